"""
python -m benchmarks.chat_web [--clients 200] [--senders 10] [--seconds 10] [--idle 1000]

The chat's WebSocket members (issue 16) next to telnet ones, on one C{twistnet-chat --web}:

- deliveries/s with every client on TCP, then with half of them on WebSocket: the senders
  (always TCP) send one line each per round, the next round starts when a TCP probe got the
  whole round, so the window is one line per sender; every client counts what it receives;
- memory per idle member: RSS of a fresh server before and after IDLE telnet members join,
  then after IDLE WebSocket members join.

One Python process drives all clients with C{selectors}; WebSocket clients count the line
marker in the payload instead of parsing frames. Loopback only; rate limits set out of reach.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import socket
import tempfile
import time
from pathlib import Path

from benchmarks.processes import Server, free_port, raise_fd_limit, twistd_executable

LIMITS = ("--rate", "100000", "--burst", "100000", "--max-clients", "20000")
#: Every benchmark line holds this marker once, so receivers count deliveries by counting it.
MARKER = b"~bench~"


def start_server(workdir: Path) -> tuple[Server, int, int]:
    web = free_port()
    server = Server(
        "twistnet-chat --web",
        [
            twistd_executable("twistnet-chat"),
            "-n",
            "--pidfile=",
            "twistnet-chat",
            "--listen",
            "tcp:0:interface=127.0.0.1:backlog=4096",
            "--web-listen",
            f"tcp:{web}:interface=127.0.0.1:backlog=4096",
            "--history",
            "0",
            *LIMITS,
        ],
        workdir,
    )
    return server, server.start(), web


def tcp_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ws_client(port: int) -> socket.socket:
    """A WebSocket member: the handshake, then its first message (no resume)."""
    sock = tcp_client(port)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("the server closed a WebSocket handshake")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"WebSocket refused: {answer.splitlines()[0]!r}")
    sock.sendall(ws_frame(json.dumps({"resume": None}).encode()))
    return sock


def ws_frame(payload: bytes) -> bytes:
    """A masked client text frame (mask of zeros: the payload goes as is)."""
    if len(payload) < 126:
        header = bytes([0x81, 0x80 | len(payload)])
    else:
        header = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + b"\0\0\0\0" + payload


class Counter:
    """Counts the marker in what one client receives (a marker split across reads counts)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.count = 0
        self._tail = b""

    def read(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        data = self._tail + data
        self.count += data.count(MARKER)
        self._tail = data[-(len(MARKER) - 1) :]
        return True


def deliveries(clients: int, senders: int, seconds: float, ws_share: float, workdir) -> float:
    server, port, web = start_server(workdir)
    try:
        on_ws = int(clients * ws_share)
        socks = [ws_client(web) for _ in range(on_ws)]
        socks += [tcp_client(port) for _ in range(clients - on_ws)]
        probe = Counter(tcp_client(port))
        sending = [tcp_client(port) for _ in range(senders)]
        counters = [Counter(sock) for sock in socks] + [probe]
        selector = selectors.DefaultSelector()
        for counter in counters:
            counter.sock.setblocking(False)
            selector.register(counter.sock, selectors.EVENT_READ, counter)
        for sock in sending:  # drain the senders' own welcome and join lines in the OS buffer
            sock.setblocking(False)
        _settle(selector, sending)  # the joins announced, before counting
        start_counts = sum(counter.count for counter in counters)
        line = MARKER + b" " + b"x" * 40 + b"\r\n"
        rounds = 0
        deadline = time.monotonic() + seconds
        began = time.monotonic()
        while time.monotonic() < deadline:
            target = probe.count + senders
            for sock in sending:
                sock.sendall(line)
            while probe.count < target and time.monotonic() < deadline + 5:
                for key, _ in selector.select(1.0):
                    key.data.read()
                _drain(sending)
            rounds += 1
        elapsed = time.monotonic() - began
        _settle(selector, sending)
        delivered = sum(counter.count for counter in counters) - start_counts
        return delivered / elapsed
    finally:
        server.stop()


def _settle(selector: selectors.BaseSelector, sending: list[socket.socket]) -> None:
    """Read until nothing arrives for half a second."""
    while True:
        ready = selector.select(0.5)
        if not ready:
            return
        for key, _ in ready:
            key.data.read()
        _drain(sending)


def _drain(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            while sock.recv(1 << 16):
                pass
        except BlockingIOError:
            pass


def idle_memory(idle: int, workdir) -> tuple[float, float]:
    """KiB of server memory per idle telnet member, then per idle WebSocket member."""
    server, port, web = start_server(workdir)
    try:
        time.sleep(0.5)
        before = server.rss_kib()
        telnet = [tcp_client(port) for _ in range(idle)]
        time.sleep(1.0)
        after_telnet = server.rss_kib()
        websockets = [ws_client(web) for _ in range(idle)]
        time.sleep(1.0)
        after_ws = server.rss_kib()
        for sock in telnet + websockets:
            sock.close()
        return (after_telnet - before) / idle, (after_ws - after_telnet) / idle
    finally:
        server.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=1000)
    options = parser.parse_args(argv)
    raise_fd_limit(4 * (options.clients + options.idle) + 256)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        all_tcp = deliveries(options.clients, options.senders, options.seconds, 0.0, workdir)
        half_ws = deliveries(options.clients, options.senders, options.seconds, 0.5, workdir)
        telnet_kib, ws_kib = idle_memory(options.idle, workdir)
    print(f"{options.clients} clients, {options.senders} senders, {options.seconds:g} s")
    print(f"deliveries/s, all TCP:          {all_tcp:12,.0f}")
    print(f"deliveries/s, half on WebSocket: {half_ws:11,.0f}")
    print(f"KiB per idle telnet member:     {telnet_kib:8.1f}  ({options.idle} members)")
    print(f"KiB per idle WebSocket member:  {ws_kib:8.1f}  ({options.idle} members)")


if __name__ == "__main__":
    main()
