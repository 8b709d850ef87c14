"""
A twistnet-http cluster on one real PostgreSQL, every node a `twistd` child process as an
operator runs it: API nodes (--role api) and workers (--role worker). Side effects are
counted in a file the tools append to, so "started exactly once" is checked, not assumed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from helpers import wait_until
from http_support import group_gone

pytest_plugins = ["pg_support"]

TOOLS = """
[tools.once]
command = "sh -c 'echo $1 >> runs.txt; echo ran $1' once {{n}}"
cwd = "{cwd}"

[tools.tick]
command = "sh -c 'for i in 1 2 3; do echo tick $i; sleep 0.3; done'"
cwd = "{cwd}"

[tools.hold]
command = "sh -c 'echo hold >> runs.txt; exec sleep 60'"
cwd = "{cwd}"

[tools.holdsafe]
command = "sh -c 'echo holdsafe >> runs.txt; exec sleep 60'"
cwd = "{cwd}"
retry_safe = true

[tools.single]
command = "sh -c 'echo start >> runs.txt; sleep 0.2; echo end >> runs.txt'"
cwd = "{cwd}"
max_concurrent = 1

[tools.nap]
command = "sh -c 'sleep 1.5; echo napped'"
cwd = "{cwd}"
"""


class Cluster:
    """Nodes of one cluster, started on demand; the file their tools append to."""

    def __init__(self, twistd, url: str, directory: Path) -> None:
        self.twistd = twistd
        self.url = url
        self.directory = directory
        (directory / "tools.toml").write_text(TOOLS.format(cwd=directory))
        self.runs = directory / "runs.txt"

    def node(self, role: str, *args: str):
        argv = ["--db", self.url, "--role", role, "--config", "tools.toml", "--lease", "2"]
        if role != "worker":
            argv += ["--listen", "tcp:0:interface=127.0.0.1"]
        process = self.twistd("twistnet-http", *argv, *args)
        if role == "worker":
            process.wait_for_line("registered, lease")
        else:
            process.api_port = process.port()
        return process

    def lines(self) -> list[str]:
        return self.runs.read_text().split() if self.runs.exists() else []

    def rows(self, query: str, *args) -> list[tuple]:
        with psycopg.connect(self.url) as db:
            return db.execute(query, args).fetchall()


@pytest.fixture
def cluster(twistd, postgres_url, tmp_path):
    made = Cluster(twistd, postgres_url, tmp_path)
    yield made
    # Jobs of a SIGKILLed worker outlive it (as on a dead machine): end what they left.
    for (pid,) in made.rows("SELECT pid FROM jobs WHERE pid IS NOT NULL"):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def call(node, method: str, path: str, body=None, headers=None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=20)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        sent = {"content-type": "application/json", **(headers or {})}
        connection.request(method, path, payload, sent)
        response = connection.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else {}
    finally:
        connection.close()


def submit(node, tool: str, params=None, **headers) -> str:
    status, _, body = call(node, "POST", "/jobs", {"tool": tool, "params": params or {}}, headers)
    assert status == 202, body
    return body["id"]


def job(node, job_id: str) -> dict:
    status, _, body = call(node, "GET", f"/jobs/{job_id}")
    assert status == 200, body
    return body


def finished(node, job_id: str, timeout: float = 20) -> dict:
    return wait_until(lambda: (j := job(node, job_id))["status"] not in ("queued", "running")
                      and j, timeout=timeout)  # fmt: skip


def test_many_jobs_each_started_exactly_once_and_read_from_either_api_node(cluster):
    many_jobs_each_started_exactly_once(cluster, 400)


@pytest.mark.soak
def test_thousands_of_jobs_each_started_exactly_once(cluster):
    many_jobs_each_started_exactly_once(cluster, 5000)


def many_jobs_each_started_exactly_once(cluster, count: int) -> None:
    # --queue-size is per cluster: room for all of them, however fast they come.
    a, b = (cluster.node("api", "--queue-size", str(count)) for _ in range(2))
    cluster.node("worker", "--workers", "4")
    cluster.node("worker", "--workers", "4")
    ids: dict[int, str] = {}

    def submitter(offset: int) -> None:
        for n in range(offset, count, 4):
            ids[n] = submit((a, b)[n % 2], "once", {"n": str(n)})

    threads = [threading.Thread(target=submitter, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(ids) == count
    wait_until(lambda: len(cluster.lines()) >= count, timeout=60 + count / 20)
    wait_until(
        lambda: cluster.rows("SELECT count(*) FROM jobs WHERE status = 'succeeded'")[0][0] == count,
        timeout=30,
    )
    assert sorted(map(int, cluster.lines())) == list(range(count)), "a job ran twice or never"
    workers = cluster.rows("SELECT count(DISTINCT worker) FROM jobs")[0][0]
    assert workers == 2, "one worker did all the work"
    # Each job read from the API node that did not accept it.
    for n in (0, 1, count - 1):
        other = (b, a)[n % 2]
        assert job(other, ids[n])["output"] == f"ran {n}\n"


def test_a_tools_limit_holds_across_the_cluster(cluster):
    api = cluster.node("api")
    cluster.node("worker", "--workers", "3")
    cluster.node("worker", "--workers", "3")
    ids = [submit(api, "single") for _ in range(6)]
    for job_id in ids:
        assert finished(api, job_id)["status"] == "succeeded"
    assert cluster.lines() == ["start", "end"] * 6, "two ran at once"


def test_event_stream_from_the_node_that_did_not_accept_the_job(cluster):
    a, b = cluster.node("api"), cluster.node("api")
    cluster.node("worker")
    job_id = submit(a, "tick")
    connection = http.client.HTTPConnection("127.0.0.1", b.api_port, timeout=20)
    connection.request("GET", f"/jobs/{job_id}/log", headers={"accept": "text/event-stream"})
    response = connection.getresponse()
    assert response.status == 200
    started = time.monotonic()
    stream = response.read().decode()  # ends with the job's end event
    connection.close()
    data = [line[6:] for line in stream.splitlines() if line.startswith("data: ")]
    assert data[:3] == ["tick 1", "tick 2", "tick 3"]
    assert '"status":"succeeded"' in data[-1].replace(" ", "")
    assert time.monotonic() - started < 10


def test_cancel_from_another_node_stops_the_job_where_it_runs(cluster):
    a, b = cluster.node("api"), cluster.node("api")
    cluster.node("worker")
    job_id = submit(a, "hold")
    wait_until(lambda: job(a, job_id)["status"] == "running")
    started = time.monotonic()
    status, _, body = call(b, "DELETE", f"/jobs/{job_id}")
    assert status == 200 and body["status"] == "cancelled", body
    assert time.monotonic() - started < 8
    assert cluster.rows("SELECT pid FROM jobs WHERE id = %s", job_id) == [(None,)]


def test_sigkill_of_a_worker_hands_its_jobs_back_within_the_lease(cluster):
    api = cluster.node("api")
    doomed = cluster.node("worker")
    lost_id = submit(api, "hold")
    again_id = submit(api, "holdsafe")
    wait_until(lambda: job(api, lost_id)["status"] == job(api, again_id)["status"] == "running")
    pids = wait_until(lambda: len(rows := cluster.rows("SELECT pid FROM jobs WHERE pid > 0")) == 2
                      and [pid for (pid,) in rows])  # fmt: skip
    survivor = cluster.node("worker")
    doomed.kill()
    killed = time.monotonic()
    lost = finished(api, lost_id, timeout=15)
    assert lost["status"] == "lost" and "lease" in lost["error"]
    # Retry-safe: re-queued, and started again by the worker still alive.
    wait_until(lambda: cluster.lines().count("holdsafe") == 2, timeout=15)
    assert time.monotonic() - killed < 10  # a 2 s lease, reaped within a few
    assert cluster.lines().count("hold") == 1, "a job that is not retry-safe ran twice"
    assert job(api, again_id)["status"] == "running"
    # What the dead worker started is killed by the worker left on its host.
    wait_until(lambda: all(group_gone(pid) for pid in pids), timeout=10)
    status, _, _ = call(api, "DELETE", f"/jobs/{again_id}")
    assert status == 200
    survivor.terminate()


def test_postgresql_restart_mid_run_refuses_submissions_then_stores_the_result(
    cluster, postgres_server
):
    api = cluster.node("api")
    cluster.node("worker", "--lease", "6")
    job_id = submit(api, "nap")
    wait_until(lambda: job(api, job_id)["status"] == "running")
    postgres_server.stop()
    try:
        status, headers, body = call(api, "POST", "/jobs", {"tool": "once", "params": {"n": "1"}})
        assert status == 503, body
        assert {k.lower(): v for k, v in headers.items()}["retry-after"]
        status, _, health = call(api, "GET", "/healthz")
        assert status == 503 and health["store"] == "unreachable"
    finally:
        postgres_server.start()
    assert wait_until(lambda: call(api, "GET", "/healthz")[2].get("store") == "reachable")
    done = finished(api, job_id, timeout=30)
    assert done["status"] == "succeeded" and done["output"] == "napped\n"
    again = submit(api, "once", {"n": "2"})
    assert finished(api, again)["status"] == "succeeded"


def test_a_retry_with_the_same_idempotency_key_gets_the_same_job(cluster):
    a, b = cluster.node("api"), cluster.node("api")
    first = submit(a, "once", {"n": "7"}, **{"Idempotency-Key": "order-7"})
    second = submit(b, "once", {"n": "7"}, **{"Idempotency-Key": "order-7"})
    other = submit(b, "once", {"n": "7"}, **{"Idempotency-Key": "order-8"})
    assert first == second != other
    assert cluster.rows("SELECT count(*) FROM jobs")[0][0] == 2


def test_a_worker_that_cannot_renew_kills_its_jobs_before_its_lease_expires(
    cluster, postgres_server
):
    api = cluster.node("api")
    worker = cluster.node("worker")
    job_id = submit(api, "hold")
    wait_until(lambda: job(api, job_id)["status"] == "running")
    [(pid,)] = wait_until(lambda: cluster.rows("SELECT pid FROM jobs WHERE pid IS NOT NULL"))
    postgres_server.stop()
    try:
        worker.wait_for_line(r"killing the 1 jobs of this worker before its lease", timeout=10)
        wait_until(lambda: group_gone(pid), timeout=5)
    finally:
        postgres_server.start()
    lost = finished(api, job_id, timeout=20)
    assert lost["status"] == "lost"
    assert cluster.lines() == ["hold"]
