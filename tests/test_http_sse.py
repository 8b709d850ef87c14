"""The event framing of twistnet-http's log stream, without IO: input split at every byte."""

from __future__ import annotations

import pytest

from twistnet.http.sse import events

OUTPUT = "line 1\r\nzwei\ncarriage\rreturn\nh\u00e9llo \u2603\n\nno newline at the end".encode()


def test_each_line_is_an_event_whose_id_is_the_offset_after_it():
    framed, offset = events(b"a\nbc\n", 0, terminal=False)
    assert framed == b"id: 2\ndata: a\n\nid: 5\ndata: bc\n\n"
    assert offset == 5


def test_a_partial_line_waits_unless_the_output_is_over():
    assert events(b"a\nb", 10, terminal=False) == (b"id: 12\ndata: a\n\n", 12)
    assert events(b"b", 12, terminal=False) == (b"", 12)
    assert events(b"b", 12, terminal=True) == (b"id: 13\ndata: b\n\n", 13)


def test_a_lone_carriage_return_ends_a_line_as_in_sse():
    framed = events(b"a\rb\r\n", 0, terminal=False)[0]
    assert framed == b"id: 2\ndata: a\n\nid: 5\ndata: b\n\n"


def test_undecodable_bytes_are_replaced():
    assert events(b"\xff\n", 0, terminal=False)[0] == "id: 2\ndata: \ufffd\n\n".encode()


@pytest.mark.parametrize("split", range(len(OUTPUT) + 1))
def test_output_split_anywhere_frames_the_same_events(split):
    whole, end = events(OUTPUT, 0, terminal=True)
    first, offset = events(OUTPUT[:split], 0, terminal=False)
    # What the first call held back is read again from its offset, as the stream does.
    rest, final = events(OUTPUT[offset:], offset, terminal=True)
    assert first + rest == whole
    assert final == end == len(OUTPUT)
    # Only whole lines (so whole characters) went out before the end.
    assert OUTPUT[:offset].endswith(b"\n") or offset == 0
    first.decode("utf-8")
