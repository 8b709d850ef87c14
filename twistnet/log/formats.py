"""
How a received line becomes a record in the log file: C{raw} (the line as sent) or C{json}
(one object per line with time, peer and text).
"""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring

from twisted.internet.interfaces import IReactorTime


class RawFormat:
    """Each line exactly as sent (a trailing CR removed), one per line."""

    name = "raw"

    def chunk(self, lines: bytes, peer: str) -> bytes:
        """Records for C{lines}: complete lines, each ending in LF, none over the limit."""
        return lines

    def line(
        self, text: bytes, peer: str, *, length: int | None = None, unterminated: bool = False
    ) -> bytes:
        """The record of one line; C{length} is the size sent when C{text} is truncated."""
        if length is not None:
            return b"%s [truncated: line of %d bytes]\n" % (text, length)
        return text + b"\n"

    def message(
        self, text: bytes, peer: str, *, length: int | None = None, unterminated: bool = False
    ) -> bytes:
        """
        The record of a message that may hold LFs (a syslog frame, a datagram): a backslash
        becomes C{\\\\} and an LF C{\\n}, so one message stays one line and stays readable.
        """
        if b"\\" in text or b"\n" in text:
            text = text.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
        return self.line(text, peer, length=length, unterminated=unterminated)


class JsonFormat:
    """
    One JSON object per line: C{time} (UTC ISO-8601, when the chunk arrived), C{peer}, C{text};
    C{invalid_utf8}, C{truncated} with C{length}, and C{unterminated} only when they apply.
    Invalid UTF-8 is backslash-escaped (C{\\xff}), never fatal.
    """

    name = "json"

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = self._clock.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def chunk(self, lines: bytes, peer: str) -> bytes:
        try:
            text = lines.decode("utf-8")
        except UnicodeDecodeError:
            return b"".join(self.line(line, peer) for line in lines[:-1].split(b"\n"))
        prefix = f'{{"time":"{self._timestamp()}","peer":{encode_basestring(peer)},"text":'
        encode = encode_basestring
        return "".join([f"{prefix}{encode(line)}}}\n" for line in text[:-1].split("\n")]).encode()

    def line(
        self, text: bytes, peer: str, *, length: int | None = None, unterminated: bool = False
    ) -> bytes:
        record: dict[str, object] = {"time": self._timestamp(), "peer": peer}
        try:
            record["text"] = text.decode("utf-8")
        except UnicodeDecodeError:
            record["text"] = text.decode("utf-8", "backslashreplace")
            record["invalid_utf8"] = True
        if length is not None:
            record["truncated"] = True
            record["length"] = length
        if unterminated:
            record["unterminated"] = True
        return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    #: JSON escapes an LF inside a message natively.
    message = line


FORMATS = ("raw", "json")


def make_format(name: str, clock: IReactorTime) -> RawFormat | JsonFormat:
    return JsonFormat(clock) if name == "json" else RawFormat()
