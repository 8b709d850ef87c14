"""Fakes and helpers shared by the twistnet-http tests."""

from __future__ import annotations

import io
import os

from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from zope.interface import implementer

from twistnet.http.model import QUEUED, RUNNING, Job
from twistnet.http.runner import LocalRunner
from twistnet.http.store import IJobStore
from twistnet.http.tools import BUILTIN_TOOLS, catalogue


@implementer(IJobStore)
class MemoryStore:
    """An IJobStore in memory, for runner unit tests."""

    def __init__(self, jobs=()):
        self.jobs = {job.id: job for job in jobs}
        self.outputs: dict[str, bytearray] = {}

    def add(self, job):
        self.jobs[job.id] = job
        return defer.succeed(None)

    update = add

    def get(self, job_id):
        return defer.succeed(self.jobs.get(job_id))

    def cached(self, job_id):
        return self.jobs.get(job_id)

    def unfinished(self):
        return defer.succeed([j for j in self.jobs.values() if j.status in (QUEUED, RUNNING)])

    def open_output(self, job_id):
        buffer = self.outputs[job_id] = bytearray()

        class Sink(io.RawIOBase):
            def write(self, data):
                buffer.extend(data)
                return len(data)

        return Sink()

    def read_output(self, job_id, offset=0, size=-1):
        data = bytes(self.outputs.get(job_id, b""))[offset:]
        return data if size < 0 else data[:size]


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.written = b""
        self.stdin_closed = False

    def write(self, data):
        self.written += data

    def closeStdin(self):
        self.stdin_closed = True


class ProcessReactor(task.Clock):
    """A task.Clock that records spawnProcess calls (an IReactorProcess stand-in)."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, proto, executable, args=(), env=None, path=None, childFDs=None, **kw):
        transport = FakeProcess(pid=1000 + len(self.spawned))
        self.spawned.append((proto, executable, list(args), env, path, childFDs))
        proto.makeConnection(transport)
        return transport


def end(proto, exit_code=0, signum=None):
    proto.processExited(Failure(error.ProcessDone(0)))
    if exit_code == 0 and signum is None:
        reason = Failure(error.ProcessDone(0))
    else:
        reason = Failure(error.ProcessTerminated(exitCode=exit_code, signal=signum))
    proto.processEnded(reason)


def job(number, tool="echo", params=None, timeout=10.0, status=QUEUED):
    return Job(
        id=f"{number:032x}",
        tool=tool,
        params={"text": "hi"} if params is None else params,
        timeout=timeout,
        created=float(number),
        status=status,
    )


def make_runner(workers=2, queue_size=10, tools=BUILTIN_TOOLS, store=None, environment=None):
    reactor = ProcessReactor()
    signals = []
    runner = LocalRunner(
        store or MemoryStore(),
        catalogue(tools),
        workers=workers,
        queue_size=queue_size,
        reactor=reactor,
        kill_grace=5.0,
        signal_group=lambda pid, signum, alive=True: signals.append((pid, signum)),
        environment=environment or {"PATH": "/bin", "TWISTNET_HTTP_TOKEN": "secret"},
    )
    runner.startService()
    return runner, reactor, signals


def group_gone(pgid: int) -> bool:
    """Is there no process left in process group C{pgid}?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def poll(predicate, message: str, timeout: float = 10.0) -> None:
    """Wait, without blocking the reactor, until C{predicate()} holds (bounded)."""
    from twisted.internet import reactor

    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(message)
