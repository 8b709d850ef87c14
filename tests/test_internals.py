"""Pin every private name of Twisted that twistnet uses (twistnet/_internals.py): write_now and
the output probe, the HTTP channel's request flag and bad-request answer, endpoint parsing, and
the exit signal twistd re-raises."""

from __future__ import annotations

import errno
import select
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport

from helpers import connect, recv_exactly
from twistnet._internals import pending_output_probe, write_now

#: Long enough for loopback to deliver bytes already handed to the kernel.
DELIVERY_WINDOW = 1.0


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


class Holder(protocol.Protocol):
    """Server side that hands its connected instance to the test."""

    def connectionMade(self):
        self.factory.connected.callback(self)


async def read_with_reactor(reactor, sock: socket.socket, count: int, timeout=20.0) -> bytes:
    """Read C{count} bytes while the reactor keeps running (it has to flush buffered writes)."""
    received = bytearray()
    deadline = reactor.seconds() + timeout
    while len(received) < count:
        assert reactor.seconds() < deadline, f"got {len(received)} of {count} bytes"
        if readable(sock, 0):
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed early"
            received += chunk
        else:
            await task.deferLater(reactor, 0.001, lambda: None)
    return bytes(received)


async def server_and_client(listen):
    factory = protocol.Factory.forProtocol(Holder)
    factory.connected = defer.Deferred()
    port = await listen(factory)
    client = connect(port.getHost().port)
    server = await factory.connected
    return server, client


@pytest_twisted.ensureDeferred
async def test_write_now_sends_before_the_reactor_turns(listen):
    """The reactor is blocked here on purpose: only a write-through send can arrive."""
    server, client = await server_and_client(listen)
    with client:
        server.transport.write(b"buffered")
        assert not readable(client, 0.2), "a plain write should wait for the reactor"
        server.transport.doWrite()  # flush the plain write so the buffer is empty again
        assert recv_exactly(client, 8) == b"buffered"
        write_now(server.transport, b"now")
        assert readable(client, DELIVERY_WINDOW)
        assert client.recv(100) == b"now"
        server.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_write_now_queues_behind_pending_output_to_keep_order(listen, reactor):
    server, client = await server_and_client(listen)
    with client:
        server.transport.write(b"first,")
        write_now(server.transport, b"second")
        assert not readable(client, 0.2), "must not overtake the queued bytes"
        assert server.transport._tempDataLen == len(b"first,second")
        assert await read_with_reactor(reactor, client, 12) == b"first,second"
        server.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_write_now_buffers_what_the_socket_does_not_take(listen, reactor):
    server, client = await server_and_client(listen)
    with client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        payload = bytes(range(256)) * 8_000  # 2 MB: far more than both socket buffers
        write_now(server.transport, payload)
        pending = server.transport._tempDataLen
        assert 0 < pending < len(payload), "some sent at once, the rest queued"
        assert await read_with_reactor(reactor, client, len(payload)) == payload
        server.transport.loseConnection()


def test_write_now_falls_back_to_plain_write_on_other_transports():
    transport = StringTransport()
    write_now(transport, b"tls or test transport")
    assert transport.value() == b"tls or test transport"


@pytest_twisted.ensureDeferred
async def test_write_now_leaves_a_socket_error_to_the_buffered_path(listen):
    server, client = await server_and_client(listen)
    client.close()
    lost = defer.Deferred()
    server.connectionLost = lambda reason: lost.callback(reason.type)

    class ResetOnSend:
        """The server's socket, except that a send finds the connection reset."""

        def __init__(self, sock):
            self._sock = sock

        def send(self, data):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

        def __getattr__(self, name):
            return getattr(self._sock, name)

    server.transport.socket = ResetOnSend(server.transport.socket)
    write_now(server.transport, b"into the void")
    assert server.transport._tempDataLen == len(b"into the void")
    assert await lost in (ConnectionLost, ConnectionDone)


def test_pending_output_probe_reads_tcp_buffers_and_looks_below_wrappers():
    class TCPLike:
        dataBuffer = b"0123456789"
        offset = 4
        _tempDataLen = 5

    class Wrapper:
        """Forwards unknown attributes, as twisted.protocols.policies.ProtocolWrapper does."""

        def __init__(self, transport):
            self.transport = transport

        def __getattr__(self, name):
            return getattr(self.transport, name)

    class TLSLike(Wrapper):
        _appSendBuffer = [b"abc", b"de"]

    assert pending_output_probe(TCPLike())() == 11
    assert pending_output_probe(Wrapper(TCPLike()))() == 11
    assert pending_output_probe(TLSLike(TCPLike()))() == 16
    assert pending_output_probe(object()) is None
    transport = StringTransport()
    transport.write(b"xyz")
    assert pending_output_probe(transport)() == 3


# --- the other private names twistnet relies on: each fails if an upgrade removes it -------


def test_http_channel_handling_request_flag_exists_and_tracks_a_request():
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web import http, resource, server

    from twistnet._internals import handling_request

    class Hold(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return server.NOT_DONE_YET

    site = server.Site(Hold(), reactor=MemoryReactorClock())
    site.protocol = http.HTTPChannel
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    assert handling_request(channel) is False
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert handling_request(channel) is True
    channel.connectionLost(ConnectionDone())


def test_bad_request_hook_replaces_twisted_web_bare_400():
    from twistnet._internals import JsonBadRequestChannel

    class Channel(JsonBadRequestChannel):
        said = False

        def bad_request(self):
            self.said = True
            self.transport.loseConnection()

    channel = Channel()
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"NOT HTTP\r\n\r\n")
    assert channel.said and transport.value() == b""
    # Without an override, twisted.web's own bare answer is still what it gives.
    plain = JsonBadRequestChannel()
    transport = StringTransport()
    plain.makeConnection(transport)
    plain.dataReceived(b"NOT HTTP\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request")


def test_parse_description_tells_kind_and_interface():
    from twistnet._internals import parse_description

    args, kwargs = parse_description("tcp:80:interface=127.0.0.1")
    assert (list(args), kwargs) == (["tcp", "80"], {"interface": "127.0.0.1"})
    assert parse_description("unix:/tmp/x.sock")[0][0] == "unix"


def test_sigterm_caught_by_twisted_is_forgotten_at_shutdown():
    import signal

    from twisted.internet.selectreactor import SelectReactor

    from twistnet._internals import forget_sigterm_at_exit

    reactor = SelectReactor()
    try:
        forget_sigterm_at_exit(reactor)
        reactor.sigTerm(signal.SIGTERM, None)
        assert reactor._exitSignal == signal.SIGTERM
        reactor.fireSystemEvent("shutdown")
        assert reactor._exitSignal is None
    finally:
        reactor.waker.connectionLost(None)


def test_the_websocket_upgrade_of_an_http_channel_is_still_there():
    from twisted.web import http

    # twistnet.chat.web hands an HTTP channel to its WebSocket protocol through it.
    assert callable(http.HTTPChannel._protocolUpgradeForWebsockets)
    assert callable(http.HTTPChannel.setTimeout)


def test_tls_context_factory_reads_the_key_and_certificate_of_an_ssl_description(tmp_path):
    import pytest
    from OpenSSL import SSL

    from helpers import make_certificate
    from twistnet._internals import tls_context_factory

    key, cert = make_certificate(tmp_path)
    factory = tls_context_factory(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    assert isinstance(factory.getContext(), SSL.Context)
    with pytest.raises(OSError):
        tls_context_factory(f"ssl:0:privateKey={tmp_path / 'missing.pem'}")


# --- the twistnet reactor: what its doPoll copies from Twisted's, and what it changes ---------

#: Digest of the statements of Twisted's C{EPollReactor.doPoll} (docstring and comments aside)
#: that C{DirectDispatchEPollReactor.doPoll} was written from. If it changes, compare the two,
#: carry the change over, and pin the new digest.
STOCK_DOPOLL_DIGEST = "f57e2c7333740ac9"


def _statements_digest(function) -> str:
    import ast
    import hashlib
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    if isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        tree.body = tree.body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def test_twisted_epoll_do_poll_is_still_the_one_the_twistnet_reactor_copies():
    import inspect

    from twisted.internet.epollreactor import EPollReactor

    assert _statements_digest(EPollReactor.doPoll) == STOCK_DOPOLL_DIGEST
    source = inspect.getsource(EPollReactor.doPoll)
    assert "self._poller.poll(timeout, len(self._selectables))" in source
    assert "log.callWithLogger(selectable, _drdw, selectable, fd, event)" in source
    assert EPollReactor.doIteration is EPollReactor.doPoll


@pytest.fixture
def lean_reactor():
    """A twistnet reactor of its own, never installed nor run: driven by C{doIteration(0)}."""
    from twistnet._internals import DirectDispatchEPollReactor

    reactor = DirectDispatchEPollReactor()
    yield reactor
    reactor.waker.connectionLost(None)
    reactor._poller.close()


def test_the_reactor_internals_the_twistnet_reactor_uses_are_still_there(lean_reactor):
    import inspect

    from twisted.internet.epollreactor import EPollReactor

    from twistnet._internals import REACTOR_PRIVATE_NAMES, DirectDispatchEPollReactor

    assert issubclass(DirectDispatchEPollReactor, EPollReactor)
    for name in REACTOR_PRIVATE_NAMES:
        assert hasattr(lean_reactor, name), name
    assert isinstance(lean_reactor._selectables, dict)
    assert isinstance(lean_reactor._reads, set) and isinstance(lean_reactor._writes, set)
    assert callable(lean_reactor._poller.poll)
    parameters = list(inspect.signature(EPollReactor._doReadOrWrite).parameters)
    assert parameters == ["self", "selectable", "fd", "event"]
    assert DirectDispatchEPollReactor.doIteration is DirectDispatchEPollReactor.doPoll


class Selectable:
    """A reader on one end of a socket pair, with hooks a test can make fail."""

    def __init__(self, sock: socket.socket, prefix: str, read=None, lost=None):
        self.sock = sock
        self.prefix = prefix
        self.read = read or (lambda: sock.recv(100))
        self.lost = lost or (lambda reason: None)
        self.reasons: list = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return self.prefix

    def doRead(self):
        self.read()

    def connectionLost(self, reason):
        self.reasons.append(reason)
        self.lost(reason)


@pytest.fixture
def socket_pairs():
    pairs = []

    def make():
        pair = socket.socketpair()
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        for sock in pair:
            sock.close()


def test_a_reader_that_raises_is_logged_and_disconnected_and_the_reactor_serves_on(
    lean_reactor, socket_pairs
):
    from twisted.logger import capturedLogs

    broken_end, broken_peer = socket_pairs()
    good_end, good_peer = socket_pairs()
    broken = Selectable(broken_end, "Broken,1,127.0.0.1", read=lambda: 1 / 0)
    good = Selectable(good_end, "Good,2,127.0.0.1")
    lean_reactor.addReader(broken)
    lean_reactor.addReader(good)
    broken_peer.send(b"x")
    good_peer.send(b"y")
    with capturedLogs() as events:
        lean_reactor.doIteration(0)
    # Logged by Twisted's _doReadOrWrite through twisted.python.log: "failure", not "log_failure".
    failures = [e["failure"] for e in events if e.get("failure") is not None]
    assert [f.type for f in failures] == [ZeroDivisionError]
    assert [r.type for r in broken.reasons] == [ZeroDivisionError]
    assert broken not in lean_reactor.getReaders() and good in lean_reactor.getReaders()
    good_peer.send(b"z")
    lean_reactor.doIteration(0)
    assert good.reasons == [], "the healthy reader is served and kept"


def test_an_error_escaping_dispatch_is_logged_under_the_connection_and_the_next_is_served(
    lean_reactor, socket_pairs
):
    """C{_doReadOrWrite} does not guard C{connectionLost}; the stock wrapper did, and so do we."""
    from twisted.logger import capturedLogs

    closing_end, closing_peer = socket_pairs()
    good_end, good_peer = socket_pairs()

    def lose(reason):
        lean_reactor.removeReader(closing)
        raise RuntimeError("bug in connectionLost")

    closing = Selectable(closing_end, "Closing,1,127.0.0.1", read=lambda: 1 / 0, lost=lose)
    received = []
    good = Selectable(good_end, "Good,2,127.0.0.1", read=lambda: received.append(good_end.recv(9)))
    lean_reactor.addReader(closing)
    lean_reactor.addReader(good)
    closing_peer.send(b"x")
    good_peer.send(b"y")
    with capturedLogs() as events:
        for _ in range(2):  # epoll may report the two in either order
            lean_reactor.doIteration(0)
    escaped = [e for e in events if getattr(e.get("log_failure"), "type", None) is RuntimeError]
    assert len(escaped) == 1
    assert escaped[0]["log_system"] == "Closing,1,127.0.0.1"
    assert received == [b"y"]


def test_legacy_log_lines_during_dispatch_lose_only_the_connection_prefix(
    lean_reactor, socket_pairs
):
    """
    The one thing consciously dropped: C{twisted.python.log} events logged while a read is
    dispatched read C{[-]}, where the stock reactor wrote the connection's prefix.
    C{twisted.logger} events, all of twistnet's own, are the same on both reactors.
    """
    from twisted.internet.epollreactor import EPollReactor
    from twisted.logger import Logger, capturedLogs, formatEventAsClassicLogText
    from twisted.python import log as legacy

    modern = Logger(namespace="twistnet.test")

    def read_and_log(sock):
        sock.recv(9)
        legacy.msg("legacy line")
        modern.info("modern line")

    def systems(reactor) -> list[str]:
        end, peer = socket_pairs()
        reader = Selectable(end, "Echo,7,127.0.0.1", read=lambda: read_and_log(end))
        reactor.addReader(reader)
        peer.send(b"x")
        with capturedLogs() as events:
            reactor.doIteration(0)
        reactor.removeReader(reader)
        return [formatEventAsClassicLogText(e).split(" ", 1)[1] for e in events]

    stock = EPollReactor()
    try:
        assert systems(stock) == [
            "[Echo,7,127.0.0.1] legacy line\n",
            "[twistnet.test#info] modern line\n",
        ]
    finally:
        stock.waker.connectionLost(None)
        stock._poller.close()
    assert systems(lean_reactor) == ["[-] legacy line\n", "[twistnet.test#info] modern line\n"]
