"""Echo under bad input, hostile clients and TLS: it keeps serving and stays bounded."""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport

from helpers import (
    connect,
    figure,
    make_certificate,
    percentile,
    raise_fd_limit,
    recv_exactly,
    recv_until_closed,
    tls_client,
    wait_until,
)
from twistnet import echo

LOCAL = "tcp:0:interface=127.0.0.1"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=4096), max_size=30))
def test_arbitrary_chunks_come_back_byte_exact(chunks):
    factory = echo.EchoFactory(clock=task.Clock())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    for chunk in chunks:
        proto.dataReceived(chunk)
    assert transport.value() == b"".join(chunks)
    proto.connectionLost(None)
    assert len(factory.registry) == 0


def assert_clean_log(server) -> None:
    assert "Traceback" not in server.output
    assert "Unhandled" not in server.output


def test_half_closed_client_gets_every_byte_back(twistd):
    """Like `nc -N`: send everything, shut down the sending side, read the echo to EOF."""
    server = twistd("twistnet-echo", "--listen", LOCAL)
    payload = bytes(range(256)) * 4096  # 1 MiB, more than the socket buffers hold
    with connect(server.port()) as sock:
        sender = threading.Thread(
            target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        assert recv_until_closed(sock) == payload
        sender.join()
    assert_clean_log(server)


def test_resets_mid_stream_leave_no_traceback_and_service_goes_on(twistd):
    server = twistd("twistnet-echo", "--listen", LOCAL)
    port = server.port()
    for _ in range(20):
        sock = connect(port)
        sock.sendall(b"x" * 200_000)
        # SO_LINGER 0: close() sends RST while the server still has replies queued.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    with connect(port) as honest:
        honest.sendall(b"ok?")
        assert recv_exactly(honest, 3) == b"ok?"
    assert server.terminate() == 0
    assert_clean_log(server)


def test_tls_through_an_ssl_endpoint(twistd, tmp_path):
    key, cert = make_certificate(tmp_path)
    server = twistd(
        "twistnet-echo",
        "--listen",
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    with tls_client(server.port(), cert) as sock:
        sock.sendall(b"secret echo")
        assert recv_exactly(sock, 11) == b"secret echo"
        assert sock.version().startswith("TLS")


def open_many(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    return socks


def classify(socks: list[socket.socket], timeout: float) -> tuple[int, int]:
    """
    Send one byte on each; count (echoed, refused) answers within C{timeout}. A refused
    connection is closed without a word (an echo stream carries only the client's bytes),
    or reset if it had sent its byte already.
    """
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_WRITE)
    echoed = refused = 0
    pending = len(socks)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, events in selector.select(0.5):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(b"!")
                except OSError:
                    selector.unregister(sock)
                    pending -= 1
                    refused += 1
                    continue
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data.startswith(b"!"):
                echoed += 1
            else:
                refused += 1
            selector.unregister(sock)
            pending -= 1
    selector.close()
    return echoed, refused


def test_connection_flood_holds_the_cap_and_stays_bounded(twistd):
    flood, cap = 5000, 1000
    raise_fd_limit(flood + 1000)
    # A flood outruns the default listen backlog of 50: SYNs beyond it wait for retries.
    listen = f"{LOCAL}:backlog=4096"
    server = twistd("twistnet-echo", "--listen", listen, "--max-connections", str(cap))
    port = server.port()
    rss_before = server.rss_kib()
    started = time.monotonic()
    socks = open_many(port, flood)
    try:
        echoed, refused = classify(socks, timeout=60)
        figure("echo.flood.seconds_to_answer_all", time.monotonic() - started, "s")
        growth = (server.rss_kib() - rss_before) / 1024
        assert (echoed, refused) == (cap, flood - cap)
        figure("echo.flood.connections", flood)
        figure("echo.flood.admitted", echoed)
        figure("echo.flood.rss_growth", growth, "MiB")
        assert growth < 64
        with connect(port) as latecomer:
            assert recv_until_closed(latecomer) == b""
    finally:
        for sock in socks:
            sock.close()

    def honest_served() -> bool:
        with connect(port) as honest:
            honest.sendall(b"hello")
            return honest.recv(100) == b"hello"

    # Once the flood is gone the slots free up and an honest client is served.
    assert wait_until(honest_served, timeout=30, interval=0.2)
    assert server.terminate() == 0
    assert_clean_log(server)


def test_tricklers_do_not_slow_honest_clients(twistd):
    """
    500 clients trickling a byte every 50 ms (slowloris) while an honest client measures its
    round trips. To echo, a trickled byte is a complete request, so tricklers are served, not
    closed; --max-connections bounds how many there can be.
    """
    server = twistd("twistnet-echo", "--listen", LOCAL)
    port = server.port()
    tricklers = [connect(port) for _ in range(500)]
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            for sock in tricklers:
                sock.send(b".")
            for sock in tricklers:
                sock.recv(64)
            stop.wait(0.05)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        samples = []
        with connect(port) as honest:
            honest.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(300):
                started = time.perf_counter()
                honest.sendall(b"ping")
                recv_exactly(honest, 4)
                samples.append((time.perf_counter() - started) * 1000)
    finally:
        stop.set()
        thread.join(10)
        for sock in tricklers:
            sock.close()
    p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
    figure("echo.trickle.honest_p50", p50, "ms")
    figure("echo.trickle.honest_p99", p99, "ms")
    assert p99 < 250, f"honest p99 {p99:.1f} ms under 500 tricklers"
