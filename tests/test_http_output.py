"""twistnet-http job output, the IO-free part: whole lines per stream and the head+tail cap."""

from __future__ import annotations

import itertools

import pytest

from twistnet.http.output import LONG_LINE, PARTIAL_LINE_WAIT, HeadTail, LineAssembler

# --- LineAssembler ------------------------------------------------------------------------------

#: stdout and stderr writing partial lines in turn, as a tool with unbuffered output does.
INTERLEAVED = [
    (1, b"out-a "),
    (2, b"err-a "),
    (1, b"out-b\nout-c "),
    (2, b"err-b\n"),
    (1, b"out-d\n"),
]


def assemble(script, now=0.0):
    lines = LineAssembler()
    combined = b"".join(lines.receive(stream, data, now) for stream, data in script)
    return combined + lines.flush()


def test_interleaved_partial_lines_stay_whole():
    assert assemble(INTERLEAVED) == b"out-a out-b\nerr-a err-b\nout-c out-d\n"


def every_split(script):
    """The script with each write cut in two at every boundary (one write at a time)."""
    for index, (stream, data) in enumerate(script):
        for cut in range(1, len(data)):
            yield [
                *script[:index],
                (stream, data[:cut]),
                (stream, data[cut:]),
                *script[index + 1 :],
            ]


def test_interleaved_lines_are_the_same_whatever_the_chunking():
    expected = assemble(INTERLEAVED)
    for script in every_split(INTERLEAVED):
        assert assemble(script) == expected, script
    byte_at_a_time = [(s, bytes([b])) for s, data in INTERLEAVED for b in data]
    assert assemble(byte_at_a_time) == expected


def test_a_partial_line_shows_after_the_wait_and_the_rest_follows():
    lines = LineAssembler()
    assert lines.receive(1, b"progress 10%", now=5.0) == b""
    assert lines.next_due() == 5.0 + PARTIAL_LINE_WAIT
    assert lines.due(5.0 + PARTIAL_LINE_WAIT - 0.01) == b""
    assert lines.due(5.0 + PARTIAL_LINE_WAIT) == b"progress 10%"
    assert lines.next_due() is None
    assert lines.receive(1, b"\rprogress 20%\n", now=7.0) == b"\rprogress 20%\n"
    assert lines.flush() == b""


def test_only_the_partial_lines_that_waited_long_enough_are_released():
    lines = LineAssembler()
    lines.receive(1, b"old", now=0.0)
    lines.receive(2, b"new", now=0.5)
    assert lines.next_due() == PARTIAL_LINE_WAIT
    assert lines.due(PARTIAL_LINE_WAIT) == b"old"
    assert lines.next_due() == 0.5 + PARTIAL_LINE_WAIT
    # A partial line keeps the time its first byte arrived, however it grows.
    lines.receive(2, b"er", now=1.4)
    assert lines.due(0.5 + PARTIAL_LINE_WAIT) == b"newer"


def test_a_line_longer_than_the_limit_is_not_held_in_memory():
    lines = LineAssembler()
    assert lines.receive(1, b"x" * (LONG_LINE - 1), now=0.0) == b""
    assert lines.receive(1, b"xy", now=0.0) == b"x" * LONG_LINE + b"y"
    assert lines.next_due() is None


def test_flush_releases_the_oldest_partial_line_first():
    lines = LineAssembler()
    lines.receive(2, b"first", now=1.0)
    lines.receive(1, b"second", now=2.0)
    assert lines.flush() == b"firstsecond"


# --- HeadTail -----------------------------------------------------------------------------------


def capped(chunks, head, tail, slack):
    cap = HeadTail(head, tail, slack)
    written = b"".join(cap.add(chunk) for chunk in chunks)
    return written + cap.finish(), cap


def numbered(count: int, width: int) -> bytes:
    return b"".join(f"{n:0{width - 1}d}\n".encode() for n in range(count))


def test_caps_cut_at_line_boundaries_near_them():
    data = numbered(20, 10)  # 200 bytes, lines of 10
    out, cap = capped([data], head=55, tail=55, slack=20)
    # The head ends after line 5, not at byte 55; the tail starts at line 16, not byte 145.
    assert out == data[:50] + b"[... 100 bytes of output omitted ...]\n" + data[150:]
    assert cap.omitted == 100 and cap.truncated
    assert all(len(line) == 9 for line in out.splitlines() if not line.startswith(b"[..."))


def test_caps_cut_mid_line_when_no_line_ends_near_them():
    out, cap = capped([b"0123456", b"789abcdefghij", b"KLMNOP"], head=10, tail=5, slack=3)
    assert out == b"0123456789\n[... 11 bytes of output omitted ...]\nLMNOP"
    assert cap.omitted == 11


def test_output_within_the_caps_is_kept_whole_without_a_marker():
    data = numbered(9, 10)
    out, cap = capped([data], head=55, tail=55, slack=20)
    assert out == data and not cap.truncated


@pytest.mark.parametrize(
    "data",
    [
        numbered(20, 10),
        numbered(20, 7),
        b"a" * 30 + b"\n" + numbered(10, 13) + b"tail without newline",
        b"no newline at all " * 12,
        numbered(3, 50),
    ],
)
def test_the_cap_is_the_same_whatever_the_chunking(data):
    expected, _ = capped([data], head=64, tail=48, slack=24)
    for a, b in itertools.combinations(range(1, len(data)), 2):
        chunks = [data[:a], data[a:b], data[b:]]
        assert capped(chunks, head=64, tail=48, slack=24)[0] == expected, (a, b)


def test_head_bytes_are_released_as_soon_as_their_line_is_complete():
    cap = HeadTail(head=100, tail=10, slack=30)
    assert cap.add(b"x" * 60) == b"x" * 60  # before the window: at once
    assert cap.add(b"y" * 20) == b"y" * 10  # up to the window at once, the rest held
    assert cap.add(b"y\nz") == b"y" * 11 + b"\n"
    assert cap.finish() == b"z"
