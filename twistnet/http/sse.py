"""
A job's output as server-sent events (the WHATWG HTML "server-sent events" format): one
event per line of output, without its line break, whose id is the byte offset after that
line, so Last-Event-ID resumes exactly; a final C{end} event gives the status.

L{events} frames bytes into events without IO; L{EventStream} is the glue that feeds it a
job's output as the job writes it and keeps an idle stream alive. A job this node's runner
does not run (it runs on another node of a cluster, or has just finished) is followed by
polling the store every L{POLL_INTERVAL}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web import server

from twistnet.http.errors import encode
from twistnet.http.model import Job

#: Seconds between comments on an idle event stream, so a vanished client is noticed.
SSE_KEEPALIVE = 15.0
#: Seconds between reads of a job running elsewhere: its new output shows within a second.
POLL_INTERVAL = 0.5


def events(data: bytes, offset: int, terminal: bool) -> tuple[bytes, int]:
    """
    The events for output C{data} that starts at byte C{offset}, and the offset after the
    last byte they carry. Unless C{terminal} (no more output will follow, or C{data} must go
    out whole), a trailing partial line is held back, so an event never splits a line or a
    character.
    """
    if not terminal:
        data = data[: data.rfind(b"\n") + 1]
    framed = []
    # bytes.splitlines ends a line at CR, LF or CR LF, as SSE does: no field holds a CR.
    for line in data.splitlines(keepends=True):
        offset += len(line)
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        framed.append(f"id: {offset}\ndata: {text}\n\n")
    return "".join(framed).encode(), offset


def end_event(offset: int, job: Job) -> bytes:
    """The last event of a stream: the job's final status and exit code."""
    end = encode({"status": job.status, "exit_code": job.exit_code})
    return b"event: end\nid: %d\ndata: %s\n" % (offset, end)


class EventStream:
    """One client's event stream of one job's output, from byte C{offset} on."""

    def __init__(
        self,
        request: server.Request,
        job: Job,
        offset: int,
        runner: Any,
        store: Any,
        clock: IReactorTime,
        chunk: int,
    ) -> None:
        self.request = request
        self.job = job
        self.offset = offset
        self.runner = runner
        self.store = store
        self.clock = clock
        #: The most output read from the store at once.
        self.chunk = chunk
        self.unwatch: Callable[[], None] | None = None
        self.keepalive: IDelayedCall | None = None
        self.poll_call: IDelayedCall | None = None
        self.done = False
        #: A read of the store is under way; C{stale}: the job changed meanwhile.
        self.reading = False
        self.stale = False

    def start(self) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        if request.method == b"HEAD":
            # The headers are the whole answer: no stream to keep open.
            request.write(b"")
            request.finish()
            return
        request.write(b": job %s\n\n" % self.job.id.encode())
        request.notifyFinish().addBoth(self._gone)
        if not self.job.terminal:
            self.unwatch = self.runner.watch(self.job.id, self._changed)
            if not self.runner.is_active(self.job.id):
                # Running elsewhere, or finished between the lookup and the watch: read it
                # from the store until it ends.
                self.poll_call = self.clock.callLater(0, self._poll)
        self._changed(self.job)

    def _poll(self) -> None:
        self.poll_call = None
        if self.done:
            return

        def polled(job: Job | None) -> None:
            if not self.done:
                self._changed(job or self.job)
                if not self.done:
                    self.poll_call = self.clock.callLater(POLL_INTERVAL, self._poll)

        self.store.get(self.job.id).addCallbacks(polled, lambda _: polled(None))

    def _changed(self, job: Job) -> None:
        if self.done:
            return
        self.job = job
        if self.reading:
            self.stale = True
            return
        self.reading = True
        self.store.fetch_output(job.id, self.offset, self.chunk).addCallbacks(
            self._read, lambda _: self._read(b"", failed=True)
        )

    def _read(self, data: bytes, failed: bool = False) -> None:
        self.reading = False
        if self.done:
            return
        job = self.job
        full = len(data) >= self.chunk
        # A full chunk goes out even mid-line: a line longer than a chunk must still move.
        framed, self.offset = events(data, self.offset, job.terminal or full)
        if framed:
            self.request.write(framed)
        if self.stale or full:
            self.stale = False
            self._changed(self.job)
            return
        if failed and self.poll_call is None:
            # The store could not be read (a database restarting): try again shortly.
            self.poll_call = self.clock.callLater(POLL_INTERVAL, self._poll)
        if job.terminal and not failed:
            self.request.write(end_event(self.offset, job))
            self._close()
            self.request.finish()
            return
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        if self.keepalive is not None and self.keepalive.active():
            self.keepalive.reset(SSE_KEEPALIVE)
        else:
            self.keepalive = self.clock.callLater(SSE_KEEPALIVE, self._ping)

    def _ping(self) -> None:
        self.keepalive = None
        if not self.done:
            self.request.write(b": keepalive\n\n")
            self._arm_keepalive()

    def _close(self) -> None:
        self.done = True
        if self.unwatch is not None:
            self.unwatch()
            self.unwatch = None
        if self.keepalive is not None and self.keepalive.active():
            self.keepalive.cancel()
        self.keepalive = None
        if self.poll_call is not None and self.poll_call.active():
            self.poll_call.cancel()
        self.poll_call = None

    def _gone(self, _: Any) -> None:
        self._close()
