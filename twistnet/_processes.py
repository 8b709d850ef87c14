"""
``--processes N``: N reactors behind one listening address, supervised by one twistd.

The parent claims every address once, exclusively, so a second instance on the same port still
fails with "address in use" and ``--port 0`` gives one port for all; it then holds the port
with a ``SO_REUSEPORT`` socket that never listens (so it never takes a share of connections),
and each of N children, an ordinary ``twistd -n`` of the same service, listens on the address
with its own ``SO_REUSEPORT`` socket (adopted with ``IReactorSocket.adoptStreamPort``): the
kernel spreads connections evenly across them. One accept queue shared by all children (the
classic pre-fork) was measured first and rejected: epoll wakes the most recent waiter, so 40
connections in a row all went to one child (docs/architecture.md says more). The parent
stays small: it builds no service, only spawns, relays the children's log lines into its own
log, restarts a child that dies (with backoff), and forwards SIGTERM and SIGHUP.

Children die with the parent even when it is SIGKILLed: each asks the kernel for SIGTERM when
its parent goes (``PR_SET_PDEATHSIG``), and checks at start that the parent it was spawned by
is still there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import FileLogObserver, Logger, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from twistnet._connections import reactor_or_global
from twistnet._internals import parse_description, tls_context_factory

log = Logger()

#: The environment the parent passes its children: the addresses to listen on, in the order
#: of the endpoint descriptions, and the parent's pid.
ADDRESSES_VARIABLE = "TWISTNET_LISTEN"
PARENT_VARIABLE = "TWISTNET_PARENT_PID"
#: Which child this is (1 to N), for what each child must hold alone (its --metrics port).
INDEX_VARIABLE = "TWISTNET_CHILD"
#: A child that lived this long before dying restarts at once; quicker deaths back off.
HEALTHY_SECONDS = 10.0
#: The longest wait before restarting a child that keeps dying at start.
MAX_BACKOFF_SECONDS = 30.0
#: How long the parent waits for children to drain on SIGTERM before it kills them.
STOP_GRACE_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1
#: The endpoint kinds children can share: a TCP port, bare or under TLS (C{ssl:}).
SHARED_KINDS = ("tcp", "tcp6", "ssl")


def process_count(value: str) -> int:
    """Coerce --processes: a whole number of 1 or more, or C{auto} for one per CPU."""
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"expected a number of processes or 'auto', got {value!r}") from None
    if count < 1:
        raise ValueError(f"expected 1 or more processes, got {count}")
    return count


process_count.coerceDoc = "A whole number, 1 or more, or auto (one per CPU)."  # type: ignore[attr-defined]


def processes_option() -> list:
    return [
        "processes",
        None,
        1,
        "Worker processes sharing the listening address, each its own reactor on its own core; "
        "caps such as --max-connections apply per process",
        process_count,
    ]


def refuse_processes(options: usage.Options, why: str | None) -> None:
    """
    Refuse --processes above 1 for a service that cannot run so (C{why}), or over a listener
    children cannot share: TCP and TLS are shared (each child wraps its own listener in TLS);
    a UNIX socket or a systemd-activated one is not.
    """
    if options["processes"] == 1:
        return
    if why is not None:
        raise usage.UsageError(f"--processes {options['processes']}: {why}")
    for description in options.endpoint_descriptions():
        kind = parse_description(description)[0][0]
        if kind not in SHARED_KINDS:
            raise usage.UsageError(
                f"--processes {options['processes']} shares TCP and TLS listeners only, not "
                f"{description!r}: run one process per UNIX or systemd listener instead."
            )


# --- the parent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where the children listen: the parent holds it, each child adds its own listener."""

    family: int
    host: str
    port: int
    backlog: int

    def encode(self) -> str:
        return f"{self.family},{self.host},{self.port},{self.backlog}"

    @classmethod
    def decode(cls, text: str) -> Address:
        family, host, port, backlog = text.split(",")
        return cls(int(family), host, int(port), int(backlog))


def bind(name: str, descriptions: Iterable[str]) -> tuple[list[socket.socket], list[Address]]:
    """
    Claim every TCP address now, in the foreground; a failure is one line and exit 1.

    Each address is first bound exclusively (so another process holding it, a second
    instance included, is refused as before), then held by a C{SO_REUSEPORT} socket that
    never listens: it keeps the port for the family while the children's own listeners
    (C{SO_REUSEPORT}, same user) share the connections, spread evenly by the kernel.
    """
    held, addresses = [], []
    for description in descriptions:
        args, kwargs = parse_description(description)
        interface = kwargs.get("interface", "")
        family = socket.AF_INET6 if args[0] == "tcp6" or ":" in interface else socket.AF_INET
        port = int(args[1])
        try:
            if port:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((interface, port))
            sock = _reuseport_socket(family)
            sock.bind((interface, port))
        except OSError as error:
            where = f"{interface}:{port}" if interface else f"port {port} (all interfaces)"
            raise SystemExit(f"{name}: cannot listen on {where}: {error}") from None
        host, bound = sock.getsockname()[:2]
        log.info(
            "{service} listening on {host}:{port} ({description})",
            service=name,
            host=host,
            port=bound,
            description=description,
        )
        held.append(sock)
        addresses.append(Address(family, interface, bound, int(kwargs.get("backlog", 50))))
    return held, addresses


def _reuseport_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As Twisted's own TCP ports: a restart may bind while old connections linger.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


class _Child(protocol.ProcessProtocol):
    """One child: its log lines relayed, its end reported to the supervisor."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = supervisor.clock.seconds()
        self._partial = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            log.info(
                "[child {index}] {line}", index=self.index, line=line.decode("utf-8", "replace")
            )

    def processEnded(self, reason) -> None:
        if self._partial:
            self.childDataReceived(1, b"\n")
        self.supervisor.ended(self, reason.value)


class Supervisor(Service):
    """Keeps N children of the same service running on the parent's listening sockets."""

    def __init__(
        self,
        count: int,
        held: list[socket.socket],
        addresses: list[Address],
        argv: list[str],
        reactor=None,
    ) -> None:
        reactor = reactor_or_global(reactor)
        self.count = count
        self.held = held
        self.addresses = addresses
        self.argv = argv
        self.reactor = reactor
        self.clock = reactor
        self.children: dict[int, tuple[_Child, object]] = {}
        self._quick_deaths: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._stopping: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._forward_hup)
        for index in range(1, self.count + 1):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        child = _Child(self, index)
        env = dict(os.environ)
        env[ADDRESSES_VARIABLE] = ";".join(address.encode() for address in self.addresses)
        env[PARENT_VARIABLE] = str(os.getpid())
        env[INDEX_VARIABLE] = str(index)
        transport = self.reactor.spawnProcess(
            child, self.argv[0], self.argv, env=env, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.children[index] = (child, transport)
        log.info("started child {index} (pid {pid})", index=index, pid=transport.pid)

    def ended(self, child: _Child, reason: BaseException) -> None:
        index = child.index
        if self.children.get(index, (None,))[0] is not child:
            return
        del self.children[index]
        how = _how_it_ended(reason)
        if self._stopping is not None:
            log.info("child {index} exited ({how})", index=index, how=how)
            if not self.children:
                self._stopping.callback(None)
            return
        lived = self.clock.seconds() - child.started
        deaths = 0 if lived >= HEALTHY_SECONDS else self._quick_deaths.get(index, 0) + 1
        self._quick_deaths[index] = deaths
        delay = 0.0 if deaths == 0 else min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (deaths - 1))
        log.warn(
            "child {index} died ({how}) after {lived:.1f} s; restarting it in {delay:g} s",
            index=index,
            how=how,
            lived=lived,
            delay=delay,
        )
        self._restarts[index] = self.clock.callLater(delay, self.spawn, index)

    def _forward_hup(self, signum, frame) -> None:
        self.reactor.callFromThread(self._hup)

    def _hup(self) -> None:
        self.signal_children(signal.SIGHUP)
        log.info("forwarded SIGHUP to {count} children", count=len(self.children))

    def signal_children(self, signum: int) -> None:
        for _, transport in list(self.children.values()):
            try:
                transport.signalProcess(signum)
            except Exception:  # already gone: its processEnded is on the way
                log.debug("child already gone")

    def stopService(self):
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        for sock in self.held:
            sock.close()  # the children's own listeners stop as they drain
        if not self.children:
            return defer.succeed(None)
        self._stopping = defer.Deferred()
        self.signal_children(signal.SIGTERM)
        killer = self.clock.callLater(STOP_GRACE_SECONDS, self.signal_children, signal.SIGKILL)

        def done(result):
            if killer.active():
                killer.cancel()
            return result

        return self._stopping.addBoth(done)


def _how_it_ended(reason: BaseException) -> str:
    code = getattr(reason, "exitCode", None)
    sig = getattr(reason, "signal", None)
    if sig:
        return f"signal {signal.Signals(sig).name}"
    return f"exit status {code}"


def child_argv(plugin: str, argv: list[str], reactor: str | None = None) -> list[str]:
    """
    The command of one child: the same service in the foreground, one process, on the
    C{reactor} the operator gave the parent (C{twistd --reactor}); with none, the child
    picks the same default as the parent did.
    """
    twistd = Path(sys.executable).with_name("twistd")
    command = [str(twistd)] if twistd.exists() else [sys.executable, "-m", "twisted", "twistd"]
    return [
        *command,
        *(["--reactor", reactor] if reactor else []),
        "-n",
        "--pidfile=",
        f"--logger={__name__}.child_log_observer",
        plugin,
        *argv,
        "--processes",
        "1",
    ]


def child_log_observer():
    """twistd --logger for a child: plain lines on stdout, the parent adds time and origin."""

    def format_line(event) -> str:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        namespace = event.get("log_namespace", "-")
        level = getattr(event.get("log_level"), "name", "-")
        return f"[{namespace}#{level}] {text}\n"

    return FileLogObserver(sys.stdout, format_line)


# --- a child -----------------------------------------------------------------------------------


def own_endpoint(description: str) -> str:
    """
    C{description} for this process alone: in child I{i} of --processes, a TCP port P
    becomes P + i - 1 (port 0 stays 0), so each child serves its own --metrics; elsewhere
    unchanged.
    """
    index = int(os.environ.get(INDEX_VARIABLE, "0"))
    if index <= 1:
        return description
    args, kwargs = parse_description(description)
    if args[0] not in ("tcp", "tcp6") or int(args[1]) == 0:
        return description
    escaped = [f"{key}={value.replace(':', chr(92) + ':')}" for key, value in kwargs.items()]
    return ":".join([args[0], str(int(args[1]) + index - 1), *escaped])


def inherited_addresses() -> list[Address] | None:
    """
    In a child, the addresses the parent holds for it (consumed once), after asking to die
    with the parent; C{None} in any other process.
    """
    value = os.environ.pop(ADDRESSES_VARIABLE, None)
    if value is None:
        return None
    _die_with_parent(int(os.environ.pop(PARENT_VARIABLE, "0")))
    # The parent forwards SIGHUP; no service that runs under it acts on one, and its default
    # action would kill the child and cut every client.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return [Address.decode(text) for text in value.split(";") if text]


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warn("cannot ask to die with the parent: errno {errno}", errno=ctypes.get_errno())
    if parent and os.getppid() != parent:
        # The parent died before the request took effect: nobody will stop this child.
        raise SystemExit("twistnet: the supervising process is gone")


class SharedPort(Service):
    """
    Serves C{factory} on this child's own listener at the address the parent holds for
    C{description}; under TLS for an C{ssl:} description, wrapped as C{SSL4ServerEndpoint}
    wraps it, with the key and certificate the description names.
    """

    def __init__(self, name: str, address: Address, description: str, factory, reactor=None):
        reactor = reactor_or_global(reactor)
        self.name = name
        self.address = address
        self.kind = parse_description(description)[0][0]
        if self.kind == "ssl":
            factory = TLSMemoryBIOFactory(tls_context_factory(description), False, factory)
        self.factory = factory
        self.reactor = reactor
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        address = self.address
        with _reuseport_socket(address.family) as sock:
            try:
                sock.bind((address.host, address.port))
                sock.listen(address.backlog)
            except OSError as error:
                raise CannotListenError(address.host, address.port, error) from None
            # adoptStreamPort needs it: a blocking accept would stall the whole reactor.
            sock.setblocking(False)
            # The reactor keeps its own duplicate of the descriptor.
            self.port = self.reactor.adoptStreamPort(sock.fileno(), address.family, self.factory)
        host = self.port.getHost()
        log.info(
            "{service} serving {host}:{port} (shared, {kind})",
            service=self.name,
            kind=self.kind,
            host=host.host,
            port=host.port,
        )

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None
