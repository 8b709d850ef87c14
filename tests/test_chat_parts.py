"""The chat protocol's IO-free parts, each alone: input split at every boundary gives one result."""

from __future__ import annotations

import pytest

from twistnet.chat.flow import SendQueue, TokenBucket, Verdict
from twistnet.chat.lines import LineSplitter
from twistnet.chat.telnet import TelnetFilter


def splits(data: bytes):
    """C{data} whole, cut once at every boundary, and one byte at a time."""
    yield [data]
    for at in range(1, len(data)):
        yield [data[:at], data[at:]]
    yield [data[i : i + 1] for i in range(len(data))]


def filtered(chunks) -> tuple[bytes, bytes]:
    telnet = TelnetFilter()
    results = [telnet.feed(chunk) for chunk in chunks]
    return b"".join(r[0] for r in results), b"".join(r[1] for r in results)


def split_lines(chunks, max_line=100) -> tuple[list[bytes], int]:
    splitter = LineSplitter(max_line)
    lines: list[bytes] = []
    overflows = 0
    for chunk in chunks:
        got, overflowed = splitter.feed(chunk)
        lines += got
        overflows += overflowed
    return lines, overflows


# --- telnet ---------------------------------------------------------------------------------

TELNET_CASES = [
    # (received, application data, answers)
    (b"hi\xff\xfd\x06there", b"hithere", b"\xff\xfc\x06"),  # DO TIMING-MARK -> WONT
    (b"a\xff\xfb\x01b", b"ab", b"\xff\xfe\x01"),  # WILL ECHO -> DONT
    (b"a\xff\xfc\x01\xff\xfe\x01b", b"ab", b""),  # WONT/DONT are never answered
    (b"x\xff\xfa\x18\x00xterm\xff\xf0y", b"xy", b""),  # subnegotiation dropped whole
    (b"\xff\xf4\xff\xfd\x06", b"", b"\xff\xfc\x06"),  # Ctrl-C: IP then DO TIMING-MARK
    (b"a\xff\xffb", b"a\xffb", b""),  # IAC IAC is data
    (b"a\xff\x01b", b"ab", b""),  # unknown command dropped with its IAC
    (b"plain text\r\n", b"plain text\r\n", b""),
]


@pytest.mark.parametrize(("received", "data", "answers"), TELNET_CASES)
def test_telnet_filter_gives_one_result_whatever_the_split(received, data, answers):
    for chunks in splits(received):
        assert filtered(chunks) == (data, answers), chunks


def test_telnet_filter_answers_every_repeated_request():
    assert filtered([b"\xff\xfd\x06" * 3]) == (b"", b"\xff\xfc\x06" * 3)


def test_telnet_filter_keeps_nothing_once_a_command_is_complete():
    telnet = TelnetFilter()
    assert telnet.feed(b"\xff") == (b"", b"")
    assert telnet.feed(b"\xfd") == (b"", b"")
    assert telnet.feed(b"\x06ok") == (b"ok", b"\xff\xfc\x06")
    assert telnet.feed(b"more") == (b"more", b"")


# --- lines ----------------------------------------------------------------------------------

LINE_CASES = [
    (b"one\r\ntwo\r\n", [b"one", b"two"]),  # telnet
    (b"one\ntwo\n", [b"one", b"two"]),  # nc
    (b"one\r\x00two\r\x00", [b"one", b"two"]),  # telnet's bare CR
    (b"one\rtwo\r", [b"one", b"two"]),  # bare CR
    (b"one\r\n\r\ntwo\n", [b"one", b"", b"two"]),  # an empty line stays one line
    (b"caf\xc3\xa9\nunfinished", [b"caf\xc3\xa9"]),
]


@pytest.mark.parametrize(("received", "lines"), LINE_CASES)
def test_line_splitter_gives_the_same_lines_whatever_the_split(received, lines):
    for chunks in splits(received):
        assert split_lines(chunks) == (lines, 0), chunks


def test_line_splitter_reports_an_overlong_unfinished_line_once_and_discards_it():
    received = b"ok\n" + b"x" * 30 + b"\nafter\n"
    for chunks in splits(received):
        lines, overflows = split_lines(chunks, max_line=10)
        # A whole long line in one chunk comes back for the caller to refuse; pieces of one
        # are dropped as they overflow, and reported once.
        assert lines[0] == b"ok" and lines[-1] == b"after", chunks
        assert (len(lines), overflows) in ((3, 0), (2, 1)), chunks


def test_line_splitter_holds_no_more_than_max_line():
    splitter = LineSplitter(10)
    reports = [splitter.feed(b"x" * 7)[1] for _ in range(50)]
    assert reports.count(True) == 1
    assert len(splitter._buffer) <= 10
    assert splitter.feed(b"tail\nnext\n") == ([b"next"], False)


# --- token bucket ---------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    bucket.refill(0.5)
    assert [bucket.take() for _ in range(2)] == [True, False]


def test_token_bucket_warns_once_then_drops_then_disconnects():
    bucket = TokenBucket(rate=1, burst=2, now=0)
    assert bucket.take() and bucket.take() and not bucket.take()
    verdicts = [bucket.over() for _ in range(4)]
    assert verdicts == [Verdict.WARN, Verdict.DROP, Verdict.DISCONNECT, Verdict.DISCONNECT]


def test_a_full_bucket_forgives_the_warning():
    bucket = TokenBucket(rate=1, burst=2, now=0)
    assert bucket.over() is Verdict.WARN
    bucket.refill(10)
    assert bucket.over() is Verdict.WARN


# --- send queue -----------------------------------------------------------------------------


def test_send_queue_takes_one_write_and_says_when_to_schedule():
    queue = SendQueue(cap=100)
    line = b"hello\r\n"
    assert queue.put(line) is True
    assert queue.put(b"x\r\n") is False
    assert queue.take() == b"hello\r\nx\r\n"
    assert queue.put(line) is True
    assert queue.take() is line  # one delivery goes out as the very object
    assert not queue and queue.take() == b""


def test_send_queue_caps_what_waits_unsent():
    queue = SendQueue(cap=100)
    assert queue.fits(pending=0, size=500)  # nothing waiting: a write may go
    assert queue.fits(pending=60, size=40)
    assert not queue.fits(pending=60, size=41)


def test_send_queue_exempts_one_burst_of_bulk_output_not_a_repeated_one():
    queue = SendQueue(cap=100)
    queue.put(b"w" * 1000, exempt=True)
    assert queue.fits(pending=0, size=1000)
    # The bulk output is still unsent: a small line behind it fits.
    assert queue.fits(pending=1000, size=50)
    # Another burst of the same size without reading in between passes the cap.
    queue.put(b"w" * 1000, exempt=True)
    assert not queue.fits(pending=1050, size=1000)
