"""
The statements a cluster of twistnet-http nodes must get right under concurrency: claim,
lease renewal, reaping, fencing and cancellation. Each function takes a psycopg connection
inside a transaction (the store's writer lane gives one) and says what it guarantees.

The promise they keep together: no job is started twice unless its tool is retry-safe, and
every job ends in a final state.
- A job is claimed by one worker only: rows are locked with C{FOR UPDATE SKIP LOCKED}, so
  concurrent claimers each take different rows and never wait for each other.
- A tool's limit holds across the cluster: a claim also locks a free row of C{tool_slots}
  (again SKIP LOCKED) and writes the job id into it; the slot is freed in the statement
  that ends the job (or by the reaper).
- Leases live in the worker's own row of C{workers}, renewed there (the jobs table does not
  bloat); expiry is judged by the database's clock (C{now()}), never a node's.
- Every write a worker makes to a job names (worker, attempt) and status C{running}: once
  the job was reaped, re-queued or cancelled, the write matches no row and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import psycopg

from twistnet.http.model import CANCELLED, LOST, QUEUED, RUNNING, Job
from twistnet.http.pgschema import pg_job, pg_row
from twistnet.http.store import JOB_COLUMNS

#: Advisory lock key: one reaper at a time across the cluster.
REAP_LOCK = 0x7477_6E65_7403
#: LISTEN/NOTIFY channels: a job was queued (payload: its tool); a job is to be cancelled
#: (payload: its id).
QUEUED_CHANNEL = "twistnet_http_queued"
CANCEL_CHANNEL = "twistnet_http_cancel"

_J = ", ".join(f"j.{name.strip()}" for name in JOB_COLUMNS.split(","))


def register(db: psycopg.Connection, worker: str, tools: Mapping[str, int], lease: float) -> None:
    """
    Create (or refresh) this worker's heartbeat row with a lease of C{lease} seconds from the
    database's now, and make sure each limited tool has its slot rows.
    """
    db.execute(
        "INSERT INTO workers (id, tools, lease_seconds, expires)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (id) DO UPDATE SET tools = excluded.tools,"
        " lease_seconds = excluded.lease_seconds, expires = excluded.expires",
        (worker, sorted(tools), lease, lease),
    )
    for tool, limit in tools.items():
        if limit:
            # Slots are only ever added: a lower limit simply leaves the higher ones unused.
            db.execute(
                "INSERT INTO tool_slots (tool, slot) SELECT %s, generate_series(1, %s)"
                " ON CONFLICT DO NOTHING",
                (tool, limit),
            )


def renew(db: psycopg.Connection, worker: str, lease: float) -> bool:
    """
    Extend this worker's lease to C{lease} seconds from the database's now; False if it had
    already expired (its jobs may be reaped: the worker must not go on as if it held them).
    """
    row = db.execute(
        "UPDATE workers SET expires = now() + make_interval(secs => %s)"
        " WHERE id = %s AND expires > now() RETURNING 1",
        (lease, worker),
    ).fetchone()
    return row is not None


def retire(db: psycopg.Connection, worker: str) -> None:
    """A worker stopping cleanly (its jobs already ended or handed back) leaves no lease."""
    db.execute("DELETE FROM workers WHERE id = %s", (worker,))


#: The PostgreSQL type of each job column and of the idempotency key, for C{unnest}.
_TYPES = (
    "text, text, jsonb, text, float8, float8, float8, float8, int4, jsonb, text, bool, int8,"
    " int4, text"
).split(", ")
_ENQUEUE = (
    f"INSERT INTO jobs ({JOB_COLUMNS}, idempotency_key)"  # noqa: S608 - constants only
    f" SELECT * FROM unnest({', '.join(f'%s::{kind}[]' for kind in _TYPES)})"
    " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
)


def enqueue(db: psycopg.Connection, job: Job, idempotency_key: str | None) -> Job | None:
    """L{enqueue_many} of one job."""
    return enqueue_many(db, [(job, idempotency_key)])[0]


def enqueue_many(
    db: psycopg.Connection, submissions: list[tuple[Job, str | None]]
) -> list[Job | None]:
    """
    Store new jobs in one statement and wake the workers of their tools; for each, None, or
    the job its C{idempotency_key} already made (then nothing is stored: a client's retry
    gets the same job; two submissions of one batch with the same key get the first's job).

    One INSERT of arrays for the whole batch and one NOTIFY per tool, sent at commit: a
    statement per job would cost a round trip per job, and NOTIFY serializes committing
    transactions (identical notifications of one transaction are folded anyway).
    """
    rows = [(*pg_row(job), key) for job, key in submissions]
    columns = [list(column) for column in zip(*rows, strict=True)]
    inserted = {row[0] for row in db.execute(_ENQUEUE, columns)}
    keys = [key for job, key in submissions if job.id not in inserted]
    existing: dict[str, Job] = {}
    if keys:
        for row in db.execute(
            f"SELECT idempotency_key, {JOB_COLUMNS} FROM jobs"  # noqa: S608 - constants only
            " WHERE idempotency_key = ANY(%s)",
            (keys,),
        ):
            existing[row[0]] = pg_job(row[1:])
    tools = sorted({job.tool for job, _ in submissions if job.id in inserted})
    if tools:
        db.execute(
            "SELECT pg_notify(%s, tool) FROM unnest(%s::text[]) tool", (QUEUED_CHANNEL, tools)
        )
    return [None if job.id in inserted else existing[key] for job, key in submissions]


def claim(
    db: psycopg.Connection,
    worker: str,
    tools: Mapping[str, int],
    capacity: int,
    started: float,
    host: str = "",
) -> list[tuple[Job, int]]:
    """
    Take up to C{capacity} queued jobs of the C{tools} this worker declares (name: its
    limit, 0 for none), and mark them running here; each with its attempt number, the
    fence of every later write. Jobs of limited tools first (each needs a slot), then the
    oldest of all the unlimited tools in one statement: a claim costs a few round trips,
    however many tools a worker declares.

    Guarantees: a job is taken by one claimer (SKIP LOCKED: a row another transaction has
    locked is skipped, not waited for, and re-checked as no longer queued once it commits);
    only by a worker whose lease is valid by the database's clock; and a limited tool's job
    only with a free slot, locked and filled in the same transaction.
    """
    claimed: list[tuple[Job, int]] = []
    for tool, limit in tools.items():
        wanted = capacity - len(claimed)
        if not limit or wanted <= 0:
            continue
        slots = [
            row[0]
            for row in db.execute(
                "SELECT slot FROM tool_slots WHERE tool = %s AND slot <= %s"
                " AND job_id IS NULL ORDER BY slot LIMIT %s FOR UPDATE SKIP LOCKED",
                (tool, limit, wanted),
            )
        ]
        if not slots:
            continue
        taken = _take(db, worker, [tool], len(slots), started, host)
        if taken:
            db.execute(
                "UPDATE tool_slots s SET job_id = v.job_id"
                " FROM unnest(%s::int[], %s::text[]) v(slot, job_id)"
                " WHERE s.tool = %s AND s.slot = v.slot",
                (slots[: len(taken)], [job.id for job, _ in taken], tool),
            )
        claimed += taken
    unlimited = sorted(tool for tool, limit in tools.items() if not limit)
    if unlimited and capacity > len(claimed):
        claimed += _take(db, worker, unlimited, capacity - len(claimed), started, host)
    if claimed:
        # A re-run (of a retry-safe job) starts its output afresh.
        db.execute(
            "DELETE FROM job_output WHERE job_id = ANY(%s)", ([job.id for job, _ in claimed],)
        )
    return claimed


def _take(
    db: psycopg.Connection, worker: str, tools: list[str], wanted: int, started: float, host: str
) -> list[tuple[Job, int]]:
    """Mark up to C{wanted} of the oldest queued jobs of C{tools} running as C{worker}'s."""
    rows = db.execute(
        f"UPDATE jobs j SET status = %s, worker = %s, attempt = j.attempt + 1,"  # noqa: S608
        " started = %s, cancel_requested = false, host = %s"
        " FROM (SELECT seq FROM jobs WHERE status = %s AND tool = ANY(%s)"
        "       AND EXISTS (SELECT 1 FROM workers WHERE id = %s AND expires > now())"
        "       ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) picked"
        f" WHERE j.seq = picked.seq RETURNING {_J}, j.attempt",
        (RUNNING, worker, started, host, QUEUED, tools, worker, wanted),
    ).fetchall()
    return [(pg_job(row[:-1]), row[-1]) for row in rows]


def fenced_update(db: psycopg.Connection, job: Job, worker: str, attempt: int) -> bool:
    """
    Write a worker's new state of a job it runs; False (and nothing written) unless the job
    is still running as this worker's attempt C{attempt}. A state that ends the run frees
    the job's tool slot in the same transaction.
    """
    row = pg_row(job)
    names = [name.strip() for name in JOB_COLUMNS.split(",")][1:]
    assignments = ", ".join(f"{name} = %s" for name in names)
    updated = db.execute(
        f"UPDATE jobs SET {assignments} WHERE id = %s"  # noqa: S608 - constants only
        " AND worker = %s AND attempt = %s AND status = %s",
        (*row[1:], job.id, worker, attempt, RUNNING),
    ).rowcount
    if updated and job.status != RUNNING:
        db.execute("UPDATE tool_slots SET job_id = NULL WHERE job_id = %s", (job.id,))
    return bool(updated)


def fenced_output(
    db: psycopg.Connection, job_id: str, position: int, data: bytes, worker: str, attempt: int
) -> None:
    """Append a chunk of a job's output, only while the job runs as this worker's attempt."""
    db.execute(
        "INSERT INTO job_output (job_id, pos, data) SELECT %s, %s, %s WHERE EXISTS"
        " (SELECT 1 FROM jobs WHERE id = %s AND worker = %s AND attempt = %s AND status = %s)"
        " ON CONFLICT DO NOTHING",
        (job_id, position, data, job_id, worker, attempt, RUNNING),
    )


def cancel(db: psycopg.Connection, job_id: str, finished: float) -> str | None:
    """
    Cancel a job from any node. A queued job is cancelled at once (a claim holding its row
    lock makes this wait, then see it running); a running one is flagged and its worker told
    by NOTIFY (and by its polling), to stop it and write the final state itself. The status
    now: C{cancelled}, C{running} (flagged), or None when it was not queued or running.
    """
    row = db.execute(
        "UPDATE jobs SET status = %s, finished = %s, error = 'cancelled by a client'"
        " WHERE id = %s AND status = %s RETURNING status",
        (CANCELLED, finished, job_id, QUEUED),
    ).fetchone()
    if row is not None:
        return CANCELLED
    row = db.execute(
        "UPDATE jobs SET cancel_requested = true WHERE id = %s AND status = %s RETURNING worker",
        (job_id, RUNNING),
    ).fetchone()
    if row is None:
        return None
    db.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, job_id))
    return RUNNING


def cancel_requested(db: psycopg.Connection, worker: str) -> list[str]:
    """The jobs this worker runs that a client asked to cancel (the polling fallback)."""
    return [
        row[0]
        for row in db.execute(
            "SELECT id FROM jobs WHERE worker = %s AND status = %s AND cancel_requested",
            (worker, RUNNING),
        )
    ]


def reap(
    db: psycopg.Connection, retry_safe: Iterable[str], lease: float, finished: float
) -> list[tuple[str, str]] | None:
    """
    Hand back the jobs of workers whose lease expired: re-queued if their tool is retry-safe,
    else C{lost}; free their slots; forget the dead workers. The (id, new status) of each job
    reaped, or None when this node may not reap now.

    Guarantees: one reaper at a time (a transaction-level advisory lock, tried, not waited
    for); nothing is reaped until the database has been up for one lease (after a restart
    every lease looks expired, though live workers renew within one lease); a job is reaped
    only if its worker has no unexpired row, and the fence then shuts that worker out.
    """
    ready = db.execute(
        "SELECT pg_try_advisory_xact_lock(%s)"
        " AND now() > pg_postmaster_start_time() + make_interval(secs => %s)",
        (REAP_LOCK, lease),
    ).fetchone()[0]
    if not ready:
        return None
    db.execute("DELETE FROM workers WHERE expires < now()")
    doomed = db.execute(
        "SELECT id, host, pid, started FROM jobs WHERE status = %s AND NOT EXISTS"
        " (SELECT 1 FROM workers w WHERE w.id = jobs.worker) FOR UPDATE",
        (RUNNING,),
    ).fetchall()
    if not doomed:
        return []
    # What the dead worker started may still run on its host: a worker there will kill it.
    left = [(host, pid, started) for _, host, pid, started in doomed if host and pid]
    if left:
        db.cursor().executemany("INSERT INTO orphans VALUES (%s, %s, %s)", left)
    reaped = db.execute(
        "UPDATE jobs SET"
        " status = CASE WHEN tool = ANY(%(safe)s) THEN %(queued)s ELSE %(lost)s END,"
        " finished = CASE WHEN tool = ANY(%(safe)s) THEN NULL ELSE %(now)s END,"
        " started = CASE WHEN tool = ANY(%(safe)s) THEN NULL ELSE started END,"
        " error = CASE WHEN tool = ANY(%(safe)s) THEN NULL"
        "  ELSE 'lost: its worker stopped renewing its lease while the job ran' END,"
        " pid = NULL"
        " WHERE status = %(running)s AND id = ANY(%(doomed)s)"
        " RETURNING id, status",
        {
            "safe": sorted(retry_safe),
            "queued": QUEUED,
            "lost": LOST,
            "now": finished,
            "running": RUNNING,
            "doomed": [row[0] for row in doomed],
        },
    ).fetchall()
    db.execute(
        "UPDATE tool_slots s SET job_id = NULL WHERE job_id IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM jobs j WHERE j.id = s.job_id AND j.status = %s)",
        (RUNNING,),
    )
    if any(status == QUEUED for _, status in reaped):
        db.execute("SELECT pg_notify(%s, '')", (QUEUED_CHANNEL,))
    return [(job_id, status) for job_id, status in reaped]


def orphans(db: psycopg.Connection, host: str) -> list[tuple[int, float | None]]:
    """Take the (pid, started) of the process groups reaped jobs left on this host."""
    return db.execute(
        "DELETE FROM orphans WHERE host = %s RETURNING pid, started", (host,)
    ).fetchall()


def queued_count(db: psycopg.Connection) -> int:
    """Jobs waiting across the cluster (what --queue-size bounds)."""
    return db.execute("SELECT count(*) FROM jobs WHERE status = %s", (QUEUED,)).fetchone()[0]
