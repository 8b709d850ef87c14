"""
twistnet-http on PostgreSQL, what only a shared server store has: the schema made under an
advisory lock by nodes starting together, a newer schema refused, no password in any
message, 503-worthy errors while the server is down and a reconnection after, and
`twistd twistnet-http --db postgresql://...` end to end. All against a real PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import jsonschema
import psycopg
import pytest
import pytest_twisted

from helpers import eventually, run_twistd, wait_until
from twistnet.http import claims, openapi, pgschema, pgstore
from twistnet.http.api import ROUTES
from twistnet.http.model import QUEUED, Job
from twistnet.http.pgstore import PostgresJobStore, redacted
from twistnet.http.store import StoreError, StoreUnavailable
from twistnet.http.tools import BUILTIN_TOOLS

pytest_plugins = ["pg_support"]


def make_job(number: int) -> Job:
    return Job(
        id=f"{number:032x}", tool="echo", params={"text": "x"}, timeout=5.0, created=1.0 + number
    )


@pytest.fixture
def store(postgres_url, reactor):
    store = PostgresJobStore(postgres_url, reactor)
    store.startService()
    yield store
    pytest_twisted.blockon(store.stopService())


def test_nodes_starting_together_make_the_schema_once(postgres_url):
    errors: list[Exception] = []

    def start() -> None:
        try:
            PostgresJobStore(postgres_url)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT version FROM twistnet_schema").fetchall() == [
            (pgschema.SCHEMA_VERSION,)
        ]


def test_a_newer_schema_is_refused_in_one_line(postgres_url):
    PostgresJobStore(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE twistnet_schema SET version = 99")
    with pytest.raises(StoreError, match="schema version 99 is newer") as raised:
        PostgresJobStore(postgres_url)
    assert "\n" not in str(raised.value)


def test_the_password_is_never_in_a_message(postgres_server):
    url = f"postgresql://nobody:s3cret-pw@/nosuchdb?host={postgres_server.directory}"
    with pytest.raises(StoreError) as raised:
        PostgresJobStore(url)
    assert "cannot open the job database" in str(raised.value)
    assert "s3cret-pw" not in str(raised.value)
    assert "s3cret-pw" not in redacted(url) and "nosuchdb" in redacted(url)


@pytest_twisted.ensureDeferred
async def test_a_write_while_the_server_is_down_is_unavailable_then_works_again(
    store, postgres_server
):
    await store.add(make_job(1))
    postgres_server.stop()
    try:
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await store.add(make_job(2))
        with pytest.raises(StoreUnavailable):
            await store.get(make_job(1).id)
    finally:
        postgres_server.start()
    await store.add(make_job(3))
    assert (await store.get(make_job(3).id)).status == QUEUED
    assert await store.get(make_job(2).id) is None


def server_processes(server) -> list[int]:
    """The postmaster and its children (backends, background workers)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


@pytest_twisted.ensureDeferred
async def test_health_says_unreachable_within_a_second_when_the_server_hangs(
    store, postgres_server
):
    assert await store.reachable() is True
    frozen = server_processes(postgres_server)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        asked = time.monotonic()
        assert await store.reachable() is False
        assert time.monotonic() - asked < pgstore.HEALTH_TIMEOUT + 0.5
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert await store.reachable() is True


def test_health_with_a_store_field_matches_the_openapi_schema():
    schema = openapi.document(BUILTIN_TOOLS, False, ROUTES)["components"]["schemas"]["Health"]
    health = {"status": "ok", "queued": 0, "running": 0, "workers": 1, "queue_size": 5}
    for store in ("reachable", "unreachable"):
        jsonschema.validate({**health, "store": store}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**health, "store": "maybe"}, schema)


@pytest_twisted.ensureDeferred
async def test_a_refused_submission_in_a_batch_fails_alone(store):
    entered, held = threading.Event(), threading.Event()
    # The writer waits in this write: the submissions below queue up into one batch.
    blocked = store.write(lambda db: entered.set() or held.wait(5))
    assert entered.wait(5)
    good, bad, other = make_job(1), make_job(2).evolve(params={"text": "\0"}), make_job(3)
    answers = [
        store.write_many(claims.enqueue_many, (job, None)).addErrback(lambda f: f.value)
        for job in (good, bad, other)
    ]
    held.set()
    await blocked
    results = [await answer for answer in answers]
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], psycopg.DataError)
    assert (await store.get(good.id)).status == QUEUED
    assert (await store.get(other.id)).status == QUEUED
    assert await store.get(bad.id) is None
    assert store.commits == 2 and store.committed_operations == 4


@pytest_twisted.ensureDeferred
async def test_output_written_on_one_node_is_read_on_another(store, postgres_url, reactor):
    other = PostgresJobStore(postgres_url, reactor)
    other.startService()
    try:
        job = make_job(1)
        await store.add(job)
        output = store.open_output(job.id)
        output.write(b"first line\n")
        seen = []

        def read() -> bool:
            other.fetch_output(job.id).addCallback(seen.append)
            return b"first line\n" in seen

        await eventually(read, "the other node never saw the output", timeout=1)
        output.write(b"second\n")
        assert await store.update(job.evolve(status="succeeded", finished=2.0)) is None
        assert await other.fetch_output(job.id) == b"first line\nsecond\n"
        assert (await other.get(job.id)).status == "succeeded"
    finally:
        await other.stopService()


def test_bad_url_makes_twistd_exit_with_one_line(postgres_server, tmp_path):
    url = f"postgresql://twistnet:pw-not-shown@/nosuchdb?host={postgres_server.directory}"
    result = run_twistd("twistnet-http", "--listen", "tcp:0:interface=127.0.0.1", "--db", url)
    assert result.returncode != 0
    assert "cannot open the job database" in result.stderr + result.stdout
    assert "pw-not-shown" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_twistd_serves_jobs_from_postgresql(twistd, postgres_url):
    server = twistd("twistnet-http", "--listen", "tcp:0:interface=127.0.0.1", "--db", postgres_url)
    port = server.port()
    server.wait_for_line(r"jobs in user=twistnet dbname=")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/jobs",
        data=json.dumps({"tool": "echo", "params": {"text": "from pg"}}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        job_id = json.load(response)["id"]

    def finished() -> dict | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs/{job_id}", timeout=10) as r:
            job = json.load(r)
        return job if job["status"] == "succeeded" else None

    job = wait_until(finished)
    assert job["output"] == "from pg\n"
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone() == (
            "succeeded",
        )
    assert server.terminate() == 0


@pytest_twisted.ensureDeferred
async def test_pruning_runs_on_one_node_at_a_time(store, postgres_url):
    old = make_job(1).evolve(status="succeeded", finished=10.0)
    await store.add(old)
    with psycopg.connect(postgres_url) as other_node:
        # Another node is pruning: it holds the lock for its transaction.
        other_node.execute("SELECT pg_advisory_xact_lock(%s)", (pgschema.PRUNE_LOCK,))
        assert await store.prune(before=100.0) == 0
    assert await store.prune(before=100.0) == 1
    assert await store.get(old.id) is None


@pytest_twisted.ensureDeferred
async def test_the_first_write_after_a_database_restart_is_stored(
    store, postgres_server, monkeypatch
):
    monkeypatch.setattr(pgstore, "IDLE_CHECK", 0.0)  # as if idle long enough to be checked
    await store.add(make_job(1))
    postgres_server.restart()
    await store.add(make_job(2))
    assert (await store.get(make_job(2).id)).status == QUEUED
