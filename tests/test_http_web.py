"""
twistnet-http over real TCP on 127.0.0.1 (in this process): one smoke round trip of submit
and get. The API's answers are tested in memory in test_http_api.py, the channel and site
policy in test_http_channel.py, and the slowloris at the defaults over real sockets in
test_http_reliability.py.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import pytest_twisted
import treq
from twisted.internet import defer
from twisted.web.client import HTTPConnectionPool

from helpers import eventually
from twistnet.http.api import JobApi
from twistnet.http.channel import JobSite
from twistnet.http.runner import LocalRunner
from twistnet.http.store import SQLiteJobStore
from twistnet.http.tools import BUILTIN_TOOLS, catalogue

TOOLS = BUILTIN_TOOLS


class Server:
    def __init__(self, port, store, runner, api, site, pool):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.store, self.runner, self.api, self.site = store, runner, api, site
        self.pool = pool

    async def call(self, method, path, body=None, headers=None, raw=None):
        """(status, headers, body bytes) of one request; C{body} is sent as JSON."""
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault(b"Content-Type", [b"application/json"])
        response = await treq.request(
            method, self.url + path, headers=headers, data=data, pool=self.pool
        )
        content = await response.content()
        return response.code, response.headers, content

    async def json(self, method, path, body=None, headers=None):
        code, headers, content = await self.call(method, path, body, headers)
        return code, headers, json.loads(content)

    async def until_done(self, job_id):
        def finished():
            job = self.store.cached(job_id)
            return job is not None and job.terminal

        await eventually(finished, f"job {job_id} never finished")
        code, _, job = await self.json("GET", f"/jobs/{job_id}")
        assert code == 200
        return job


@pytest.fixture
def serve(tmp_path, reactor, listen):
    servers = []

    async def start(tools=TOOLS, token=None, workers=2, queue_size=100, **site_options):
        store = SQLiteJobStore(tmp_path / "jobs.db", reactor)
        store.startService()
        tools = catalogue(tools)
        runner = LocalRunner(store, tools, workers, queue_size, reactor, kill_grace=1.0)
        runner.startService()
        api = JobApi(store, runner, tools, token=token, clock=reactor)
        site = JobSite(api, reactor=reactor, **site_options)
        port = await listen(site)
        server = Server(
            port.getHost().port, store, runner, api, site, HTTPConnectionPool(reactor, False)
        )
        servers.append(server)
        return server

    yield start

    async def stop():
        for server in servers:
            await server.runner.stopService()
            await server.store.stopService()

    pytest_twisted.blockon(defer.ensureDeferred(stop()))


@pytest_twisted.ensureDeferred
async def test_submit_is_durable_at_202_and_poll_gives_the_result(serve, tmp_path):
    server = await serve()
    code, headers, body = await server.json(
        "POST", "/jobs", {"tool": "echo", "params": {"text": "hello"}}
    )
    assert code == 202
    assert body["status"] == "queued"
    location = headers.getRawHeaders(b"location")[0].decode()
    assert location == f"/jobs/{body['id']}" == body["url"]
    # On disk before the 202 went out: another connection to the database sees it.
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("SELECT tool FROM jobs WHERE id = ?", (body["id"],)).fetchone() == (
            "echo",
        )
    job = await server.until_done(body["id"])
    assert job["status"] == "succeeded" and job["exit_code"] == 0
    assert job["output"] == "hello\n" and job["truncated"] is False
    assert job["duration"] >= 0 and job["finished_at"] >= job["started_at"] >= job["created_at"]
