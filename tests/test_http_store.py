"""
twistnet-http job stores: the contract every L{IJobStore} keeps, run against SQLite (one
thread, group commit, output files) and a real PostgreSQL (chunk rows, shared by nodes).
"""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import pytest_twisted
from twisted.internet import defer

from http_support import make_runner
from twistnet.http.model import FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from twistnet.http.pgstore import PostgresJobStore
from twistnet.http.store import IJobStore, SQLiteJobStore, StoreError

pytest_plugins = ["pg_support"]


def make_job(number: int, tool: str = "echo", status: str = QUEUED, created: float = 0.0) -> Job:
    return Job(
        id=f"{number:032x}",
        tool=tool,
        params={"text": f"job {number}"},
        timeout=10.0,
        created=created or 1_700_000_000.0 + number,
        status=status,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path, reactor):
    """Opens (or opens again) the test's store, of each kind in turn."""
    stores = []
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")

        def make(name):
            return PostgresJobStore(url if name == "jobs.db" else url + "x", reactor)
    else:

        def make(name):
            return SQLiteJobStore(tmp_path / name, reactor)

    def start(name: str = "jobs.db"):
        store = make(name)
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
async def test_a_known_idempotency_key_stores_nothing_and_answers_the_first_job(open_store):
    store = open_store()
    first = make_job(1)
    assert await store.add(first, "order-1") is None
    retries = await defer.gatherResults(
        [store.add(make_job(2), "order-1"), store.add(make_job(3), "order-1")]
    )
    assert [job.id for job in retries] == [first.id, first.id]
    assert await store.get(make_job(2).id) is None and await store.get(make_job(3).id) is None
    assert await store.add(make_job(4), "order-2") is None
    assert await store.add(make_job(5)) is None and await store.add(make_job(6)) is None
    jobs, _ = await store.list()
    assert sorted(int(job.id, 16) for job in jobs) == [1, 4, 5, 6]
    again = open_store("jobs.db")  # the key outlives the process that stored it
    assert (await again.add(make_job(7), "order-1")).id == first.id


def test_a_sqlite_file_made_before_idempotency_keys_gets_the_column(tmp_path, reactor):
    with sqlite3.connect(tmp_path / "old.db") as old:
        old.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
                    " tool TEXT NOT NULL, params TEXT NOT NULL, status TEXT NOT NULL,"
                    " timeout REAL NOT NULL, created REAL NOT NULL, started REAL, finished REAL,"
                    " exit_code INTEGER, result TEXT, error TEXT, truncated INTEGER NOT NULL"
                    " DEFAULT 0, output_size INTEGER NOT NULL DEFAULT 0, pid INTEGER)")  # fmt: skip
    store = SQLiteJobStore(tmp_path / "old.db", reactor)
    columns = [row[1] for row in store._db.execute("PRAGMA table_info(jobs)")]
    store._db.close()
    assert columns[-1] == "idempotency_key"


@pytest_twisted.ensureDeferred
async def test_a_retry_with_the_same_key_is_the_same_job_on_sqlite(tmp_path, reactor):
    store = SQLiteJobStore(tmp_path / "jobs.db", reactor)
    store.startService()
    runner, _, _ = make_runner(workers=0, store=store)
    try:
        first = await runner.submit(make_job(1), idempotency_key="order-9")
        retry = await runner.submit(make_job(2), idempotency_key="order-9")
        assert retry.id == first.id == make_job(1).id
        assert [job.id for job in runner.queue] == [first.id]
    finally:
        await store.stopService()


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
        output.write(b"hel")
        output.write(b"lo\xff")
    await store.update(finished)  # after the output, as the runner does
    await store.stopService()

    again = open_store()
    assert again.cached(job.id) is None
    assert await again.get(job.id) == finished
    assert await again.get("0" * 31 + "f") is None
    assert await again.fetch_output(job.id) == b"hello\xff"
    assert await again.fetch_output(job.id, offset=2, size=2) == b"ll"
    assert await again.fetch_output(job.id, offset=4, size=100) == b"o\xff"
    assert await again.fetch_output(job.id, offset=99) == b""
    assert await again.fetch_output("f" * 32) == b""
    assert [j.id for j in await again.unfinished()] == [make_job(2).id, make_job(3).id]


@pytest_twisted.ensureDeferred
async def test_prune_forgets_old_finished_jobs_and_their_output(open_store):
    store = open_store()
    old = make_job(1).evolve(status=SUCCEEDED, finished=100.0)
    new = make_job(2).evolve(status=SUCCEEDED, finished=300.0)
    queued = make_job(3)
    for job in (old, new, queued):
        with store.open_output(job.id) as output:
            output.write(b"x")
        await store.add(job)
    assert await store.prune(before=200.0) == 1
    assert await store.get(old.id) is None
    assert await store.fetch_output(old.id) == b""
    assert await store.fetch_output(new.id) == b"x"
    assert (await store.get(new.id)) == new
    assert (await store.get(queued.id)) == queued


@pytest_twisted.ensureDeferred
async def test_a_failed_write_fails_its_caller_and_the_store_keeps_working(open_store):
    store = open_store()
    await store.add(make_job(1))
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
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
