"""
The log file every connection of twistnet-log shares: durable appends, rotation,
reopening, periodic fsync and backpressure when the disk refuses a write.

Each call to L{LogSink.write} carries the complete records of one received chunk and hands
them to the OS at once with a single C{os.write} on an C{O_APPEND} descriptor (looping only
on a partial write; a burst that crosses --rotate-bytes is cut into a few such writes):
nothing waits in a Python buffer, so a killed process loses nothing it had received, and
lines from different connections never interleave inside a line.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twistnet.log.formats import make_format
from twistnet.log.retry import RETRY_SECONDS, WriteRetry
from twistnet.log.rotation import RotationNames, batches

__all__ = ["RETRY_SECONDS", "LogSink"]

#: How long to wait before trying again after a rotation or reopen failed (an unwritable
#: directory does not heal by itself within a second; each failure is logged).
ROTATE_RETRY_SECONDS = 10.0

#: Mode of a log file we create; the umask applies as usual.
FILE_MODE = 0o644

OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

Writer = Callable[[int, bytes | memoryview], int]


class LogSink:
    """
    The open log file shared by every connection.

    @ivar blocked: true while a write failed and received bytes wait in memory; every attached
        producer is paused meanwhile, so that memory stays bounded.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        *,
        format: str = "raw",
        rotate_bytes: int = 0,
        keep: int = 5,
        fsync_interval: float = 0.0,
        clock: IReactorTime | None = None,
        writer: Writer = os.write,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.path = os.path.abspath(path)
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.format = make_format(format, self.clock)
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.names = RotationNames(self.path, keep)
        self.fsync_interval = fsync_interval
        self._writer = writer
        self._fd = -1
        self._size = 0
        #: True when the descriptor no longer refers to C{path} (a failed rotation or reopen):
        #: the next write after the retry time opens C{path} again.
        self._detached = False
        self._retry_rotation_at = 0.0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._outage = WriteRetry()
        self._retry_call: IDelayedCall | None = None
        self._producers: set[IPushProducer] = set()
        self._dirty = False
        self._last_error: BaseException | None = None
        self._fsync_loop: LoopingCall | None = None
        self.bytes_written = 0
        self.rotations = 0
        #: How often writing stopped on an error (disk full) and reading was paused.
        self.pauses = 0
        #: Whether L{open} created the file (rather than appending to one that existed).
        self.created = False

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the file; raises C{OSError} when it cannot be opened."""
        try:
            self._fd = os.open(self.path, OPEN_FLAGS | os.O_EXCL, FILE_MODE)
            self.created = True
        except FileExistsError:
            self._fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
        self._size = os.fstat(self._fd).st_size
        try:
            existing = os.listdir(os.path.dirname(self.path))
        except OSError:
            existing = []
        self.names = RotationNames(self.path, self.keep, existing)
        if self.fsync_interval > 0:
            self._fsync_loop = LoopingCall(self.sync)
            self._fsync_loop.clock = self.clock
            self._fsync_loop.start(self.fsync_interval, now=False)

    def close(self) -> None:
        """Write what is held, fsync and close. Bytes that still cannot be written are logged."""
        if self._fsync_loop is not None and self._fsync_loop.running:
            self._fsync_loop.stop()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._fd < 0:
            return
        if self._pending:
            held, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
            rest = self._append(held)
            if rest:
                self.log.critical(
                    "closing {path} with a write still failing: {count} received bytes lost",
                    path=self.path,
                    count=len(rest),
                )
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

    # --- writing -----------------------------------------------------------------------------

    @property
    def blocked(self) -> bool:
        return bool(self._pending)

    def write(self, records: bytes) -> None:
        """Append C{records} (whole formatted lines) with one write, or hold them if blocked."""
        if self._pending:
            self._pending.append(records)
            self._pending_bytes += len(records)
            return
        rest = self._append(records)
        if rest:
            self._block(rest)

    def _append(self, records: bytes) -> bytes | memoryview | None:
        """
        Write C{records}, rotating wherever the file would pass --rotate-bytes: a burst is cut
        into a few whole-line batches (L{batches}), not written line by line. Returns what
        failed to go out.
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
            rest = self._write_out(part) if part else None
            if rest:
                return b"".join([rest, *parts[index + 1 :]])
        return None

    def _write_out(self, data: bytes) -> memoryview | None:
        """Write all of C{data}, looping on partial writes; returns what failed to go out."""
        view = memoryview(data)
        try:
            while view:
                count = self._writer(self._fd, view)
                self._size += count
                self.bytes_written += count
                view = view[count:]
        except OSError as error:
            self._last_error = error
            done = len(data) - len(view)
            if done:
                return self._take_back(data, done, view)
            return view
        self._dirty = True
        return None

    def _take_back(self, data: bytes, done: int, rest: memoryview) -> memoryview:
        """
        After a partial write failed, cut the file back to its last whole line so that a
        process killed while the disk is full leaves no broken line; hold all of C{data}.
        """
        try:
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - done)
        except OSError:
            return rest  # the head stays written; the rest completes it on recovery
        self._size -= done
        self.bytes_written -= done
        return memoryview(data)

    def _block(self, rest: bytes | memoryview) -> None:
        self._pending = [bytes(rest)]
        self._pending_bytes = len(rest)
        self.pauses += 1
        self._outage.failed(self.clock.seconds())
        self.log.critical(
            "cannot write to {path}: {error}; holding {held} bytes in memory, "
            "pausing reading from {clients} clients, retrying every {retry}s",
            path=self.path,
            error=_describe(self._last_error),
            held=self._pending_bytes,
            clients=len(self._producers),
            retry=self._outage.interval,
        )
        _each(self._producers, "pauseProducing")
        self._retry_call = self.clock.callLater(self._outage.interval, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        held = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        rest = self._append(held)
        now = self.clock.seconds()
        if rest:
            self._pending = [bytes(rest)]
            self._pending_bytes = len(rest)
            if self._outage.failed(now):
                self.log.critical(
                    "still cannot write to {path} after {seconds:.0f}s: {error}; "
                    "holding {held} bytes, clients still paused",
                    path=self.path,
                    seconds=self._outage.elapsed(now),
                    error=_describe(self._last_error),
                    held=self._pending_bytes,
                )
            self._retry_call = self.clock.callLater(self._outage.interval, self._retry)
            return
        self.log.warn(
            "writing to {path} again after {seconds:.1f}s: {held} held bytes written, "
            "resuming reading from {clients} clients",
            path=self.path,
            seconds=self._outage.succeeded(now),
            held=len(held),
            clients=len(self._producers),
        )
        _each(self._producers, "resumeProducing")

    # --- producers (the connections) ---------------------------------------------------------

    def attach(self, producer: IPushProducer) -> None:
        """Pause C{producer} (a connection's transport) whenever the sink is blocked."""
        self._producers.add(producer)
        if self._pending:
            producer.pauseProducing()

    def detach(self, producer: IPushProducer) -> None:
        self._producers.discard(producer)

    # --- durability --------------------------------------------------------------------------

    def sync(self) -> None:
        """fsync the file if anything was written since the last fsync."""
        if not self._dirty or self._fd < 0:
            return
        self._dirty = False
        self._sync_fd(self._fd)

    # --- rotation and reopening --------------------------------------------------------------

    def rotated_files(self) -> list[str]:
        """The rotated files this sink knows of, oldest first."""
        return self.names.files()

    def _maybe_rotate(self) -> None:
        if self.clock.seconds() < self._retry_rotation_at:
            return
        if self._detached:
            self._reopen("the earlier failure")
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
        self._reopen(f"rotation to {target}")
        self._remove(doomed)

    def _postpone(self, message: str, error: OSError, **fields: object) -> None:
        """Log a rotation or reopen failure loudly; the next attempt waits a while."""
        self._retry_rotation_at = self.clock.seconds() + ROTATE_RETRY_SECONDS
        self.log.critical(
            message + ", retrying in {retry:.0f}s",
            path=self.path,
            error=_describe(error),
            retry=ROTATE_RETRY_SECONDS,
            **fields,
        )

    def _remove(self, paths: list[str]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                self.log.error("cannot remove old log {path}: {error}", path=path, error=error)

    def reopen(self) -> None:
        """Open C{path} afresh (after an external rename by logrotate); SIGHUP and SIGUSR1."""
        if self._fd < 0:
            return  # closed: a signal that arrived during shutdown
        self.log.info("reopening {path}", path=self.path)
        self._reopen("a reopen request")
        if self._pending and self._retry_call is not None and self._retry_call.active():
            # A fresh file may be writable again: try now rather than at the next retry.
            self._retry_call.reset(0)

    def _reopen(self, why: str) -> None:
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

    def _sync_fd(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as error:
            self.log.critical(
                "fsync of {path} failed: {error}", path=self.path, error=_describe(error)
            )


def _each(producers: set[IPushProducer], method: str) -> None:
    """Call C{method} on every producer; one that fails does not stop the others."""
    for producer in list(producers):
        try:
            getattr(producer, method)()
        except Exception:
            LogSink.log.failure("{method} failed for {producer}", method=method, producer=producer)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error)
