"""
The cluster's statements (twistnet.http.claims) against a real PostgreSQL, each guarantee
on its own: concurrent claims never share a job, an expired lease claims nothing, a stale
attempt writes nothing, the reaper waits for a restarted database, a slot bounds a tool.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from twistnet.http import claims, pgschema
from twistnet.http.model import LOST, QUEUED, RUNNING, SUCCEEDED, Job

pytest_plugins = ["pg_support"]


@pytest.fixture
def connect(postgres_url):
    opened: list[psycopg.Connection] = []

    def new() -> psycopg.Connection:
        db = psycopg.connect(postgres_url, autocommit=True)
        opened.append(db)
        return db

    with psycopg.connect(postgres_url, autocommit=True) as db:
        pgschema.migrate(db)
    yield new
    for db in opened:
        db.close()


def queue(db, count: int, tool: str = "echo") -> list[str]:
    ids = []
    for _ in range(count):
        job = Job(id=uuid.uuid4().hex, tool=tool, params={}, timeout=5.0, created=1.0)
        with db.transaction():
            claims.enqueue(db, job, None)
        ids.append(job.id)
    return ids


def test_concurrent_claims_take_different_jobs_without_waiting(connect):
    first, second = connect(), connect()
    queue(first, 6)
    for worker in ("w1", "w2"):
        with first.transaction():
            claims.register(first, worker, {"echo": 0}, 30)
    with first.transaction():
        mine = claims.claim(first, "w1", {"echo": 0}, 4, 1.0)
        # The first transaction still holds its rows: the second skips them, not waits.
        with second.transaction():
            theirs = claims.claim(second, "w2", {"echo": 0}, 4, 1.0)
    assert len(mine) == 4 and len(theirs) == 2
    assert not {j.id for j, _ in mine} & {j.id for j, _ in theirs}
    assert all(attempt == 1 for _, attempt in mine + theirs)


def test_a_worker_whose_lease_expired_claims_nothing_and_cannot_renew(connect):
    db = connect()
    queue(db, 1)
    with db.transaction():
        claims.register(db, "late", {"echo": 0}, 0.001)
    db.execute("SELECT pg_sleep(0.01)")
    with db.transaction():
        assert claims.claim(db, "late", {"echo": 0}, 1, 1.0) == []
        assert claims.renew(db, "late", 30) is False


def test_a_stale_attempt_writes_nothing(connect):
    db = connect()
    queue(db, 1)
    with db.transaction():
        claims.register(db, "w1", {"echo": 0}, 30)
        [(job, attempt)] = claims.claim(db, "w1", {"echo": 0}, 1, 1.0)
    done = job.evolve(status=SUCCEEDED, finished=2.0)
    with db.transaction():
        assert claims.fenced_update(db, done, "w1", attempt + 1) is False
        assert claims.fenced_update(db, done, "w2", attempt) is False
    assert db.execute("SELECT status FROM jobs").fetchone() == (RUNNING,)
    with db.transaction():
        assert claims.fenced_update(db, done, "w1", attempt) is True
        # Finished: no later write of the same attempt lands either.
        assert claims.fenced_update(db, done.evolve(status=LOST), "w1", attempt) is False
    assert db.execute("SELECT status FROM jobs").fetchone() == (SUCCEEDED,)


def test_the_reaper_hands_back_expired_jobs_but_waits_after_a_database_start(connect):
    db = connect()
    queue(db, 1, "safe")
    queue(db, 1, "unsafe")
    with db.transaction():
        claims.register(db, "dead", {"safe": 0, "unsafe": 0}, 0.001)
        # Claimed while its lease was (barely) valid.
        db.execute("UPDATE workers SET expires = now() + interval '1 hour'")
        assert len(claims.claim(db, "dead", {"safe": 0, "unsafe": 0}, 2, 1.0)) == 2
        db.execute("UPDATE workers SET expires = now() - interval '1 second'")
    with db.transaction():
        # As if the database had just started: every lease looks expired, so none is reaped.
        assert claims.reap(db, ["safe"], 1e9, 5.0) is None
    with db.transaction():
        reaped = dict(claims.reap(db, ["safe"], 0.001, 5.0))
    assert sorted(reaped.values()) == [LOST, QUEUED]
    rows = dict(db.execute("SELECT tool, status FROM jobs").fetchall())
    assert rows == {"safe": QUEUED, "unsafe": LOST}
    assert db.execute("SELECT count(*) FROM workers").fetchone() == (0,)


def test_a_tool_slot_bounds_claims_across_workers(connect):
    db = connect()
    queue(db, 3, "single")
    with db.transaction():
        claims.register(db, "w1", {"single": 1}, 30)
        claims.register(db, "w2", {"single": 1}, 30)
        [(running, attempt)] = claims.claim(db, "w1", {"single": 1}, 3, 1.0)
        assert claims.claim(db, "w2", {"single": 1}, 3, 1.0) == []
    with db.transaction():
        claims.fenced_update(db, running.evolve(status=SUCCEEDED), "w1", attempt)
        assert len(claims.claim(db, "w2", {"single": 1}, 3, 1.0)) == 1


def test_cancel_ends_a_queued_job_and_flags_a_running_one(connect):
    db = connect()
    queued_id, running_id = queue(db, 2)
    with db.transaction():
        claims.register(db, "w1", {"echo": 0}, 30)
        db.execute("UPDATE jobs SET status = 'running', worker = 'w1' WHERE id = %s",
                   (running_id,))  # fmt: skip
    with db.transaction():
        assert claims.cancel(db, queued_id, 3.0) == "cancelled"
        assert claims.cancel(db, running_id, 3.0) == RUNNING
        assert claims.cancel(db, "f" * 32, 3.0) is None
    assert claims.cancel_requested(db, "w1") == [running_id]


def test_a_batch_of_submissions_is_one_insert_with_keys_honoured_and_one_notify_per_tool(
    connect,
):
    db, listener = connect(), connect()
    listener.execute(f"LISTEN {claims.QUEUED_CHANNEL}")

    def job(tool: str = "echo") -> Job:
        return Job(id=uuid.uuid4().hex, tool=tool, params={"n": 1}, timeout=5.0, created=1.0)

    earlier = job()
    with db.transaction():
        assert claims.enqueue(db, earlier, "k-old") is None
    list(listener.notifies(timeout=0.2, stop_after=1))
    batch = [
        (job(), None),
        (job(), "k-new"),
        (job(), "k-new"),
        (job(), "k-old"),
        (job("date"), None),
    ]
    with db.transaction():
        answers = claims.enqueue_many(db, batch)
    assert answers[0] is None and answers[1] is None and answers[4] is None
    assert answers[2].id == batch[1][0].id  # the same key in one batch: the first's job
    assert answers[3].id == earlier.id
    stored = {row[0] for row in db.execute("SELECT id FROM jobs")}
    assert stored == {earlier.id, batch[0][0].id, batch[1][0].id, batch[4][0].id}
    payloads = sorted(note.payload for note in listener.notifies(timeout=0.3, stop_after=3))
    assert payloads == ["date", "echo"]


def test_a_claim_takes_the_oldest_jobs_of_all_its_tools_and_a_limited_one_within_its_slots(
    connect,
):
    db = connect()
    order = [queue(db, 1, tool)[0] for tool in ("echo", "date", "single", "single", "echo")]
    with db.transaction():
        claims.register(db, "w1", {"single": 1, "echo": 0, "date": 0, "idle": 0}, 30)
        taken = claims.claim(db, "w1", {"single": 1, "echo": 0, "date": 0, "idle": 0}, 3, 1.0)
    # The single slot's first job, then the oldest of the unlimited tools.
    assert sorted(job.id for job, _ in taken) == sorted([order[2], order[0], order[1]])
    slots = db.execute("SELECT job_id FROM tool_slots WHERE tool = 'single'").fetchall()
    assert slots == [(order[2],)]
    with db.transaction():
        rest = claims.claim(db, "w1", {"single": 1, "echo": 0, "date": 0, "idle": 0}, 5, 1.0)
    assert [job.id for job, _ in rest] == [order[4]]  # the second single waits for its slot
