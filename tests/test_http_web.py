"""
twistnet-http over real TCP on 127.0.0.1 (in this process): one round trip of submit and
get, and the channel and site policy (connection cap, body cap, request timeout). The API's
answers themselves are tested in memory in test_http_api.py.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, threads
from twisted.web.client import HTTPConnectionPool

from helpers import connect, eventually, recv_until, recv_until_closed, wait_until
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


@pytest_twisted.ensureDeferred
async def test_bodies_over_max_body_are_413_declared_or_chunked(serve):
    server = await serve(max_body=1000)

    def exchange():
        replies = []
        for request in (
            # Declared too large: refused at the headers, before any of the body is sent.
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n",
            # Nor is a client that asks first told to go on.
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b" " * 0x200
            + b"\r\n" * 1
            + b"200\r\n"
            + b" " * 0x200
            + b"\r\n",
        ):
            with connect(server.port) as sock:
                sock.sendall(request)
                replies.append(recv_until_closed(sock))
        return replies

    replies = await threads.deferToThread(exchange)
    assert len(replies) == 3
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 413 ")
        assert b'"error":"request too large"' in reply


@pytest_twisted.ensureDeferred
async def test_max_connections_is_enforced_with_a_503(serve):
    server = await serve(max_connections=2)

    def crowd():
        first, second = connect(server.port), connect(server.port)
        # Both admitted (served) before the third arrives.
        for sock in (first, second):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            recv_until(sock, lambda data: data.endswith(b"}\n"))
        with connect(server.port) as third:
            refused = recv_until_closed(third)
        first.close()
        wait_until(lambda: len(server.site.registry) < 2)
        with connect(server.port) as fourth:
            fourth.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            served = recv_until_closed(fourth)
        second.close()
        return refused, served

    refused, served = await threads.deferToThread(crowd)
    assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in refused
    assert served.startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_trickled_headers_are_cut_off_by_the_request_timeout(serve):
    server = await serve(request_timeout=1.0)

    def slowloris():
        started = time.monotonic()
        with connect(server.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            received = b""
            sock.settimeout(0.1)
            for byte in b"X-Slow: " + b"a" * 100:
                try:
                    sock.sendall(bytes([byte]))
                    received += sock.recv(4096)
                    if received:
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            return received, time.monotonic() - started

    slow = threads.deferToThread(slowloris)
    # An honest client meanwhile is served as usual.
    assert (await server.json("GET", "/healthz"))[0] == 200
    received, elapsed = await slow
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert 0.9 < elapsed < 6
