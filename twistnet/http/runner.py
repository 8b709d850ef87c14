"""
Running jobs: the L{IRunner} interface and L{LocalRunner}, which runs them as local processes.

Each job is a process started with C{spawnProcess} from an argv, never a shell, in its own
session and process group (the argv is prefixed by C{setsid}), so a timeout or a cancel can
signal the whole tree it started: SIGTERM to the group, then SIGKILL after a grace period.
When the job's own process exits, whatever it left behind in its group is killed too, so no
orphan outlives its job; Twisted reaps the process, so no zombie remains.

Output (stdout and stderr together, each line whole: see L{twistnet.http.output}) is
appended to the job's output file as it arrives, up to a head limit; after that only the
last bytes are kept in memory and written at the end, after a marker saying how much was
left out.
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
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from twistnet._connections import reactor_or_global
from twistnet.http._logging import observer as log_observer
from twistnet.http._pytool import RESULT_FD
from twistnet.http.ending import COULD_NOT_START, NOT_SPAWNED, ProcessEnd, interrupted, outcome
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
from twistnet.http.output import LINE_SLACK, HeadTail, LineAssembler
from twistnet.http.pending import PendingStates
from twistnet.http.store import IJobStore, StoreUnavailable

#: Output kept from the start of a run, streamed to the output file as it arrives (the cut
#: moves back to a line's end within LINE_SLACK bytes).
OUTPUT_HEAD = 64 * 1024
#: Output kept from the end of a run, held in memory until the run ends (the cut moves
#: forward to a line's start within LINE_SLACK bytes).
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


def tool_environment(tool: Tool, server: Mapping[str, str]) -> dict[str, str]:
    """The environment a tool's process gets: a few of the server's variables, then its own."""
    passed = {key: server[key] for key in PASSED_ENVIRONMENT if key in server}
    passed.setdefault("PATH", DEFAULT_PATH)
    return {**passed, **dict(tool.env)}


def unrunnable(tool: Tool, server: Mapping[str, str] | None = None) -> str | None:
    """
    Why C{tool}'s program cannot be run, or None: it is looked up as the job's C{execvp}
    will, on the PATH of L{tool_environment}, or (a name with a slash) from the tool's cwd.
    """
    if tool.function:
        return None  # run by this very Python
    program = "".join(text for _, text in tool.argv[0])
    environment = tool_environment(tool, os.environ if server is None else server)
    if "/" in program:
        path = os.path.join(tool.cwd or os.getcwd(), program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return None
        return f"tool {tool.name!r}: program {program!r} is not an executable file"
    if shutil.which(program, path=environment["PATH"]) is not None:
        return None
    return f"tool {tool.name!r}: program {program!r} is not found on PATH {environment['PATH']}"


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

    def submit(job: Job, idempotency_key: str | None = None) -> defer.Deferred[Job]:
        """
        Store C{job} durably and queue it; fails with L{QueueFull} when there is no room.
        With an C{idempotency_key} already used, fires with the job that key made instead.
        """

    def cancel(job_id: str) -> defer.Deferred[Job | None]:
        """Cancel a queued or running job; fires with the job once it is cancelled, or None."""

    def watch(job_id: str, observer: Callable[[Job], None]) -> Callable[[], None]:
        """Call C{observer} on new output or a new state of the job; returns an unwatch."""

    def is_active(job_id: str) -> bool:
        """Is the job queued or running here?"""


class OutputCapture:
    """
    Writes a job's combined output to its file within the head+tail cap (L{HeadTail}), and
    counts what a failing file (a full disk) lost as omitted too.
    """

    def __init__(
        self, sink: BinaryIO, head: int = OUTPUT_HEAD, tail: int = OUTPUT_TAIL, slack=LINE_SLACK
    ):
        self._sink = sink
        self._cap = HeadTail(head, tail, slack)
        self._lost = 0
        #: Bytes in the file.
        self.kept = 0
        #: The error that stopped writes to the sink (then all output is counted omitted).
        self.failed: OSError | None = None

    @property
    def omitted(self) -> int:
        return self._cap.omitted + self._lost

    @property
    def truncated(self) -> bool:
        return self.omitted > 0

    def write(self, data: bytes) -> None:
        self._put(self._cap.add(data))

    def _put(self, data: bytes) -> None:
        """Write through to the sink; once that failed (a full disk), count the bytes lost."""
        if not data:
            return
        if self.failed is None:
            try:
                self._sink.write(data)
                self._sink.flush()
                self.kept += len(data)
                return
            except OSError as error:
                self.failed = error
        self._lost += len(data)

    def close(self) -> None:
        """Write the rest (the tail, after a marker if bytes were left out) and close."""
        self._put(self._cap.finish())
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
        self.lines = LineAssembler()
        self.result = bytearray()
        self.result_too_large = False
        self.ending: str | None = None
        self.timeout_call: IDelayedCall | None = None
        self.kill_call: IDelayedCall | None = None
        self.flush_call: IDelayedCall | None = None
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
        self.append(self.lines.receive(fd, data, self.runner.clock.seconds()))
        due = self.lines.next_due()
        if due is not None and not _active(self.flush_call):
            delay = max(0.0, due - self.runner.clock.seconds())
            self.flush_call = self.runner.clock.callLater(delay, self._flush_due)

    def _flush_due(self) -> None:
        """Show the partial lines that waited long enough (a progress bar, a prompt)."""
        self.flush_call = None
        now = self.runner.clock.seconds()
        self.append(self.lines.due(now))
        due = self.lines.next_due()
        if due is not None:
            self.flush_call = self.runner.clock.callLater(max(0.0, due - now), self._flush_due)

    def append(self, data: bytes) -> None:
        """Add C{data} to the job's output and tell its watchers."""
        if data:
            self.output.write(data)
            self.runner.notify(self.job)

    def terminate(self, why: str) -> None:
        """SIGTERM to the job's process group; SIGKILL after the grace period."""
        if self.ending is not None:
            return
        self.ending = why
        self.timeout_call = _cancel(self.timeout_call)
        if self.pid is None:
            return
        self.runner.log.info("job {job}: {why}, sending SIGTERM", job=self.job.id, why=why)
        self.runner.signal_group(self.pid, signal.SIGTERM, self.transport.pid is not None)
        self.kill_call = self.runner.clock.callLater(self.runner.kill_grace, self._kill)

    def _kill(self) -> None:
        self.kill_call = None
        self.runner.log.info("job {job}: still running, sending SIGKILL", job=self.job.id)
        self.runner.signal_group(self.pid, signal.SIGKILL, self.transport.pid is not None)

    def processExited(self, reason) -> None:
        # The job's own process is gone: anything it left in its group must not outlive it
        # (or hold its output pipe open, which would keep the job running).
        if self.pid is not None:
            self.runner.signal_group(self.pid, signal.SIGKILL, False)

    def processEnded(self, reason) -> None:
        self.finish(ProcessEnd.from_reason(reason))

    def finish(self, end: ProcessEnd) -> None:
        """The process ended (or never started): close the output, report to the runner."""
        self.timeout_call = _cancel(self.timeout_call)
        self.kill_call = _cancel(self.kill_call)
        self.flush_call = _cancel(self.flush_call)
        self.append(self.lines.flush())
        self.output.close()
        if self.output.failed is not None:
            self.runner.log.error(
                "job {job}: could not store all of its output: {error}",
                job=self.job.id,
                error=self.output.failed,
            )
        self.runner.run_ended(self, end)

    def result_changes(self) -> dict[str, Any]:
        """A Python tool's result, or why the job failed after all."""
        if self.result_too_large:
            return {"status": FAILED, "error": f"the result is larger than {MAX_RESULT} bytes"}
        try:
            return {"result": json.loads(self.result.decode())}
        except ValueError:
            return {"status": FAILED, "error": "the tool returned no JSON result"}


def _active(call: IDelayedCall | None) -> bool:
    return call is not None and call.active()


def _cancel(call: IDelayedCall | None) -> None:
    """Cancel C{call} if it is still to come; returns None, to clear the attribute holding it."""
    if _active(call):
        call.cancel()


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
        reactor = reactor_or_global(reactor)
        self.store = store
        self.tools = dict(tools)
        self.workers = workers
        self.queue_size = queue_size
        self.reactor = reactor
        self.clock = reactor
        self.kill_grace = kill_grace
        self.signal_group = signal_group
        self.server_environment = os.environ if environment is None else environment
        self.prefix = session_prefix()
        self.queue: deque[Job] = deque()
        self.active: dict[str, _Run] = {}
        self._reserved = 0
        self._per_tool: Counter[str] = Counter()
        self._watchers: dict[str, set[Callable[[Job], None]]] = {}
        self._accepting = False
        self._pending = PendingStates()
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
                job = job.evolve(pid=None, **interrupted(tool.retry_safe, self.clock.seconds()))
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

    def stopService(self) -> defer.Deferred[None]:
        """Stop starting jobs; end the running ones (as at a restart) and wait for them."""
        super().stopService()
        self._accepting = False
        if _active(self._retry_call):
            self._retry()  # a last try, while the store is still running
        self._retry_call = _cancel(self._retry_call)
        runs = list(self.active.values())
        for run in runs:
            run.terminate("server stopping")
        return defer.gatherResults([run.ended for run in runs]).addCallback(lambda _: None)

    # --- IRunner ------------------------------------------------------------------------

    def queue_depth(self) -> int:
        return len(self.queue) + self._reserved

    def submit(self, job: Job, idempotency_key: str | None = None) -> defer.Deferred[Job]:
        if self.queue_depth() >= self.queue_size:
            # Jobs leave the queue whenever a worker frees up: ask for a short, polite pause.
            return defer.fail(QueueFull(retry_after=1))
        self._reserved += 1

        def queued(existing: Job | None) -> Job:
            self._reserved -= 1
            if existing is not None:
                return existing  # a retry: the key's first job, queued (or run) already
            self.queue.append(job)
            self._pump()
            return job

        def not_stored(failure):
            self._reserved -= 1
            return failure

        added = (
            self.store.add(job) if idempotency_key is None else self.store.add(job, idempotency_key)
        )
        return added.addCallbacks(queued, not_stored)

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
                self.notify(cancelled)
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

    def notify(self, job: Job) -> None:
        """Tell the watchers of C{job} about its new state or output."""
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
        self.notify(job)
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
        run.append(f"not started: the job store failed: {failure.value}\n".encode())
        run.finish(COULD_NOT_START)

    def _spawn(self, run: _Run) -> None:
        job, tool = run.job, run.tool
        if run.ending is not None:
            # Cancelled (or the server is stopping) while its start was being recorded.
            run.finish(NOT_SPAWNED)
            return
        argv = self.command(job, tool)
        environment = tool_environment(tool, self.server_environment)
        child_fds: dict[int, str] = {0: "w", 1: "r", 2: "r"}
        if tool.function:
            child_fds[RESULT_FD] = "r"
        try:
            process = self.reactor.spawnProcess(
                run, argv[0], argv, env=environment, path=tool.cwd, childFDs=child_fds
            )
        except Exception as failure:
            self.log.failure("job {job}: could not start {tool}", job=job.id, tool=tool.name)
            run.append(f"could not start: {failure}\n".encode())
            run.finish(COULD_NOT_START)
            return
        run.job = job.evolve(pid=process.pid)
        self._record(run.job)
        run.timeout_call = self.clock.callLater(job.timeout, run.terminate, TIMED_OUT)
        self.log.debug("job {job} started: {tool}", job=job.id, tool=tool.name)

    def _record(self, job: Job) -> None:
        self._pending.record(job)
        self._store(job)
        self.notify(job)

    def _store(self, job: Job) -> None:
        self.store.update(job).addCallbacks(self._stored, self._not_stored, (job,), None, (job,))

    def _stored(self, _: None, job: Job) -> None:
        if self._pending.stored(job):
            self.log.info("job {job}: its state is stored after all", job=job.id)

    def _not_stored(self, failure, job: Job) -> None:
        # A full disk, say: what the API shows must still reach the database, or a restart
        # would undo it; so the job's newest state is tried again until it is stored.
        if not self._pending.is_newest(job):
            return  # a newer state of the job is on its way
        if self._pending.refused(job):
            self.log.error(
                "could not store job {job} ({status}): {error}; retrying every {delay:g} s",
                job=job.id,
                status=job.status,
                error=failure.getErrorMessage(),
                delay=STORE_RETRY,
            )
        if self.running and not _active(self._retry_call):
            self._retry_call = self.clock.callLater(STORE_RETRY, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        for job in self._pending.to_retry():
            self._store(job)

    def run_ended(self, run: _Run, end: ProcessEnd) -> None:
        """C{run}'s process ended, or never started: record how, free its worker, start more."""
        job = run.job
        now = self.clock.seconds()
        changes: dict[str, Any] = {
            "pid": None,
            "finished": now,
            "exit_code": end.exit_code,
            "truncated": run.output.truncated,
            "output_size": run.output.kept,
        }
        if run.ending in (None, CANCELLED, TIMED_OUT):
            changes.update(outcome(run.ending, end, job.timeout))
        else:  # the server is stopping
            changes.update(interrupted(run.tool.retry_safe, now))
        if run.tool.function and changes["status"] == SUCCEEDED:
            changes.update(run.result_changes())
        run.job = job = job.evolve(**changes)
        del self.active[job.id]
        self._per_tool[run.tool.name] -= 1
        if job.status != QUEUED:
            self._finished(job)
        self._record(job)
        run.ended.callback(job)
        self._pump()

    def _finished(self, job: Job) -> None:
        for observer in self.on_finished:
            observer(job)
