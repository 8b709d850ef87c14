"""
The twistd face every twistnet service shares: common options and listening services.

``--port N`` is shorthand for the endpoint ``tcp:N``; ``--listen`` takes any Twisted server
endpoint description and may be repeated (it overrides ``--port``), so TLS (``ssl:``), UNIX
sockets and systemd socket activation come for free.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterable

from twisted.application import internet, strports
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from twistnet import _processes
from twistnet._internals import forget_sigterm_at_exit

log = Logger()

#: Listen backlog of --port and the default endpoint. Twisted's own default of 50 makes a burst
#: of connections (a flood, a restart with many clients reconnecting) wait on SYN retries for
#: seconds; 511 is nginx's default and within Linux's default somaxconn (4096).
DEFAULT_BACKLOG = 511

#: The default cap on concurrent connections: far above any honest use of a small service,
#: far below the file-descriptor limits that would take the whole process down.
DEFAULT_MAX_CONNECTIONS = 1000


def port_number(value: str) -> int:
    """Coerce a TCP/UDP port number (0 asks the OS for a free one)."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    return port


port_number.coerceDoc = "A port number, 0-65535."  # type: ignore[attr-defined]


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"expected 0 or more, got {number}")
    return number


non_negative_int.coerceDoc = "A whole number, 0 or more."  # type: ignore[attr-defined]


def _not_zero(coerce: Callable[[str], int], doc: str) -> Callable[[str], int]:
    """C{coerce}, refusing 0: for a limit where 0 would mean nothing gets through."""

    def positive(value: str) -> int:
        number = coerce(value)
        if number == 0:
            raise ValueError("expected 1 or more, got 0")
        return number

    positive.coerceDoc = doc  # type: ignore[attr-defined]
    return positive


positive_int = _not_zero(non_negative_int, "A whole number, 1 or more.")


def one_of(choices: Iterable[str]) -> Callable[[str], str]:
    """A coercer that takes exactly one of C{choices} and names them all when refusing."""
    choices = tuple(choices)
    listed = ", ".join(choices)

    def choice(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {listed}, got {value!r}")
        return value

    choice.coerceDoc = f"{', '.join(choices[:-1])} or {choices[-1]}."  # type: ignore[attr-defined]
    return choice


def non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"expected a finite number, 0 or more, got {value!r}")
    return number


non_negative_float.coerceDoc = "A number, 0 or more."  # type: ignore[attr-defined]


#: Size suffixes, binary as operators expect of buffer and file sizes: 4K is 4,096 bytes.
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def byte_size(value: str) -> int:
    """Coerce a size in bytes, optionally with a K, M or G (binary) suffix."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in ("K", "M", "G") else ""
    try:
        number = int(text[: len(text) - len(unit)])
    except ValueError:
        raise ValueError(f"expected a size in bytes such as 65536 or 10M, got {value!r}") from None
    if number < 0:
        raise ValueError(f"expected a size of 0 or more, got {value!r}")
    return number * _UNITS[unit]


byte_size.coerceDoc = "Bytes, or with a K, M or G suffix."  # type: ignore[attr-defined]


positive_byte_size = _not_zero(byte_size, "Bytes (1 or more), or with a K, M or G suffix.")


class _EndpointCheckReactor:
    """Stands in for the reactor while a description is parsed but not yet listened on."""


def check_endpoint(description: str, option: str = "--listen") -> str:
    """Parse a server endpoint description now, so a typo is a usage error, not a traceback."""
    try:
        endpoints.serverFromString(_EndpointCheckReactor(), description)
    except Exception as error:
        raise usage.UsageError(f"{option} {description!r}: {error}") from None
    return description


class ServiceOptions(usage.Options):
    """
    Options every twistnet service shares. Subclasses set L{default_port} and
    L{default_interface} and extend C{optParameters}.
    """

    #: The port used when neither --port nor --listen is given.
    default_port = 0
    #: The interface the default and --port endpoints bind; "" means all interfaces.
    default_interface = ""
    #: The twistd plugin name, as log lines and --processes children use it.
    service_name = "twistnet"

    optParameters: list = []

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        #: The arguments as given, so --processes can start children with the same ones.
        self.argv: list[str] = []

    def parseOptions(self, options=None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def append_coerced(self, option: str, coerce: Callable[[str], object], value: str) -> None:
        """Add C{value}, coerced, to the list of a repeatable C{option}; a ValueError is a
        usage error naming the option."""
        try:
            self[option].append(coerce(value))
        except ValueError as error:
            raise usage.UsageError(f"--{option}: {error}") from None

    def opt_listen(self, description: str) -> None:
        self["listen"].append(check_endpoint(description))

    # One line, as --help shows it (a docstring's indentation would show too).
    opt_listen.__doc__ = (
        "Listen on a server endpoint description, e.g. tcp:7007:interface=127.0.0.1 or "
        "ssl:7443:privateKey=key.pem:certKey=cert.pem; repeatable, overrides --port."
    )

    def opt_version(self) -> None:
        """Display the twistnet and Twisted versions and exit."""
        from twisted import __version__ as twisted_version
        from twistnet import __version__

        print(f"twistnet {__version__} (Twisted {twisted_version})")
        raise SystemExit(0)

    def endpoint_descriptions(self) -> list[str]:
        """The descriptions to listen on: every --listen, else --port, else the default."""
        if self["listen"]:
            return list(self["listen"])
        port = self["port"] if self["port"] is not None else self.default_port
        description = f"tcp:{port}:backlog={DEFAULT_BACKLOG}"
        if self.default_interface:
            description += f":interface={self.default_interface}"
        return [description]


def connection_options(default_max: int = DEFAULT_MAX_CONNECTIONS) -> list:
    """The optParameters of a TCP service: --port, --max-connections and --idle-timeout."""
    return [
        [
            "port",
            "p",
            None,
            f"TCP port to listen on (shorthand for --listen tcp:PORT:backlog={DEFAULT_BACKLOG})",
            port_number,
        ],
        [
            "max-connections",
            None,
            default_max,
            "Most open connections (0 = no cap). At the cap, the connection silent longest "
            "(past a second) is closed to make room; if none is, the newcomer is turned away.",
            non_negative_int,
        ],
        [
            "idle-timeout",
            None,
            0.0,
            "Close a connection after this many seconds without input from it (0 = off).",
            non_negative_float,
        ],
        _processes.processes_option(),
    ]


class ServiceRoot(MultiService):
    """
    The top service of a twistnet service: a port that cannot be bound (in use, no
    permission) ends twistd with one clear line and a non-zero exit instead of a traceback.
    """

    #: Set once every port is bound (early, in daemon mode: see L{for_twistd}).
    _bound = False

    def __init__(self, name: str, reactor=None) -> None:
        super().__init__()
        self.service_name = name
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        if self._reactor is None:
            # Only under the real, global reactor (twistd), never a test's fake one. Twisted
            # installs its own handlers as the reactor starts: take SIGTERM back after that.
            from twisted.internet import reactor

            reactor.callWhenRunning(_exit_zero_on_sigterm, reactor, self.service_name)

    def privilegedStartService(self) -> None:
        if self._bound:
            return
        if self._reactor is None:
            # From before the first port is bound, so a SIGTERM at any moment is a clean stop.
            from twisted.internet import reactor

            _exit_zero_on_sigterm(reactor, self.service_name)
            forget_sigterm_at_exit(reactor)
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            where = (
                f"{error.interface}:{error.port}"
                if error.interface
                else f"port {error.port} (all interfaces)"
            )
            raise SystemExit(
                f"{self.service_name}: cannot listen on {where}: {error.socketError}"
            ) from None
        self._bound = True


def for_twistd(make_service: Callable[..., ServiceRoot]) -> Callable[..., ServiceRoot]:
    """
    Wraps a service's C{makeService} so that, when twistd will daemonize, every port is bound
    at once, in the foreground.

    twistd forks before it starts services, and a start-up failure after the fork never
    reaches the terminal: its status pipe carries only an C{Exception} (shown as a bytes
    repr), and the C{SystemExit} of a busy port is none, so the parent waited forever.
    Bound here, a refusal is one readable line and exit status 1, before any pidfile or log
    file exists; the ports are inherited by the daemon.
    """

    @functools.wraps(make_service)
    def makeService(options: usage.Options, reactor=None) -> ServiceRoot:
        if options.get("processes", 1) > 1:
            return _supervising(options, reactor)
        root = make_service(options, reactor)
        if reactor is None and _daemonizing(options):
            root.privilegedStartService()
        return root

    return makeService


def _supervising(options: usage.Options, reactor=None) -> ServiceRoot:
    """The parent of --processes N: it binds, then only supervises the children."""
    name = options.service_name
    root = ServiceRoot(name, reactor)
    held, addresses = _processes.bind(name, options.endpoint_descriptions())
    twistd = getattr(options, "parent", None)
    argv = _processes.child_argv(name, options.argv, twistd.get("reactor") if twistd else None)
    supervisor = _processes.Supervisor(options["processes"], held, addresses, argv, reactor)
    supervisor.setServiceParent(root)
    return root


def _daemonizing(options: usage.Options) -> bool:
    """Whether twistd, whose subcommand C{options} are, will fork into the background."""
    twistd = getattr(options, "parent", None)
    return twistd is not None and not twistd.get("nodaemon", True)


def _exit_zero_on_sigterm(reactor, name: str) -> None:
    """
    Make SIGTERM an orderly stop with exit status 0.

    Twisted's own handler makes twistd re-raise the signal at exit, so a deliberate, clean
    stop looks like a crash (status 143) to scripts and supervisors that check the status.
    """

    def on_sigterm(signum, frame) -> None:
        # A second SIGTERM (a supervisor and `uv run` both forwarding one) changes nothing.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.info("{service} received SIGTERM, shutting down", service=name)
        reactor.callFromThread(_stop, reactor)

    signal.signal(signal.SIGTERM, on_sigterm)


def _stop(reactor) -> None:
    if reactor.running:
        reactor.stop()


@implementer(IStreamServerEndpoint)
class AnnouncingEndpoint:
    """Wraps an endpoint to log, once listening, what listens where."""

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        name: str,
        description: str,
        serving: str = "listening on",
    ) -> None:
        self._wrapped = wrapped
        self._name = name
        self._description = description
        self._serving = serving

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        def announce(port: IListeningPort) -> IListeningPort:
            address = port.getHost()
            host = getattr(address, "host", None)
            where = f"{host}:{address.port}" if host is not None else str(address)
            log.info(
                "{service} {serving} {where} ({description})",
                service=self._name,
                serving=self._serving,
                where=where,
                description=self._description,
            )
            return port

        return self._wrapped.listen(factory).addCallback(announce)


def listening_services(
    name: str,
    descriptions: Iterable[str],
    factory: IProtocolFactory,
    reactor=None,
    parent: MultiService | None = None,
    serving: str = "listening on",
) -> MultiService:
    """
    A service listening with C{factory} on every description. Built with
    C{strports.service}, which makes twistd exit when a port cannot be bound. Each port is
    announced as "C{name} C{serving} host:port (description)".
    """
    parent = parent if parent is not None else ServiceRoot(name, reactor)
    shared = _processes.inherited_addresses()
    if shared is not None:
        # A child of --processes: the parent holds these addresses, in the same order.
        for address, description in zip(shared, descriptions, strict=True):
            shared_port = _processes.SharedPort(name, address, description, factory, reactor)
            shared_port.setServiceParent(parent)
        return parent
    for description in descriptions:
        listener = strports.service(description, factory, reactor=reactor)
        listener.endpoint = AnnouncingEndpoint(listener.endpoint, name, description, serving)
        listener.setServiceParent(parent)
    return parent


#: The largest UDP payload (65,507 bytes over IPv4) fits in 65,535: a datagram is read whole.
#: Twisted's listenUDP reads only 8,192 bytes by default and silently cuts the rest.
MAX_DATAGRAM = 65535


def udp_options(what: str) -> list:
    """The optParameters of a service that also reads UDP: --udp-port and --udp-interface."""
    return [
        ["udp-port", None, None, f"{what} (off unless given)", port_number],
        ["udp-interface", None, None, "Interface for --udp-port (default: all)."],
    ]


def udp_service(
    port: int, proto: DatagramProtocol, interface: str = "", reactor=None
) -> internet.UDPServer:
    """A UDP listener reading whole datagrams; binds (or fails) in privilegedStartService."""
    service = internet.UDPServer(port, proto, interface=interface, maxPacketSize=MAX_DATAGRAM)
    if reactor is not None:
        service.reactor = reactor
    return service


def not_yet_available(issue: str) -> Callable[[usage.Options], MultiService]:
    """A makeService for a plugin whose service has not landed: refuses with a clear message."""

    def make_service(options: usage.Options) -> MultiService:
        raise SystemExit(f"twistnet: this service is not available yet ({issue}).")

    return make_service
