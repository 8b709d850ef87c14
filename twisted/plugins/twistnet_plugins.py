"""twistd plugins for the twistnet services; the options and services live in twistnet."""

from twisted.application.service import ServiceMaker

twistnet_echo = ServiceMaker(
    "twistnet echo", "twistnet.echo", "RFC 862 echo over TCP and UDP.", "twistnet-echo"
)
twistnet_log = ServiceMaker(
    "twistnet line logging",
    "twistnet.log",
    "Write every line clients send to a log file, none lost.",
    "twistnet-log",
)
twistnet_chat = ServiceMaker(
    "twistnet chat",
    "twistnet.chat",
    "Broadcast chat for telnet and netcat users.",
    "twistnet-chat",
)
twistnet_http = ServiceMaker(
    "twistnet HTTP jobs",
    "twistnet.http",
    "HTTP job endpoint: POST a job for a configured tool, poll its JSON result.",
    "twistnet-http",
)
