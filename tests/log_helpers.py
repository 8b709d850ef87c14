"""Helpers for the log service's end-to-end tests: a server in a directory, line-sending clients."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from helpers import WAIT_SECONDS, connect, recv_until_closed, wait_until


def start_log_server(
    twistd, tmp_path, *args: str, listen: str = "tcp:0:interface=127.0.0.1", file=None
):
    """twistd -n twistnet-log on 127.0.0.1 in C{tmp_path}, writing lines.log there by default."""
    if file is not None:
        args = ("--file", str(file), *args)
    server = twistd("twistnet-log", "--listen", listen, *args, cwd=tmp_path)
    server.tcp_port = server.port()
    server.path = Path(file) if file is not None else tmp_path / "lines.log"
    return server


def client_lines(client: int, count: int) -> list[bytes]:
    return [b"client %d line %d %s" % (client, n, b"x" * (n % 50)) for n in range(count)]


def client_payload(lines: list[bytes]) -> bytes:
    """CR LF and LF mixed, the last line without any newline."""
    endings = [b"\r\n" if n % 3 == 0 else b"\n" for n in range(len(lines) - 1)] + [b""]
    return b"".join(line + ending for line, ending in zip(lines, endings, strict=True))


def send_and_close(port: int, payload: bytes, piece: int = 1000) -> None:
    """Send C{payload} in odd pieces, half-close, and wait until the server closed too."""
    with connect(port) as sock:
        for start in range(0, len(payload), piece):
            sock.sendall(payload[start : start + piece])
        sock.shutdown(socket.SHUT_WR)
        recv_until_closed(sock)


def run_clients(port: int, payloads: list[bytes]) -> None:
    errors: list[BaseException] = []

    def run(payload: bytes, piece: int) -> None:
        try:
            send_and_close(port, payload, piece)
        except BaseException as error:  # surfaced in the test thread below
            errors.append(error)

    threads = [
        threading.Thread(target=run, args=(payload, 997 + 13 * n))
        for n, payload in enumerate(payloads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def logged_lines(*paths: Path) -> list[bytes]:
    lines: list[bytes] = []
    for path in paths:
        data = path.read_bytes() if path.exists() else b""
        assert not data or data.endswith(b"\n"), f"{path} ends inside a line"
        lines += data.splitlines()
    return lines


def wait_for_lines(expected: list[bytes], paths) -> list[bytes]:
    """Bounded poll until the files hold as many lines as expected; returns them."""
    wait_until(lambda: len(logged_lines(*paths())) >= len(expected))
    return logged_lines(*paths())


def rows_of(server) -> list[dict]:
    return [json.loads(row) for row in server.path.read_bytes().splitlines()]


def tcp_queues(port: int) -> dict[tuple[int, int], tuple[int, int]]:
    """
    Established IPv4 connections touching C{port}, from /proc/net/tcp:
    (local port, remote port) -> (send queue, receive queue) in bytes.

    A server-side receive queue of 0 means the server process has read everything that
    arrived; a client-side send queue of 0 means the server's kernel acknowledged it all.
    """
    queues = {}
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if fields[3] == "01" and port in (local, remote):
            send, receive = (int(value, 16) for value in fields[4].split(":"))
            queues[(local, remote)] = (send, receive)
    return queues


class Sender(threading.Thread):
    """
    A client sending numbered 100-byte lines in chunks of 50, as fast as it can, until
    C{max_lines}, C{stop} or C{seconds}; C{sent} counts the lines whose sendall returned.
    """

    def __init__(
        self, port: int, client: int, stop: threading.Event, max_lines: int, seconds=WAIT_SECONDS
    ) -> None:
        super().__init__(daemon=True)
        self.deadline = time.monotonic() + seconds
        self.sock = connect(port)
        self.client = client
        self.stop = stop
        self.max_lines = max_lines
        self.sent = 0
        self.error: OSError | None = None

    def line(self, number: int) -> bytes:
        head = b"client %d line %d " % (self.client, number)
        return head + b"z" * (99 - len(head))

    def run(self) -> None:
        try:
            while (
                self.sent < self.max_lines
                and not self.stop.is_set()
                and time.monotonic() < self.deadline
            ):
                count = min(50, self.max_lines - self.sent)
                chunk = b"".join(self.line(n) + b"\n" for n in range(self.sent, self.sent + count))
                self.sock.sendall(chunk)
                self.sent += count
        except OSError as error:  # the server went away: expected in kill and stop tests
            self.error = error

    def local_port(self) -> int:
        return self.sock.getsockname()[1]


def by_client(lines: list[bytes]) -> dict[int, list[int]]:
    """The line numbers each Sender's lines carry, in file order."""
    numbers: dict[int, list[int]] = {}
    for line in lines:
        _, client, _, number, _ = line.split(b" ")
        numbers.setdefault(int(client), []).append(int(number))
    return numbers


def assert_whole_sender_lines(senders: list[Sender], lines: list[bytes]) -> dict[int, int]:
    """Every line is a whole Sender line and each Sender's lines are 0..k-1 in order."""
    for line in lines:
        assert len(line) == 99, f"not a whole line: {line[:120]!r}"
    numbers = by_client(lines)
    counts = {}
    for sender in senders:
        mine = numbers.get(sender.client, [])
        assert mine == list(range(len(mine))), f"client {sender.client}: gap or duplicate"
        counts[sender.client] = len(mine)
    return counts
