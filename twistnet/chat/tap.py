"""The twistd face of the chat: C{twistd -n twistnet-chat [--port 12345] [limits]}."""

from __future__ import annotations

from functools import partial

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.python import usage

from twistnet._connections import ConnectionCloser, reactor_or_global
from twistnet._processes import refuse_processes
from twistnet._tap import (
    AnnouncingEndpoint,
    ServiceOptions,
    ServiceRoot,
    byte_size,
    check_endpoint,
    connection_options,
    for_twistd,
    listening_services,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_byte_size,
    positive_int,
)
from twistnet.chat.protocol import ChatFactory, ChatLimits
from twistnet.chat.redis_room import RedisRoom, RedisUrlError, connect, parse_redis_url
from twistnet.chat.room import Room, encode_lines
from twistnet.chat.web import normal_origin, web_site
from twistnet.metrics import LineMetrics, ServiceMetrics, add_metrics_service, metrics_option

#: The port of the README's quick start, above 1024 so any user can run it.
DEFAULT_PORT = 12345

#: What everyone reads when the server stops (SIGTERM).
SHUTDOWN_NOTICE = encode_lines(["*** The server is shutting down. Goodbye."])

_DEFAULTS = ChatLimits()


class Options(ServiceOptions):
    """twistd -n twistnet-chat [--port 12345] [--max-clients N] [--rate 10] ..."""

    synopsis = "[options]"
    longdesc = (
        "A broadcast chat for telnet and nc: every line goes to everyone else in the room. "
        f"Listens on TCP port {DEFAULT_PORT} on all interfaces unless --port or --listen says "
        "otherwise. /HELP in the chat lists the commands."
    )
    default_port = DEFAULT_PORT
    service_name = "twistnet-chat"
    optParameters = [
        *connection_options(),
        [
            "max-clients",
            None,
            None,
            "Most people in the room at once; the next is told the room is full "
            "(same as --max-connections, which it overrides)",
            non_negative_int,
        ],
        [
            "history",
            None,
            20,
            "Recent messages shown to a newcomer (0 = none).",
            non_negative_int,
        ],
        [
            "max-line",
            None,
            _DEFAULTS.max_line,
            "Longest line in bytes; a longer one is refused with a message, the connection kept.",
            positive_byte_size,
        ],
        [
            "rate",
            None,
            _DEFAULTS.rate,
            "Lines per second a client may send on average; a flooder is warned, then "
            "disconnected (0 = no limit).",
            non_negative_float,
        ],
        [
            "burst",
            None,
            _DEFAULTS.burst,
            "Lines a client may send at once before --rate applies.",
            positive_int,
        ],
        [
            "sendq",
            None,
            _DEFAULTS.sendq,
            "Bytes that may wait unsent for a client that does not read before it is "
            "disconnected (0 = no cap).",
            byte_size,
        ],
        [
            "redis",
            None,
            None,
            "Share the room with other servers through Redis: redis://[user[:password]@]"
            "host:port/db, rediss://... (TLS) or unix:///path/redis.sock?db=N. "
            "Cluster and Sentinel are not supported.",
        ],
        [
            "redis-password-file",
            None,
            None,
            "Read the Redis password from this file (first line), so it is not in argv.",
        ],
        ["redis-ca", None, None, "CA certificate (PEM) to verify a rediss:// server with."],
        [
            "redis-prefix",
            None,
            "twistnet",
            "Prefix of this chat's Redis keys, so several chats can share one Redis.",
        ],
        [
            "redis-ttl",
            None,
            10.0,
            "Seconds without a heartbeat after which a server is declared dead and its "
            "members announced gone.",
            non_negative_float,
        ],
        [
            "web",
            None,
            None,
            "Also serve the chat page and its WebSocket on this TCP port "
            "(shorthand for --web-listen tcp:PORT); off by default",
            port_number,
        ],
        *metrics_option(),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["web-listen"] = []
        self["web-origin"] = []

    def opt_web_listen(self, description: str) -> None:
        self["web-listen"].append(check_endpoint(description, "--web-listen"))

    opt_web_listen.__doc__ = (
        "Serve the chat page on a server endpoint description, e.g. "
        "ssl:8443:privateKey=key.pem:certKey=cert.pem; repeatable."
    )

    def opt_web_origin(self, origin: str) -> None:
        self.append_coerced("web-origin", normal_origin, origin)

    opt_web_origin.__doc__ = (
        "Also accept pages and WebSockets from this origin (https://chat.example.org), as "
        "the page is reached through a proxy or by a DNS name; repeatable."
    )

    def web_descriptions(self) -> list[str]:
        """Where the chat page is served: every --web-listen, plus --web."""
        descriptions = list(self["web-listen"])
        if self["web"] is not None:
            descriptions.append(f"tcp:{self['web']}")
        return descriptions

    def postOptions(self) -> None:
        refuse_processes(
            self,
            None
            if self["redis"]
            else "the room lives in one process, so N processes would be N separate rooms; "
            "share it through Redis (--redis URL) or run one process.",
        )
        self["cap-option"] = "--max-connections"
        if self["max-clients"] is not None:
            self["max-connections"] = self["max-clients"]
            self["cap-option"] = "--max-clients"
        self["redis-settings"] = self._redis_settings()
        if self["web-origin"] and not self.web_descriptions():
            raise usage.UsageError("--web-origin needs --web or --web-listen")
        if self.web_descriptions() and self["processes"] != 1:
            raise usage.UsageError(
                f"--processes {self['processes']} with --web: the web page is served by "
                "one process only for now; run it with one process."
            )

    def _redis_settings(self):
        if self["redis-ttl"] == 0:
            raise usage.UsageError("--redis-ttl must be more than 0 seconds")
        if not self["redis"]:
            for option in ("redis-password-file", "redis-ca"):
                if self[option]:
                    raise usage.UsageError(f"--{option} needs --redis")
            return None
        password = None
        if self["redis-password-file"]:
            try:
                with open(self["redis-password-file"], encoding="utf-8") as file:
                    password = file.readline().rstrip("\r\n")
            except OSError as exc:
                raise usage.UsageError(
                    f"cannot read --redis-password-file: {exc.strerror}"
                ) from None
            if not password:
                raise usage.UsageError("--redis-password-file is empty")
        try:
            settings = parse_redis_url(self["redis"], password=password, ca=self["redis-ca"])
        except RedisUrlError as exc:
            raise usage.UsageError(str(exc)) from None
        if settings.ca:
            _check_ca(settings.ca)
        return settings


def _check_ca(path: str) -> None:
    """Refuse at start a --redis-ca that the first TLS connection could not use."""
    from OpenSSL.crypto import Error
    from twisted.internet.ssl import Certificate

    try:
        with open(path, "rb") as pem:
            Certificate.loadPEM(pem.read())
    except OSError as exc:
        raise usage.UsageError(f"cannot read --redis-ca: {exc.strerror}") from None
    except Error:
        raise usage.UsageError("--redis-ca is not a PEM certificate") from None


class ChatCloser(ConnectionCloser):
    """On stop, tells everyone the server is shutting down, then closes every connection."""

    def __init__(self, factory: ChatFactory) -> None:
        super().__init__(factory.registry, SHUTDOWN_NOTICE)
        self.factory = factory

    def stopService(self):
        # Everyone is leaving at once: announcing each departure to all the others would
        # be N*N lines nobody reads.
        self.factory.stopping = True
        # What people said this turn goes out before the notice, not after it.
        self.factory.flusher.flush()
        for proto in self.factory.registry:
            proto.release_transport()
        return super().stopService()


@for_twistd
def makeService(options: usage.Options, reactor=None) -> MultiService:
    limits = ChatLimits(
        max_line=options["max-line"],
        rate=options["rate"],
        burst=options["burst"],
        sendq=options["sendq"],
    )
    settings = options["redis-settings"]
    if settings is None:
        room = Room(history_size=options["history"])
    else:
        room = RedisRoom(
            partial(connect, settings),
            prefix=options["redis-prefix"],
            ttl=options["redis-ttl"],
            history_size=options["history"],
            clock=reactor,
            where=settings.safe_url,
        )
    factory = ChatFactory(
        room,
        limits,
        max_connections=options["max-connections"],
        idle_timeout=options["idle-timeout"],
        clock=reactor,
    )
    factory.cap_option = options["cap-option"]
    top = ServiceRoot("twistnet-chat", reactor)
    if settings is not None:
        room.setServiceParent(top)
    ChatCloser(factory).setServiceParent(top)
    listening_services("twistnet-chat", options.endpoint_descriptions(), factory, reactor, top)
    _web_services(options, factory, reactor, top)
    collectors = [ServiceMetrics(factory), LineMetrics(factory)]
    add_metrics_service(top, "twistnet-chat", options["metrics"], collectors, reactor)
    return top


def _web_services(options: usage.Options, factory: ChatFactory, reactor, top) -> None:
    """The chat page and its WebSocket on every --web/--web-listen (none by default)."""
    descriptions = options.web_descriptions()
    if not descriptions:
        return
    site = web_site(factory, options["web-origin"], reactor_or_global(reactor))
    for description in descriptions:
        listener = strports.service(description, site, reactor=reactor)
        listener.endpoint = AnnouncingEndpoint(
            listener.endpoint, "twistnet-chat", description, "serving its web page on"
        )
        listener.setServiceParent(top)
