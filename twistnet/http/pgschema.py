"""
The PostgreSQL schema of twistnet-http and its migrations.

Each node migrates on start inside one transaction holding a transaction-level advisory
lock, so nodes starting together migrate once, in turn; a node that finds a schema newer
than it knows refuses to start rather than write rows it does not understand.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from twistnet.http.model import TERMINAL, Job
from twistnet.http.store import job_from_row, job_row

#: The schema version this code writes and reads.
SCHEMA_VERSION = 1
#: Advisory lock keys (any 64-bit numbers, fixed for twistnet-http).
MIGRATION_LOCK = 0x7477_6E65_7401
PRUNE_LOCK = 0x7477_6E65_7402

#: MIGRATIONS[n] takes a database at version n to version n + 1.
MIGRATIONS = [
    """
    CREATE TABLE jobs (
        seq bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        tool text NOT NULL,
        params jsonb NOT NULL,
        status text NOT NULL,
        timeout double precision NOT NULL,
        created double precision NOT NULL,
        started double precision,
        finished double precision,
        exit_code integer,
        result jsonb,
        error text,
        truncated boolean NOT NULL DEFAULT false,
        output_size bigint NOT NULL DEFAULT 0,
        pid integer,
        -- The worker running the job and which of its runs this is: every write a worker
        -- makes names both (the fence), so a worker that lost the job cannot touch it.
        worker text,
        attempt integer NOT NULL DEFAULT 0,
        cancel_requested boolean NOT NULL DEFAULT false,
        -- The host of the worker that claimed it: only there can its process group be killed.
        host text,
        idempotency_key text UNIQUE
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);
    CREATE INDEX jobs_by_tool ON jobs (tool, seq);
    CREATE INDEX jobs_by_finished ON jobs (finished) WHERE finished IS NOT NULL;
    CREATE INDEX jobs_queued ON jobs (tool, seq) WHERE status = 'queued';
    CREATE INDEX jobs_running_by_worker ON jobs (worker) WHERE status = 'running';

    -- Output as append-only chunks: any node reads any job's output.
    CREATE TABLE job_output (
        job_id text NOT NULL,
        pos bigint NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (job_id, pos)
    );

    -- One heartbeat row per worker: renewing a lease rewrites this row, not the jobs.
    CREATE TABLE workers (
        id text PRIMARY KEY,
        tools text[] NOT NULL,
        lease_seconds double precision NOT NULL,
        expires timestamptz NOT NULL
    );

    -- Process groups of reaped jobs, left on their host (a worker killed by SIGKILL leaves its
    -- jobs running): a worker on that host kills them.
    CREATE TABLE orphans (
        host text NOT NULL,
        pid integer NOT NULL,
        started double precision
    );

    -- One row per tool and slot: a worker holds a slot (row lock) for each job it starts,
    -- so a tool's limit holds across the cluster.
    CREATE TABLE tool_slots (
        tool text NOT NULL,
        slot integer NOT NULL,
        job_id text,
        PRIMARY KEY (tool, slot)
    );
    """,
]


class NewerSchema(Exception):
    """The database was made by a newer twistnet-http."""


def migrate(db: psycopg.Connection) -> int:
    """Bring the schema to L{SCHEMA_VERSION}; the version found before."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS twistnet_schema (version integer NOT NULL)")
        row = db.execute("SELECT version FROM twistnet_schema").fetchone()
        found = row[0] if row else 0
        if found > SCHEMA_VERSION:
            raise NewerSchema(
                f"its schema version {found} is newer than this twistnet-http knows "
                f"({SCHEMA_VERSION}); upgrade twistnet-http"
            )
        for script in MIGRATIONS[found:]:
            db.execute(script)
        if row is None:
            db.execute("INSERT INTO twistnet_schema VALUES (%s)", (SCHEMA_VERSION,))
        else:
            db.execute("UPDATE twistnet_schema SET version = %s", (SCHEMA_VERSION,))
    return found


def prune_batch(db: psycopg.Connection, before: float, batch: int) -> int | None:
    """
    Delete up to C{batch} jobs that finished before C{before}, with their output; None when
    another node holds the prune lock (one node prunes at a time).
    """
    if not db.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,)).fetchone()[0]:
        return None
    ids = [
        row[0]
        for row in db.execute(
            "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE finished < %s"
            " AND status = ANY(%s) LIMIT %s) RETURNING id",
            (before, sorted(TERMINAL), batch),
        )
    ]
    db.execute("DELETE FROM job_output WHERE job_id = ANY(%s)", (ids,))
    return len(ids)


def pg_row(job: Job) -> tuple:
    """C{job} as the values of the job columns, JSON as jsonb."""
    return job_row(job, Jsonb)


def _as_is(value: Any) -> Any:
    return value  # jsonb columns arrive decoded


def pg_job(row: tuple) -> Job:
    """The job in a row of the job columns."""
    return job_from_row(row, _as_is)
