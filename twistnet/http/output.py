"""
A job's output, the part without IO: whole lines from each stream, and the head+tail cap.

A tool writes to stdout and stderr through two pipes; read as they come, a line half-written
to one would be spliced with a line from the other. L{LineAssembler} holds each stream's
partial line and gives out only whole lines, except a partial line that waited
L{PARTIAL_LINE_WAIT} (a progress bar must still show) or grew past L{LONG_LINE}.

L{HeadTail} keeps the first C{head} bytes and the last C{tail} of the combined output and
counts what lies between; each cut is moved to a line boundary when one is within C{slack}
bytes, so the omission marker stands on a line of its own between whole lines.

Both give the same bytes however the input is chunked; time is passed in, never read.
"""

from __future__ import annotations

from collections.abc import Hashable

#: Seconds a partial line is held for the rest of its line before it is shown as it is.
PARTIAL_LINE_WAIT = 1.0
#: A partial line this long is given out at once: no line a person reads is that long, and
#: holding it would cost memory per job.
LONG_LINE = 16 * 1024
#: How far (bytes) a cap may move back to a line boundary rather than cut a line.
LINE_SLACK = 512


class LineAssembler:
    """Whole lines from several streams, in the order each line was completed."""

    def __init__(self, wait: float = PARTIAL_LINE_WAIT, long_line: int = LONG_LINE) -> None:
        self._wait = wait
        self._long_line = long_line
        #: Each stream's partial line, and when its first byte arrived (oldest first).
        self._partial: dict[Hashable, bytes] = {}
        self._since: dict[Hashable, float] = {}

    def receive(self, stream: Hashable, data: bytes, now: float) -> bytes:
        """Take C{data} from C{stream}; return what is ready for the combined output."""
        pending = self._partial.pop(stream, b"") + data
        since = self._since.pop(stream, now)
        if len(pending) >= self._long_line:
            return pending
        end = pending.rfind(b"\n") + 1
        if end == 0:
            self._hold(stream, pending, since)
            return b""
        if end < len(pending):
            self._hold(stream, pending[end:], now)
        return pending[:end]

    def _hold(self, stream: Hashable, partial: bytes, since: float) -> None:
        self._partial[stream] = partial
        self._since[stream] = since

    def next_due(self) -> float | None:
        """When the oldest partial line is due to be shown as it is, if any is held."""
        return min(self._since.values()) + self._wait if self._since else None

    def due(self, now: float) -> bytes:
        """The partial lines that waited long enough, oldest first."""
        ready = [s for s, since in self._since.items() if since + self._wait <= now]
        return self._release(sorted(ready, key=self._since.__getitem__))

    def flush(self) -> bytes:
        """Every partial line, oldest first (the streams ended)."""
        return self._release(sorted(self._since, key=self._since.__getitem__))

    def _release(self, streams: list[Hashable]) -> bytes:
        for stream in streams:
            del self._since[stream]
        return b"".join(self._partial.pop(stream) for stream in streams)


class HeadTail:
    """
    Keeps the first C{head} bytes (given out as they become final) and the last C{tail}.

    Head bytes within C{slack} of the head's end are held until their line ends, since the
    head may end at that line's end; everything before is given out at once.
    """

    def __init__(self, head: int, tail: int, slack: int = LINE_SLACK) -> None:
        self._head = head
        self._tail_limit = tail
        self._slack = slack
        self._head_open = True
        #: Head bytes given out so far; whether they end a line; those held back.
        self._given = 0
        self._ends_line = True
        self._held = b""
        self._tail = bytearray()
        #: Whether the last byte dropped from the tail's front ended a line.
        self._dropped_ends_line = True
        self.total = 0
        self.omitted = 0

    @property
    def truncated(self) -> bool:
        return self.omitted > 0

    def add(self, data: bytes) -> bytes:
        """Take C{data}; return the head bytes that are final now."""
        self.total += len(data)
        if not self._head_open:
            self._to_tail(data)
            return b""
        pending = self._held + data
        self._held = b""
        room = self._head - self._given
        if len(pending) >= room:
            cut = self._head_cut(pending, room)
            self._head_open = False
            self._to_tail(pending[cut:])
            return self._give(pending[:cut])
        # Before the slack window everything is final; within it, only whole lines.
        final = max(room - self._slack, pending.rfind(b"\n") + 1)
        self._held = pending[final:]
        return self._give(pending[:final])

    def _head_cut(self, pending: bytes, room: int) -> int:
        """Where the head ends: after the last line ending within the slack, else at C{room}."""
        window = max(0, room - self._slack)
        newline = pending.rfind(b"\n", max(0, window - 1), room)
        if newline != -1:
            return newline + 1
        # Head bytes given out within the window always end a line.
        if window == 0 and self._given and self._ends_line:
            return 0
        return room

    def _give(self, data: bytes) -> bytes:
        if data:
            self._given += len(data)
            self._ends_line = data.endswith(b"\n")
        return data

    def _to_tail(self, data: bytes) -> None:
        self._tail += data
        excess = len(self._tail) - self._tail_limit
        if excess > 0:
            self._dropped_ends_line = self._tail[excess - 1 : excess] == b"\n"
            del self._tail[:excess]
            self.omitted += excess

    def finish(self) -> bytes:
        """The rest: held head bytes, then (after a marker if bytes were left out) the tail."""
        head = self._give(self._held)
        self._held = b""
        self._head_open = False
        tail = bytes(self._tail)
        self._tail = bytearray()
        if not self.omitted:
            return head + tail
        if not self._dropped_ends_line:
            newline = tail.find(b"\n", 0, self._slack)
            if newline != -1:
                self.omitted += newline + 1
                tail = tail[newline + 1 :]
        marker = f"[... {self.omitted} bytes of output omitted ...]\n".encode()
        return head + (b"" if self._ends_line else b"\n") + marker + tail
