"""twistd plugins for the twistnet services and their reactor; the code lives in twistnet."""

from twisted.application.reactors import Reactor

from twistnet.reactor import ServiceMaker

twistnet_reactor = Reactor(
    "twistnet",
    "twistnet.reactor",
    "epoll without the legacy log context per event; twistnet's default (Linux).",
)
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
