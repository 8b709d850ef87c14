"""The echo service: unit tests in memory, integration on real ports, end-to-end via twistd."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage

from helpers import (
    connect,
    eventually,
    figure,
    recv_exactly,
    recv_until_closed,
    run_twistd,
    wait_until,
)
from twistnet import echo
from twistnet._connections import Refused


def make_echo(max_connections=0, idle_timeout=0.0, clock=None):
    clock = clock or task.Clock()
    factory = echo.EchoFactory(max_connections, idle_timeout, clock)
    return factory, clock


def connected(factory) -> tuple[protocol.Protocol, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


# --- unit -----------------------------------------------------------------------------------


def test_bytes_come_back_unchanged():
    factory, _ = make_echo()
    proto, transport = connected(factory)
    proto.dataReceived(b"\x00\xffhello\r\n")
    proto.dataReceived(b"world")
    assert transport.value() == b"\x00\xffhello\r\nworld"


def test_transport_is_its_own_streaming_producer_for_backpressure():
    factory, _ = make_echo()
    _, transport = connected(factory)
    assert transport.producer is transport
    assert transport.streaming is True


def test_connection_over_the_cap_is_closed_without_a_word_when_everyone_has_spoken():
    factory, clock = make_echo(max_connections=2)
    first, _ = connected(factory)
    second, _ = connected(factory)
    first.dataReceived(b"a")
    second.dataReceived(b"b")
    third, transport = connected(factory)
    assert isinstance(third, Refused)
    assert transport.value() == b""  # an echo stream carries only the client's own bytes
    assert transport.disconnecting
    third.dataReceived(b"ignored?")
    assert transport.value() == b""
    assert len(factory.registry) == 2
    first.connectionLost(None)
    fourth, transport = connected(factory)
    assert isinstance(fourth, echo.Echo)
    assert not transport.disconnecting
    assert len(factory.registry) == 2
    third.connectionLost(None)
    factory.stopFactory()
    assert clock.getDelayedCalls() == []


def test_connection_silent_past_the_grace_makes_room_for_a_newcomer_oldest_first():
    factory, clock = make_echo(max_connections=2)
    silent_old, old_transport = connected(factory)
    clock.advance(0.5)
    _silent_new, new_transport = connected(factory)
    clock.advance(0.6)
    newcomer, _ = connected(factory)
    assert isinstance(newcomer, echo.Echo)
    assert old_transport.disconnecting and old_transport.value() == b""
    assert not new_transport.disconnecting
    assert len(factory.registry) == 2
    # The evicted one is still closed at shutdown until it is gone.
    assert silent_old in list(factory.registry)
    silent_old.connectionLost(None)
    assert silent_old not in list(factory.registry)
    # The other one is within its grace: a burst of newcomers is refused, not churned.
    assert isinstance(connected(factory)[0], Refused)


def test_idle_connection_is_closed_without_a_word_after_timeout_but_input_keeps_it_open():
    factory, clock = make_echo(idle_timeout=10)
    proto, transport = connected(factory)
    clock.advance(6)
    proto.dataReceived(b"x")
    clock.advance(6)
    assert not transport.disconnecting
    clock.advance(4.5)
    assert transport.disconnecting
    assert transport.value() == b"x"
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_idle_timeout_zero_schedules_nothing():
    factory, clock = make_echo(idle_timeout=0)
    connected(factory)
    assert clock.getDelayedCalls() == []


def test_udp_echoes_but_never_answers_loop_guard_ports():
    proto = echo.EchoDatagram()
    sent = []

    class Transport:
        def write(self, data, addr):
            sent.append((data, addr))

        def getHost(self):
            return type("Addr", (), {"host": "127.0.0.1", "port": 7007})()

    proto.makeConnection(Transport())
    proto.datagramReceived(b"ping", ("127.0.0.1", 40000))
    for port in (7, 19, 0, 7007):
        proto.datagramReceived(b"loop?", ("127.0.0.1", port))
    assert sent == [(b"ping", ("127.0.0.1", 40000))]
    assert proto.dropped == 4


# --- options and makeService ----------------------------------------------------------------


def parse(*argv):
    options = echo.Options()
    options.parseOptions(list(argv))
    return options


def test_options_defaults():
    options = parse()
    assert options.endpoint_descriptions() == [f"tcp:{echo.DEFAULT_PORT}:backlog=511"]
    assert options["max-connections"] == 1000
    assert options["idle-timeout"] == 0.0
    assert options["udp-port"] is None


def test_port_is_shorthand_for_tcp_endpoint_and_listen_overrides_it():
    assert parse("--port", "12345").endpoint_descriptions() == ["tcp:12345:backlog=511"]
    options = parse("--port", "1", "--listen", "tcp:0:interface=127.0.0.1", "--listen", "unix:/x")
    assert options.endpoint_descriptions() == ["tcp:0:interface=127.0.0.1", "unix:/x"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "abc"],
        ["--port", "70000"],
        ["--max-connections", "-1"],
        ["--idle-timeout", "soon"],
        ["--listen", "tcp:notaport"],
        ["--listen", "nosuchkind:1"],
        ["--bogus"],
    ],
)
def test_bad_options_are_usage_errors(argv):
    with pytest.raises(usage.UsageError):
        parse(*argv)


class MemoryReactorWithUDP(MemoryReactorClock):
    """MemoryReactorClock has no listenUDP; record UDP listeners the same way."""

    def __init__(self):
        super().__init__()
        self.udpServers = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udpServers.append((port, protocol, interface))
        return _StoppablePort()


class _StoppablePort:
    def stopListening(self):
        return defer.succeed(None)


def test_make_service_listens_on_every_endpoint_and_udp():
    reactor = MemoryReactorWithUDP()
    options = parse("--listen", "tcp:7100", "--listen", "tcp:7101:interface=127.0.0.1")
    options["udp-port"] = 7102
    service = echo.makeService(options, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (7100, ""),
        (7101, "127.0.0.1"),
    ]
    assert [(port, interface) for port, _, interface in reactor.udpServers] == [(7102, "")]
    stopped = defer.maybeDeferred(service.stopService)
    assert stopped.called


# --- integration: real ports ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_echo_over_real_tcp(listen, reactor):
    factory = echo.EchoFactory(clock=reactor)
    port = await listen(factory)
    received = defer.Deferred()

    class Client(protocol.Protocol):
        buffer = b""

        def connectionMade(self):
            self.transport.write(b"x" * 100_000)

        def dataReceived(self, data):
            self.buffer += data
            if len(self.buffer) >= 100_000:
                self.transport.loseConnection()

        def connectionLost(self, reason):
            received.callback(self.buffer)

    endpoint = endpoints_client(reactor, port.getHost().port)
    await endpoint.connect(protocol.Factory.forProtocol(Client))
    assert await received == b"x" * 100_000


async def echoed(client, data: bytes) -> bool:
    """Send C{data} on a plain socket and wait, reactor running, for it to come back."""
    client.setblocking(False)
    client.sendall(data)
    received = bytearray()

    def back() -> bool:
        try:
            received.extend(client.recv(100))
        except BlockingIOError:
            pass
        return len(received) >= len(data)

    await eventually(back, "no echo came back")
    return bytes(received) == data


@pytest_twisted.ensureDeferred
async def test_replies_leave_without_nagle_over_tcp_and_unix_sockets_still_echo(
    listen, reactor, tmp_path
):
    from twisted.internet import endpoints

    factory = echo.EchoFactory(clock=reactor)
    port = await listen(factory)
    with socket.create_connection(("127.0.0.1", port.getHost().port)) as client:
        assert await echoed(client, b"ping")
        (server,) = list(factory.registry)
        assert server.transport.getTcpNoDelay()
    path = str(tmp_path / "echo.sock")
    unix = await endpoints.UNIXServerEndpoint(reactor, path).listen(factory)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            assert await echoed(client, b"pong")
    finally:
        await unix.stopListening()
        await factory.registry.close_all(grace=1.0)


def endpoints_client(reactor, port):
    from twisted.internet import endpoints

    return endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)


# --- end to end: twistd as a child process --------------------------------------------------


@pytest.fixture
def echo_server(twistd):
    server = twistd(
        "twistnet-echo",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--udp-port",
        "0",
        "--udp-interface",
        "127.0.0.1",
    )
    server.tcp_port = server.port("tcp")
    server.udp_port = server.port("udp")
    return server


def test_twistd_echoes_300kb_byte_exact(echo_server):
    payload = bytes(range(256)) * 1200  # 307,200 bytes, every byte value
    with connect(echo_server.tcp_port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()


def test_twistd_echoes_a_udp_datagram(echo_server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"ping over udp", ("127.0.0.1", echo_server.udp_port))
        data, addr = sock.recvfrom(2048)
    assert data == b"ping over udp"
    assert addr == ("127.0.0.1", echo_server.udp_port)


@pytest.mark.parametrize("size", [8193, 9000, 65507])
def test_twistd_echoes_a_whole_large_udp_datagram(echo_server, size):
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(10)
        sock.sendto(payload, ("127.0.0.1", echo_server.udp_port))
        data, _ = sock.recvfrom(65535)
    assert len(data) == size
    assert data == payload


def test_non_reading_client_is_paused_while_others_are_served(echo_server):
    """A client pushing 200 MB without reading must not grow the server; others get answers."""
    rss_before = echo_server.rss_kib()
    chunk = b"z" * 65536
    pushed = 0
    with connect(echo_server.tcp_port) as hog:
        hog.setblocking(False)
        deadline = time.monotonic() + 10
        stalled_since = None
        # Push until the server stops reading (kernel buffers full) or 200 MB went through.
        while pushed < 200 * 2**20 and time.monotonic() < deadline:
            try:
                pushed += hog.send(chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break
                time.sleep(0.01)
        with connect(echo_server.tcp_port) as honest:
            honest.sendall(b"still there?\n")
            assert recv_exactly(honest, 13) == b"still there?\n"
        growth_mib = (echo_server.rss_kib() - rss_before) / 1024
    figure("echo.slow_consumer.pushed", pushed / 2**20, "MiB")
    figure("echo.slow_consumer.rss_growth", growth_mib, "MiB")
    assert pushed > 1 * 2**20, "the hog should have pushed at least the socket buffers"
    assert growth_mib < 16, f"server grew by {growth_mib:.1f} MiB for a non-reading client"
    assert echo_server.terminate() == 0


def test_max_connections_refuses_without_a_word_end_to_end(twistd):
    server = twistd(
        "twistnet-echo", "--listen", "tcp:0:interface=127.0.0.1", "--max-connections", "1"
    )
    port = server.port()
    with connect(port) as first:
        first.sendall(b"a")
        assert recv_exactly(first, 1) == b"a"
        with connect(port) as second:
            assert recv_until_closed(second) == b""
    server.wait_for_line("refused at --max-connections 1: 127.0.0.1:\\d+")


def test_sigterm_closes_connections_and_exits_zero(twistd):
    server = twistd("twistnet-echo", "--listen", "tcp:0:interface=127.0.0.1")
    with connect(server.port()) as client:
        client.sendall(b"hi")
        assert recv_exactly(client, 2) == b"hi"
        assert server.terminate() == 0
        assert recv_until_closed(client) == b""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "notaport"], "expected a port number, got 'notaport'"),
        (["--bogus"], "option --bogus not recognized"),
        (["--listen", "tcp:notaport"], "--listen 'tcp:notaport'"),
    ],
)
def test_bad_option_exits_nonzero_without_traceback(argv, message):
    result = run_twistd("twistnet-echo", *argv)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output
    assert "Traceback" not in output


def test_port_in_use_exits_nonzero_with_one_clear_line(twistd):
    first = twistd("twistnet-echo", "--listen", "tcp:0:interface=127.0.0.1")
    port = first.port()
    result = run_twistd("twistnet-echo", "--listen", f"tcp:{port}:interface=127.0.0.1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"twistnet-echo: cannot listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output
    wait_until(lambda: first.proc.poll() is None)


def test_a_second_sigterm_during_shutdown_changes_nothing(twistd):
    server = twistd("twistnet-echo", "--listen", "tcp:0:interface=127.0.0.1")
    server.port()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.send_signal(signal.SIGTERM)
    assert server.terminate() == 0
    assert "Traceback" not in server.output


def test_idle_timer_restart_rearms_a_fired_timer_for_a_full_timeout():
    from twistnet._connections import IdleTimer

    clock, fired = task.Clock(), []
    timer = IdleTimer(clock, 10, lambda: fired.append(clock.seconds()))
    clock.advance(10)
    timer.restart()
    clock.advance(9.5)
    assert fired == [10]
    clock.advance(0.5)
    assert fired == [10, 20]
    assert clock.getDelayedCalls() == []
