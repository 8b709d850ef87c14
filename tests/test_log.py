"""The log service: unit tests in memory, options, makeService, end-to-end via twistd."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from helpers import connect, run_twistd, wait_until
from log_helpers import (
    client_lines,
    client_payload,
    logged_lines,
    rows_of,
    run_clients,
    send_and_close,
    start_log_server,
    wait_for_lines,
)
from twistnet.log import Options, makeService
from twistnet.log import logfile as logfile_module
from twistnet.log import sink as sink_module
from twistnet.log.protocol import LineLogFactory, LineLogProtocol, has_overlong_line
from twistnet.log.sink import LogSink

PEER = "192.168.1.1:54321"  # StringTransport's default peer address


def make_factory(tmp_path, max_line=64 * 1024, idle_timeout=0.0, max_connections=0, **sink_kw):
    clock = sink_kw.pop("clock", None) or task.Clock()
    sink = LogSink(str(tmp_path / "lines.log"), clock=clock, **sink_kw)
    sink.open()
    factory = LineLogFactory(sink, max_line, max_connections, idle_timeout)
    return factory, clock


def connected(factory) -> tuple[LineLogProtocol, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def file_bytes(factory) -> bytes:
    return Path(factory.sink.path).read_bytes()


def written(tmp_path, *chunks: bytes, close: bool = False, **factory_kw) -> bytes:
    """What the file holds after one connection sent C{chunks} (and closed, if C{close})."""
    factory, _ = make_factory(tmp_path, **factory_kw)
    proto, _ = connected(factory)
    for chunk in chunks:
        proto.dataReceived(chunk)
    if close:
        proto.connectionLost(None)
    return file_bytes(factory)


def messages(events) -> list[str]:
    return [formatEvent(event) for event in events]


class CountingWriter:
    """An os.write stand-in: counts calls, writes at most C{limit} bytes, fails on demand."""

    def __init__(self, limit: int | None = None) -> None:
        self.calls = 0
        self.limit = limit
        self.error: OSError | None = None

    def __call__(self, fd, data) -> int:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return os.write(fd, data[: self.limit] if self.limit else data)


# --- unit: framing ----------------------------------------------------------------------------


def test_lines_are_written_as_sent_with_trailing_cr_stripped(tmp_path):
    pieces = (b"tel", b"net\r", b"\nnc\n\nmid\rdle\r\nla", b"st\r\n")
    assert written(tmp_path, *pieces) == b"telnet\nnc\n\nmid\rdle\nlast\n"


def test_complete_lines_reach_the_file_in_the_same_call_before_the_line_ends(tmp_path):
    assert written(tmp_path, b"one\ntwo\nthr") == b"one\ntwo\n"


def test_final_line_without_newline_is_written_at_disconnect(tmp_path):
    assert written(tmp_path, b"whole\nno newline\r", close=True) == b"whole\nno newline\n"


def test_one_write_per_chunk_whatever_the_number_of_lines(tmp_path):
    writer = CountingWriter()
    factory, _ = make_factory(tmp_path, writer=writer)
    proto, _ = connected(factory)
    chunk = b"".join(b"line %d\r\n" % n for n in range(5000))
    proto.dataReceived(chunk)
    assert writer.calls == 1
    assert file_bytes(factory) == chunk.replace(b"\r\n", b"\n")


def test_partial_os_writes_are_completed(tmp_path):
    data = b"a fairly long line\nand another one\n"
    assert written(tmp_path, data, writer=CountingWriter(limit=7)) == data


def test_two_connections_never_interleave_inside_a_line(tmp_path):
    factory, _ = make_factory(tmp_path)
    first, _ = connected(factory)
    second, _ = connected(factory)
    first.dataReceived(b"first-a\nfirst-")
    second.dataReceived(b"second-a\nsecond-")
    first.dataReceived(b"b\n")
    second.dataReceived(b"b\n")
    lines = file_bytes(factory).splitlines()
    assert sorted(lines) == [b"first-a", b"first-b", b"second-a", b"second-b"]


# --- unit: json ---------------------------------------------------------------------------------


def test_json_records_parse_with_time_peer_text_and_flags(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000.25)
    factory, _ = make_factory(tmp_path, format="json", clock=clock)
    proto, _ = connected(factory)
    proto.dataReceived(b'plain "quoted" \xc3\xa9\r\n\xff\xfebad\ntail')
    proto.connectionLost(None)
    records = [json.loads(row) for row in file_bytes(factory).splitlines()]
    assert records == [
        {"time": "2023-11-14T22:13:20.250Z", "peer": PEER, "text": 'plain "quoted" é'},
        {
            "time": "2023-11-14T22:13:20.250Z",
            "peer": PEER,
            "text": "\\xff\\xfebad",
            "invalid_utf8": True,
        },
        {"time": "2023-11-14T22:13:20.250Z", "peer": PEER, "text": "tail", "unterminated": True},
    ]


# --- unit: --max-line -------------------------------------------------------------------------


def test_overlong_line_is_truncated_with_marker_logged_and_connection_kept(tmp_path):
    factory, _ = make_factory(tmp_path, max_line=10)
    proto, transport = connected(factory)
    with capturedLogs() as events:
        proto.dataReceived(b"short\n" + b"x" * 25 + b"\nafter\n")
    assert file_bytes(factory) == (
        b"short\n" + b"x" * 10 + b" [truncated: line of 25 bytes]\nafter\n"
    )
    assert factory.truncated == 1
    assert any("truncated a 25-byte line from " + PEER in m for m in messages(events))
    assert not transport.disconnecting


def test_overlong_line_spread_over_chunks_is_held_bounded_and_truncated(tmp_path):
    factory, _ = make_factory(tmp_path, max_line=10)
    proto, transport = connected(factory)
    proto.dataReceived(b"ok\n0123456")
    for _ in range(1000):
        proto.dataReceived(b"y" * 100)
        assert len(proto._partial) + len(proto._kept or b"") <= 11
    proto.dataReceived(b"zz\r\nnext\n")
    assert file_bytes(factory) == (b"ok\n0123456yyy [truncated: line of 100009 bytes]\nnext\n")
    assert not transport.disconnecting


def test_line_of_exactly_max_line_bytes_with_crlf_is_whole(tmp_path):
    factory, _ = make_factory(tmp_path, max_line=10)
    proto, _ = connected(factory)
    proto.dataReceived(b"0123456789\r")
    proto.dataReceived(b"\n")
    assert file_bytes(factory) == b"0123456789\n"
    assert factory.truncated == 0


def test_overlong_unterminated_line_in_json_is_marked_both_ways(tmp_path):
    factory, _ = make_factory(tmp_path, max_line=4, format="json")
    proto, _ = connected(factory)
    proto.dataReceived(b"abcdefgh")
    proto.connectionLost(None)
    (record,) = [json.loads(row) for row in file_bytes(factory).splitlines()]
    assert record["text"] == "abcd"
    assert record["truncated"] is True and record["length"] == 8
    assert record["unterminated"] is True


def test_has_overlong_line_examples():
    assert not has_overlong_line(b"abc\nde\n", 3)
    assert has_overlong_line(b"abc\ndefg\n", 3)
    assert has_overlong_line(b"a\n" * 100 + b"toolong\n" + b"b\n" * 100, 6)
    assert not has_overlong_line(b"\n" * 50, 0)


# --- unit: idle timeout -----------------------------------------------------------------------


def test_idle_timeout_counts_complete_lines_so_a_trickle_is_closed(tmp_path):
    factory, clock = make_factory(tmp_path, idle_timeout=10)
    slow, slow_transport = connected(factory)
    honest, honest_transport = connected(factory)
    for _ in range(8):
        clock.advance(2)
        slow.dataReceived(b"x")  # bytes, but never a whole line
        honest.dataReceived(b"line\n")
    assert slow_transport.disconnecting
    assert slow_transport.value().endswith(LineLogProtocol.idle_message)
    assert not honest_transport.disconnecting
    slow.connectionLost(None)
    honest.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_an_overlong_line_that_ends_counts_as_activity(tmp_path):
    factory, clock = make_factory(tmp_path, max_line=4, idle_timeout=10)
    proto, transport = connected(factory)
    proto.dataReceived(b"0123456789")
    clock.advance(9)
    proto.dataReceived(b"end\n")
    clock.advance(9)
    assert not transport.disconnecting
    proto.connectionLost(None)


# --- unit: rotation and reopening -------------------------------------------------------------


def test_rotation_renames_once_to_a_sequence_number_and_prunes_beyond_keep(tmp_path, monkeypatch):
    factory, _ = make_factory(tmp_path, rotate_bytes=40, keep=2)
    proto, _ = connected(factory)
    renames = []
    real_rename = os.rename

    def counting_rename(src, dst):
        renames.append((src, dst))
        real_rename(src, dst)

    monkeypatch.setattr(logfile_module.os, "rename", counting_rename)
    for n in range(20):
        proto.dataReceived(b"line number %02d\n" % n)  # 15 bytes: two per file
    monkeypatch.undo()
    sink = factory.sink
    assert sink.rotations == 9
    assert len(renames) == 9, "one rename per rotation, never a cascade"
    assert [Path(p).name for p in sink.rotated_files()] == ["lines.log.000008", "lines.log.000009"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lines.log",
        "lines.log.000008",
        "lines.log.000009",
    ]
    assert (tmp_path / "lines.log.000009").read_bytes() == b"line number 16\nline number 17\n"
    assert (tmp_path / "lines.log").read_bytes() == b"line number 18\nline number 19\n"


def test_rotation_never_splits_a_chunk_and_continues_the_sequence_after_restart(tmp_path):
    factory, _ = make_factory(tmp_path, rotate_bytes=100, keep=10)
    proto, _ = connected(factory)
    for n in range(30):
        proto.dataReceived(b"%02d-" % n + b"z" * 20 + b"\n" + b"%02d+" % n + b"z" * 20 + b"\n")
    factory.sink.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 11, "the current file and --keep 10 old ones"
    for path in files:
        data = path.read_bytes()
        assert len(data) <= 100 and data.endswith(b"\n")
        assert all(len(line) == 23 for line in data.splitlines())
    again = LogSink(str(tmp_path / "lines.log"), rotate_bytes=100, keep=10, clock=task.Clock())
    again.open()
    again.write(b"x" * 90 + b"\n")
    assert Path(again.rotated_files()[-1]).name == f"lines.log.{factory.sink.rotations + 1:06d}"
    again.close()


def test_rotation_failure_is_logged_loudly_and_lines_keep_going_to_the_file(tmp_path, monkeypatch):
    factory, clock = make_factory(tmp_path, rotate_bytes=20)
    proto, _ = connected(factory)

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(logfile_module.os, "rename", refuse)
    with capturedLogs() as events:
        for n in range(5):
            proto.dataReceived(b"line %d of many\n" % n)
    logged = [m for m in messages(events) if "cannot rotate" in m]
    assert len(logged) == 1, "logged once per retry period, not once per line"
    assert "Permission denied" in logged[0]
    assert file_bytes(factory).count(b"\n") == 5
    monkeypatch.undo()
    clock.advance(logfile_module.ROTATE_RETRY_SECONDS)
    proto.dataReceived(b"after\n")
    assert file_bytes(factory) == b"after\n"
    assert factory.sink.rotations == 1


def test_reopen_after_external_rename_writes_to_a_fresh_file(tmp_path):
    factory, _ = make_factory(tmp_path)
    proto, _ = connected(factory)
    proto.dataReceived(b"before\n")
    os.rename(tmp_path / "lines.log", tmp_path / "lines.log.1")
    proto.dataReceived(b"still old fd\n")
    factory.sink.reopen()
    proto.dataReceived(b"after\n")
    assert (tmp_path / "lines.log.1").read_bytes() == b"before\nstill old fd\n"
    assert (tmp_path / "lines.log").read_bytes() == b"after\n"


def test_failed_reopen_keeps_writing_to_the_old_file_and_retries(tmp_path, monkeypatch):
    factory, clock = make_factory(tmp_path)
    sink = factory.sink
    os.rename(tmp_path / "lines.log", tmp_path / "moved.log")
    real_open = os.open

    def refuse(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(logfile_module.os, "open", refuse)
    with capturedLogs() as events:
        sink.reopen()
        sink.write(b"kept\n")
    assert any("cannot open" in m and "Too many open files" in m for m in messages(events))
    monkeypatch.setattr(logfile_module.os, "open", real_open)
    clock.advance(logfile_module.ROTATE_RETRY_SECONDS)
    sink.write(b"fresh\n")
    assert (tmp_path / "moved.log").read_bytes() == b"kept\n"
    assert (tmp_path / "lines.log").read_bytes() == b"fresh\n"


def test_reopen_after_close_is_ignored(tmp_path):
    factory, _ = make_factory(tmp_path)
    factory.sink.close()
    factory.sink.reopen()
    assert factory.sink.file.closed


# --- unit: fsync --------------------------------------------------------------------------------


def test_fsync_runs_on_the_clock_only_after_writes_and_at_close(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(logfile_module.os, "fsync", synced.append)
    factory, clock = make_factory(tmp_path, fsync_interval=5.0)
    sink = factory.sink
    clock.advance(5)
    assert synced == [], "nothing written, nothing to sync"
    sink.write(b"a\n")
    clock.advance(4.9)
    assert synced == []
    clock.advance(0.1)
    assert synced == [sink.file.fileno()]
    clock.advance(10)
    assert len(synced) == 1
    sink.write(b"b\n")
    sink.close()
    assert len(synced) == 2
    assert clock.getDelayedCalls() == []


def test_no_fsync_timer_without_the_option(tmp_path):
    _, clock = make_factory(tmp_path)
    assert clock.getDelayedCalls() == []


# --- unit: write errors and backpressure ------------------------------------------------------


def test_disk_full_pauses_every_client_keeps_bytes_and_recovers_in_order(tmp_path):
    writer = CountingWriter()
    factory, clock = make_factory(tmp_path, writer=writer, idle_timeout=3)
    first, first_transport = connected(factory)
    second, second_transport = connected(factory)
    first.dataReceived(b"1 before\n")
    writer.error = OSError(errno.ENOSPC, "No space left on device")
    with capturedLogs() as events:
        first.dataReceived(b"1 during\n")
        second.dataReceived(b"2 during\n")  # already in flight in the same reactor turn
        assert factory.sink.blocked
        assert first_transport.producerState == "paused"
        assert second_transport.producerState == "paused"
        late, late_transport = connected(factory)
        assert late_transport.producerState == "paused"
        late.dataReceived(b"late\npart")
        late.connectionLost(None)
        for _ in range(4):
            clock.advance(sink_module.RETRY_SECONDS)
        assert not first_transport.disconnecting, "no idle timeout while we hold the reads"
        writer.error = None
        clock.advance(sink_module.RETRY_SECONDS)
    logged = messages(events)
    assert any(
        "cannot write to" in m and "No space left on device" in m and "pausing reading" in m
        for m in logged
    )
    assert any("writing to" in m and "again after" in m for m in logged)
    assert not factory.sink.blocked
    assert first_transport.producerState == "producing"
    assert second_transport.producerState == "producing"
    assert file_bytes(factory) == b"1 before\n1 during\n2 during\nlate\npart\n"
    first.dataReceived(b"1 after\n")
    assert file_bytes(factory).endswith(b"1 after\n")
    first.connectionLost(None)
    second.connectionLost(None)
    factory.sink.close()
    assert clock.getDelayedCalls() == []


def test_partial_write_then_error_leaves_no_broken_line_and_holds_it_whole(tmp_path):
    class HalfThenFail(CountingWriter):
        def __call__(self, fd, data):
            if self.calls == 0:
                self.calls += 1
                return os.write(fd, data[:5])
            return super().__call__(fd, data)

    writer = HalfThenFail()
    writer.error = OSError(errno.ENOSPC, "No space left on device")
    factory, clock = make_factory(tmp_path, writer=writer)
    Path(factory.sink.path).write_bytes(b"earlier\n")
    factory.sink.write(b"0123456789\n")
    assert file_bytes(factory) == b"earlier\n", "the 5 bytes that went out were taken back"
    assert factory.sink.blocked
    writer.error = None
    clock.advance(sink_module.RETRY_SECONDS)
    assert file_bytes(factory) == b"earlier\n0123456789\n"


def test_close_while_blocked_logs_the_bytes_lost(tmp_path):
    writer = CountingWriter()
    factory, clock = make_factory(tmp_path, writer=writer)
    writer.error = OSError(errno.ENOSPC, "No space left on device")
    factory.sink.write(b"doomed\n")
    with capturedLogs() as events:
        factory.sink.close()
    assert any("7 received bytes lost" in m for m in messages(events))
    assert clock.getDelayedCalls() == []


# --- options and makeService ------------------------------------------------------------------


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_options_defaults():
    options = parse()
    assert options.endpoint_descriptions() == ["tcp:5140:backlog=511"]
    assert options["file"] == "lines.log"
    assert options["format"] == "raw"
    assert options["rotate-bytes"] == 0
    assert options["keep"] == 5
    assert options["fsync"] == 0.0
    assert options["max-line"] == 65536
    assert options["max-connections"] == 1000
    assert options["idle-timeout"] == 0.0


def test_options_parse_sizes_and_formats():
    options = parse("--file", "x.log", "--format", "json", "--rotate-bytes", "10M", "--keep", "3")
    assert options["rotate-bytes"] == 10 * 2**20
    assert options["format"] == "json"
    assert options["keep"] == 3
    assert parse("--max-line", "4k")["max-line"] == 4096
    assert parse("--fsync", "0.5")["fsync"] == 0.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "xml"], "expected one of raw, json"),
        (["--rotate-bytes", "lots"], "expected a size in bytes"),
        (["--keep", "-1"], "expected 0 or more"),
        (["--fsync", "-2"], "expected a finite number"),
        (["--max-line", "0"], "--max-line must be at least 1 byte"),
        (["--file", ""], "--file needs a file name"),
        (["--rotate-bytes", "1000", "--max-line", "4096"], "a single line could not fit"),
    ],
)
def test_bad_options_are_usage_errors_with_a_sentence(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_make_service_opens_the_file_listens_and_closes_on_stop(tmp_path):
    reactor = MemoryReactorClock()
    options = parse("--listen", "tcp:5150", "--file", str(tmp_path / "made.log"))
    service = makeService(options, reactor=reactor)
    assert (tmp_path / "made.log").exists(), "opened while the service is built"
    service.privilegedStartService()
    service.startService()
    assert [port for port, *_ in reactor.tcpServers] == [5150]
    factory = reactor.tcpServers[0][1]
    proto, _ = connected(factory)
    proto.dataReceived(b"kept\nunfinished")
    stopped = defer.maybeDeferred(service.stopService)
    proto.connectionLost(None)  # what close_all's loseConnection leads to
    assert stopped.called
    assert (tmp_path / "made.log").read_bytes() == b"kept\nunfinished\n"
    assert factory.sink.file.closed


def test_make_service_refuses_an_unopenable_file(tmp_path):
    options = parse("--file", str(tmp_path / "no" / "such" / "dir.log"))
    with pytest.raises(SystemExit, match=r"cannot open log file .*No such file or directory"):
        makeService(options, reactor=MemoryReactorClock())


def test_make_service_refuses_rotation_in_an_unwritable_directory(tmp_path, monkeypatch):
    from twistnet.log import tap

    monkeypatch.setattr(tap.os, "access", lambda path, mode: False)
    options = parse("--file", str(tmp_path / "x.log"), "--rotate-bytes", "1M")
    with pytest.raises(SystemExit, match=r"cannot rotate .*x\.log: its directory .* not writable"):
        makeService(options, reactor=MemoryReactorClock())


# --- end to end: twistd as a child process ----------------------------------------------------


TEN_CLIENTS = [client_lines(client, 2000) for client in range(10)]


def test_ten_concurrent_clients_every_line_once_and_whole_while_running(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path)
    run_clients(server.tcp_port, [client_payload(lines) for lines in TEN_CLIENTS])
    expected = [line for lines in TEN_CLIENTS for line in lines]
    found = wait_for_lines(expected, lambda: [server.path])
    assert Counter(found) == Counter(expected)
    assert server.proc.poll() is None, "checked while the server still runs"
    for client, lines in enumerate(TEN_CLIENTS):  # each client's lines in the order sent
        assert [line for line in found if line.split(b" ")[1] == b"%d" % client] == lines


def test_nothing_is_lost_when_the_server_is_killed_a_moment_later(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path)
    run_clients(server.tcp_port, [client_payload(lines) for lines in TEN_CLIENTS])
    # Every client saw the server close, so the server read all of it (final lines included,
    # written just before); a sentinel read after that proves its turn is over.
    send_and_close(server.tcp_port, b"sentinel\n")
    wait_until(lambda: b"sentinel\n" in server.path.read_bytes())
    server.kill()
    assert server.proc.returncode == -signal.SIGKILL
    expected = [line for lines in TEN_CLIENTS for line in lines] + [b"sentinel"]
    assert Counter(logged_lines(server.path)) == Counter(expected)


def test_rotation_under_load_loses_and_splits_nothing(twistd, tmp_path):
    server = start_log_server(
        twistd, tmp_path, "--rotate-bytes", "64K", "--keep", "1000", "--max-line", "1K"
    )
    run_clients(server.tcp_port, [client_payload(lines) for lines in TEN_CLIENTS])
    expected = [line for lines in TEN_CLIENTS for line in lines]

    def files():
        return [*sorted(tmp_path.glob("lines.log.*")), server.path]

    found = wait_for_lines(expected, files)
    assert Counter(found) == Counter(expected)
    rotated = files()[:-1]
    assert len(rotated) >= 10, f"only {len(rotated)} rotations for {sum(map(len, expected))} B"
    assert all(path.stat().st_size <= 64 * 1024 for path in rotated)
    assert server.terminate() == 0


def test_json_rows_parse_with_peer_and_unterminated_last_line(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path, "--format", "json")
    texts = [b'caf\xc3\xa9 "quoted"', b"\xff not utf-8", b"tab\there", b"last"]
    send_and_close(server.tcp_port, b'caf\xc3\xa9 "quoted"\r\n\xff not utf-8\ntab\there\nlast')
    rows = wait_until(lambda: len(server.path.read_bytes().splitlines()) >= 4 and rows_of(server))
    assert [row["text"] for row in rows] == [
        'café "quoted"',
        "\\xff not utf-8",
        "tab\there",
        "last",
    ]
    assert len(rows) == len(texts)
    assert all(row["peer"].startswith("127.0.0.1:") for row in rows)
    assert [row.get("unterminated", False) for row in rows] == [False, False, False, True]
    assert rows[1]["invalid_utf8"] is True
    for row in rows:
        stamp = datetime.fromisoformat(row["time"].replace("Z", "+00:00"))
        assert abs(stamp.timestamp() - time.time()) < 60


@pytest.mark.parametrize(
    ("path", "reason"),
    [("missing-dir/lines.log", "No such file or directory"), (".", "Is a directory")],
)
def test_unopenable_file_is_refused_with_one_line_and_nonzero_exit(tmp_path, path, reason):
    result = run_twistd("twistnet-log", "--port", "0", "--file", path, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"twistnet-log: cannot open log file {tmp_path}" in output
    assert reason in output
    assert "Traceback" not in output


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def test_a_start_that_cannot_listen_leaves_no_new_file_behind(tmp_path, busy_port):
    listen = f"tcp:{busy_port}:interface=127.0.0.1"
    result = run_twistd("twistnet-log", "--listen", listen, "--file", "new.log", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"twistnet-log: cannot listen on 127.0.0.1:{busy_port}" in output
    assert "Traceback" not in output
    assert not (tmp_path / "new.log").exists()
    (tmp_path / "old.log").write_bytes(b"")  # an empty file that was there is left alone
    result = run_twistd("twistnet-log", "--listen", listen, "--file", "old.log", cwd=tmp_path)
    assert result.returncode != 0
    assert (tmp_path / "old.log").exists()


def test_abandon_removes_only_an_unused_file_the_sink_created(tmp_path):
    fresh = LogSink(str(tmp_path / "fresh.log"), clock=task.Clock())
    fresh.open()
    fresh.abandon()
    assert not (tmp_path / "fresh.log").exists()
    (tmp_path / "kept.log").write_bytes(b"earlier\n")
    kept = LogSink(str(tmp_path / "kept.log"), clock=task.Clock())
    kept.open()
    kept.abandon()
    assert (tmp_path / "kept.log").read_bytes() == b"earlier\n"


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_signal_reopens_the_file_after_an_external_rename(twistd, tmp_path, signum):
    server = start_log_server(twistd, tmp_path)
    server.wait_for_line("reopens .* on SIGHUP or SIGUSR1")
    with connect(server.tcp_port) as sock:
        sock.sendall(b"before rotation\n")
        wait_until(lambda: server.path.read_bytes() == b"before rotation\n")
        server.path.rename(tmp_path / "lines.log.1")  # what logrotate does
        sock.sendall(b"still to the renamed file\n")
        wait_until(lambda: (tmp_path / "lines.log.1").read_bytes().count(b"\n") == 2)
        server.proc.send_signal(signum)
        server.wait_for_line("reopening .*lines.log")
        sock.sendall(b"after reopen\n")
        wait_until(lambda: server.path.exists() and server.path.read_bytes() == b"after reopen\n")
    assert (
        tmp_path / "lines.log.1"
    ).read_bytes() == b"before rotation\nstill to the renamed file\n"
    assert server.terminate() == 0
