"""
Running jobs on a cluster that shares one PostgreSQL: L{ClusterRunner}.

It is the L{LocalRunner} (processes, output capture, timeouts, kill grace) with the
queue, the per-tool limits and the cancellations moved into the database (see
L{twistnet.http.claims} for the statements and what each guarantees):
- queued jobs are claimed with C{SKIP LOCKED} when a C{NOTIFY} says one was queued, and by
  polling every L{POLL_INTERVAL} (notifications sent while the LISTEN connection was down
  are lost, so polling is the fallback, and runs at once after a reconnection);
- the worker holds a lease in its own heartbeat row, renewed every third of the lease; if
  it cannot renew, it kills its own jobs' process groups at L{SELF_FENCE} of the lease after
  the last renewal that succeeded was sent, by its own monotonic clock, before the database
  can count the lease expired; every node reaps the jobs of expired leases (one at a time);
- every write about a job it runs is fenced by (worker, attempt).

A node in role C{api} runs nothing (no workers, no lease, no claims); it accepts, answers
and cancels through the database. C{--queue-size} bounds the jobs waiting in the whole
cluster, counted by the database (refreshed every L{POLL_INTERVAL}, plus this node's
submissions since).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping

import psycopg
from psycopg import sql
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from twistnet.http import claims
from twistnet.http._logging import observer as log_observer
from twistnet.http.model import CANCELLED, QUEUED, RUNNING, Job, Tool
from twistnet.http.pgstore import CONNECT_TIMEOUT, ChunkWriter, PostgresJobStore
from twistnet.http.runner import (
    KILL_GRACE,
    IRunner,
    LocalRunner,
    OutputCapture,
    QueueFull,
    _cancel,
    _Run,
    boot_time,
    signal_group,
)
from twistnet.http.store import IJobStore

#: Default lease of a worker, in seconds: a dead worker's jobs are handed back within about
#: this (plus one reaper interval).
DEFAULT_LEASE = 30.0
#: Seconds between polls for queued jobs, cancellations and the cluster's queue depth.
POLL_INTERVAL = 0.5
#: A worker that has not renewed its lease for this fraction of it kills its jobs: the rest
#: of the lease is the margin for the kill and for clocks running at slightly other rates.
SELF_FENCE = 0.75
#: Seconds a cancel from another node waits for the job's worker to stop it.
CANCEL_WAIT = 2.0
#: Seconds between attempts to open the LISTEN connection again.
LISTEN_RETRY = 1.0
#: Why a run was killed when its lease could not be renewed.
LEASE_LOST = "lease lost"


def worker_name() -> str:
    """A worker id unique to this process: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Listener:
    """
    A dedicated connection LISTENing on C{channels}, on its own thread: C{handler(channel,
    payload)} is called on the reactor for each notification, C{connected()} after each
    (re)connection. It reconnects by itself.
    """

    log = Logger(observer=log_observer)

    def __init__(
        self,
        url: str,
        channels: list[str],
        handler: Callable[[str, str], None],
        connected: Callable[[], None],
        reactor,
    ) -> None:
        self._url = url
        self._channels = channels
        self._handler = handler
        self._connected = connected
        self._reactor = reactor
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="twistnet-http-listen", daemon=True)
        self._stopped: defer.Deferred[None] = defer.Deferred()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> defer.Deferred[None]:
        if not self._thread.is_alive():
            return defer.succeed(None)
        self._stopping.set()
        return self._stopped

    def _work(self) -> None:
        complained = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                ) as db:
                    for channel in self._channels:
                        db.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if complained:
                        self._reactor.callFromThread(self.log.info, "LISTEN connection is back")
                    complained = False
                    self._reactor.callFromThread(self._connected)
                    while not self._stopping.is_set():
                        for note in db.notifies(timeout=0.5):
                            self._reactor.callFromThread(self._handler, note.channel, note.payload)
            except psycopg.Error as error:
                if not complained:
                    complained = True
                    self._reactor.callFromThread(
                        self.log.warn,
                        "LISTEN connection lost ({error}); polling until it is back",
                        error=str(error).strip().splitlines()[0] if str(error).strip() else error,
                    )
                self._stopping.wait(LISTEN_RETRY)
        self._reactor.callFromThread(self._stopped.callback, None)


@implementer(IJobStore)
class FencedStore:
    """
    The store as a worker writes to it: a job it claimed is updated, and its output
    appended, only while the job is still its own attempt (L{claims.fenced_update}).
    """

    def __init__(self, store: PostgresJobStore, runner: ClusterRunner) -> None:
        self.store = store
        self.runner = runner

    def add(self, job: Job) -> defer.Deferred[None]:
        return self.store.add(job)

    def get(self, job_id: str) -> defer.Deferred[Job | None]:
        return self.store.get(job_id)

    def cached(self, job_id: str) -> Job | None:
        return None

    def list(self, status=None, tool=None, limit=50, cursor=None):
        return self.store.list(status, tool, limit, cursor)

    def unfinished(self) -> defer.Deferred[list[Job]]:
        return self.store.unfinished()

    def prune(self, before: float) -> defer.Deferred[int]:
        return self.store.prune(before)

    def fetch_output(self, job_id: str, offset: int = 0, size: int = -1):
        return self.store.fetch_output(job_id, offset, size)

    def open_output(self, job_id: str) -> ChunkWriter:
        return ChunkWriter(self.store, job_id, self.runner.fence(job_id))

    def update(self, job: Job) -> defer.Deferred[None]:
        fence = self.runner.fence(job.id)
        if fence is None:
            return self.store.update(job)
        worker, attempt = fence

        def written(ours: bool) -> None:
            if job.status != RUNNING:
                self.runner.attempts.pop(job.id, None)
            if not ours:
                self.runner.log.warn(
                    "job {job}: no longer this worker's (reaped or cancelled), {status} not"
                    " written",
                    job=job.id,
                    status=job.status,
                )

        return self.store.write(
            lambda db: claims.fenced_update(db, job, worker, attempt)
        ).addCallback(written)


@implementer(IRunner)
class ClusterRunner(LocalRunner):
    """
    Runs (role worker or both) and accepts (role api or both) jobs of a cluster sharing one
    PostgreSQL store.

    @param run_jobs: claim and run jobs here (False for an API-only node).
    @param lease: seconds of a worker's lease.
    @param monotonic: the clock of self-fencing (never the wall clock).
    """

    log = Logger(observer=log_observer)

    def __init__(
        self,
        store: PostgresJobStore,
        tools: Mapping[str, Tool],
        workers: int,
        queue_size: int,
        reactor=None,
        *,
        run_jobs: bool = True,
        lease: float = DEFAULT_LEASE,
        poll_interval: float = POLL_INTERVAL,
        worker_id: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        kill_grace: float = KILL_GRACE,
        signal_group: Callable[[int, int], None] = signal_group,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            store,
            tools,
            workers if run_jobs else 0,
            queue_size,
            reactor,
            kill_grace=kill_grace,
            signal_group=signal_group,
            environment=environment,
        )
        self.db = store
        self.store = FencedStore(store, self)
        self.run_jobs = run_jobs
        self.lease = lease
        self.poll_interval = poll_interval
        self.worker_id = worker_id or worker_name()
        self.host = socket.gethostname()
        self.monotonic = monotonic
        #: The (worker id, attempt) of each job this worker runs: the fence of its writes
        #: (the id it had when it claimed the job: a worker whose lease expired takes a new one).
        self.attempts: dict[str, tuple[str, int]] = {}
        self._queued = 0
        self._registered = False
        self._renewed_at = monotonic()
        self._fenced_self = False
        self._claiming = False
        self._claim_again = False
        self._loops: list[task.LoopingCall] = []
        self._listener: Listener | None = None

    def fence(self, job_id: str) -> tuple[str, int] | None:
        return self.attempts.get(job_id)

    # --- service --------------------------------------------------------------------------

    def startService(self) -> None:
        # Not LocalRunner's: nothing to recover, a previous run's jobs are reaped by lease.
        Service.startService(self)
        self._accepting = True
        self.recovered = defer.succeed(None)
        self._every(self.poll_interval, self._refresh)
        self._every(self.lease / 2, self._reap)
        if self.run_jobs:
            self._every(self.lease / 3, self._heartbeat)
            self._every(self.lease / 10, self._check_lease)
            self._listener = Listener(
                self.db.url,
                [claims.QUEUED_CHANNEL, claims.CANCEL_CHANNEL],
                self._notified,
                self._pump,
                self.reactor,
            )
            self._listener.start()

    def _every(self, interval: float, function: Callable[[], defer.Deferred | None]) -> None:
        def tick():
            # A failing tick is logged and the loop goes on (a LoopingCall stops on errors).
            return defer.maybeDeferred(function).addErrback(
                lambda failure: (
                    self.log.failure("cluster upkeep failed", failure)
                    if not failure.check(defer.CancelledError)
                    else None
                )
            )

        loop = task.LoopingCall(tick)
        loop.clock = self.reactor
        loop.start(interval, now=True)
        self._loops.append(loop)

    def stopService(self) -> defer.Deferred[None]:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        ended = super().stopService()
        return defer.Deferred.fromCoroutine(self._stop(ended))

    async def _stop(self, ended: defer.Deferred[None]) -> None:
        await ended
        if self._listener is not None:
            await self._listener.stop()
        if self.run_jobs and self._registered:
            try:
                await self.db.write(lambda db: claims.retire(db, self.worker_id))
            except Exception as error:
                self.log.warn("could not retire worker {worker}: {error}",
                              worker=self.worker_id, error=error)  # fmt: skip

    # --- the lease ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        sent = self.monotonic()
        limits = self._limits()
        if not self._registered:
            await self.db.write(lambda db: claims.register(db, self.worker_id, limits, self.lease))
            self._registered = True
            self._renewed_at = sent
            self.log.info("worker {worker} registered, lease {lease:g} s",
                          worker=self.worker_id, lease=self.lease)  # fmt: skip
            self._pump()
            return
        try:
            renewed = await self.db.write(lambda db: claims.renew(db, self.worker_id, self.lease))
        except Exception as error:
            self.log.warn("could not renew the lease of {worker}: {error}",
                          worker=self.worker_id, error=error)  # fmt: skip
            return
        if renewed:
            self._renewed_at = max(self._renewed_at, sent)
            if self._fenced_self:
                self._fenced_self = False
                self.log.info("lease renewed again: claiming jobs")
                self._pump()
            return
        # Expired: its jobs are (or will be) reaped. Kill them, start again as a new worker.
        self.log.error("worker {worker}: its lease expired; killing its jobs, registering anew",
                       worker=self.worker_id)  # fmt: skip
        self._kill_own_jobs()
        self._registered = False
        self.worker_id = worker_name()

    def _lease_fresh(self) -> bool:
        return self.monotonic() - self._renewed_at < self.lease * SELF_FENCE

    def _check_lease(self) -> None:
        if self._registered and not self._lease_fresh() and not self._fenced_self:
            self._fenced_self = True
            self.log.error(
                "no lease renewal for {age:.1f} s: killing the {count} jobs of this worker"
                " before its lease can expire",
                age=self.monotonic() - self._renewed_at,
                count=len(self.active),
            )
            self._kill_own_jobs()

    def _kill_own_jobs(self) -> None:
        for run in list(self.active.values()):
            if run.ending is None:
                run.ending = LEASE_LOST
            run.timeout_call = _cancel(run.timeout_call)
            if run.pid is not None:
                self.signal_group(run.pid, signal.SIGKILL, run.transport.pid is not None)

    async def _reap(self) -> None:
        safe = [name for name, tool in self.tools.items() if tool.retry_safe]
        now = self.clock.seconds()
        reaped = await self.db.write(lambda db: claims.reap(db, safe, self.lease, now))
        for job_id, status in reaped or ():
            self.log.warn("job {job}: its worker's lease expired; now {status}",
                          job=job_id, status=status)  # fmt: skip
        if self.run_jobs:
            self._sweep_orphans(await self.db.write(lambda db: claims.orphans(db, self.host)))

    def _sweep_orphans(self, orphans: list[tuple[int, float | None]]) -> None:
        """Kill what reaped jobs of a dead worker on this host left running."""
        booted = boot_time()
        for pid, started in orphans:
            if (started or 0) < booted:
                continue  # a reboot since: that group id now belongs to someone else
            self.log.info("killing process group {pid}, left by a reaped job", pid=pid)
            self.signal_group(pid, signal.SIGKILL, False)

    # --- polling and notifications --------------------------------------------------------

    async def _refresh(self) -> None:
        self._queued = await self.db.read(claims.queued_count)
        if self.run_jobs and self._registered:
            worker = self.worker_id
            for job_id in await self.db.read(lambda db: claims.cancel_requested(db, worker)):
                self._cancel_here(job_id)
            self._pump()

    def _notified(self, channel: str, payload: str) -> None:
        if channel == claims.CANCEL_CHANNEL:
            self._cancel_here(payload)
        elif not payload or payload in self.tools:
            self._pump()

    def _cancel_here(self, job_id: str) -> None:
        run = self.active.get(job_id)
        if run is not None:
            run.terminate(CANCELLED)

    # --- IRunner --------------------------------------------------------------------------

    def queue_depth(self) -> int:
        return self._queued + self._reserved

    def is_active(self, job_id: str) -> bool:
        return job_id in self.active

    def submit(self, job: Job, idempotency_key: str | None = None) -> defer.Deferred[Job]:
        if self.queue_depth() >= self.queue_size:
            return defer.fail(QueueFull(retry_after=1))
        self._reserved += 1

        def stored(existing: Job | None) -> Job:
            self._reserved -= 1
            if existing is not None:
                return existing
            self._queued += 1
            self._pump()
            return job

        def not_stored(failure):
            self._reserved -= 1
            return failure

        return self.db.write_many(claims.enqueue_many, (job, idempotency_key)).addCallbacks(
            stored, not_stored
        )

    def cancel(self, job_id: str) -> defer.Deferred[Job | None]:
        if job_id in self.active:
            return super().cancel(job_id)
        return defer.Deferred.fromCoroutine(self._cancel_anywhere(job_id))

    async def _cancel_anywhere(self, job_id: str) -> Job | None:
        now = self.clock.seconds()
        status = await self.db.write(lambda db: claims.cancel(db, job_id, now))
        if status is None:
            return None
        deadline = self.clock.seconds() + self.kill_grace + CANCEL_WAIT
        while True:
            job = await self.db.get(job_id)
            if job is None or job.terminal or self.clock.seconds() > deadline:
                if job is not None and job.status == CANCELLED:
                    self._finished(job)
                return job
            await task.deferLater(self.clock, 0.1, lambda: None)

    # --- running --------------------------------------------------------------------------

    def _limits(self) -> dict[str, int]:
        return {name: tool.max_concurrent or 0 for name, tool in self.tools.items()}

    def _pump(self) -> None:
        if not (self._accepting and self.run_jobs and self._registered and self._lease_fresh()):
            return
        if self._claiming:
            self._claim_again = True
            return
        capacity = self.workers - len(self.active)
        if capacity <= 0:
            return
        self._claiming, self._claim_again = True, False
        worker, limits, now = self.worker_id, self._limits(), self.clock.seconds()
        host = self.host
        self.db.write(
            lambda db: claims.claim(db, worker, limits, capacity, now, host)
        ).addCallbacks(self._claimed, self._claim_failed, (worker,))

    def _claimed(self, claimed: list[tuple[Job, int]], worker: str) -> None:
        self._claiming = False
        for job, attempt in claimed:
            self.attempts[job.id] = (worker, attempt)
            if self._accepting:
                self._start(job, self.tools[job.tool])
            else:  # stopping: never started, so handing it back is always safe
                self.store.update(job.evolve(status=QUEUED, started=None))
        if claimed or self._claim_again:
            self._pump()

    def _claim_failed(self, failure) -> None:
        self._claiming = False
        self.log.warn("claiming jobs failed: {error}", error=failure.getErrorMessage())

    def _start(self, job: Job, tool: Tool) -> None:
        """Spawn a claimed job: its start is already committed (the claim wrote it)."""
        run = _Run(self, job, tool, self._capture(job.id))
        self.active[job.id] = run
        self._per_tool[tool.name] += 1
        self.notify(job)
        self._spawn(run)

    def _capture(self, job_id: str) -> OutputCapture:
        return OutputCapture(self.store.open_output(job_id))
