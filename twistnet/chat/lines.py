"""
Line framing without IO: L{LineSplitter} turns received chunks into complete lines.

A line ends at CR LF (telnet), CR NUL (telnet's bare CR), bare LF (nc) or bare CR. Whole
chunks are split at once (no C{LineReceiver}, which re-scans its buffer for every line).
"""

from __future__ import annotations

import re

#: Any line end; CR LF and CR NUL first so they count as one.
_LINE_END = re.compile(rb"\r\n|\r\x00|\r|\n")


class LineSplitter:
    """
    Splits a byte stream into lines, holding at most C{max_line} bytes of an unfinished one.

    An unfinished line that grows past C{max_line} is dropped, reported once by L{feed},
    and the rest of it discarded up to its line end. A complete line that arrived in one
    chunk is returned whatever its length: the caller refuses it in order with the others.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = b""
        self._after_cr = False
        self._discarding = False

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """The complete lines C{data} finished, and whether an unfinished one overflowed."""
        if not data:
            return [], False
        if self._after_cr:
            self._after_cr = False
            if data[0] in (0, 10):
                data = data[1:]
        if b"\r" in data:
            self._after_cr = data.endswith(b"\r")
            parts = _LINE_END.split(data)
        else:
            parts = data.split(b"\n")
        tail = parts.pop()
        if parts:
            if self._discarding:
                # The end of a line already refused as overlong.
                self._discarding = False
                del parts[0]
            elif self._buffer:
                parts[0] = self._buffer + parts[0]
            self._buffer = tail
        elif not self._discarding:
            self._buffer += tail
        overflowed = len(self._buffer) > self.max_line
        if overflowed:
            self._buffer = b""
            self._discarding = True
        return parts, overflowed
