"""UDP input of twistnet-log: the drop counter alone, the datagram protocol, a real child."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from twisted.internet import task
from twisted.logger import capturedLogs, formatEvent

from helpers import wait_until
from log_helpers import start_log_server
from twistnet._tap import MAX_DATAGRAM
from twistnet.log import Options
from twistnet.log.sink import RETRY_SECONDS, LogSink
from twistnet.log.udp import DatagramLogProtocol, DropCounter

PEER = ("127.0.0.1", 40000)


class FailingWriter:
    """os.write that raises ENOSPC while C{full}."""

    def __init__(self) -> None:
        self.full = False

    def __call__(self, fd, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)


def datagram_protocol(tmp_path, format="raw", max_line=64 * 1024, writer=os.write):
    clock = task.Clock()
    sink = LogSink(str(tmp_path / "lines.log"), format=format, clock=clock, writer=writer)
    sink.open()
    return DatagramLogProtocol(sink, max_line), clock


def test_drop_counter_reports_the_first_drop_at_once_then_at_most_once_per_period():
    drops = DropCounter(every=1.0)
    assert drops.dropped(10, now=5.0) == 0.0
    assert drops.report(5.0) == (1, 10)
    assert drops.dropped(20, now=5.25) == 0.75
    assert drops.dropped(30, now=5.5) == 0.5
    assert drops.report(6.0) == (2, 50)
    assert drops.dropped(1, now=9.0) == 0.0
    assert drops.total == 4


def test_one_record_per_datagram_trailing_newline_dropped_inner_lf_escaped(tmp_path):
    proto, _ = datagram_protocol(tmp_path)
    for data in (b"plain", b"ends in lf\n", b"ends in crlf\r\n", b"two\nlines", b"a\\b", b"\n"):
        proto.datagramReceived(data, PEER)
    proto.sink.close()
    assert Path(proto.sink.path).read_bytes() == (
        b"plain\nends in lf\nends in crlf\ntwo\\nlines\na\\\\b\n\n"
    )


def test_json_records_carry_the_sender_as_peer(tmp_path):
    proto, _ = datagram_protocol(tmp_path, format="json")
    proto.datagramReceived(b"<13>two\nlines\n", ("::1", 514))
    proto.sink.close()
    row = json.loads(Path(proto.sink.path).read_bytes())
    assert row["peer"] == "::1:514"
    assert row["text"] == "<13>two\nlines"


def test_a_datagram_over_max_line_is_truncated_and_flagged(tmp_path):
    proto, _ = datagram_protocol(tmp_path, max_line=4)
    with capturedLogs() as events:
        proto.datagramReceived(b"abcdefgh", PEER)
    proto.sink.close()
    assert Path(proto.sink.path).read_bytes() == b"abcd [truncated: line of 8 bytes]\n"
    assert any("truncated a 8-byte datagram" in formatEvent(e) for e in events)


def test_while_the_disk_is_full_datagrams_are_dropped_counted_and_summarised(tmp_path):
    writer = FailingWriter()
    proto, clock = datagram_protocol(tmp_path, writer=writer)
    writer.full = True
    with capturedLogs() as events:
        proto.datagramReceived(b"held", PEER)  # the sink holds this one and blocks
        for n in range(5):
            proto.datagramReceived(b"dropped %d" % n, PEER)
            clock.advance(0.1)
        clock.advance(1.0)
        writer.full = False
        clock.advance(RETRY_SECONDS)
        proto.datagramReceived(b"after", PEER)
        proto.stopProtocol()
    summaries = [formatEvent(e) for e in events if "UDP datagrams" in formatEvent(e)]
    assert len(summaries) == 2, summaries
    assert summaries[0].startswith("dropped 1 UDP datagrams (9 bytes)")
    assert summaries[1].startswith("dropped 4 UDP datagrams (36 bytes)")
    assert "(5 dropped in all)" in summaries[1]
    proto.sink.close()
    assert Path(proto.sink.path).read_bytes() == b"held\nafter\n"
    assert clock.getDelayedCalls() == []


def test_udp_options_default_off():
    options = Options()
    options.parseOptions([])
    assert options["udp-port"] is None
    options = Options()
    options.parseOptions(["--udp-port", "5514", "--udp-interface", "127.0.0.1"])
    assert (options["udp-port"], options["udp-interface"]) == (5514, "127.0.0.1")


def test_whole_datagrams_up_to_the_udp_maximum_reach_the_file(twistd, tmp_path):
    server = start_log_server(
        twistd, tmp_path, "--udp-port", "0", "--udp-interface", "127.0.0.1", "--format", "json"
    )
    udp_port = server.port("udp")
    largest = b"L" * (MAX_DATAGRAM - 28)  # the IPv4 maximum payload, 65,507 bytes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"small one\n", ("127.0.0.1", udp_port))
        sock.sendto(largest, ("127.0.0.1", udp_port))
        sender = f"127.0.0.1:{sock.getsockname()[1]}"
    wait_until(lambda: server.path.exists() and server.path.read_bytes().count(b"\n") >= 2)
    rows = [json.loads(row) for row in server.path.read_bytes().splitlines()]
    assert [row["text"] for row in rows] == ["small one", largest.decode()]
    assert {row["peer"] for row in rows} == {sender}
    assert not any("truncated" in row for row in rows)
    assert server.terminate() == 0
