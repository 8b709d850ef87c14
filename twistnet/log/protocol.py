"""
One client connection of twistnet-log: split received chunks into lines (or RFC 6587 frames,
decoded by L{twistnet.log.framing}) and hand the complete ones to the shared L{LogSink}.

Chunks are split whole, never line by line in Python: the complete lines of a chunk (up to
its last LF) go to the sink as one block, so the cost per chunk is a few C-level scans and
one write, whatever the number of lines. Twisted's C{LineReceiver} instead calls back once
per line and re-slices its buffer for each, which is quadratic on large chunks.
"""

from __future__ import annotations

from twisted.logger import Logger

from twistnet._connections import ManagedFactory, ManagedProtocol, peer_name
from twistnet.log.framing import (
    AUTO,
    OCTET_COUNTED,
    SNIFF_BYTES,
    Frame,
    OctetCountedDecoder,
    sniff,
    strip_line_end,
)
from twistnet.log.sink import LogSink

#: The default --max-line: far above any honest log line, small enough that one client
#: cannot make the server hold much for a line that never ends.
DEFAULT_MAX_LINE = 64 * 1024


def has_overlong_line(lines: bytes, max_line: int) -> bool:
    """
    Whether any line of C{lines} (complete lines, each ending in LF) is longer than
    C{max_line} bytes, not counting its LF.

    Jumps from line start to the last LF within reach instead of visiting every line: every
    line inside that window is short, so a 64 KiB chunk takes one or two C-level scans.
    """
    start, end = 0, len(lines)
    while start < end:
        newline = lines.rfind(b"\n", start, start + max_line + 1)
        if newline < 0:
            return True
        start = newline + 1
    return False


class LineLogProtocol(ManagedProtocol):
    """
    Writes every line the client sends (and a final unterminated one) to the sink; or every
    octet-counted frame, when the factory's framing says so or the first bytes look like one.
    """

    sink: LogSink
    peer = "?"
    #: The start of the line not yet ended by LF.
    _partial = b""
    #: While inside a line longer than --max-line: its first max_line bytes (else None).
    _kept: bytes | None = None
    #: How many bytes of that overlong line were dropped so far.
    _dropped = 0
    #: Whether the last byte dropped was a CR (a trailing CR is not part of the line).
    _dropped_cr = False
    #: Under --framing auto, the first bytes while they do not yet tell lines from frames.
    _head = b""
    _sniffing = False
    #: The frame decoder, once the connection is octet-counted.
    _frames: OctetCountedDecoder | None = None

    def connectionAdmitted(self) -> None:
        self.sink = self.factory.sink
        self.max_line = self.factory.max_line
        self.peer = peer_name(self.transport)
        self.sink.attach(self.transport)
        if self.factory.framing == OCTET_COUNTED:
            self._frames = OctetCountedDecoder(self.max_line)
        self._sniffing = self.factory.framing == AUTO

    def dataReceived(self, data: bytes) -> None:
        self.factory.counts.bytes_in += len(data)
        if self._frames is not None:
            self._frames_received(data)
        elif self._sniffing:
            self._sniff(data)
        else:
            self._lines_received(data)

    def _sniff(self, data: bytes) -> None:
        head = self._head + data
        framing = sniff(head[:SNIFF_BYTES])
        if framing is None:
            self._head = head
            return
        self._sniffing, self._head = False, b""
        if framing == OCTET_COUNTED:
            self._frames = OctetCountedDecoder(self.max_line)
            self._frames_received(head)
        else:
            self._lines_received(head)

    def _frames_received(self, data: bytes) -> None:
        decoder = self._frames
        frames = decoder.feed(data)
        if frames:
            self.spoke()
            self.sink.write(b"".join(map(self._frame_record, frames)))
        if decoder.error is not None:
            self.factory.log.warn(
                "closing {peer}: {error} (octet-counted framing, RFC 6587)",
                peer=self.peer,
                error=decoder.error,
            )
            self.close_reason = "malformed_frame"
            self.close()

    def _frame_record(self, frame: Frame) -> bytes:
        fmt = self.sink.format
        if frame.truncated:
            self._count_truncation(frame.length)
            return fmt.message(frame.text, self.peer, length=frame.length)
        text = strip_line_end(frame.text) if frame.complete else frame.text
        return fmt.message(text, self.peer, unterminated=not frame.complete)

    def _lines_received(self, data: bytes) -> None:
        records = b""
        if self._kept is not None:
            newline = data.find(b"\n")
            if newline < 0:
                self._dropped += len(data)
                self._dropped_cr = data.endswith(b"\r")
                return
            self._dropped += newline
            if newline:
                self._dropped_cr = data[newline - 1] == 0x0D
            self.spoke()
            records = self._truncated_record(unterminated=False)
            data = data[newline + 1 :]
        buffer = self._partial + data if self._partial else data
        end = buffer.rfind(b"\n") + 1
        if end:
            self.spoke()
            records += self._records(buffer[:end] if end < len(buffer) else buffer)
            buffer = buffer[end:]
        # One byte of slack: a line of exactly max_line bytes may still end in CR LF.
        if len(buffer) > self.max_line + 1:
            self._kept = buffer[: self.max_line]
            self._dropped = len(buffer) - self.max_line
            self._dropped_cr = buffer.endswith(b"\r")
            buffer = b""
        self._partial = buffer
        if records:
            self.sink.write(records)

    def _records(self, lines: bytes) -> bytes:
        """The records of complete lines: CR LF becomes LF, overlong lines are truncated."""
        if b"\r" in lines:
            lines = lines.replace(b"\r\n", b"\n")
        fmt = self.sink.format
        if len(lines) <= self.max_line + 1 or not has_overlong_line(lines, self.max_line):
            return fmt.chunk(lines, self.peer)
        records = []
        run: list[bytes] = []
        for line in lines[:-1].split(b"\n"):
            if len(line) <= self.max_line:
                run.append(line)
                continue
            if run:
                records.append(fmt.chunk(b"\n".join(run) + b"\n", self.peer))
                run = []
            self._count_truncation(len(line))
            records.append(fmt.line(line[: self.max_line], self.peer, length=len(line)))
        if run:
            records.append(fmt.chunk(b"\n".join(run) + b"\n", self.peer))
        return b"".join(records)

    def _truncated_record(self, unterminated: bool) -> bytes:
        kept = self._kept or b""
        length = len(kept) + self._dropped - self._dropped_cr
        self._kept, self._dropped = None, 0
        self._count_truncation(length)
        return self.sink.format.line(kept, self.peer, length=length, unterminated=unterminated)

    def _count_truncation(self, length: int) -> None:
        self.factory.truncated += 1
        self.factory.log.warn(
            "truncated a {length}-byte line from {peer} to --max-line {max_line} bytes "
            "({count} truncated so far)",
            length=length,
            peer=self.peer,
            max_line=self.max_line,
            count=self.factory.truncated,
        )

    def _idled(self) -> None:
        if self.sink.blocked:
            # Reading is paused by our own full disk, not the client's silence; closing now
            # would also discard what the client sent and we have not read yet.
            self.idle.restart()
            return
        super()._idled()

    def connectionClosed(self, reason) -> None:
        self.sink.detach(self.transport)
        self._write_final_line()

    def _write_final_line(self) -> None:
        if self._frames is not None:
            frame = self._frames.finish()
            if frame is not None:
                self.sink.write(self._frame_record(frame))
            return
        if self._head:
            self._partial, self._head = self._head, b""
        if self._kept is not None:
            self.sink.write(self._truncated_record(unterminated=True))
        elif self._partial:
            line = self._partial[:-1] if self._partial.endswith(b"\r") else self._partial
            self._partial = b""
            if len(line) > self.max_line:  # within the one byte of slack kept for a CR
                self._count_truncation(len(line))
                record = self.sink.format.line(
                    line[: self.max_line], self.peer, length=len(line), unterminated=True
                )
            else:
                record = self.sink.format.line(line, self.peer, unterminated=True)
            self.sink.write(record)


class LineLogFactory(ManagedFactory):
    """Holds what the connections share: the sink, the limits and the connection registry."""

    protocol = LineLogProtocol
    log = Logger()

    def __init__(
        self,
        sink: LogSink,
        max_line: int = DEFAULT_MAX_LINE,
        max_connections: int = 0,
        idle_timeout: float = 0.0,
        framing: str = AUTO,
    ) -> None:
        super().__init__(max_connections, idle_timeout, sink.clock)
        self.sink = sink
        self.max_line = max_line
        self.framing = framing
        self.truncated = 0
