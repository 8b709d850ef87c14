"""twistnet-http runner: queueing, limits, timeouts and cancel, with fake and real processes."""

from __future__ import annotations

import io
import os
import signal
import sys

import pytest
import pytest_twisted
from twisted.internet import defer

from http_support import MemoryStore, end, group_gone, job, make_runner, poll
from twistnet.http.ending import COULD_NOT_START, NOT_SPAWNED, ProcessEnd, outcome
from twistnet.http.model import (
    CANCELLED,
    FAILED,
    LOST,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    Param,
    Tool,
)
from twistnet.http.output import PARTIAL_LINE_WAIT
from twistnet.http.pending import PendingStates
from twistnet.http.runner import OUTPUT_HEAD, OUTPUT_TAIL, LocalRunner, OutputCapture, QueueFull
from twistnet.http.store import SQLiteJobStore
from twistnet.http.tools import (
    BUILTIN_TOOLS,
    catalogue,
    parse_argv,
    parse_tool_option,
    split_command,
)

# --- unit: fake processes and a task.Clock ---------------------------------------------------


def test_argv_is_the_template_in_its_own_session_without_a_shell():
    runner, reactor, _ = make_runner()
    runner.submit(job(1, params={"text": "a b; $(id) | `x`"}))
    (proto, executable, argv, env, _path, child_fds) = reactor.spawned[0]
    assert argv[-2:] == ["echo", "a b; $(id) | `x`"]
    assert argv[:-2] == runner.prefix
    assert executable == argv[0]
    assert "sh" not in [os.path.basename(a) for a in argv]
    assert "TWISTNET_HTTP_TOKEN" not in env and env["PATH"] == "/bin"
    assert child_fds == {0: "w", 1: "r", 2: "r"}
    assert proto.transport.stdin_closed


def test_workers_and_per_tool_limits_hold_and_queue_drains_in_order():
    slow = Tool(name="slow", argv=split_command("sleep 1"), max_concurrent=1)
    runner, reactor, _ = make_runner(workers=2, tools=[*BUILTIN_TOOLS, slow])
    for number, tool in [(1, "slow"), (2, "slow"), (3, "echo"), (4, "echo")]:
        runner.submit(job(number, tool=tool, params={} if tool == "slow" else None))
    started = [p.job.id for p, *_ in reactor.spawned]
    assert started == [job(1).id, job(3).id]
    assert [j.id for j in runner.queue] == [job(2).id, job(4).id]
    end(reactor.spawned[0][0])
    assert [p.job.id for p, *_ in reactor.spawned][2] == job(2).id
    assert runner.store.jobs[job(1).id].status == SUCCEEDED


def test_queue_full_is_refused_until_there_is_room():
    runner, reactor, _ = make_runner(workers=1, queue_size=2)
    results = [runner.submit(job(n)) for n in range(1, 5)]
    failures = []
    results[3].addErrback(failures.append)
    assert isinstance(failures[0].value, QueueFull)
    assert failures[0].value.retry_after >= 1
    assert len(runner.queue) == 2
    end(reactor.spawned[0][0])
    assert len(runner.queue) == 1
    runner.submit(job(9))
    assert len(runner.queue) == 2


def test_timeout_terminates_the_group_then_kills_it_after_the_grace():
    runner, reactor, signals = make_runner()
    runner.submit(job(1, timeout=3.0))
    proto = reactor.spawned[0][0]
    reactor.advance(2.9)
    assert signals == []
    reactor.advance(0.2)
    assert signals == [(1000, signal.SIGTERM)]
    reactor.advance(5.0)
    assert signals[1] == (1000, signal.SIGKILL)
    end(proto, exit_code=None, signum=signal.SIGKILL)
    stored = runner.store.jobs[job(1).id]
    assert stored.status == TIMED_OUT and stored.error == "timed out after 3 s"
    assert stored.exit_code == -signal.SIGKILL
    assert reactor.getDelayedCalls() == []


def test_a_job_ending_in_the_grace_is_not_killed_later():
    runner, reactor, signals = make_runner()
    runner.submit(job(1))
    d = runner.cancel(job(1).id)
    end(reactor.spawned[0][0], exit_code=None, signum=signal.SIGTERM)
    assert d.result.status == CANCELLED
    reactor.advance(10)
    # SIGTERM, then processExited's sweep of the group; no grace-timer SIGKILL after that.
    assert signals == [(1000, signal.SIGTERM), (1000, signal.SIGKILL)]
    assert reactor.getDelayedCalls() == []


def test_cancel_of_a_queued_job_means_it_never_starts():
    runner, reactor, _ = make_runner(workers=1)
    runner.submit(job(1))
    runner.submit(job(2))
    cancelled = runner.cancel(job(2).id).result
    assert cancelled.status == CANCELLED
    end(reactor.spawned[0][0])
    assert len(reactor.spawned) == 1
    assert runner.store.jobs[job(2).id].status == CANCELLED
    assert runner.cancel("f" * 32).result is None


def test_failure_exit_code_and_watchers():
    runner, reactor, _ = make_runner()
    seen = []
    runner.submit(job(1))
    unwatch = runner.watch(job(1).id, lambda j: seen.append(j.status))
    proto = reactor.spawned[0][0]
    proto.childDataReceived(1, b"out\n")
    proto.childDataReceived(2, b"err\n")
    end(proto, exit_code=3)
    unwatch()
    stored = runner.store.jobs[job(1).id]
    assert stored.status == FAILED and stored.exit_code == 3
    assert stored.error == "exited with status 3"
    assert runner.store.read_output(job(1).id) == b"out\nerr\n"
    assert seen == [RUNNING, RUNNING, FAILED]


def test_python_tool_gets_params_on_stdin_and_its_result_from_fd_3():
    runner, reactor, _ = make_runner()
    runner.submit(job(1, tool="wordcount", params={"text": "a b"}))
    proto, _, argv, _, _, child_fds = reactor.spawned[0]
    assert argv[len(runner.prefix) :] == [
        sys.executable,
        "-m",
        "twistnet.http._pytool",
        "twistnet.http.tools:word_count",
    ]
    assert child_fds[3] == "r"
    assert proto.transport.written == b'{"text": "a b"}'
    proto.childDataReceived(3, b'{"words": 2}')
    end(proto)
    stored = runner.store.jobs[job(1).id]
    assert stored.status == SUCCEEDED and stored.result == {"words": 2}


def test_restart_recovery_marks_running_lost_requeues_safe_and_runs_queued():
    unsafe = Tool(name="unsafe", argv=split_command("true"))
    store = MemoryStore(
        [
            job(1, tool="unsafe", params={}, status=RUNNING),
            job(2, status=RUNNING),  # echo is retry_safe
            job(3, tool="gone", status=QUEUED),
            job(4, status=QUEUED),
        ]
    )
    _, reactor, _ = make_runner(workers=4, tools=[*BUILTIN_TOOLS, unsafe], store=store)
    assert store.jobs[job(1).id].status == LOST
    assert "stopped while the job ran" in store.jobs[job(1).id].error
    assert store.jobs[job(3).id].status == LOST
    assert [p.job.id for p, *_ in reactor.spawned] == [job(2).id, job(4).id]


def test_output_keeps_head_and_tail_and_says_what_was_omitted():
    sink = io.BytesIO()
    sink.close = lambda: None
    capture = OutputCapture(sink, head=10, tail=5)
    for chunk in (b"0123456", b"789abcdefghij", b"KLMNOP"):
        capture.write(chunk)
    capture.close()
    assert capture.truncated
    assert sink.getvalue() == b"0123456789\n[... 11 bytes of output omitted ...]\nLMNOP"
    assert capture.kept == len(sink.getvalue())


def test_stdout_and_stderr_lines_are_not_spliced_mid_line():
    runner, reactor, _ = make_runner()
    runner.submit(job(1))
    proto = reactor.spawned[0][0]
    for fd, data in [(1, b"out-a "), (2, b"err-a "), (1, b"out-b\nout-c "), (2, b"err-b\n")]:
        proto.childDataReceived(fd, data)
    assert runner.store.read_output(job(1).id) == b"out-a out-b\nerr-a err-b\n"
    proto.childDataReceived(2, b"no newline at the end")
    end(proto)
    assert runner.store.read_output(job(1).id).endswith(b"\nout-c no newline at the end")
    assert reactor.getDelayedCalls() == []


def test_a_partial_line_shows_after_a_second_and_watchers_hear_of_it():
    runner, reactor, _ = make_runner()
    runner.submit(job(1, timeout=60))
    seen = []
    runner.watch(job(1).id, lambda j: seen.append(runner.store.read_output(j.id)))
    proto = reactor.spawned[0][0]
    proto.childDataReceived(1, b"[=====     ] 50%")
    assert runner.store.read_output(job(1).id) == b"" and seen == []
    reactor.advance(PARTIAL_LINE_WAIT)
    assert seen == [b"[=====     ] 50%"]
    proto.childDataReceived(1, b"\r[==========] 100%\n")
    assert seen[-1] == b"[=====     ] 50%\r[==========] 100%\n"
    end(proto)
    assert reactor.getDelayedCalls() == []


def test_long_output_keeps_whole_lines_at_the_default_caps():
    sink = io.BytesIO()
    sink.close = lambda: None
    capture = OutputCapture(sink)
    lines = [f"line {n:05d} ".encode().ljust(99, b".") + b"\n" for n in range(3000)]
    for line in lines:
        capture.write(line)
    capture.close()
    kept = sink.getvalue().splitlines(keepends=True)
    markers = [line for line in kept if line.startswith(b"[...")]
    assert len(markers) == 1 and capture.truncated
    assert all(line in lines for line in kept if line not in markers)
    assert kept[0] == lines[0] and kept[-1] == lines[-1]
    assert len(sink.getvalue()) <= OUTPUT_HEAD + OUTPUT_TAIL + len(markers[0])


def test_only_the_newest_refused_state_of_a_job_is_retried():
    pending = PendingStates()
    first, second = job(1), job(1, status=RUNNING)
    pending.record(first)
    pending.record(second)
    assert not pending.is_newest(first) and pending.is_newest(second)
    assert pending.refused(second) is True  # the first refusal: worth a log line
    assert pending.refused(second) is False
    assert pending.waiting and pending.to_retry() == [second]
    assert pending.stored(first) is False  # superseded: changes nothing
    assert pending.stored(second) is True  # ends the refusal: worth a log line
    assert not pending.waiting and pending.to_retry() == []


@pytest.mark.parametrize(
    ("ending", "end", "status", "error"),
    [
        (None, ProcessEnd(0), SUCCEEDED, None),
        (None, ProcessEnd(3), FAILED, "exited with status 3"),
        (None, ProcessEnd(None, signal.SIGKILL), FAILED, f"killed by signal {signal.SIGKILL}"),
        (None, COULD_NOT_START, FAILED, "exited with status 127"),
        (CANCELLED, NOT_SPAWNED, CANCELLED, "cancelled by a client"),
        (TIMED_OUT, ProcessEnd(None, signal.SIGTERM), TIMED_OUT, "timed out after 2.5 s"),
    ],
)
def test_how_a_run_ended_decides_the_jobs_status(ending, end, status, error):
    assert outcome(ending, end, timeout=2.5) == (
        {"status": status} if error is None else {"status": status, "error": error}
    )


def test_exit_code_is_the_status_or_minus_the_signal():
    assert ProcessEnd(3).exit_code == 3
    assert ProcessEnd(None, signal.SIGTERM).exit_code == -signal.SIGTERM
    assert NOT_SPAWNED.exit_code is None and not NOT_SPAWNED.succeeded


# --- integration: real processes -------------------------------------------------------------


@pytest.fixture
def real_runner(tmp_path, reactor):
    made = []

    def start(tools, workers=2, kill_grace=2.0):
        store = SQLiteJobStore(tmp_path / "jobs.db", reactor)
        store.startService()
        runner = LocalRunner(
            store, catalogue(tools), workers=workers, queue_size=10, kill_grace=kill_grace
        )
        runner.startService()
        made.append((store, runner))
        return runner

    yield start
    for store, runner in made:
        pytest_twisted.blockon(defer.maybeDeferred(runner.stopService))
        pytest_twisted.blockon(store.stopService())


@pytest_twisted.ensureDeferred
async def test_real_job_keeps_metacharacters_literal(real_runner, tmp_path):
    runner = real_runner(BUILTIN_TOOLS)
    marker = tmp_path / "pwned"
    text = f"; touch {marker} && echo $(id) `id` | cat > {marker} 'q' \"d\" *"
    done = await runner.submit(job(1, params={"text": text}))
    finished = await watch_until_done(runner, done)
    assert finished.status == SUCCEEDED and finished.exit_code == 0
    assert runner.store.read_output(done.id) == text.encode() + b"\n"
    assert not marker.exists()


async def watch_until_done(runner, submitted):
    if not runner.is_active(submitted.id):
        return await runner.store.get(submitted.id)
    ended = defer.Deferred()

    def observe(j):
        if j.terminal and not ended.called:
            ended.callback(j)

    unwatch = runner.watch(submitted.id, observe)
    try:
        return await ended
    finally:
        unwatch()


TREE = Tool(
    name="tree",
    # The operator's own shell script (a fixed argv): starts a grandchild that ignores
    # SIGTERM, prints its own pid (its group's id: it leads its session) and the grandchild's.
    argv=split_command("sh -c 'trap \"\" TERM; sleep 60 & echo $$ $!; wait' tree {x}"),
    params=[Param(name="x", required=False, default="1")],
    timeout=60,
)


@pytest_twisted.ensureDeferred
async def test_timeout_and_cancel_kill_the_whole_process_group(real_runner):
    runner = real_runner([TREE, parse_tool_option("quick=true")], kill_grace=0.5)
    timed = await runner.submit(job(1, tool="tree", params={"x": "1"}, timeout=1.0))
    cancelled = await runner.submit(job(2, tool="tree", params={"x": "2"}))
    await wait_output(runner, cancelled.id)
    leader, grandchild = map(int, runner.store.read_output(cancelled.id).split())
    assert os.getpgid(leader) == leader == os.getsid(leader) != os.getpgid(0)
    assert os.getpgid(grandchild) == leader
    cancel_result = await runner.cancel(cancelled.id)
    assert cancel_result.status == CANCELLED
    timed_result = await watch_until_done(runner, timed)
    assert timed_result.status == TIMED_OUT
    for finished in (cancel_result, timed_result):
        pgid, grandchild = map(int, runner.store.read_output(finished.id).split())
        # Killed at once; init reaps the orphaned grandchild's zombie a moment later.
        await poll(lambda g=pgid: group_gone(g), f"process group {pgid} survived its job")
        assert not os.path.exists(f"/proc/{grandchild}")


async def wait_output(runner, job_id):
    await poll(lambda: runner.store.read_output(job_id).strip(), "the job printed nothing")


@pytest_twisted.ensureDeferred
async def test_real_python_tool_returns_its_result(real_runner):
    runner = real_runner(BUILTIN_TOOLS)
    submitted = await runner.submit(job(1, tool="wordcount", params={"text": "one two\nthree"}))
    finished = await watch_until_done(runner, submitted)
    assert finished.status == SUCCEEDED, runner.store.read_output(submitted.id)
    assert finished.result == {"lines": 2, "words": 3, "chars": 13}


def test_restart_after_a_crash_kills_the_leftover_group_of_a_running_job():
    import time

    crashed = job(1, status=RUNNING).evolve(started=time.time() - 5, pid=4242)
    before_boot = job(2, status=RUNNING).evolve(started=1.0, pid=4343)
    store = MemoryStore([crashed, before_boot])
    _, reactor, signals = make_runner(store=store)
    assert (4242, signal.SIGKILL) in signals
    assert not [s for s in signals if s[0] == 4343], "a group id from before a reboot is not ours"
    # echo is retry-safe: both run again, in new process groups.
    assert [p.job.id for p, *_ in reactor.spawned] == [crashed.id, before_boot.id]
    assert store.jobs[crashed.id].pid == 1000


def test_a_running_job_records_its_process_group_until_it_ends():
    runner, reactor, _ = make_runner()
    runner.submit(job(1))
    assert runner.store.jobs[job(1).id].pid == 1000
    end(reactor.spawned[0][0])
    assert runner.store.jobs[job(1).id].pid is None


def test_a_tool_that_cannot_start_fails_its_job_and_frees_the_worker():
    runner, reactor, _ = make_runner(workers=1)

    def refuse(*args, **kwargs):
        raise OSError(2, "No such file or directory")

    reactor.spawnProcess = refuse
    runner.submit(job(1))
    failed = runner.store.jobs[job(1).id]
    assert failed.status == FAILED and failed.exit_code == 127
    assert b"could not start" in runner.store.read_output(job(1).id)
    assert not runner.active
    assert reactor.getDelayedCalls() == []


def test_output_that_cannot_be_written_is_counted_as_omitted():
    class FullDisk(io.RawIOBase):
        def write(self, data):
            raise OSError(28, "No space left on device")

    capture = OutputCapture(FullDisk(), head=4, tail=4)
    capture.write(b"0123456789")
    capture.close()
    assert capture.failed.errno == 28
    assert capture.truncated and capture.kept == 0


def test_stopping_requeues_a_retry_safe_job_cleanly_and_loses_the_others():
    unsafe = Tool(name="unsafe", argv=split_command("true"))
    runner, reactor, signals = make_runner(tools=[*BUILTIN_TOOLS, unsafe])
    runner.submit(job(1))  # echo: retry-safe
    runner.submit(job(2, tool="unsafe", params={}))
    stopped = runner.stopService()
    assert sorted(signals) == [(1000, signal.SIGTERM), (1001, signal.SIGTERM)]
    for proto, *_ in reactor.spawned:
        proto.childDataReceived(1, b"partial\n")
        end(proto, exit_code=None, signum=signal.SIGTERM)
    assert stopped.called
    again = runner.store.jobs[job(1).id]
    assert again.status == QUEUED
    assert (again.started, again.finished, again.exit_code, again.output_size) == (None,) * 3 + (0,)
    assert runner.store.jobs[job(2).id].status == LOST
    assert len(reactor.spawned) == 2, "nothing starts while stopping"


@pytest_twisted.ensureDeferred
async def test_without_setsid_a_tiny_python_starts_the_job_in_its_own_session(
    real_runner, monkeypatch
):
    from twistnet.http import runner as runner_module

    monkeypatch.setattr(runner_module.shutil, "which", lambda name: None)
    prefix = runner_module.session_prefix()
    assert prefix[:2] == [sys.executable, "-c"]
    runner = real_runner([parse_tool_option("me=sh -c 'echo $$ $(cut -d\" \" -f6 /proc/$$/stat)'")])
    runner.prefix = prefix
    finished = await watch_until_done(runner, await runner.submit(job(1, tool="me", params={})))
    pid, session = map(int, runner.store.read_output(finished.id).split())
    assert finished.status == SUCCEEDED and pid == session


class SlowStore(MemoryStore):
    """Holds back the commit of every 'running' update until released."""

    def __init__(self):
        super().__init__()
        self.pending = []

    def update(self, job):
        if job.status == RUNNING and job.pid is None:
            self.jobs[job.id] = job
            committed = defer.Deferred()
            self.pending.append(committed)
            return committed
        return super().update(job)


def test_a_job_is_spawned_only_once_its_start_is_committed():
    store = SlowStore()
    runner, reactor, _ = make_runner(store=store)
    runner.submit(job(1))
    assert reactor.spawned == [] and store.jobs[job(1).id].status == RUNNING
    store.pending.pop().callback(None)
    assert len(reactor.spawned) == 1


def test_cancel_while_the_start_is_being_committed_never_spawns():
    store = SlowStore()
    runner, reactor, _ = make_runner(store=store)
    runner.submit(job(1))
    cancelled = runner.cancel(job(1).id)
    store.pending.pop().callback(None)
    assert reactor.spawned == []
    assert cancelled.result.status == CANCELLED and cancelled.result.exit_code is None
    assert not runner.active


def test_a_start_that_cannot_be_recorded_fails_the_job_without_running_it():
    store = SlowStore()
    runner, reactor, _ = make_runner(store=store)
    runner.submit(job(1))
    store.pending.pop().errback(OSError(28, "No space left on device"))
    assert reactor.spawned == []
    assert store.jobs[job(1).id].status == FAILED
    assert b"the job store failed" in store.read_output(job(1).id)


@pytest_twisted.ensureDeferred
async def test_real_tool_writing_partial_lines_to_both_streams_keeps_lines_whole(real_runner):
    script = "printf 'out-'; sleep 0.2; printf 'err line\\n' >&2; printf 'rest\\n'"
    runner = real_runner([Tool(name="mix", argv=parse_argv(["sh", "-c", script]))])
    finished = await watch_until_done(runner, await runner.submit(job(1, tool="mix", params={})))
    assert finished.status == SUCCEEDED
    # Which stream is read first is the reactor's business; that no line is cut is ours.
    assert runner.store.read_output(finished.id) in (
        b"err line\nout-rest\n",
        b"out-rest\nerr line\n",
    )
