"""
Running jobs: the L{IRunner} interface and L{LocalRunner}, which runs them as local processes.

Each job is a process started with C{spawnProcess} from an argv, never a shell, in its own
session and process group (the argv is prefixed by C{setsid}), so a timeout or a cancel can
signal the whole tree it started: SIGTERM to the group, then SIGKILL after a grace period.
When the job's own process exits, whatever it left behind in its group is killed too, so no
orphan outlives its job; Twisted reaps the process, so no zombie remains.

Output (stdout and stderr together) is appended to the job's output file as it arrives, up
to a head limit; after that only the last bytes are kept in memory and written at the end,
after a marker saying how much was left out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from twistnet.http._logging import observer as log_observer
from twistnet.http._pytool import RESULT_FD
from twistnet.http.model import (
    CANCELLED,
    FAILED,
    LOST,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    Job,
    Tool,
)
from twistnet.http.store import IJobStore, StoreUnavailable

#: Output kept from the start of a run, streamed to the output file as it arrives.
OUTPUT_HEAD = 64 * 1024
#: Output kept from the end of a run, held in memory until the run ends.
OUTPUT_TAIL = 64 * 1024
#: The largest JSON result a Python tool may return: it is stored in the database row.
MAX_RESULT = 1024 * 1024
#: Seconds between attempts to store a job's new state the store refused (a full disk).
STORE_RETRY = 1.0
#: Seconds between SIGTERM and SIGKILL when a job is timed out or cancelled.
KILL_GRACE = 5.0
#: Environment variables passed to every tool from the server's own environment; nothing
#: else is (the server's environment may hold the API token).
PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "TZ", "PYTHONPATH")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

#: Starts the rest of argv in a new session and process group, without a shell.
_SETSID_HELPER = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


def session_prefix() -> list[str]:
    """An argv prefix that runs a command as leader of its own session and process group."""
    setsid = shutil.which("setsid")
    # util-linux setsid execs directly (no fork) when it is not a group leader, which a
    # freshly spawned child never is; otherwise a tiny Python does the same.
    return [setsid] if setsid else [sys.executable, "-c", _SETSID_HELPER]


def signal_group(pid: int, signum: int, leader_alive: bool = True) -> None:
    """
    Send C{signum} to the process group led by C{pid}.

    While the leader lives it may not have called setsid yet (no such group): then it gets
    the signal alone. Once it is reaped its pid may be reused, so only the group is tried.
    """
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        if not leader_alive:
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def boot_time() -> float:
    """When the machine booted (epoch seconds), or 0 if unknown."""
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


class QueueFull(Exception):
    """No room in the queue; C{retry_after} is a hint in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the job queue is full")
        self.retry_after = retry_after


class IRunner(Interface):
    """Runs jobs. A runner on other machines implements the same."""

    workers = Attribute("How many jobs may run at once.")
    queue_size = Attribute("How many jobs may wait.")
    active = Attribute("The jobs running now, by id.")
    on_finished = Attribute("Callables called with each job that reaches a final state.")

    def queue_depth() -> int:
        """How many jobs are waiting."""

    def submit(job: Job) -> defer.Deferred[Job]:
        """Store C{job} durably and queue it; fails with L{QueueFull} when there is no room."""

    def cancel(job_id: str) -> defer.Deferred[Job | None]:
        """Cancel a queued or running job; fires with the job once it is cancelled, or None."""

    def watch(job_id: str, observer: Callable[[Job], None]) -> Callable[[], None]:
        """Call C{observer} on new output or a new state of the job; returns an unwatch."""

    def is_active(job_id: str) -> bool:
        """Is the job queued or running here?"""


class OutputCapture:
    """Keeps the first C{head} bytes (written through to C{sink}) and the last C{tail}."""

    def __init__(self, sink: BinaryIO, head: int = OUTPUT_HEAD, tail: int = OUTPUT_TAIL):
        self._sink = sink
        self._head_room = head
        self._tail_limit = tail
        self._tail = bytearray()
        self.total = 0
        self.kept = 0
        self.omitted = 0
        #: The error that stopped writes to the sink (then all output is counted omitted).
        self.failed: OSError | None = None

    def write(self, data: bytes) -> None:
        self.total += len(data)
        if self._head_room:
            head, data = data[: self._head_room], data[self._head_room :]
            self._head_room -= len(head)
            self._put(head)
        if data:
            self._tail += data
            excess = len(self._tail) - self._tail_limit
            if excess > 0:
                del self._tail[:excess]
                self.omitted += excess

    @property
    def truncated(self) -> bool:
        return self.omitted > 0

    def _put(self, data: bytes) -> None:
        """Write through to the sink; once that failed (a full disk), count the bytes lost."""
        if self.failed is None:
            try:
                self._sink.write(data)
                self._sink.flush()
                self.kept += len(data)
                return
            except OSError as error:
                self.failed = error
        self.omitted += len(data)

    def close(self) -> None:
        """Write the tail (after an omission marker if bytes were dropped) and close."""
        if self.truncated:
            self._put(f"\n[... {self.omitted} bytes of output omitted ...]\n".encode())
        self._put(bytes(self._tail))
        self._tail = bytearray()
        try:
            self._sink.close()
        except OSError as error:  # what a failed write left in the buffer
            self.failed = self.failed or error


class _Run(protocol.ProcessProtocol):
    """One running job: its process, output, timers and how it ended."""

    def __init__(self, runner: LocalRunner, job: Job, tool: Tool, output: OutputCapture):
        self.runner = runner
        self.job = job
        self.tool = tool
        self.output = output
        self.result = bytearray()
        self.result_too_large = False
        self.ending: str | None = None
        self.timeout_call: IDelayedCall | None = None
        self.kill_call: IDelayedCall | None = None
        self.ended: defer.Deferred[Job] = defer.Deferred()
        self.pid: int | None = None

    def makeConnection(self, transport) -> None:
        # Kept: Twisted forgets the transport's pid once the process is reaped, but its group
        # (and the job's output pipe) may live on.
        self.pid = getattr(transport, "pid", None)
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        if self.tool.function:
            self.transport.write(json.dumps(self.job.params).encode())
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == RESULT_FD:
            if len(self.result) + len(data) > MAX_RESULT:
                self.result_too_large = True
            else:
                self.result += data
            return
        self.output.write(data)
        self.runner._notify(self.job)

    def terminate(self, why: str) -> None:
        """SIGTERM to the job's process group; SIGKILL after the grace period."""
        if self.ending is not None:
            return
        self.ending = why
        self._cancel_timeout()
        if self.pid is None:
            return
        self.runner.log.info("job {job}: {why}, sending SIGTERM", job=self.job.id, why=why)
        self.runner.signal_group(self.pid, signal.SIGTERM, self.transport.pid is not None)
        self.kill_call = self.runner.clock.callLater(self.runner.kill_grace, self._kill)

    def _kill(self) -> None:
        self.kill_call = None
        self.runner.log.info("job {job}: still running, sending SIGKILL", job=self.job.id)
        self.runner.signal_group(self.pid, signal.SIGKILL, self.transport.pid is not None)

    def _cancel_timeout(self) -> None:
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.cancel()
        self.timeout_call = None

    def processExited(self, reason) -> None:
        # The job's own process is gone: anything it left in its group must not outlive it
        # (or hold its output pipe open, which would keep the job running).
        if self.pid is not None:
            self.runner.signal_group(self.pid, signal.SIGKILL, False)

    def processEnded(self, reason) -> None:
        self._cancel_timeout()
        if self.kill_call is not None and self.kill_call.active():
            self.kill_call.cancel()
        self.kill_call = None
        self.output.close()
        if self.output.failed is not None:
            self.runner.log.error(
                "job {job}: could not store all of its output: {error}",
                job=self.job.id,
                error=self.output.failed,
            )
        exit_code = getattr(reason.value, "exitCode", None)
        signum = getattr(reason.value, "signal", None)
        changes: dict[str, Any] = {
            "pid": None,
            "finished": self.runner.clock.seconds(),
            "exit_code": exit_code if exit_code is not None else (-signum if signum else None),
            "truncated": self.output.truncated,
            "output_size": self.output.kept,
        }
        if self.ending == CANCELLED:
            changes.update(status=CANCELLED, error="cancelled by a client")
        elif self.ending == TIMED_OUT:
            changes.update(status=TIMED_OUT, error=f"timed out after {self.job.timeout:g} s")
        elif self.ending is not None:
            changes.update(self.runner._interrupted(self.job, self.tool))
        elif reason.check(error.ProcessDone):
            changes.update(status=SUCCEEDED)
        else:
            why = f"killed by signal {signum}" if signum else f"exited with status {exit_code}"
            changes.update(status=FAILED, error=why)
        if self.tool.function and changes["status"] == SUCCEEDED:
            changes.update(self._result())
        self.runner._ended(self, self.job.evolve(**changes))

    def _result(self) -> dict[str, Any]:
        if self.result_too_large:
            return {"status": FAILED, "error": f"the result is larger than {MAX_RESULT} bytes"}
        try:
            return {"result": json.loads(self.result.decode())}
        except ValueError:
            return {"status": FAILED, "error": "the tool returned no JSON result"}


@implementer(IRunner)
class LocalRunner(Service):
    """
    Runs jobs as local processes: at most C{workers} at once (and each tool's own limit),
    with at most C{queue_size} waiting.

    @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
    @param signal_group: sends a signal to a process group (replaced in tests).
    """

    log = Logger(observer=log_observer)

    def __init__(
        self,
        store: IJobStore,
        tools: Mapping[str, Tool],
        workers: int,
        queue_size: int,
        reactor=None,
        kill_grace: float = KILL_GRACE,
        signal_group: Callable[[int, int], None] = signal_group,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.store = store
        self.tools = dict(tools)
        self.workers = workers
        self.queue_size = queue_size
        self.reactor = reactor
        self.clock = reactor
        self.kill_grace = kill_grace
        self.signal_group = signal_group
        source = os.environ if environment is None else environment
        self.base_environment = {key: source[key] for key in PASSED_ENVIRONMENT if key in source}
        self.base_environment.setdefault("PATH", DEFAULT_PATH)
        self.prefix = session_prefix()
        self.queue: deque[Job] = deque()
        self.active: dict[str, _Run] = {}
        self._reserved = 0
        self._per_tool: Counter[str] = Counter()
        self._watchers: dict[str, set[Callable[[Job], None]]] = {}
        self._accepting = False
        #: Each job's newest state until it is stored; the ids of those the store refused.
        self._latest: dict[str, Job] = {}
        self._failing: set[str] = set()
        self._retry_call: IDelayedCall | None = None
        #: Called with each job that reaches a terminal state (metrics).
        self.on_finished: list[Callable[[Job], None]] = []

    # --- service ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._accepting = True
        self.recovered: defer.Deferred[None] = defer.Deferred.fromCoroutine(self._recover())
        self.recovered.addErrback(lambda f: self.log.failure("recovering jobs failed", f))

    async def _recover(self) -> None:
        """After a restart: queued jobs run again; running ones are lost or re-queued."""
        for job in await self.store.unfinished():
            tool = self.tools.get(job.tool)
            if tool is None:
                lost = job.evolve(
                    status=LOST,
                    finished=self.clock.seconds(),
                    error=f"tool {job.tool!r} is no longer declared",
                )
                await self.store.update(lost)
                continue
            if job.status == RUNNING:
                self._sweep(job)
                job = job.evolve(pid=None, **self._interrupted(job, tool))
                await self.store.update(job)
                self.log.info(
                    "job {job} was running at restart: {status}", job=job.id, status=job.status
                )
            if job.status == QUEUED:
                self.queue.append(job)
        self._pump()

    def _sweep(self, job: Job) -> None:
        """Kill what a job that was running when the server died left behind (no orphans)."""
        if job.pid is None or (job.started or 0) < boot_time():
            return  # a reboot since: that group id now belongs to someone else
        self.log.info(
            "job {job}: killing its leftover process group {pid}", job=job.id, pid=job.pid
        )
        self.signal_group(job.pid, signal.SIGKILL, False)

    def _interrupted(self, job: Job, tool: Tool) -> dict[str, Any]:
        """The changes for a job whose run the server's stop cut short."""
        if tool.retry_safe:
            # Run again from the start: nothing of the cut-short run remains.
            return {
                "status": QUEUED,
                "started": None,
                "finished": None,
                "exit_code": None,
                "truncated": False,
                "output_size": 0,
            }
        return {
            "status": LOST,
            "finished": self.clock.seconds(),
            "error": "the server stopped while the job ran",
        }

    def stopService(self) -> defer.Deferred[None]:
        """Stop starting jobs; end the running ones (as at a restart) and wait for them."""
        super().stopService()
        self._accepting = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
            self._retry()  # a last try, while the store is still running
        self._retry_call = None
        runs = list(self.active.values())
        for run in runs:
            run.terminate("server stopping")
        return defer.gatherResults([run.ended for run in runs]).addCallback(lambda _: None)

    # --- IRunner ------------------------------------------------------------------------

    def queue_depth(self) -> int:
        return len(self.queue) + self._reserved

    def submit(self, job: Job) -> defer.Deferred[Job]:
        if self.queue_depth() >= self.queue_size:
            # Jobs leave the queue whenever a worker frees up: ask for a short, polite pause.
            return defer.fail(QueueFull(retry_after=1))
        self._reserved += 1

        def queued(_: None) -> Job:
            self._reserved -= 1
            self.queue.append(job)
            self._pump()
            return job

        def not_stored(failure):
            self._reserved -= 1
            return failure

        return self.store.add(job).addCallbacks(queued, not_stored)

    def is_active(self, job_id: str) -> bool:
        return job_id in self.active or any(job.id == job_id for job in self.queue)

    def cancel(self, job_id: str) -> defer.Deferred[Job | None]:
        run = self.active.get(job_id)
        if run is not None:
            run.terminate(CANCELLED)
            return run.ended
        for job in self.queue:
            if job.id == job_id:
                self.queue.remove(job)
                cancelled = job.evolve(
                    status=CANCELLED, finished=self.clock.seconds(), error="cancelled by a client"
                )
                self._finished(cancelled)
                self._notify(cancelled)
                return self.store.update(cancelled).addCallback(lambda _, job=cancelled: job)
        return defer.succeed(None)

    def watch(self, job_id: str, observer: Callable[[Job], None]) -> Callable[[], None]:
        self._watchers.setdefault(job_id, set()).add(observer)

        def unwatch() -> None:
            observers = self._watchers.get(job_id)
            if observers is not None:
                observers.discard(observer)
                if not observers:
                    del self._watchers[job_id]

        return unwatch

    # --- running ------------------------------------------------------------------------

    def _notify(self, job: Job) -> None:
        for observer in list(self._watchers.get(job.id, ())):
            try:
                observer(job)
            except Exception:
                self.log.failure("a watcher of job {job} failed", job=job.id)

    def _has_room(self, tool: Tool) -> bool:
        return not tool.max_concurrent or self._per_tool[tool.name] < tool.max_concurrent

    def _pump(self) -> None:
        """Start queued jobs, oldest first, while workers (and their tools) have room."""
        if not self._accepting:
            return
        skipped: list[Job] = []
        while self.queue and len(self.active) < self.workers:
            job = self.queue.popleft()
            tool = self.tools[job.tool]
            if self._has_room(tool):
                self._start(job, tool)
            else:
                skipped.append(job)
        self.queue.extendleft(reversed(skipped))

    def command(self, job: Job, tool: Tool) -> list[str]:
        """The argv of a job: its tool's command, in a session of its own."""
        if tool.function:
            argv = [sys.executable, "-m", "twistnet.http._pytool", tool.function]
        else:
            argv = tool.command(job.params)
        return [*self.prefix, *argv]

    def _start(self, job: Job, tool: Tool) -> None:
        """
        Take a worker for C{job}: record it as running, durably, and only then spawn it, so
        a crash can never make a job that may not run twice look as if it had not started.
        """
        job = job.evolve(status=RUNNING, started=self.clock.seconds())
        run = _Run(self, job, tool, OutputCapture(self.store.open_output(job.id)))
        self.active[job.id] = run
        self._per_tool[tool.name] += 1
        self._notify(job)
        self.store.update(job).addCallbacks(
            lambda _: self._spawn(run), lambda failure: self._not_recorded(run, failure)
        )

    def _not_recorded(self, run: _Run, failure) -> None:
        if failure.check(StoreUnavailable):
            # A full disk, say: the job does not run, and the operator reads why in one line.
            self.log.error(
                "job {job}: not started, its start could not be recorded: {error}",
                job=run.job.id,
                error=failure.getErrorMessage(),
            )
        else:
            self.log.failure("job {job}: could not record its start", failure, job=run.job.id)
        run.output.write(f"not started: the job store failed: {failure.value}\n".encode())
        run.processEnded(_NotStarted(127))

    def _spawn(self, run: _Run) -> None:
        job, tool = run.job, run.tool
        if run.ending is not None:
            # Cancelled (or the server is stopping) while its start was being recorded.
            run.processEnded(_NotStarted(None))
            return
        argv = self.command(job, tool)
        environment = {**self.base_environment, **dict(tool.env)}
        child_fds: dict[int, str] = {0: "w", 1: "r", 2: "r"}
        if tool.function:
            child_fds[RESULT_FD] = "r"
        try:
            process = self.reactor.spawnProcess(
                run, argv[0], argv, env=environment, path=tool.cwd, childFDs=child_fds
            )
        except Exception as failure:
            self.log.failure("job {job}: could not start {tool}", job=job.id, tool=tool.name)
            run.output.write(f"could not start: {failure}\n".encode())
            run.processEnded(_NotStarted(127))
            return
        run.job = job.evolve(pid=process.pid)
        self._record(run.job)
        run.timeout_call = self.clock.callLater(job.timeout, run.terminate, TIMED_OUT)
        self.log.debug("job {job} started: {tool}", job=job.id, tool=tool.name)

    def _record(self, job: Job) -> None:
        self._latest[job.id] = job
        self._store(job)
        self._notify(job)

    def _store(self, job: Job) -> None:
        self.store.update(job).addCallbacks(self._stored, self._not_stored, (job,), None, (job,))

    def _stored(self, _: None, job: Job) -> None:
        if self._latest.get(job.id) is job:
            del self._latest[job.id]
            if job.id in self._failing:
                self._failing.discard(job.id)
                self.log.info("job {job}: its state is stored after all", job=job.id)

    def _not_stored(self, failure, job: Job) -> None:
        # A full disk, say: what the API shows must still reach the database, or a restart
        # would undo it; so the job's latest state is tried again until it is stored.
        if self._latest.get(job.id) is not job:
            return  # a newer state of the job is on its way
        if job.id not in self._failing:
            self._failing.add(job.id)
            self.log.error(
                "could not store job {job} ({status}): {error}; retrying every {delay:g} s",
                job=job.id,
                status=job.status,
                error=failure.getErrorMessage(),
                delay=STORE_RETRY,
            )
        if self.running and (self._retry_call is None or not self._retry_call.active()):
            self._retry_call = self.clock.callLater(STORE_RETRY, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        for job_id in list(self._failing):
            job = self._latest.get(job_id)
            if job is not None:
                self._store(job)

    def _ended(self, run: _Run, job: Job) -> None:
        del self.active[job.id]
        self._per_tool[run.tool.name] -= 1
        run.job = job
        if job.status != QUEUED:
            self._finished(job)
        self._record(job)
        run.ended.callback(job)
        self._pump()

    def _finished(self, job: Job) -> None:
        for observer in self.on_finished:
            observer(job)


class _NotStarted:
    """Stands in for the ended-process reason of a job whose process never ran."""

    def __init__(self, exit_code: int | None) -> None:
        self.value = error.ProcessTerminated(exitCode=exit_code)

    def check(self, *kinds: type) -> type | None:
        return None
