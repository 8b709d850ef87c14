"""RFC 6587 octet counting: the IO-free decoder and sniffer alone, then through a connection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from twistnet.log import Options
from twistnet.log.framing import (
    LINES,
    MAX_FRAME_LENGTH,
    OCTET_COUNTED,
    Frame,
    OctetCountedDecoder,
    sniff,
    strip_line_end,
)
from twistnet.log.protocol import LineLogFactory
from twistnet.log.sink import LogSink

MESSAGES = [b"<13>1 2026-01-01T00:00:00Z host app - - - hello", b"<14>two\nlines", b"<15>x"]
STREAM = b"".join(b"%d %s" % (len(m), m) for m in MESSAGES)


def octet(*messages: bytes) -> bytes:
    return b"".join(b"%d %s" % (len(m), m) for m in messages)


def decode_split(stream: bytes, cuts: list[int], max_frame: int = 1000):
    decoder = OctetCountedDecoder(max_frame)
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        frames += decoder.feed(stream[start:end])
    return frames, decoder


# --- the decoder alone --------------------------------------------------------------------


def test_chunk_boundaries_every_single_split_gives_the_same_frames():
    expected = [Frame(m, len(m)) for m in MESSAGES]
    for cut in range(len(STREAM) + 1):
        frames, decoder = decode_split(STREAM, [cut])
        assert frames == expected, f"split at {cut}"
        assert decoder.error is None and decoder.finish() is None


def test_chunk_boundaries_byte_by_byte_and_every_pair_of_splits():
    expected = [Frame(m, len(m)) for m in MESSAGES]
    assert decode_split(STREAM, list(range(1, len(STREAM))))[0] == expected
    for first in range(0, len(STREAM), 3):
        for second in range(first, len(STREAM) + 1, 5):
            assert decode_split(STREAM, [first, second])[0] == expected


def test_a_frame_over_the_cap_keeps_its_head_and_skips_the_rest_at_every_split():
    stream = octet(b"a" * 30, b"next")
    for cut in range(len(stream) + 1):
        frames, _ = decode_split(stream, [cut], max_frame=8)
        assert frames == [Frame(b"a" * 8, 30), Frame(b"next", 4)]
        assert frames[0].truncated and not frames[1].truncated


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"12x <13>hello", "is not a number"),
        (b"abc", "is not a number"),
        (b"0 ", "not a positive number"),
        (b"007 <13>abcd", "not a positive number"),
        (b" <13>hi", "frame length missing"),
        (b"12345678901", "is absurd"),
        (b"%d " % (MAX_FRAME_LENGTH + 1), "is absurd"),
    ],
)
def test_a_malformed_length_stops_the_decoder_with_a_reason(stream, error):
    frames, decoder = decode_split(octet(b"<13>ok") + stream, [])
    assert frames == [Frame(b"<13>ok", 6)], "frames before the bad length still come out"
    assert error in decoder.error
    assert decoder.feed(octet(b"<13>more")) == []
    assert decoder.finish() is None


def test_a_malformed_length_is_found_whatever_the_split():
    stream = octet(b"<13>ok") + b"4x2 <13>"
    for cut in range(len(stream) + 1):
        frames, decoder = decode_split(stream, [cut])
        assert frames == [Frame(b"<13>ok", 6)]
        assert "is not a number" in decoder.error


def test_finish_returns_a_frame_cut_short_by_the_end_of_the_stream():
    decoder = OctetCountedDecoder(1000)
    assert decoder.feed(b"20 <13>partial") == []
    assert decoder.finish() == Frame(b"<13>partial", 20, complete=False)
    assert not Frame(b"<13>partial", 20, complete=False).truncated
    assert decoder.finish() is None
    assert OctetCountedDecoder(10).finish() is None, "nothing arrived: nothing to write"


@pytest.mark.parametrize(
    ("head", "framing"),
    [
        (b"5 <13>x", OCTET_COUNTED),
        (b"123 <1>", OCTET_COUNTED),
        (b"200 OK", LINES),
        (b"200 <html>", LINES),
        (b"0 <13>", LINES),
        (b"12 <1234>", LINES),
        (b"hello", LINES),
        (b"12\n", LINES),
        (b"12345678901 <13>", LINES),
        (b"", None),
        (b"5", None),
        (b"52 ", None),
        (b"52 <", None),
        (b"52 <134", None),
    ],
)
def test_sniff_tells_octet_counting_only_by_length_space_and_pri(head, framing):
    assert sniff(head) == framing


def test_strip_line_end_removes_one_lf_or_crlf_only():
    assert strip_line_end(b"a\r\n") == b"a"
    assert strip_line_end(b"a\n\n") == b"a\n"
    assert strip_line_end(b"a\r") == b"a\r"


# --- through a connection -----------------------------------------------------------------


def run(tmp_path, *chunks: bytes, framing="auto", format="raw", max_line=64 * 1024):
    sink = LogSink(str(tmp_path / "lines.log"), format=format, clock=task.Clock())
    sink.open()
    factory = LineLogFactory(sink, max_line, framing=framing)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    with capturedLogs() as events:
        for chunk in chunks:
            proto.dataReceived(chunk)
        proto.connectionLost(None)
    sink.close()
    logged = [formatEvent(event) for event in events]
    return Path(sink.path).read_bytes(), transport, logged


def test_auto_detects_octet_counting_and_escapes_lf_and_backslash_in_raw(tmp_path):
    data, _, _ = run(tmp_path, octet(b"<13>one", b"<13>two\nlines", b"<13>back\\slash\n"))
    assert data == b"<13>one\n<13>two\\nlines\n<13>back\\\\slash\n"


def test_octet_frames_in_json_are_one_record_each_with_lf_kept_in_the_text(tmp_path):
    data, _, _ = run(tmp_path, octet(b"<13>two\nlines", b"<13>x"), format="json")
    assert [json.loads(row)["text"] for row in data.splitlines()] == ["<13>two\nlines", "<13>x"]


def test_auto_keeps_an_ordinary_line_starting_with_digits_as_lines(tmp_path):
    data, _, _ = run(tmp_path, b"20", b"0 OK\n12 <b>bold</b>\n")
    assert data == b"200 OK\n12 <b>bold</b>\n"


def test_lines_framing_never_decodes_frames(tmp_path):
    data, _, _ = run(tmp_path, b"5 <13>x\n", framing="lines")
    assert data == b"5 <13>x\n"


def test_a_short_connection_still_sniffing_writes_its_bytes_as_a_line(tmp_path):
    data, _, _ = run(tmp_path, b"42")
    assert data == b"42\n"


def test_an_overlong_frame_is_truncated_flagged_and_the_next_frame_kept(tmp_path):
    data, transport, logged = run(
        tmp_path, octet(b"<13>" + b"z" * 40, b"<13>next"), framing="octet-counted", max_line=10
    )
    assert data == b"<13>zzzzzz [truncated: line of 44 bytes]\n<13>next\n"
    assert not transport.disconnecting
    assert any("truncated a 44-byte line" in m for m in logged)


def test_a_malformed_frame_closes_only_that_connection_with_a_log_line(tmp_path):
    data, transport, logged = run(tmp_path, octet(b"<13>ok") + b"x3 <13>bad")
    assert data == b"<13>ok\n"
    assert transport.disconnecting
    assert any("closing" in m and "is not a number" in m and "RFC 6587" in m for m in logged)


def test_a_frame_cut_short_by_the_disconnect_is_written_unterminated(tmp_path):
    data, _, _ = run(tmp_path, b"30 <13>cut short", format="json")
    row = json.loads(data)
    assert row["text"] == "<13>cut short" and row["unterminated"] is True


def test_framing_option_parses_and_refuses_unknown_values():
    assert Options().parseOptions([]) is None
    options = Options()
    options.parseOptions(["--framing", "octet-counted"])
    assert options["framing"] == "octet-counted"
    default = Options()
    default.parseOptions([])
    assert default["framing"] == "auto"
    with pytest.raises(usage.UsageError, match="expected one of auto, lines, octet-counted"):
        Options().parseOptions(["--framing", "syslog"])
