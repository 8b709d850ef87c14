"""
The IO-free parts of log rotation: where a batch of lines must be cut so that no file grows
past --rotate-bytes, what the rotated files are called, and which of them to delete.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable


def batches(records: bytes, room: int, limit: int) -> list[bytes]:
    """
    C{records} (whole lines, each ending in LF) cut at line boundaries into batches: the
    first fits in C{room} (what the current file has left), each later one in C{limit} (a
    fresh file). A line longer than the space it meets goes alone into a fresh file, so a
    file passes C{limit} by at most that one line.

    The first batch is empty when not even one line fits in C{room}: write the rest after
    rotating. Scans jump C{limit} bytes at a time, so a large chunk costs a few C-level
    C{rfind}s, not a Python step per line.
    """
    cuts: list[bytes] = []
    start, end, space = 0, len(records), max(room, 0)
    while end - start > space:
        cut = records.rfind(b"\n", start, start + space) + 1
        if cut <= start:
            if space < limit:
                # Nothing whole fits in what is left of this file: start a fresh one.
                cuts.append(b"")
                space = limit
                continue
            cut = records.find(b"\n", start) + 1 or end
        cuts.append(records[start:cut])
        start, space = cut, limit
    if start < end:
        cuts.append(records[start:] if start else records)
    return cuts


class RotationNames:
    """
    The sequence-numbered rotated files of one log path (C{lines.log.000001}, ...; the highest
    number is the newest) and which of them to delete beyond C{keep}. A restart continues the
    sequence from the names found in the directory.
    """

    def __init__(self, path: str, keep: int, existing: Iterable[str] = ()) -> None:
        self.path = path
        self.keep = keep
        pattern = re.compile(re.escape(os.path.basename(path)) + r"\.(\d+)")
        #: Sequence numbers of the rotated files kept, oldest first.
        self.sequences = sorted(int(m.group(1)) for m in map(pattern.fullmatch, existing) if m)
        self.next_sequence = (self.sequences[-1] + 1) if self.sequences else 1

    def name(self, sequence: int) -> str:
        return f"{self.path}.{sequence:06d}"

    def files(self) -> list[str]:
        """The rotated files kept, oldest first."""
        return [self.name(sequence) for sequence in self.sequences]

    def rotated(self, sequence: int) -> list[str]:
        """Record a rotation to C{sequence}; returns the files to delete, oldest first."""
        self.next_sequence = sequence + 1
        self.sequences.append(sequence)
        excess = max(0, len(self.sequences) - self.keep)
        doomed, self.sequences = self.sequences[:excess], self.sequences[excess:]
        return [self.name(sequence) for sequence in doomed]
