"""
The log sink every connection of twistnet-log shares: records formatted once, appended to the
L{LogFile}, and backpressure while the disk refuses a write.

Each call to L{LogSink.write} carries the complete records of one received chunk and hands
them to the OS at once with a single C{os.write} on an C{O_APPEND} descriptor (looping only
on a partial write; a burst that crosses --rotate-bytes is cut into a few such writes):
nothing waits in a Python buffer, so a killed process loses nothing it had received, and
lines from different connections never interleave inside a line. Only while a write fails
(disk full) are bytes held in memory, and every connection is paused until they are written.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger

from twistnet._connections import reactor_or_global
from twistnet.log.formats import make_format
from twistnet.log.logfile import LogFile, Unwritten, Writer, describe_error
from twistnet.log.retry import RETRY_SECONDS, WriteRetry

__all__ = ["RETRY_SECONDS", "LogSink"]


class LogSink:
    """
    The log file shared by every connection, and what waits while it refuses writes.

    @ivar file: the L{LogFile} the records go to.
    @ivar pauses: how often writing stopped on an error (disk full) and reading was paused.
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
        self.clock: IReactorTime = reactor_or_global(clock)
        self.format = make_format(format, self.clock)
        self.file = LogFile(
            path,
            self.clock,
            rotate_bytes=rotate_bytes,
            keep=keep,
            fsync_interval=fsync_interval,
            writer=writer,
        )
        self._pending: list[bytes] = []
        self._outage = WriteRetry()
        self._retry_call: IDelayedCall | None = None
        self._producers: set[IPushProducer] = set()
        self.pauses = 0

    # --- the file, as the rest of the service sees it ----------------------------------------

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def bytes_written(self) -> int:
        return self.file.bytes_written

    @property
    def rotations(self) -> int:
        return self.file.rotations

    def rotated_files(self) -> list[str]:
        """The rotated files this sink knows of, oldest first."""
        return self.file.rotated_files()

    def open(self) -> None:
        """Open (or create) the file; raises C{OSError} when it cannot be opened."""
        self.file.open()

    def close(self) -> None:
        """Write what is held, fsync and close. Bytes that still cannot be written are logged."""
        self._release()
        self.file.close()

    def abandon(self) -> None:
        """Close, removing the file again if this sink created it and wrote nothing."""
        self._release()
        self.file.abandon()

    def sync(self) -> None:
        """fsync the file if anything was written since the last fsync."""
        self.file.sync()

    def reopen(self) -> None:
        """Open C{path} afresh (after an external rename by logrotate); SIGHUP and SIGUSR1."""
        if self.file.closed:
            return  # closed: a signal that arrived during shutdown
        self.log.info("reopening {path}", path=self.path)
        self.file.reopen("a reopen request")
        if self._pending and self._retry_call is not None and self._retry_call.active():
            # A fresh file may be writable again: try now rather than at the next retry.
            self._retry_call.reset(0)

    # --- writing -----------------------------------------------------------------------------

    @property
    def blocked(self) -> bool:
        """True while a write failed and received bytes wait in memory (producers paused)."""
        return bool(self._pending)

    def write(self, records: bytes) -> None:
        """Append C{records} (whole formatted lines) with one write, or hold them if blocked."""
        if self._pending:
            self._pending.append(records)
            return
        failed = self.file.append(records)
        if failed:
            self._block(failed)

    # --- holding while the disk refuses ------------------------------------------------------

    def _block(self, failed: Unwritten) -> None:
        self._pending = [failed.data]
        self.pauses += 1
        self._outage.failed(self.clock.seconds())
        self.log.critical(
            "cannot write to {path}: {error}; holding {held} bytes in memory, "
            "pausing reading from {clients} clients, retrying every {retry}s",
            path=self.path,
            error=describe_error(failed.error),
            held=len(failed.data),
            clients=len(self._producers),
            retry=self._outage.interval,
        )
        _each(self._producers, "pauseProducing")
        self._retry_call = self.clock.callLater(self._outage.interval, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        held = b"".join(self._pending)
        self._pending = []
        failed = self.file.append(held)
        now = self.clock.seconds()
        if failed:
            self._pending = [failed.data]
            if self._outage.failed(now):
                self.log.critical(
                    "still cannot write to {path} after {seconds:.0f}s: {error}; "
                    "holding {held} bytes, clients still paused",
                    path=self.path,
                    seconds=self._outage.elapsed(now),
                    error=describe_error(failed.error),
                    held=len(failed.data),
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

    def _release(self) -> None:
        """Stop retrying and make a last attempt at what is held; what still fails is logged."""
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if not self._pending or self.file.closed:
            return
        held, self._pending = b"".join(self._pending), []
        failed = self.file.append(held)
        if failed:
            self.log.critical(
                "closing {path} with a write still failing: {count} received bytes lost",
                path=self.path,
                count=len(failed.data),
            )

    # --- producers (the connections) ---------------------------------------------------------

    def attach(self, producer: IPushProducer) -> None:
        """Pause C{producer} (a connection's transport) whenever the sink is blocked."""
        self._producers.add(producer)
        if self._pending:
            producer.pauseProducing()

    def detach(self, producer: IPushProducer) -> None:
        self._producers.discard(producer)


def _each(producers: set[IPushProducer], method: str) -> None:
    """Call C{method} on every producer; one that fails does not stop the others."""
    for producer in list(producers):
        try:
            getattr(producer, method)()
        except Exception:
            LogSink.log.failure("{method} failed for {producer}", method=method, producer=producer)
