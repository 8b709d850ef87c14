"""
A worker's self-fencing, timed on its own monotonic clock: it kills its jobs' process groups
once 3/4 of its lease has passed since its last successful renewal was sent, not before.
"""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from twistnet.http.cluster import LEASE_LOST, SELF_FENCE, ClusterRunner
from twistnet.http.pgstore import PostgresJobStore
from twistnet.http.tools import BUILTIN_TOOLS, catalogue

pytest_plugins = ["pg_support"]


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def worker(postgres_url):
    monotonic = Monotonic()
    signals: list[tuple[int, int]] = []
    runner = ClusterRunner(
        PostgresJobStore(postgres_url),
        catalogue(BUILTIN_TOOLS),
        2,
        10,
        task.Clock(),
        lease=4.0,
        monotonic=monotonic,
        signal_group=lambda pid, signum, alive=True: signals.append((pid, signum)),
    )
    runner._registered = True
    runner._renewed_at = monotonic.now
    run = SimpleNamespace(
        pid=4242, ending=None, timeout_call=None, transport=SimpleNamespace(pid=4242)
    )
    runner.active["a" * 32] = run
    return runner, monotonic, signals, run


def test_jobs_are_killed_once_three_quarters_of_the_lease_pass_without_renewal(worker):
    runner, monotonic, signals, run = worker
    monotonic.now += 4.0 * SELF_FENCE - 0.01
    runner._check_lease()
    assert signals == [] and run.ending is None
    monotonic.now += 0.02
    runner._check_lease()
    assert signals == [(4242, signal.SIGKILL)] and run.ending == LEASE_LOST
    runner._check_lease()
    assert len(signals) == 1, "killed once, not at every check"


def test_a_worker_that_cannot_renew_claims_nothing(worker):
    runner, monotonic, _, _ = worker
    claims: list = []
    runner.db.write = lambda function: claims.append(function) or defer.Deferred()
    runner._accepting = True
    monotonic.now += 4.0 * SELF_FENCE
    runner._pump()
    assert claims == []
    runner._renewed_at = monotonic.now
    runner._pump()
    assert len(claims) == 1
