"""Rotation of the log file: the IO-free cut of a batch, and bursts through a real sink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport

from twistnet.log.protocol import LineLogFactory
from twistnet.log.rotation import RotationNames, batches
from twistnet.log.sink import LogSink

LIMIT = 1024


def burst(count: int = 300) -> bytes:
    return b"".join(b"burst line %03d %s\n" % (n, b"y" * (n % 7)) for n in range(count))


@pytest.mark.parametrize("format", ["raw", "json"])
@pytest.mark.parametrize("piece", [None, 1000, 4096, 333, 1])
def test_a_burst_never_grows_a_file_past_rotate_bytes(tmp_path, format, piece):
    sink = LogSink(
        str(tmp_path / "lines.log"),
        format=format,
        rotate_bytes=LIMIT,
        keep=1000,
        clock=task.Clock(),
    )
    sink.open()
    proto = LineLogFactory(sink).buildProtocol(None)
    proto.makeConnection(StringTransport())
    payload = burst()
    piece = piece or len(payload)
    for start in range(0, len(payload), piece):
        proto.dataReceived(payload[start : start + piece])
    sink.close()
    files = [Path(name) for name in sink.rotated_files()] + [tmp_path / "lines.log"]
    assert sink.rotations >= 4
    lines = []
    for path in files:
        data = path.read_bytes()
        assert len(data) <= LIMIT, f"{path.name} holds {len(data)} bytes"
        assert data.endswith(b"\n")
        lines += data.splitlines()
    if format == "json":
        lines = [json.loads(line)["text"].encode() for line in lines]
    assert lines == payload.splitlines()


def test_batches_keep_a_burst_whole_when_it_fits():
    records = b"a\nbb\n"
    assert batches(records, 5, 10) == [records]


def test_batches_fill_the_current_file_then_fresh_ones():
    records = b"aaa\nbbb\nccc\nddd\n"
    assert batches(records, 5, 8) == [b"aaa\n", b"bbb\nccc\n", b"ddd\n"]


def test_batches_start_with_a_rotation_when_no_line_fits_the_room():
    assert batches(b"aaaa\nbb\n", 3, 8) == [b"", b"aaaa\nbb\n"]


def test_batches_put_an_overlong_line_alone_into_a_fresh_file():
    assert batches(b"a\n" + b"x" * 12 + b"\nb\n", 4, 8) == [b"a\n", b"x" * 12 + b"\n", b"b\n"]


@given(
    lines=st.lists(
        st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=40
    ),
    room=st.integers(-5, 16),
    limit=st.integers(1, 16),
)
def test_batches_rejoin_to_the_input_and_pass_the_limit_only_by_a_lone_line(lines, room, limit):
    records = b"".join(lines)
    room = min(room, limit)  # room == limit: the current file is empty
    cut = batches(records, room, limit)
    assert b"".join(cut) == records
    for index, part in enumerate(cut):
        assert not part or part.endswith(b"\n")
        space = room if index == 0 else limit
        if part and len(part) > space:
            assert space == limit and part.count(b"\n") == 1, "only a lone line in a fresh file"


def test_rotation_names_continue_the_highest_sequence_found_and_ignore_strangers():
    names = RotationNames(
        "/logs/lines.log",
        keep=5,
        existing=["lines.log", "lines.log.000002", "lines.log.000010", "lines.log.old", "x.log.7"],
    )
    assert names.next_sequence == 11
    assert names.files() == ["/logs/lines.log.000002", "/logs/lines.log.000010"]
    assert names.name(11) == "/logs/lines.log.000011"


def test_rotation_names_prune_the_oldest_beyond_keep():
    names = RotationNames("/logs/lines.log", keep=2)
    assert names.rotated(1) == []
    assert names.rotated(2) == []
    assert names.rotated(4) == ["/logs/lines.log.000001"]
    assert names.next_sequence == 5
    assert names.files() == ["/logs/lines.log.000002", "/logs/lines.log.000004"]


def test_rotation_names_with_keep_zero_delete_each_rotated_file_at_once():
    names = RotationNames("/logs/lines.log", keep=0)
    assert names.rotated(1) == ["/logs/lines.log.000001"]
    assert names.files() == []
