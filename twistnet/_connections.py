"""
What every twistnet TCP service shares: admission decided by the factory under a connection
cap (evicting the longest-waiting connection before refusing anyone), an idle timeout that
counts only what the client sends, refusals summarized in the log, and a registry that closes
every connection on shutdown.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.logger import Logger

#: How long a closing connection may take to flush before it is aborted: a client that
#: never reads must not keep a connection (and its buffer) alive forever.
CLOSE_GRACE_SECONDS = 5.0

#: How long a connection may wait without speaking before it can be evicted for a newcomer:
#: a burst of fresh connections is refused at the cap rather than churned through, while
#: sockets that sit silent (or trickle a request) for longer make room.
EVICTION_GRACE_SECONDS = 1.0


class ConnectionCounts:
    """
    What happened to a service's connections since start, for its metrics: plain integers
    the hot path bumps with one addition, which the collector reads at scrape time.

    @ivar refused: connections turned away, by reason (C{max_connections}: refused at the
        cap; twistnet-http also C{max_requests}).
    @ivar closed: connections gone, by L{ManagedProtocol.close_reason} (C{normal} when
        nothing else was recorded: the client left or the conversation ended).
    """

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.closed: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.lines_in = 0
        #: Lines not passed on, by reason (chat: C{max_line}, C{rate}).
        self.lines_refused: collections.Counter[str] = collections.Counter()


#: The close reason of a connection nobody closed for a reason of ours.
NORMAL = "normal"


def reactor_or_global(reactor=None):
    """C{reactor} if one is injected (a test's clock or fake reactor), else the global one."""
    if reactor is None:
        from twisted.internet import reactor
    return reactor


def peer_name(transport: object) -> str:
    """A short printable name for the peer of C{transport}, for log lines."""
    try:
        peer = transport.getPeer()  # type: ignore[attr-defined]
    except Exception:
        return "?"
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if host is None:
        return str(getattr(peer, "name", None) or "unix")
    return f"{host}:{port}"


class IdleTimer:
    """
    Calls C{on_idle} once no activity was recorded for C{timeout} seconds.

    L{touch} only stores a timestamp, so recording activity for every chunk costs one clock
    read; the single delayed call re-arms itself for the remaining time when it fires.
    """

    def __init__(self, clock: IReactorTime, timeout: float, on_idle: Callable[[], None]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._on_idle = on_idle
        self._last = clock.seconds()
        self._call: IDelayedCall | None = None
        if timeout > 0:
            self._call = clock.callLater(timeout, self._check)

    def touch(self) -> None:
        self._last = self._clock.seconds()

    def restart(self) -> None:
        """Count a full timeout again from now, also after the timer has fired."""
        self.touch()
        if self._timeout > 0 and self._call is None:
            self._call = self._clock.callLater(self._timeout, self._check)

    def _check(self) -> None:
        remaining = self._last + self._timeout - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._check)
        else:
            self._call = None
            self._on_idle()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class ConnectionRegistry:
    """
    The open connections of one service: the cap, the order in which unproductive ones
    make room, and the set that shutdown closes.

    A connection is I{waiting} while it has not done anything worth its slot yet (for
    HTTP: between requests or while a request is still arriving; for chat and log: before
    its first complete line; for echo: before its first byte). When the cap is reached, the
    connection that has been waiting longest, if longer than L{EVICTION_GRACE_SECONDS}, is
    closed to make room for a newcomer, so connections that never speak, or trickle a
    request they never finish, cannot lock anyone out; connections doing real work are
    never evicted for a newcomer.

    @ivar max_connections: the most connections open at once; C{0} means no cap.
    """

    def __init__(self, max_connections: int = 0, clock: IReactorTime | None = None) -> None:
        self.max_connections = max_connections
        self.clock: IReactorTime = reactor_or_global(clock)
        self._open: dict[protocol.Protocol, None] = {}
        #: The waiting connections and since when, oldest first (dicts keep insertion order).
        self._waiting: dict[protocol.Protocol, float] = {}
        #: Evicted but not gone yet: no longer counted, still closed at shutdown.
        self._leaving: set[protocol.Protocol] = set()
        self._gone: list[defer.Deferred[None]] = []
        self.counts = ConnectionCounts()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self):
        return iter([*self._open, *self._leaving])

    @property
    def full(self) -> bool:
        return bool(self.max_connections) and len(self._open) >= self.max_connections

    def make_room(self) -> protocol.Protocol | None:
        """
        Stop counting the longest-waiting connection and return it for the caller to close;
        C{None} if none has waited past the grace (then the newcomer must be refused).
        """
        oldest = next(iter(self._waiting), None)
        if oldest is None or self._waiting[oldest] > self.clock.seconds() - EVICTION_GRACE_SECONDS:
            return None
        del self._waiting[oldest]
        del self._open[oldest]
        self._leaving.add(oldest)
        oldest.close_reason = "evicted"
        return oldest

    def admit(self, proto: protocol.Protocol) -> None:
        """Count C{proto} as open, and as waiting until L{working} says otherwise."""
        self.counts.accepted += 1
        self._open[proto] = None
        self._waiting[proto] = self.clock.seconds()

    def working(self, proto: protocol.Protocol) -> None:
        """C{proto} is doing real work: it is no longer the first to make room."""
        self._waiting.pop(proto, None)

    def waiting(self, proto: protocol.Protocol) -> None:
        """C{proto} is idle again (an HTTP connection between requests): newest in line."""
        if proto in self._open:
            self._waiting.pop(proto, None)
            self._waiting[proto] = self.clock.seconds()

    def release(self, proto: protocol.Protocol) -> None:
        self.counts.closed[getattr(proto, "close_reason", NORMAL)] += 1
        self._open.pop(proto, None)
        self._waiting.pop(proto, None)
        self._leaving.discard(proto)
        if not self._open and not self._leaving:
            waiting, self._gone = self._gone, []
            for d in waiting:
                d.callback(None)

    def close_all(self, notice: bytes = b"", grace: float = CLOSE_GRACE_SECONDS):
        """
        Write C{notice} to every open connection, close them all and fire once they are gone.

        Connections still open after C{grace} seconds (a peer that does not read) are aborted.
        """
        if not self._open and not self._leaving:
            return defer.succeed(None)
        gone: defer.Deferred[None] = defer.Deferred()
        self._gone.append(gone)
        for proto in list(self):
            if proto.transport is None:
                continue
            if getattr(proto, "close_reason", NORMAL) == NORMAL:
                proto.close_reason = "shutdown"
            if notice:
                proto.transport.write(notice)
            proto.hang_up()
        return gone


def send_at_once(transport) -> None:
    """
    Turn Nagle's algorithm off (TCP_NODELAY), as asyncio and uvloop do for every TCP
    connection: a reply is sent whole and at once, so holding it back for an ACK only adds
    latency (and, measured, costs CPU per message). A no-op on transports without TCP.
    """
    if ITCPTransport.providedBy(transport):
        try:
            transport.setTcpNoDelay(True)
        except OSError:  # a UNIX socket: tcp.Server underneath, but no TCP options
            pass


def hang_up(
    transport, clock: IReactorTime, grace: float = CLOSE_GRACE_SECONDS
) -> IDelayedCall | None:
    """
    Close C{transport} once its output is flushed, and abort it if that takes longer than
    C{grace} seconds: a peer that never reads must not keep a connection (and its buffer)
    alive. Returns the abort call, for the protocol to cancel in C{connectionLost}.
    """
    if getattr(transport, "producer", None) is transport:
        # A transport registered as its own producer (echo backpressure) would otherwise wait
        # for itself to finish before closing.
        transport.unregisterProducer()
    transport.loseConnection()
    if getattr(transport, "abortConnection", None) is None:
        return None
    return clock.callLater(grace, _abort_if_open, transport)


def _abort_if_open(transport) -> None:
    if getattr(transport, "connected", True) and not getattr(transport, "disconnected", False):
        transport.abortConnection()


class RefusalLog:
    """
    Logs refused and evicted connections without letting a flood flood the log: the first
    after a quiet second is logged at once with its peer, the rest are counted by reason and
    summarized in one line a second later.
    """

    def __init__(self, logger: Logger, clock: IReactorTime, interval: float = 1.0) -> None:
        self._log = logger
        self._clock = clock
        self._interval = interval
        self._counts: collections.Counter[str] = collections.Counter()
        self._summary: IDelayedCall | None = None
        #: Every refusal and eviction since start, by reason (for metrics and tests).
        self.totals: collections.Counter[str] = collections.Counter()

    def record(self, reason: str, peer: str) -> None:
        self.totals[reason] += 1
        if self._summary is None:
            self._log.info("{reason}: {peer}", reason=reason, peer=peer)
            self._summary = self._clock.callLater(self._interval, self._summarize)
        else:
            self._counts[reason] += 1

    def _summarize(self) -> None:
        self._summary = None
        if not self._counts:
            return
        total = sum(self._counts.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in self._counts.most_common())
        self._counts.clear()
        self._log.info(
            "{total} more connections turned away in {seconds:g} s: {reasons}",
            total=total,
            seconds=self._interval,
            reasons=reasons,
        )
        # Keep summarizing while it lasts: the next one is counted, not logged alone.
        self._summary = self._clock.callLater(self._interval, self._summarize)

    def stop(self) -> None:
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None
        self._summarize()
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None


class Refused(protocol.Protocol):
    """A connection turned away at the cap: its own small protocol, which says C{message}
    (if the service speaks at all), ignores what the client sends and hangs up."""

    def __init__(self, message: bytes, clock: IReactorTime) -> None:
        self._message = message
        self._clock = clock
        self._abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self._message:
            self.transport.write(self._message)
        self._abort = hang_up(self.transport, self._clock)

    def dataReceived(self, data: bytes) -> None:
        """Whatever a refused client already sent is not for this service to act on."""

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()


class ManagedFactory(protocol.Factory):
    """
    The base of twistnet's factories: it decides admission (as Twisted's
    C{policies.LimitTotalConnectionsFactory} does, in L{buildProtocol}), holds the registry
    that shutdown closes, the idle timeout its protocols apply, and the refusal log.

    At the cap, the longest-waiting connection is evicted for the newcomer; only when every
    connection is doing real work is the newcomer refused, through L{Refused}.
    """

    noisy = False
    logger = Logger()
    #: The option that sets the cap, as the operator typed it, for log lines.
    cap_option = "--max-connections"
    #: Sent to a client refused at the cap (empty: hang up without a word).
    full_message = b"Server is full, try again later.\r\n"

    def __init__(
        self, max_connections: int = 0, idle_timeout: float = 0.0, clock: IReactorTime | None = None
    ) -> None:
        self.clock: IReactorTime = reactor_or_global(clock)
        self.registry = ConnectionRegistry(max_connections, self.clock)
        self.counts = self.registry.counts
        self.idle_timeout = idle_timeout
        self.refusals = RefusalLog(self.logger, self.clock)

    def buildProtocol(self, addr):
        registry = self.registry
        if registry.full:
            cap = f"{self.cap_option} {registry.max_connections}"
            evicted = registry.make_room()
            if evicted is None:
                self.counts.refused["max_connections"] += 1
                self.refusals.record(f"refused at {cap}", _address(addr))
                return Refused(self.refusal(), self.clock)
            self.refusals.record(f"evicted (waited longest) at {cap}", peer_name(evicted.transport))
            evicted.evict()
        return super().buildProtocol(addr)

    def refusal(self) -> bytes:
        """What a client refused at the cap is told (empty: hang up without a word)."""
        return self.full_message

    def stopFactory(self) -> None:
        self.refusals.stop()
        super().stopFactory()


def _address(addr) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    return f"{host}:{port}" if host is not None else str(getattr(addr, "name", None) or "unix")


class ManagedProtocol(protocol.Protocol):
    """
    Base of twistnet's TCP protocols, built by a L{ManagedFactory}: registration for
    admission and shutdown, and the idle timeout.

    Subclasses implement L{connectionAdmitted} instead of C{connectionMade}, call L{spoke}
    from C{dataReceived} when the client completed something, and call L{close} to hang up.
    """

    #: Sent to a client closed by --idle-timeout, or evicted to make room.
    idle_message = b"Idle timeout, closing.\r\n"
    evicted_message = b""

    idle: IdleTimer | None = None
    #: Why the connection is closed, for the metrics; set where we decide to close it.
    close_reason = NORMAL
    #: Whether the client has spoken: it is then no longer evicted to make room.
    working = False
    _abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        factory: ManagedFactory = self.factory
        factory.registry.admit(self)
        self.idle = IdleTimer(factory.clock, factory.idle_timeout, self._idled)
        self.connectionAdmitted()

    def connectionAdmitted(self) -> None:
        """Called once the connection was admitted under the cap."""

    def spoke(self) -> None:
        """
        The client completed something (a line; for echo, any byte): it is not idle, and no
        longer the first evicted when the service is full.
        """
        self.idle.touch()
        if not self.working:
            self.working = True
            self.factory.registry.working(self)

    def evict(self) -> None:
        """Closed to make room for a newcomer at the cap."""
        self.close(self.evicted_message)

    def _idled(self) -> None:
        self.close_reason = "idle"
        self.factory.logger.info("closing idle connection {peer}", peer=peer_name(self.transport))
        self.close(self.idle_message)

    def close(self, message: bytes = b"") -> None:
        """Say C{message}, flush and close; abort if the peer does not read it in time."""
        if message:
            self.transport.write(message)
        self.hang_up()

    def hang_up(self) -> None:
        if self._abort is None or not self._abort.active():
            self._abort = hang_up(self.transport, self.factory.clock)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if self.idle is not None:
            self.idle.stop()
        try:
            self.connectionClosed(reason)
        finally:
            # Last: releasing the last connection lets a shutdown go on (close files etc.).
            self.factory.registry.release(self)

    def connectionClosed(self, reason) -> None:
        """
        Called when the connection is gone, before it is released, so what it still has
        to hand over (a final line) reaches shared state before shutdown.
        """


class ConnectionCloser(Service):
    """
    Closes every open connection when the service stops (SIGTERM), after the listeners.

    Add it to the service's L{MultiService} before the listening services: a MultiService
    stops its children in reverse order, so listening stops first and no newcomer slips in.
    """

    def __init__(self, registry: ConnectionRegistry, notice: bytes = b"") -> None:
        self.registry = registry
        self.notice = notice

    def stopService(self):
        super().stopService()
        return self.registry.close_all(self.notice)
