"""twistnet-http job store: SQLite through one thread, group commit, survival across restarts."""

from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet import defer

from twistnet.http.model import FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from twistnet.http.store import IJobStore, SQLiteJobStore, StoreError


def make_job(number: int, tool: str = "echo", status: str = QUEUED, created: float = 0.0) -> Job:
    return Job(
        id=f"{number:032x}",
        tool=tool,
        params={"text": f"job {number}"},
        timeout=10.0,
        created=created or 1_700_000_000.0 + number,
        status=status,
    )


@pytest.fixture
def open_store(tmp_path, reactor):
    stores = []

    def start(name: str = "jobs.db") -> SQLiteJobStore:
        store = SQLiteJobStore(tmp_path / name, reactor)
        store.startService()
        stores.append(store)
        return store

    yield start
    for store in stores:
        if store.running:
            pytest_twisted.blockon(store.stopService())


def test_store_provides_the_interface(open_store):
    assert IJobStore.providedBy(open_store())


@pytest_twisted.ensureDeferred
async def test_jobs_added_together_share_one_commit(open_store):
    store = open_store()
    await defer.gatherResults([store.add(make_job(n)) for n in range(300)])
    assert store.committed_operations == 300
    assert store.commits < 30, f"{store.commits} commits for 300 jobs: no grouping"
    jobs, cursor = await store.list(limit=500)
    assert len(jobs) == 300 and cursor is None


@pytest_twisted.ensureDeferred
async def test_list_is_newest_first_filtered_and_paginated(open_store):
    store = open_store()
    for n in range(10):
        await store.add(make_job(n, tool="echo" if n % 2 else "sleep"))
    page, cursor = await store.list(limit=4)
    assert [job.id[-1] for job in page] == ["9", "8", "7", "6"]
    page2, cursor2 = await store.list(limit=4, cursor=cursor)
    assert [job.id[-1] for job in page2] == ["5", "4", "3", "2"]
    page3, cursor3 = await store.list(limit=4, cursor=cursor2)
    assert [job.id[-1] for job in page3] == ["1", "0"] and cursor3 is None
    echoes, _ = await store.list(tool="echo")
    assert [int(job.id, 16) for job in echoes] == [9, 7, 5, 3, 1]
    await store.update((await store.get(make_job(3).id)).evolve(status=SUCCEEDED, finished=5.0))
    done, _ = await store.list(status=SUCCEEDED)
    assert [int(job.id, 16) for job in done] == [3]


@pytest_twisted.ensureDeferred
async def test_jobs_and_output_survive_a_restart(open_store, tmp_path):
    store = open_store()
    job = make_job(1)
    await store.add(job)
    finished = job.evolve(
        status=FAILED, started=1.0, finished=2.0, exit_code=3, result={"a": [1]}, error="x"
    )
    await store.update(finished)
    await store.add(make_job(2, status=RUNNING))
    await store.add(make_job(3))
    with store.open_output(job.id) as output:
        output.write(b"hello\xff")
    await store.stopService()

    again = open_store()
    assert again.cached(job.id) is None
    assert await again.get(job.id) == finished
    assert await again.get("0" * 31 + "f") is None
    assert again.read_output(job.id) == b"hello\xff"
    assert again.read_output(job.id, offset=2, size=2) == b"ll"
    assert again.read_output("f" * 32) == b""
    assert [j.id for j in await again.unfinished()] == [make_job(2).id, make_job(3).id]


@pytest_twisted.ensureDeferred
async def test_prune_forgets_old_finished_jobs_and_their_output(open_store):
    store = open_store()
    old = make_job(1).evolve(status=SUCCEEDED, finished=100.0)
    new = make_job(2).evolve(status=SUCCEEDED, finished=300.0)
    queued = make_job(3)
    for job in (old, new, queued):
        await store.add(job)
        with store.open_output(job.id) as output:
            output.write(b"x")
    assert await store.prune(before=200.0) == 1
    assert await store.get(old.id) is None
    assert store.read_output(old.id) == b""
    assert (await store.get(new.id)) == new
    assert (await store.get(queued.id)) == queued


@pytest_twisted.ensureDeferred
async def test_a_failed_write_fails_its_caller_and_the_store_keeps_working(open_store):
    store = open_store()
    await store.add(make_job(1))
    with pytest.raises(sqlite3.IntegrityError):
        await store.add(make_job(1))
    await store.add(make_job(2))
    jobs, _ = await store.list()
    assert len(jobs) == 2


def test_unusable_path_is_a_clear_error(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match="cannot open the job database"):
        SQLiteJobStore(tmp_path / "dir.db")


@pytest_twisted.ensureDeferred
async def test_a_stopped_store_refuses_politely(open_store):
    store = open_store()
    await store.stopService()
    with pytest.raises(StoreError, match="not running"):
        await store.add(make_job(1))
