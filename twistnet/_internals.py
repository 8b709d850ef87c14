"""
Every private name of Twisted that twistnet uses, in this one audited module; each has a test
in C{tests/test_internals.py} that fails if a Twisted upgrade removes or renames it.

The transports: write-through (L{write_now}) and the size of the unsent output
(L{pending_output_probe}). twisted.web's channel: whether a request is being handled
(L{handling_request}) and its answer to a malformed request (L{JsonBadRequestChannel}).
Endpoint descriptions: their parsed kind and arguments (L{parse_description}). The reactor:
the signal twistd re-raises at exit (L{forget_sigterm_at_exit}). The WebSocket upgrade of an
HTTP channel (L{upgrade_channel}). The twistnet reactor's dispatch
(L{DirectDispatchEPollReactor}).

Write-through: send at once when nothing is queued.

Twisted's L{FileDescriptor.write} appends to a buffer and waits for the next reactor turn to
call C{send()} (Twisted ticket 5303, open since 2011). For request/response traffic that costs
an extra trip through the reactor per reply. When the transport has nothing queued, sending
right away cannot reorder bytes, so L{write_now} does exactly that and hands any remainder to
the ordinary buffered C{write}, which keeps producers, backpressure and error handling intact.
It calls the socket's C{send} itself rather than C{writeSomeData}, whose memoryview slice and
C{untilConcludes} loop (Python retries EINTR itself since PEP 475) cost 7% of a 1 KiB echo's
server CPU, measured; a socket error is left to the buffered path, which reports it as Twisted
always does.

The fast path is feature-detected: any transport that does not look like a plain
C{twisted.internet.tcp.Connection} (TLS, UNIX sockets on other reactors, test transports)
gets a plain C{write}.
"""

from __future__ import annotations

import signal

from twisted.internet import endpoints, tcp
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.logger import Logger
from twisted.web import http
from zope.interface import implementer

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll(7) here: twistnet.reactor falls back to Twisted's default
    EPollReactor = None

_PRIVATE_STATE = ("dataBuffer", "_tempDataLen", "_writeDisconnected", "socket")


def _supports_write_through(transport: object) -> bool:
    return isinstance(transport, tcp.Connection) and all(
        hasattr(transport, name) for name in _PRIVATE_STATE
    )


_SUPPORTED: dict[type, bool] = {}


def write_now(transport: ITransport, data: bytes) -> None:
    """Write C{data}, sending it immediately when the transport's buffer is empty."""
    kind = type(transport)
    supported = _SUPPORTED.get(kind)
    if supported is None:
        supported = _SUPPORTED[kind] = _supports_write_through(transport)
    if (
        supported
        and data
        and not transport._tempDataLen  # type: ignore[attr-defined]
        and not transport.dataBuffer  # type: ignore[attr-defined]
        and transport.connected  # type: ignore[attr-defined]
        and not transport.disconnecting  # type: ignore[attr-defined]
        and not transport._writeDisconnected  # type: ignore[attr-defined]
    ):
        try:
            sent = transport.socket.send(data)  # type: ignore[attr-defined]
        except BlockingIOError:
            sent = 0
        except OSError:
            # The socket failed; the buffered path rediscovers the error and closes properly.
            transport.write(data)
            return
        if sent < len(data):
            transport.write(data[sent:])
        return
    transport.write(data)


@implementer(IPushProducer)
class PauseCounter:
    """
    The fallback measure of unsent output, for a transport whose buffer cannot be read.

    Registered as the transport's streaming producer, it is told when the transport's buffer
    fills (C{pauseProducing}) and when it drains (C{resumeProducing}); what was written in
    between is what waits beyond the transport's own buffer size. Calling it returns that.
    """

    def __init__(self) -> None:
        self.paused = False
        self.unsent = 0

    def __call__(self) -> int:
        return self.unsent

    def wrote(self, count: int) -> None:
        if self.paused:
            self.unsent += count

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.unsent = 0

    def stopProducing(self) -> None:
        self.paused = False


def pending_output_probe(transport):
    """
    A function returning how many bytes C{transport} holds unsent, or C{None} if that
    cannot be known for this kind of transport.

    For C{twisted.internet.tcp} connections (and UNIX sockets, which share their code) it
    reads the write buffer directly (C{len(dataBuffer) - offset + _tempDataLen}). A wrapping
    transport (TLS, the HAProxy wrapper) is measured below, plus for TLS the cleartext still
    waiting in the TLS layer. Test transports (C{StringTransport}) count what C{value()}
    holds. Any other transport that accepts a producer gets a L{PauseCounter} registered
    on it. Each is feature-detected, so another reactor or a new Twisted degrades to the
    fallback, or to "unknown", instead of failing.
    """
    # Wrappers first: a ProtocolWrapper forwards unknown attributes to what it wraps, so
    # it would pass for the TCP connection below while hiding its own buffer.
    inner = getattr(transport, "transport", None)
    if inner is not None and inner is not transport:
        below = pending_output_probe(inner)
        if below is None or isinstance(below, PauseCounter):
            return None
        if not isinstance(getattr(transport, "_appSendBuffer", None), list):
            return below

        def tls_pending() -> int:
            return below() + sum(map(len, transport._appSendBuffer))

        return tls_pending
    if all(hasattr(transport, a) for a in ("dataBuffer", "offset", "_tempDataLen")):

        def tcp_pending() -> int:
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

        return tcp_pending
    value = getattr(transport, "value", None)
    if callable(value):
        return lambda: len(value())
    register = getattr(transport, "registerProducer", None)
    if register is not None and getattr(transport, "producer", None) is None:
        counter = PauseCounter()
        register(counter, True)
        return counter
    return None


def handling_request(channel: http.HTTPChannel) -> bool:
    """Whether C{channel} is handling a request (then more bytes are buffered, not parsed)."""
    return channel._handlingRequest


class JsonBadRequestChannel(http.HTTPChannel):
    """
    An HTTP channel whose answer to a malformed request is L{bad_request}: twisted.web
    answers a bare C{400 Bad Request} from a private method, with no hook of its own.
    """

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()

    def bad_request(self) -> None:
        """Answer a malformed request (or one over twisted.web's limits) and hang up."""
        super()._respondToBadRequestAndDisconnect()


def parse_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    A server endpoint description's positional and keyword arguments, without listening:
    no public API tells the interface a description will bind, and twistnet-http must refuse
    to listen publicly without a token before anything binds.
    """
    return endpoints._parse(description)


def forget_sigterm_at_exit(reactor) -> None:
    """
    Once the reactor has shut down, forget a SIGTERM that Twisted's own handler caught, so
    twistd exits 0 instead of re-raising it (status 143) for what was a clean stop.

    twistnet installs its own SIGTERM handler before the reactor runs and again once it
    runs; Twisted installs its handler in between, and a SIGTERM landing in that window
    would otherwise still read as a crash to a supervisor.
    """

    def forget() -> None:
        if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None

    reactor.addSystemEventTrigger("after", "shutdown", forget)


def upgrade_channel(channel: http.HTTPChannel, wire) -> None:
    """
    Hand C{channel}'s connection to C{wire} (a byte-level protocol) after a WebSocket
    handshake. twisted.web's only way is the private method its own C{twisted.web.websocket}
    uses; its request timeout is turned off here, as nothing resets it after the upgrade.
    """
    channel.setTimeout(None)
    channel._protocolUpgradeForWebsockets(wire)


# --- TLS listeners of --processes children ------------------------------------------------------


def tls_context_factory(description: str):
    """
    The TLS context factory an C{ssl:} server description asks for (its key and certificate
    read now), as C{SSL4ServerEndpoint} would use it: a child of --processes listens on its
    own C{SO_REUSEPORT} socket, so it wraps the service in TLS itself, and Twisted's parser of
    C{ssl:} arguments (C{privateKey}, C{certKey}, C{extraCertChain}, C{dhParameters},
    C{sslmethod}) is private.
    """
    args, kwargs = endpoints._parse(description)
    return endpoints._parseSSL(None, *args[1:], **kwargs)[0][2]


# --- the twistnet reactor ----------------------------------------------------------------------

#: Read by tests/test_internals.py: what DirectDispatchEPollReactor.doPoll relies on.
REACTOR_PRIVATE_NAMES = ("_poller", "_selectables", "_reads", "_writes", "_doReadOrWrite")

if EPollReactor is not None:

    class DirectDispatchEPollReactor(EPollReactor):
        """
        Twisted's epoll reactor, minus the legacy log context it builds around every event.

        The stock C{doPoll} hands each ready descriptor to C{_doReadOrWrite} through
        C{twisted.python.log.callWithLogger}, which calls C{logPrefix()} and pushes a
        C{{"system": prefix}} context (two dict copies and a thread-local stack) per read or
        write: about 2.3 microseconds, a fifth of a small echo's server time. That context
        only reaches events logged with the legacy C{twisted.python.log} during dispatch;
        twistnet and twisted.web log with C{twisted.logger}, which never reads it. What the
        wrapper also gave is kept: an exception escaping dispatch (from C{connectionLost},
        which C{_doReadOrWrite} does not guard) is logged, under the connection's log
        prefix, and the reactor goes on with the next event. docs/architecture.md says more.
        """

        _log = Logger()

        def doPoll(self, timeout: float | None) -> None:
            """Poll epoll once and dispatch each ready descriptor straight to its selectable."""
            if timeout is None:
                timeout = -1  # wait until something is ready
            try:
                # At most one event per registered descriptor, as the stock reactor asks.
                ready = self._poller.poll(timeout, len(self._selectables))
            except InterruptedError:
                return
            selectables = self._selectables
            dispatch = self._doReadOrWrite
            for fd, event in ready:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue  # removed by an earlier event of the same poll
                try:
                    dispatch(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    self._dispatch_failed(selectable)

        doIteration = doPoll

        def _dispatch_failed(self, selectable) -> None:
            try:
                system = selectable.logPrefix()
            except Exception:
                system = "(buggy logPrefix method)"
            self._log.failure(
                "Unhandled error while dispatching to {selectable!r}",
                selectable=selectable,
                log_system=system,
            )
