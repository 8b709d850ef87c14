"""
What every twistnet TCP service shares: admission under a connection cap, an idle timeout
that counts only what the client sends, and a registry that closes every connection on
shutdown.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: How long a closing connection may take to flush before it is aborted: a client that
#: never reads must not keep a connection (and its buffer) alive forever.
CLOSE_GRACE_SECONDS = 5.0


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
    The open connections of one service, so a cap can be enforced and shutdown can close them.

    @ivar max_connections: the most connections admitted at once; C{0} means no cap.
    """

    log = Logger()

    def __init__(self, max_connections: int = 0, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.max_connections = max_connections
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self._open: set[protocol.Protocol] = set()
        self._gone: list[defer.Deferred[None]] = []
        self.refused = 0

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self):
        return iter(list(self._open))

    def admit(self, proto: protocol.Protocol) -> bool:
        """Record C{proto} as open, unless the cap is reached."""
        if self.max_connections and len(self._open) >= self.max_connections:
            self.refused += 1
            return False
        self._open.add(proto)
        return True

    def release(self, proto: protocol.Protocol) -> None:
        self._open.discard(proto)
        if not self._open:
            waiting, self._gone = self._gone, []
            for d in waiting:
                d.callback(None)

    def close_all(self, notice: bytes = b"", grace: float = CLOSE_GRACE_SECONDS):
        """
        Write C{notice} to every open connection, close them all and fire once they are gone.

        Connections still open after C{grace} seconds (a peer that does not read) are aborted.
        """
        if not self._open:
            return defer.succeed(None)
        gone: defer.Deferred[None] = defer.Deferred()
        self._gone.append(gone)
        for proto in list(self._open):
            if proto.transport is None:
                continue
            if notice:
                proto.transport.write(notice)
            _close(proto, self.clock, grace)
        return gone


def _close(proto: protocol.Protocol, clock: IReactorTime, grace: float) -> None:
    """Close C{proto}'s connection after flushing; abort it if that takes longer than C{grace}."""
    transport = proto.transport
    if getattr(transport, "producer", None) is transport:
        # A transport registered as its own producer (echo backpressure) would otherwise wait
        # for itself to finish before closing.
        transport.unregisterProducer()
    transport.loseConnection()
    if getattr(transport, "abortConnection", None) is None:
        return
    previous = getattr(proto, "_twistnet_abort_call", None)
    if previous is not None and previous.active():
        return
    # Cancelled by ManagedProtocol.connectionLost, so no delayed call outlives the connection.
    proto._twistnet_abort_call = clock.callLater(grace, _abort_if_open, transport)  # type: ignore[attr-defined]


def _ignore(data: bytes) -> None:
    pass


def _abort_if_open(transport) -> None:
    if getattr(transport, "connected", True) and not getattr(transport, "disconnected", False):
        transport.abortConnection()


class ManagedProtocol(protocol.Protocol):
    """
    Base of twistnet's TCP protocols: admission, idle timeout and tracking for shutdown.

    Subclasses implement L{connectionAdmitted} instead of C{connectionMade}, call
    C{self.idle.touch()} from C{dataReceived}, and call L{close} to hang up.
    The factory must provide C{registry} (a L{ConnectionRegistry}) and C{idle_timeout}.
    """

    #: Sent to a client refused because the service is at --max-connections.
    full_message = b"Server is full, try again later.\r\n"
    #: Sent to a client closed by --idle-timeout.
    idle_message = b"Idle timeout, closing.\r\n"

    idle: IdleTimer | None = None
    admitted = False
    _twistnet_abort_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        registry: ConnectionRegistry = self.factory.registry
        if not registry.admit(self):
            self.factory.log.info(
                "refused {peer}: at --max-connections {cap}",
                peer=peer_name(self.transport),
                cap=registry.max_connections,
            )
            # Whatever a refused client already sent is not for this service to act on.
            self.dataReceived = _ignore  # type: ignore[method-assign]
            self.transport.write(self.full_message)
            _close(self, registry.clock, CLOSE_GRACE_SECONDS)
            return
        self.admitted = True
        self.idle = IdleTimer(registry.clock, self.factory.idle_timeout, self._idled)
        self.connectionAdmitted()

    def connectionAdmitted(self) -> None:
        """Called once the connection was admitted under the cap."""

    def _idled(self) -> None:
        self.factory.log.info("closing idle connection {peer}", peer=peer_name(self.transport))
        self.close(self.idle_message)

    def close(self, message: bytes = b"") -> None:
        """Say C{message}, flush and close; abort if the peer does not read it in time."""
        if message:
            self.transport.write(message)
        _close(self, self.factory.registry.clock, CLOSE_GRACE_SECONDS)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self._twistnet_abort_call is not None and self._twistnet_abort_call.active():
            self._twistnet_abort_call.cancel()
        if self.idle is not None:
            self.idle.stop()
        try:
            self.connectionClosed(reason)
        finally:
            # Last: releasing the last connection lets a shutdown go on (close files etc.).
            if self.admitted:
                self.factory.registry.release(self)

    def connectionClosed(self, reason) -> None:
        """
        Called when an admitted or refused connection is gone, before it is released, so
        what it still has to hand over (a final line) reaches shared state before shutdown.
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
