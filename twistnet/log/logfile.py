"""
The log file on disk: whole batches appended to an C{O_APPEND} descriptor, rotation at
--rotate-bytes, reopening after logrotate, and fsync.

L{LogFile} never holds bytes back: an append that the disk refuses returns what did not go
out (always whole lines, so a killed process leaves no broken line) and the caller decides
how to wait. Rotation and reopen failures are handled here, since the file stays writable
through them: lines keep going to the previous file and the next attempt waits a while.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twistnet.log.rotation import RotationNames, batches

__all__ = ["ROTATE_RETRY_SECONDS", "LogFile", "Unwritten", "describe_error"]

#: How long to wait before trying again after a rotation or reopen failed (an unwritable
#: directory does not heal by itself within a second; each failure is logged).
ROTATE_RETRY_SECONDS = 10.0

#: Mode of a log file we create; the umask applies as usual.
FILE_MODE = 0o644

OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

Writer = Callable[[int, bytes | memoryview], int]


class Unwritten(NamedTuple):
    """The part of an append the disk refused, and why."""

    data: bytes
    error: OSError


class LogFile:
    """
    One log file, appended to in whole batches and rotated by size.

    @ivar created: whether L{open} created the file (rather than appending to one that existed).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        *,
        rotate_bytes: int = 0,
        keep: int = 5,
        fsync_interval: float = 0.0,
        writer: Writer = os.write,
    ) -> None:
        self.path = os.path.abspath(path)
        self.clock = clock
        self.rotate_bytes = rotate_bytes
        self.names = RotationNames(self.path, keep)
        self.fsync_interval = fsync_interval
        self._writer = writer
        self._fd = -1
        self._size = 0
        #: True when the descriptor no longer refers to C{path} (a failed rotation or reopen):
        #: the next append after the retry time opens C{path} again.
        self._detached = False
        self._retry_rotation_at = 0.0
        self._dirty = False
        self._fsync_loop: LoopingCall | None = None
        self.bytes_written = 0
        self.rotations = 0
        self.created = False

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The current descriptor (-1 when closed); it changes on rotation and reopen."""
        return self._fd

    def open(self) -> None:
        """Open (or create) the file; raises C{OSError} when it cannot be opened."""
        try:
            self._fd = os.open(self.path, OPEN_FLAGS | os.O_EXCL, FILE_MODE)
            self.created = True
        except FileExistsError:
            self._fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
        self._size = os.fstat(self._fd).st_size
        existing = _listing(os.path.dirname(self.path))
        self.names = RotationNames(self.path, self.names.keep, existing)
        if self.fsync_interval > 0:
            self._fsync_loop = LoopingCall(self.sync)
            self._fsync_loop.clock = self.clock
            self._fsync_loop.start(self.fsync_interval, now=False)

    def close(self) -> None:
        """fsync and close; closing a closed file does nothing."""
        if self._fsync_loop is not None and self._fsync_loop.running:
            self._fsync_loop.stop()
        if self._fd < 0:
            return
        self._dirty = True
        self.sync()
        os.close(self._fd)
        self._fd = -1

    def abandon(self) -> None:
        """
        Close without a trace when the service could not start (its port was busy): a file
        that L{open} created and nothing was written to is removed again.
        """
        if self._fd < 0:
            return
        self.close()
        if self.created and self.bytes_written == 0 and self.rotations == 0:
            try:
                if os.stat(self.path).st_size == 0:
                    os.unlink(self.path)
            except OSError as error:
                self.log.error(
                    "cannot remove the unused {path}: {error}", path=self.path, error=error
                )

    # --- appending ---------------------------------------------------------------------------

    def append(self, records: bytes) -> Unwritten | None:
        """
        Write C{records} (whole lines), rotating wherever the file would pass --rotate-bytes: a
        burst is cut into a few whole-line batches (L{batches}), not written line by line.
        Returns what failed to go out, or C{None} when all of it did.
        """
        if self._detached:
            self._maybe_rotate()
        limit = self.rotate_bytes
        if not limit or self._size + len(records) <= limit:
            return self._write_out(records)
        parts = batches(records, limit - self._size if self._size else limit, limit)
        for index, part in enumerate(parts):
            if index and self._size:
                self._maybe_rotate()
            failed = self._write_out(part) if part else None
            if failed:
                return failed._replace(data=b"".join([failed.data, *parts[index + 1 :]]))
        return None

    def _write_out(self, data: bytes) -> Unwritten | None:
        """Write all of C{data}, looping on partial writes; returns what failed to go out."""
        view = memoryview(data)
        try:
            while view:
                count = self._writer(self._fd, view)
                self._size += count
                self.bytes_written += count
                view = view[count:]
        except OSError as error:
            done = len(data) - len(view)
            return Unwritten(self._take_back(data, done, view) if done else bytes(view), error)
        self._dirty = True
        return None

    def _take_back(self, data: bytes, done: int, rest: memoryview) -> bytes:
        """
        After a partial write failed, cut the file back to its last whole line so that a
        process killed while the disk is full leaves no broken line; all of C{data} is unwritten.
        """
        try:
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - done)
        except OSError:
            return bytes(rest)  # the head stays written; the rest completes it on recovery
        self._size -= done
        self.bytes_written -= done
        return data

    # --- durability --------------------------------------------------------------------------

    def sync(self) -> None:
        """fsync the file if anything was written since the last fsync."""
        if not self._dirty or self._fd < 0:
            return
        self._dirty = False
        self._sync_fd(self._fd)

    def _sync_fd(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as error:
            self.log.critical(
                "fsync of {path} failed: {error}", path=self.path, error=describe_error(error)
            )

    # --- rotation and reopening --------------------------------------------------------------

    def rotated_files(self) -> list[str]:
        """The rotated files this file knows of, oldest first."""
        return self.names.files()

    def reopen(self, why: str) -> None:
        """Open C{path} afresh; on failure keep appending to the current descriptor."""
        try:
            fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
        except OSError as error:
            self._detached = True
            self._postpone(
                "cannot open {path} after {why}: {error}; still appending to the previous file",
                error,
                why=why,
            )
            return
        old, self._fd = self._fd, fd
        if self.fsync_interval > 0:
            # The periodic fsync only ever sees the current descriptor: settle the old one.
            self._sync_fd(old)
        os.close(old)
        self._size = os.fstat(fd).st_size
        self._detached = False
        self._retry_rotation_at = 0.0

    def _maybe_rotate(self) -> None:
        if self.clock.seconds() < self._retry_rotation_at:
            return
        if self._detached:
            self.reopen("the earlier failure")
            return
        sequence = self.names.next_sequence
        while os.path.exists(self.names.name(sequence)):
            sequence += 1  # a name taken by someone else's file
        target = self.names.name(sequence)
        try:
            os.rename(self.path, target)
        except OSError as error:
            self._postpone(
                "cannot rotate {path} to {target}: {error}; still appending to {path}",
                error,
                target=target,
            )
            return
        doomed = self.names.rotated(sequence)
        self.rotations += 1
        # Until the new file is open, lines keep going to the renamed one: nothing is lost.
        self._detached = True
        self.reopen(f"rotation to {target}")
        _remove(doomed)

    def _postpone(self, message: str, error: OSError, **fields: object) -> None:
        """Log a rotation or reopen failure loudly; the next attempt waits a while."""
        self._retry_rotation_at = self.clock.seconds() + ROTATE_RETRY_SECONDS
        self.log.critical(
            message + ", retrying in {retry:.0f}s",
            path=self.path,
            error=describe_error(error),
            retry=ROTATE_RETRY_SECONDS,
            **fields,
        )


def _remove(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            LogFile.log.error("cannot remove old log {path}: {error}", path=path, error=error)


def _listing(directory: str) -> list[str]:
    """The names in C{directory}, or none when it cannot be read (rotation then starts at 1)."""
    try:
        return os.listdir(directory)
    except OSError:
        return []


def describe_error(error: BaseException) -> str:
    """An C{OSError} as C{[Errno N] reason}, without the file name the path field already has."""
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error)
