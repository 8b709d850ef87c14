"""
Fakes and helpers shared by the twistnet-http tests: a job store and a process reactor in
memory, and L{StubApi}, the API resource served by treq's StubTreq over them (no socket, no
thread, no child process).
"""

from __future__ import annotations

import io
import json
import os

from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from zope.interface import implementer

from helpers import eventually
from twistnet.http.api import JobApi
from twistnet.http.model import QUEUED, RUNNING, Job
from twistnet.http.runner import RESULT_FD, LocalRunner
from twistnet.http.store import MAX_LIMIT, IJobStore
from twistnet.http.tools import BUILTIN_TOOLS, catalogue

#: The older name of the suite's poller, still used by the runner tests.
poll = eventually


@implementer(IJobStore)
class MemoryStore:
    """An IJobStore in memory, for runner unit tests."""

    def __init__(self, jobs=()):
        self.jobs = {job.id: job for job in jobs}
        self.outputs: dict[str, bytearray] = {}
        self.keyed: dict[str, str] = {}

    def add(self, job, idempotency_key=None):
        """As IJobStore.add: a key stored before answers its job and stores nothing."""
        if idempotency_key in self.keyed:
            return defer.succeed(self.jobs[self.keyed[idempotency_key]])
        if idempotency_key is not None:
            self.keyed[idempotency_key] = job.id
        return self.update(job)

    def update(self, job):
        self.jobs[job.id] = job
        return defer.succeed(None)

    def get(self, job_id):
        return defer.succeed(self.jobs.get(job_id))

    def list(self, status=None, tool=None, limit=50, cursor=None):
        """As SQLiteJobStore.list: newest first; a cursor is the position of a page's end."""
        limit = max(1, min(limit, MAX_LIMIT))
        numbered = [
            (seq, job)
            for seq, job in enumerate(self.jobs.values(), start=1)
            if (status is None or job.status == status)
            and (tool is None or job.tool == tool)
            and (cursor is None or seq < int(cursor))
        ][::-1]
        page = numbered[:limit]
        more = len(numbered) > limit
        return defer.succeed(([job for _, job in page], str(page[-1][0]) if more else None))

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

    def fetch_output(self, job_id, offset=0, size=-1):
        return defer.succeed(self.read_output(job_id, offset, size))


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


#: Where StubTreq's requests go (any URL reaches the resource).
BASE = "http://jobs.example"


def result_of(deferred):
    """What a Deferred that fired in memory gave (it must have fired)."""
    results = []
    deferred.addBoth(results.append)
    assert results, "the response did not complete in memory"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class StubApi:
    """
    The JSON API resource over a L{MemoryStore} and a runner whose processes are fakes,
    called through treq's StubTreq: C{api.call("GET", "/healthz")} is (status, headers, body).
    """

    def __init__(self, token=None, workers=2, queue_size=10, tools=BUILTIN_TOOLS, store=None):
        self.runner, self.clock, self.signals = make_runner(workers, queue_size, tools, store)
        self.store = self.runner.store
        self.token = token
        self.resource = JobApi(
            self.store,
            self.runner,
            catalogue(tools),
            token=token.encode() if token else None,
            clock=self.clock,
        )
        self.stub = StubTreq(self.resource)

    def call(self, method, path, body=None, token=None, raw=None, headers=None):
        """(status, headers, body bytes) of one request; C{body} is sent as JSON."""
        return self.answer(self.request(method, path, body, token, raw, headers))

    def request(self, method, path, body=None, token=None, raw=None, headers=None):
        """Send one request; its answer may wait for the runner (see L{answer})."""
        headers = dict(headers or {})
        token = token or self.token
        if token:
            headers.setdefault(b"Authorization", [b"Bearer " + token.encode()])
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault(b"Content-Type", [b"application/json"])
        response = self.stub.request(method, BASE + path, data=data, headers=headers)
        self.stub.flush()
        return response

    def answer(self, response):
        """(status, headers, body bytes) of a request sent with L{request}."""
        self.stub.flush()
        response = result_of(response)
        content = self.stub.content(response)
        self.stub.flush()
        return response.code, response.headers, result_of(content)

    def json(self, method, path, body=None, **kwargs):
        code, headers, content = self.call(method, path, body, **kwargs)
        return code, headers, json.loads(content)

    def submit(self, tool, params=None, **kwargs) -> str:
        code, _, accepted = self.json(
            "POST", "/jobs", {"tool": tool, "params": params or {}}, **kwargs
        )
        assert code == 202, accepted
        return accepted["id"]

    def process(self, job_id):
        """The fake process protocol of a started job."""
        for proto, *_ in self.clock.spawned:
            if proto.job.id == job_id:
                return proto
        raise AssertionError(f"job {job_id} was never started")

    def run(self, job_id, output=b"", exit_code=0, result=None, signum=None):
        """The job's process prints C{output}, returns C{result} (Python tools) and exits."""
        proto = self.process(job_id)
        if output:
            proto.childDataReceived(1, output)
        if result is not None:
            proto.childDataReceived(RESULT_FD, json.dumps(result).encode())
        end(proto, exit_code, signum)
