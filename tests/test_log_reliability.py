"""
The log service under hostile input, hostile clients and faults (issue 7): nothing lost.

Figures are printed (run with C{-s} to see them) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import selectors
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport

from helpers import connect, make_certificate, recv_until_closed, wait_until
from log_helpers import (
    Sender,
    assert_whole_sender_lines,
    client_payload,
    logged_lines,
    rows_of,
    start_log_server,
    tcp_queues,
)
from twistnet.log.protocol import LineLogFactory, has_overlong_line
from twistnet.log.sink import RETRY_SECONDS, LogSink


def report(test: str, **figures) -> None:
    print(f"\n[figures] {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --- bad input: hypothesis ----------------------------------------------------------------------


def expected_raw(payload: bytes, max_line: int) -> bytes:
    """The spec, written independently of the implementation: what the file must hold."""
    *complete, last = payload.split(b"\n")
    lines = complete + ([last] if last else [])
    out = []
    for line in lines:
        line = line.removesuffix(b"\r")
        if len(line) > max_line:
            line = line[:max_line] + b" [truncated: line of %d bytes]" % len(line)
        out.append(line + b"\n")
    return b"".join(out)


def feed(payload: bytes, cuts: list[int], max_line: int, format: str) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        sink = LogSink(os.path.join(directory, "lines.log"), format=format, clock=task.Clock())
        sink.open()
        proto = LineLogFactory(sink, max_line=max_line).buildProtocol(None)
        proto.makeConnection(StringTransport())
        points = sorted({cut % (len(payload) + 1) for cut in cuts})
        for start, end in zip([0, *points], [*points, len(payload)], strict=True):
            if end > start:
                proto.dataReceived(payload[start:end])
        proto.connectionLost(None)
        sink.close()
        return Path(sink.path).read_bytes()


line_bytes = st.binary(max_size=40) | st.sampled_from([b"\r", b"\r\r", b"\xff\xfe", b"\xc3"])
payloads = st.lists(st.tuples(line_bytes, st.sampled_from([b"\n", b"\r\n"])), max_size=30).map(
    lambda pairs: b"".join(line + end for line, end in pairs)
)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(st.binary(max_size=400), payloads),
    tail=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    max_line=st.integers(min_value=1, max_value=64),
)
def test_arbitrary_bytes_split_anywhere_give_exactly_the_lines_sent(payload, tail, cuts, max_line):
    payload += tail
    assert feed(payload, cuts, max_line, "raw") == expected_raw(payload, max_line)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.one_of(st.binary(max_size=300), payloads),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_arbitrary_bytes_in_json_are_one_parseable_record_per_line(payload, cuts):
    rows = [json.loads(row) for row in feed(payload, cuts, 64 * 1024, "json").splitlines()]
    *complete, last = payload.split(b"\n")
    lines = [line.removesuffix(b"\r") for line in complete + ([last] if last else [])]
    assert [row["text"] for row in rows] == [
        line.decode("utf-8", "backslashreplace") for line in lines
    ]
    assert [row.get("unterminated", False) for row in rows] == [False] * len(complete) + (
        [True] if last else []
    )


class ScriptedWriter:
    """os.write as a script says: "ok", "partial" (half, at least a byte) or "fail" (ENOSPC)."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)

    def __call__(self, fd: int, data) -> int:
        step = self.script.pop(0) if self.script else "ok"
        if step == "fail":
            raise OSError(errno.ENOSPC, "No space left on device")
        if step == "partial":
            data = data[: max(1, len(data) // 2)]
        return os.write(fd, data)


@settings(max_examples=150, deadline=None)
@given(
    payload=payloads,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
    script=st.lists(st.sampled_from(["ok", "partial", "fail"]), max_size=30),
)
def test_write_errors_and_partial_writes_anywhere_lose_and_reorder_nothing(payload, cuts, script):
    clock = task.Clock()
    with tempfile.TemporaryDirectory() as directory:
        sink = LogSink(
            os.path.join(directory, "lines.log"), clock=clock, writer=ScriptedWriter(script)
        )
        sink.open()
        proto = LineLogFactory(sink).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        points = sorted({cut % (len(payload) + 1) for cut in cuts})
        for start, end in zip([0, *points], [*points, len(payload)], strict=True):
            if end > start:
                proto.dataReceived(payload[start:end])  # even while paused: bytes in flight
            assert (transport.producerState == "paused") == sink.blocked
            clock.advance(RETRY_SECONDS)
        proto.connectionLost(None)
        for _ in range(len(script) + 1):
            clock.advance(RETRY_SECONDS)
        assert not sink.blocked
        sink.close()
        assert Path(sink.path).read_bytes() == expected_raw(payload, 64 * 1024)
        assert clock.getDelayedCalls() == []


@given(lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=30))
def test_overlong_scan_agrees_with_the_obvious_per_line_check(lines):
    data = b"".join(line + b"\n" for line in lines)
    for limit in (0, 1, 5, 17, 29, 30):
        assert has_overlong_line(data, limit) == any(len(line) > limit for line in lines)


# --- faults: SIGKILL and SIGTERM under load -----------------------------------------------------


def start_senders(
    port: int, count: int, max_lines: int, stop: threading.Event, first: int = 0, seconds=20.0
):
    senders = [Sender(port, first + n, stop, max_lines, seconds) for n in range(count)]
    for sender in senders:
        sender.start()
    return senders


def drained(server_port: int, senders: list[Sender]) -> bool:
    """The server read everything these senders sent (both queues of each connection empty)."""
    queues = tcp_queues(server_port)
    for sender in senders:
        client = sender.local_port()
        if queues.get((server_port, client), (0, 1))[1] or queues.get((client, server_port))[0]:
            return False
    return True


def test_sigkill_under_load_loses_no_line_that_reached_the_server(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path)
    stop = threading.Event()
    # Flooders run until the kill (at most 20 s or 2M lines each); finishers send 4,000.
    flooders = start_senders(server.tcp_port, 5, 2_000_000, stop)
    finishers = start_senders(server.tcp_port, 5, 4_000, stop, first=5)
    try:
        for sender in finishers:
            sender.join(30)
            assert sender.sent == 4_000 and sender.error is None
        # Everything the finishers sent has been read by the server process once their
        # queues are empty; they must stay empty for a moment so that reactor turn is over.
        since = []

        def settled() -> bool:
            if not drained(server.tcp_port, finishers):
                since.clear()
            elif not since:
                since.append(time.monotonic())
            return bool(since) and time.monotonic() - since[0] > 0.2

        wait_until(settled)
        assert all(sender.is_alive() for sender in flooders), "still under load at the kill"
        sent_at_kill = sum(sender.sent for sender in flooders)
        server.kill()
    finally:
        stop.set()
        for sender in flooders + finishers:
            sender.join(10)
            sender.sock.close()
    lines = logged_lines(server.path)
    counts = assert_whole_sender_lines(flooders + finishers, lines)
    assert all(counts[sender.client] == 4_000 for sender in finishers)
    flooded = sum(counts[sender.client] for sender in flooders)
    assert flooded > 0
    server.path.unlink()  # a few hundred MB: no need to keep it after the test
    report(
        "sigkill under load",
        lines_in_file=len(lines),
        finisher_lines=5 * 4000,
        flooder_lines_in_file=flooded,
        flooder_lines_sendall_returned_by_kill=sent_at_kill,
    )


def test_sigterm_under_load_exits_zero_quickly_with_everything_flushed(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path, "--format", "json")
    stop = threading.Event()
    senders = start_senders(server.tcp_port, 10, 100_000, stop)
    by_port = {sender.local_port(): sender for sender in senders}
    try:
        wait_until(lambda: server.path.stat().st_size > 2_000_000)
        started = time.monotonic()
        status = server.terminate(timeout=15)
        took = time.monotonic() - started
    finally:
        stop.set()
        for sender in senders:
            sender.join(10)
            sender.sock.close()
    assert status == 0
    assert took < 5, f"SIGTERM took {took:.1f}s"
    rows = rows_of(server)
    whole = [row["text"].encode() for row in rows if not row.get("unterminated")]
    counts = assert_whole_sender_lines(senders, whole)
    cut = [row for row in rows if row.get("unterminated")]
    assert len({row["peer"] for row in cut}) == len(cut), "one cut line per client at most"
    for row in cut:  # the line a client was in the middle of: its start, marked
        sender = by_port[int(row["peer"].rsplit(":", 1)[1])]
        assert sender.line(counts[sender.client]).decode().startswith(row["text"]), row
    assert len(whole) > 10_000
    report("sigterm under load", exit_status=status, seconds=round(took, 2), lines=len(rows))


# --- faults: disk full on a real tmpfs ----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted in tmp_path, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_disk_full_pauses_clients_logs_loudly_and_recovers_without_loss(
    small_disk, twistd, tmp_path
):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (4 * 2**20 - 256 * 1024))
    server = start_log_server(twistd, tmp_path, file=small_disk / "lines.log")
    rss_before = server.rss_kib()
    lines = [b"line %06d " % n + b"d" * 52 for n in range(24_000)]  # 1.5 MiB
    payload = b"".join(line + b"\n" for line in lines)
    client = connect(server.tcp_port)
    sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    sender.start()
    try:
        server.wait_for_line(r"cannot write to .*lines.log: \[Errno 28\] No space left on device")
        rss_blocked = server.rss_kib()
        assert rss_blocked - rss_before < 16 * 1024, "bounded: clients are paused, not buffered"
        # Backpressure: the server stops reading, so bytes wait in its socket receive queue.
        port = client.getsockname()[1]
        held = wait_until(lambda: tcp_queues(server.tcp_port)[(server.tcp_port, port)][1])
        written_while_full = len(logged_lines(server.path))
        assert written_while_full < len(lines)
        ballast.unlink()  # space returns
        server.wait_for_line(r"writing to .*lines.log again after")
        sender.join(20)
        assert not sender.is_alive()
        client.shutdown(socket.SHUT_WR)
        recv_until_closed(client)
        wait_until(lambda: len(logged_lines(server.path)) >= len(lines))
    finally:
        client.close()
    assert logged_lines(server.path) == lines
    assert server.terminate() == 0
    report(
        "disk full",
        lines_before_full=written_while_full,
        kernel_queue_held_bytes=held,
        server_rss_growth_while_blocked_mib=round((rss_blocked - rss_before) / 1024, 1),
        lines_after_recovery=len(lines),
    )


# --- hostile clients ----------------------------------------------------------------------------


class Tail:
    """Follows a growing file, for the latency of a line until it is visible."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = b""

    def wait_for(self, line: bytes, timeout: float = 10.0) -> None:
        def visible() -> bool:
            self.seen = self.path.read_bytes()
            return line in self.seen

        wait_until(visible, timeout=timeout, interval=0.001)


class HonestClient(threading.Thread):
    """Sends a line every C{interval} seconds and times how long until it is in the file."""

    def __init__(self, port: int, path: Path, stop: threading.Event, interval=0.05) -> None:
        super().__init__(daemon=True)
        self.sock = connect(port)
        self.tail = Tail(path)
        self.stop = stop
        self.interval = interval
        self.latencies: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            number = 0
            while not self.stop.wait(self.interval):
                line = b"honest %d" % number
                started = time.monotonic()
                self.sock.sendall(line + b"\n")
                self.tail.wait_for(line + b"\n")
                self.latencies.append(time.monotonic() - started)
                number += 1
        except BaseException as error:
            self.error = error

    def figures(self) -> dict:
        ordered = sorted(self.latencies)
        return {
            "honest_lines": len(ordered),
            "latency_p50_ms": round(statistics.median(ordered) * 1000, 1),
            "latency_max_ms": round(ordered[-1] * 1000, 1),
        }


def test_slowloris_is_closed_by_idle_timeout_while_honest_client_keeps_latency(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path, "--idle-timeout", "2")
    stop = threading.Event()
    honest = HonestClient(server.tcp_port, server.path, stop)
    honest.start()
    slow = {connect(server.tcp_port): time.monotonic() for _ in range(50)}
    closed_after: list[float] = []
    selector = selectors.DefaultSelector()
    for sock in slow:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + 15
        next_byte = time.monotonic()
        while slow and time.monotonic() < deadline:
            if time.monotonic() >= next_byte:  # one byte a second, never a whole line
                for sock in slow:
                    try:
                        sock.send(b"x")
                    except OSError:
                        pass
                next_byte += 1.0
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    closed_after.append(time.monotonic() - slow.pop(sock))
                    selector.unregister(sock)
                    sock.close()
    finally:
        stop.set()
        honest.join(10)
        for sock in slow:
            sock.close()
        selector.close()
    assert not slow, f"{len(slow)} slowloris connections still open"
    assert honest.error is None, honest.error
    assert 1.9 < min(closed_after) and max(closed_after) < 6
    figures = honest.figures()
    assert figures["honest_lines"] > 20
    assert figures["latency_max_ms"] < 1000
    with honest.sock:
        honest.sock.sendall(b"still open\n")  # the honest connection outlived them all
        Tail(server.path).wait_for(b"still open\n")
    report(
        "slowloris",
        slow_clients=50,
        closed_after_s=f"{min(closed_after):.2f}-{max(closed_after):.2f}",
        **figures,
    )


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 12_000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"the hard RLIMIT_NOFILE {hard} is below the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood_lines_of(server) -> list[bytes]:
    return [line for line in logged_lines(server.path) if line.startswith(b"flood ")]


FLOOD = 5_000
CAP = 1_000


def test_connection_flood_holds_the_cap_and_an_honest_client_is_served(many_fds, twistd, tmp_path):
    server = start_log_server(
        twistd,
        tmp_path,
        "--max-connections",
        str(CAP),
        # A listen queue deep enough for the burst: with the default 50, the kernel drops
        # the excess SYNs and the flood only drains at the pace of SYN retransmits.
        listen=f"tcp:0:interface=127.0.0.1:backlog={FLOOD}",
    )
    rss_before = server.rss_kib()
    stop = threading.Event()
    honest = HonestClient(server.tcp_port, server.path, stop, interval=0.01)
    honest.start()
    started = time.monotonic()
    flood: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        for number in range(FLOOD):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.tcp_port))
            flood.append(sock)
            selector.register(sock, selectors.EVENT_WRITE, number)
        # Refused connections are told and closed (possibly reset, as their line is unread);
        # admitted ones stay open and silent.
        refused = told = 0
        deadline = time.monotonic() + 30
        while refused < FLOOD - CAP + 1 and time.monotonic() < deadline:
            for key, events in selector.select(timeout=0.1):
                sock, number = key.fileobj, key.data
                if events & selectors.EVENT_WRITE:
                    sock.send(b"flood %d\n" % number)
                    selector.modify(sock, selectors.EVENT_READ, number)
                    continue
                try:
                    data = sock.recv(100)
                except OSError:
                    data = b""
                told += data.startswith(b"Server is full")
                if not data or data.endswith(b"\n"):
                    refused += 1
                    selector.unregister(sock)
        flood_seconds = time.monotonic() - started
        rss_peak = server.rss_kib()
        wait_until(lambda: len(flood_lines_of(server)) >= CAP - 1)
        still_open = len(selector.get_map())
    finally:
        stop.set()
        honest.join(10)
        selector.close()
        for sock in flood:
            sock.close()
    assert refused == FLOOD - CAP + 1, f"{refused} refused; the cap admits {CAP} with honest"
    assert still_open == CAP - 1
    assert told > 0
    assert len(flood_lines_of(server)) == CAP - 1, "only admitted connections are logged"
    assert honest.error is None, honest.error
    figures = honest.figures()
    assert figures["latency_max_ms"] < 5000
    with connect(server.tcp_port) as late:  # once the flood is gone, newcomers are served
        late.sendall(b"after the flood\n")
        Tail(server.path).wait_for(b"after the flood\n")
    growth = (rss_peak - rss_before) / 1024
    assert growth < 64, f"server grew {growth:.1f} MiB under the flood"
    server.wait_for_line("refused at --max-connections 1000: 127.0.0.1:\\d+")
    report(
        "connection flood",
        connections=FLOOD,
        cap=CAP,
        refused=refused,
        told_full=told,
        seconds=round(flood_seconds, 1),
        rss_growth_mib=round(growth, 1),
        **figures,
    )


def test_reset_mid_line_writes_the_fragment_leaks_nothing_and_logs_no_traceback(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path, "--format", "json", "--max-connections", "1")
    for number in range(3):
        sock = connect(server.tcp_port)
        sock.sendall(b"whole %d\nhalf a li" % number)
        wait_until(lambda n=number: b"whole %d" % n in server.path.read_bytes())
        # SO_LINGER 0: close() sends a reset instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        # The next client is admitted under --max-connections 1 only once this one is released.
        wait_until(lambda n=number: len(rows_of(server)) == 2 * (n + 1))
    rows = rows_of(server)
    expected = [text for n in range(3) for text in (f"whole {n}", "half a li")]
    assert [row["text"] for row in rows] == expected
    assert [row.get("unterminated", False) for row in rows] == [False, True] * 3
    assert server.terminate() == 0
    assert "Traceback" not in server.output
    assert "refused" not in server.output


# --- TLS ----------------------------------------------------------------------------------------


def test_lines_over_tls_through_an_ssl_endpoint(twistd, tmp_path):
    key, cert = make_certificate(tmp_path)
    server = start_log_server(
        twistd,
        tmp_path,
        "--format",
        "json",
        listen=f"ssl:0:interface=127.0.0.1:privateKey={key.name}:certKey={cert.name}",
    )
    context = ssl.create_default_context(cafile=str(cert))
    lines = [b"over tls %d" % n for n in range(500)]
    with connect(server.tcp_port) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(client_payload(lines))
    wait_until(lambda: len(server.path.read_bytes().splitlines()) >= len(lines))
    rows = rows_of(server)
    assert [row["text"].encode() for row in rows] == lines
    assert rows[-1]["unterminated"] is True
    assert all(row["peer"].startswith("127.0.0.1:") for row in rows)
    assert server.terminate() == 0


# --- soak (on demand: uv run pytest -m soak) ----------------------------------------------------


SOAK_LINES = 1_000_000


@pytest.mark.soak
def test_soak_rotation_and_external_logrotate_under_sustained_load(twistd, tmp_path):
    """10 million lines (1 GB) from 10 clients while the server rotates every MiB and an
    external logrotate renames the file and sends SIGHUP 50 times a second: nothing lost."""
    server = start_log_server(
        twistd, tmp_path, "--rotate-bytes", "1M", "--keep", "100000", "--max-line", "1K"
    )
    server.wait_for_line("reopens .* on SIGHUP or SIGUSR1")
    stop = threading.Event()
    senders = start_senders(server.tcp_port, 10, SOAK_LINES, stop, seconds=300)
    renamed = 0
    try:
        while any(sender.is_alive() for sender in senders) and renamed < 100_000:
            try:
                server.path.rename(tmp_path / f"external.{renamed:06d}")
            except FileNotFoundError:
                pass
            server.proc.send_signal(signal.SIGHUP)
            renamed += 1
            stop.wait(0.02)
        for sender in senders:
            sender.join(300)
            assert sender.sent == SOAK_LINES and sender.error is None

        def files() -> list[Path]:
            return sorted(p for p in tmp_path.iterdir() if p.name.startswith(("lines.", "ext")))

        wait_until(
            lambda: sum(p.stat().st_size for p in files()) >= 10 * SOAK_LINES * 100, timeout=120
        )
    finally:
        stop.set()
        for sender in senders:
            sender.sock.close()
    lines = logged_lines(*files())
    counts = assert_whole_sender_lines(senders, sorted(lines, key=sort_key))
    assert set(counts.values()) == {SOAK_LINES}
    assert server.terminate() == 0
    written = files()
    for path in written:
        path.unlink()
    report("soak rotation", lines=len(lines), files=len(written), external_renames=renamed)


def sort_key(line: bytes) -> tuple[int, int]:
    _, client, _, number, _ = line.split(b" ")
    return int(client), int(number)
