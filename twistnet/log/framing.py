"""
How a twistnet-log connection delimits messages, IO-free: LF-terminated lines, or RFC 6587
octet counting (C{MSG-LEN SP SYSLOG-MSG}, as C{logger --tcp --octet-count} and rsyslog's
omfwd with C{TCP_Framing="octet-counted"} send it), told apart from the first bytes.
"""

from __future__ import annotations

import re

from attrs import frozen

AUTO = "auto"
LINES = "lines"
OCTET_COUNTED = "octet-counted"
FRAMINGS = (AUTO, LINES, OCTET_COUNTED)

#: Digits a frame length may have: 10 already allows more than a GiB.
MAX_LENGTH_DIGITS = 10

#: A larger length is garbage, not a syslog message (rsyslog's default maximum is 8 KiB):
#: the connection is closed rather than skipping that many bytes.
MAX_FRAME_LENGTH = 2**30

#: The start of an octet-counted stream: a length, a space and a syslog <PRI>. Anything else
#: (an ordinary line such as "200 OK") is lines.
_OCTET_START = re.compile(rb"[1-9][0-9]{0,%d} <[0-9]{1,3}>" % (MAX_LENGTH_DIGITS - 1))
#: What may still grow into that start with more bytes.
_OCTET_PREFIX = re.compile(rb"[1-9][0-9]{0,%d}( (<[0-9]{0,3})?)?" % (MAX_LENGTH_DIGITS - 1))

#: The most bytes L{sniff} may need before it decides.
SNIFF_BYTES = MAX_LENGTH_DIGITS + len(b" <123>")


def sniff(head: bytes) -> str | None:
    """The framing of a connection that began with C{head}, or None if it is too early to tell."""
    if _OCTET_START.match(head):
        return OCTET_COUNTED
    if _OCTET_PREFIX.fullmatch(head) or not head:
        return None
    return LINES


def strip_line_end(text: bytes) -> bytes:
    """C{text} without one trailing LF or CR LF (senders that end a message with a newline)."""
    if text.endswith(b"\n"):
        return text[:-2] if text.endswith(b"\r\n") else text[:-1]
    return text


@frozen
class Frame:
    """
    One octet-counted message: C{text} holds at most the decoder's C{max_frame} bytes of it,
    C{length} is the length the sender declared; C{complete} is false for a frame the
    connection's end cut short.
    """

    text: bytes
    length: int
    complete: bool = True

    @property
    def truncated(self) -> bool:
        """Whether bytes of a complete frame were dropped (a cut-short frame keeps all it got)."""
        return self.complete and self.length > len(self.text)


class OctetCountedDecoder:
    """
    Bytes in, L{Frame}s out. A frame longer than C{max_frame} keeps its first C{max_frame}
    bytes and the rest is skipped as it arrives, so memory stays bounded by C{max_frame}.
    A malformed length sets L{error}; the decoder then ignores all further input.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        #: Why the stream cannot be decoded, once it cannot.
        self.error: str | None = None
        self._digits = b""
        self._length = 0
        #: Bytes of the current frame still to come; 0 while reading a length.
        self._remaining = 0
        self._body: list[bytes] = []
        self._kept = 0

    def feed(self, data: bytes) -> list[Frame]:
        """The frames C{data} completes, in order (those before a malformed length too)."""
        frames: list[Frame] = []
        position, end = 0, len(data)
        while position < end and self.error is None:
            if self._remaining:
                position = self._take_body(data, position, frames)
                continue
            space = data.find(b" ", position)
            self._digits += data[position : end if space < 0 else space]
            self.error = _length_error(self._digits, final=space >= 0)
            if space < 0 or self.error is not None:
                break
            position = space + 1
            self._length = self._remaining = int(self._digits)
            self._digits = b""
        return frames

    def _take_body(self, data: bytes, position: int, frames: list[Frame]) -> int:
        take = min(self._remaining, len(data) - position)
        keep = min(take, self.max_frame - self._kept)
        if keep > 0:
            self._body.append(data[position : position + keep])
            self._kept += keep
        self._remaining -= take
        if not self._remaining:
            frames.append(Frame(b"".join(self._body), self._length))
            self._body, self._kept = [], 0
        return position + take

    def finish(self) -> Frame | None:
        """At the end of the stream: the frame it cut short, if any bytes of one arrived."""
        if self.error is not None or not self._remaining:
            return None
        frame = Frame(b"".join(self._body), self._length, complete=False)
        self._body, self._kept, self._remaining = [], 0, 0
        return frame


def _length_error(digits: bytes, final: bool) -> str | None:
    """Why C{digits} (a frame length read so far) cannot be a length, or None."""
    if digits and not digits.isdigit():
        return f"frame length {digits[: MAX_LENGTH_DIGITS + 2]!r} is not a number"
    if final and not digits:
        return "frame length missing"
    if len(digits) > MAX_LENGTH_DIGITS or (final and int(digits) > MAX_FRAME_LENGTH):
        return f"frame length {digits[:MAX_LENGTH_DIGITS].decode()}... is absurd"
    if digits.startswith(b"0"):
        return f"frame length {digits.decode()} is not a positive number without leading zeros"
    return None
