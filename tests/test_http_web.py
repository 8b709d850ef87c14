"""twistnet-http API against a real listening server on 127.0.0.1 (in this process)."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import pytest_twisted
import treq
from openapi_spec_validator import validate
from twisted.internet import defer, task, threads
from twisted.web.client import HTTPConnectionPool

from helpers import connect, recv_until, recv_until_closed, wait_until
from http_support import group_gone, poll
from twistnet.http import web
from twistnet.http.channel import JobSite
from twistnet.http.model import Param, Tool
from twistnet.http.openapi import ROUTES
from twistnet.http.runner import LocalRunner
from twistnet.http.store import SQLiteJobStore
from twistnet.http.tools import BUILTIN_TOOLS, catalogue, split_command
from twistnet.http.web import JobApi

LINES = Tool(
    name="lines",
    argv=split_command("sh -c 'for i in 1 2 3; do echo line $i; sleep 0.3; done'"),
    timeout=30,
)
TREE = Tool(
    name="tree",
    argv=split_command("sh -c 'sleep 60 & echo $$; wait' tree {x}"),
    params=[Param(name="x", default="x")],
    timeout=60,
)
TOOLS = [*BUILTIN_TOOLS, LINES, TREE]


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

    async def until_done(self, job_id, timeout=20.0):
        from twisted.internet import reactor

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, _, job = await self.json("GET", f"/jobs/{job_id}")
            assert code == 200
            if job["status"] not in ("queued", "running"):
                return job
            await task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


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


# --- the happy path -------------------------------------------------------------------------


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
async def test_python_tool_result_and_metacharacters_stay_literal(serve, tmp_path):
    server = await serve()
    marker = tmp_path / "pwned"
    text = f"x; touch {marker} | $(touch {marker}) `touch {marker}` && echo *"
    _, _, echo = await server.json("POST", "/jobs", {"tool": "echo", "params": {"text": text}})
    _, _, count = await server.json(
        "POST", "/jobs", {"tool": "wordcount", "params": {"text": "a b\nc"}}
    )
    assert (await server.until_done(echo["id"]))["output"] == text + "\n"
    assert (await server.until_done(count["id"]))["result"] == {"lines": 2, "words": 3, "chars": 5}
    assert not marker.exists()


@pytest_twisted.ensureDeferred
async def test_list_is_newest_first_filtered_and_paginated(serve):
    server = await serve()
    ids = []
    for n in range(5):
        tool = "echo" if n % 2 == 0 else "date"
        params = {"text": str(n)} if tool == "echo" else {}
        ids.append((await server.json("POST", "/jobs", {"tool": tool, "params": params}))[2]["id"])
    code, _, page = await server.json("GET", "/jobs?limit=2")
    assert code == 200 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert "output" not in page["jobs"][0]
    _, _, rest = await server.json("GET", f"/jobs?limit=10&cursor={page['next_cursor']}")
    assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:] and rest["next_cursor"] is None
    _, _, echoes = await server.json("GET", "/jobs?tool=echo")
    assert [j["id"] for j in echoes["jobs"]] == [ids[4], ids[2], ids[0]]
    for job_id in ids:
        await server.until_done(job_id)
    _, _, done = await server.json("GET", "/jobs?status=succeeded&tool=date")
    assert [j["id"] for j in done["jobs"]] == [ids[3], ids[1]]


# --- every error status ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"tool": "echo", "params": {"text": "--version"}}, 400, "'text': must not start with '-'"),
        ({"tool": "echo", "params": {}}, 400, "'text': is required"),
        ({"tool": "echo", "params": {"text": "x", "extra": 1}}, 400, "'extra': unknown parameter"),
        ({"tool": "sleep", "params": {"seconds": "5"}}, 400, "'seconds': must be an integer"),
        ({"tool": "sleep", "params": {"seconds": 999}}, 400, "'seconds': must be at most 300"),
        ({"tool": "echo", "params": {"text": "x"}, "timeout": 11}, 400, "at most 10 s"),
        ({"tool": "echo", "params": {"text": "x"}, "timeout": -1}, 400, "more than 0"),
        ({"tool": "echo", "params": ["x"]}, 400, "params must be a JSON object"),
        ({"tool": "echo", "shell": True}, 400, "Unknown field 'shell'"),
        ({"params": {}}, 400, "'tool' is required"),
        (["echo"], 400, "must be a JSON object"),
        ({"tool": "../../bin/sh"}, 404, "No tool named"),
        ({"tool": "rm"}, 404, "No tool named"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_submissions_say_what_is_wrong(serve, body, status, detail):
    server = await serve()
    code, headers, error = await server.json("POST", "/jobs", body)
    assert code == status
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert set(error) == {"error", "detail"}
    assert detail in error["detail"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "detail"),
    [
        (b"{not json", b"application/json", 400, "not valid JSON"),
        (b'{"tool": "echo", "params": {"text": NaN}}', b"application/json", 400, "not valid JSON"),
        (b'{"tool": "\xff"}', b"application/json", 400, "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, b"application/json", 400, "nested too deeply"),
        (
            b'{"tool": "sleep", "params": {"seconds": 1' + b"0" * 5000 + b"}}",
            b"application/json",
            400,
            "JSON",
        ),
        (b'{"tool": "echo"}', b"text/plain", 415, "application/json"),
        (b'{"tool": "echo"}', None, 415, "application/json"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_bodies_are_400_and_other_types_415(
    serve, raw, content_type, status, detail
):
    server = await serve()
    headers = {b"Content-Type": [content_type]} if content_type else {}
    code, _, body = await server.call("POST", "/jobs", raw=raw, headers=headers)
    assert code == status, body
    assert detail in json.loads(body)["detail"]


@pytest_twisted.ensureDeferred
async def test_unknown_jobs_routes_and_methods(serve):
    server = await serve()
    for path in (
        "/jobs/" + "0" * 32,
        "/jobs/../../etc/passwd",
        "/jobs/%2e%2e%2f",
        "/jobs/x/log",
        "/nope",
        "/",
    ):
        code, _, body = await server.json("GET", path)
        assert code == 404 and body["error"] in ("unknown job", "not found"), path
    code, headers, body = await server.json("PUT", "/jobs")
    assert code == 405 and headers.getRawHeaders(b"allow") == [b"GET, POST"]
    code, _, body = await server.json("DELETE", "/jobs/" + "0" * 32)
    assert code == 404
    for query in ("status=bogus", "limit=0", "limit=501", "limit=x", "cursor=abc"):
        code, _, body = await server.json("GET", f"/jobs?{query}")
        assert code == 400, query
    code, _, _ = await server.json("GET", "/jobs/" + "0" * 32 + "/log?offset=-1")
    assert code == 400


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
async def test_queue_full_is_429_with_retry_after(serve):
    server = await serve(workers=1, queue_size=1)
    sleep = {"tool": "sleep", "params": {"seconds": 30}}
    first = (await server.json("POST", "/jobs", sleep))[2]["id"]
    second = (await server.json("POST", "/jobs", sleep))[2]["id"]
    code, headers, body = await server.json("POST", "/jobs", sleep)
    assert code == 429 and body["error"] == "queue full"
    assert int(headers.getRawHeaders(b"retry-after")[0]) >= 1
    code, _, cancelled = await server.json("DELETE", f"/jobs/{second}")
    assert code == 200 and cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    code, _, _ = await server.json("POST", "/jobs", {"tool": "echo", "params": {"text": "x"}})
    assert code == 202
    assert (await server.json("DELETE", f"/jobs/{first}"))[2]["status"] == "cancelled"
    code, _, body = await server.json("DELETE", f"/jobs/{first}")
    assert code == 409


@pytest_twisted.ensureDeferred
async def test_token_guards_state_changes_compared_in_constant_time(serve, monkeypatch):
    compared = []
    real = web.hmac.compare_digest
    monkeypatch.setattr(web.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    server = await serve(token=b"s3cret-token")
    job = {"tool": "echo", "params": {"text": "x"}}
    for headers in (
        {},
        {b"Authorization": [b"Bearer wrong"]},
        {b"Authorization": [b"s3cret-token"]},
    ):
        code, response_headers, body = await server.json("POST", "/jobs", job, headers)
        assert code == 401 and body["error"] == "unauthorized"
        assert response_headers.getRawHeaders(b"www-authenticate")
    code, _, body = await server.json(
        "POST", "/jobs", job, {b"Authorization": [b"Bearer s3cret-token"]}
    )
    assert code == 202
    assert (await server.json("DELETE", f"/jobs/{body['id']}"))[0] == 401
    assert (await server.json("GET", f"/jobs/{body['id']}"))[0] == 200
    assert len(compared) == 5


@pytest_twisted.ensureDeferred
async def test_handler_exception_is_a_500_and_the_server_keeps_serving(serve, monkeypatch):
    server = await serve()

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.store, "list", broken)
    code, _, body = await server.json("GET", "/jobs")
    assert code == 500 and body == {"error": "internal error", "detail": "The error is logged."}
    monkeypatch.setattr(server.store, "list", lambda *a: defer.fail(RuntimeError("later")))
    assert (await server.json("GET", "/jobs"))[0] == 500
    assert (await server.json("GET", "/healthz"))[0] == 200


# --- processes -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_and_timeout_leave_no_process_behind(serve):
    server = await serve()
    _, _, running = await server.json("POST", "/jobs", {"tool": "tree", "params": {"x": "1"}})
    _, _, timed = await server.json("POST", "/jobs", {"tool": "tree", "timeout": 0.5})
    await poll(lambda: server.store.read_output(running["id"]).strip(), "no output")
    code, _, cancelled = await server.json("DELETE", f"/jobs/{running['id']}")
    assert code == 200 and cancelled["status"] == "cancelled"
    timed_out = await server.until_done(timed["id"])
    assert timed_out["status"] == "timed_out" and timed_out["error"] == "timed out after 0.5 s"
    for job in (cancelled, timed_out):
        pgid = int(job["output"].split()[0])
        await poll(lambda g=pgid: group_gone(g), f"process group {pgid} of {job['id']} survived")


@pytest_twisted.ensureDeferred
async def test_log_from_an_offset_and_the_live_event_stream(serve):
    server = await serve()
    _, _, job = await server.json("POST", "/jobs", {"tool": "lines"})
    path = f"/jobs/{job['id']}/log"

    def stream(last_event_id=None):
        resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        with connect(server.port) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{resume}"
                "Connection: close\r\n\r\n".encode()
            )
            first_line_at = []

            def ended(data):
                if b"data: line" in data and not first_line_at:
                    first_line_at.append(time.monotonic())
                return b"event: end" in data and b"0\r\n\r\n" in data

            received = recv_until(sock, ended)
            return received, time.monotonic() - first_line_at[0]

    live, streamed_for = await threads.deferToThread(stream)
    live = live.decode()
    # The first line came while the job still ran (it prints a line every 0.3 s).
    assert streamed_for > 0.3
    assert "text/event-stream" in live.split("\r\n\r\n")[0]
    events = _events(live)
    assert [(i, t) for i, t, kind in events if kind == "message"] == [
        ("7", "line 1"),
        ("14", "line 2"),
        ("21", "line 3"),
    ]
    assert events[-1][2] == "end" and json.loads(events[-1][1])["status"] == "succeeded"
    resumed = _events((await threads.deferToThread(stream, "7"))[0].decode())
    assert [t for _, t, k in resumed if k == "message"] == ["line 2", "line 3"]
    code, headers, raw = await server.call("GET", f"{path}?offset=7")
    assert code == 200 and raw == b"line 2\nline 3\n"
    assert headers.getRawHeaders(b"x-next-offset") == [b"21"]
    assert headers.getRawHeaders(b"x-job-status") == [b"succeeded"]


def _events(response: str) -> list[tuple[str | None, str, str]]:
    """(id, data, event type) of each server-sent event in a chunked HTTP response."""
    body = response.split("\r\n\r\n", 1)[1]
    # Undo chunked transfer coding: drop the size lines.
    text, rest = "", body
    while rest:
        size_line, _, rest = rest.partition("\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text, rest = text + rest[:size], rest[size + 2 :]
    events = []
    for block in text.split("\n\n"):
        fields = [
            line.split(": ", 1) if ": " in line else [line.rstrip(":"), ""]
            for line in block.split("\n")
        ]
        ids = [value for name, value in fields if name == "id"]
        data = [value for name, value in fields if name == "data"]
        kind = next((value for name, value in fields if name == "event"), "message")
        if data:
            events.append((ids[0] if ids else None, "\n".join(data), kind))
    return events


# --- the catalogue, the document, health and metrics ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_openapi_document_validates_and_lists_every_route(serve):
    server = await serve(token=b"t")
    code, _, document = await server.json("GET", "/openapi.json")
    assert code == 200
    validate(document)
    assert {path: tuple(ops) for path, ops in document["paths"].items()} == {
        path: tuple(["parameters"] if "{id}" in path else []) + tuple(m.lower() for m in methods)
        for path, methods in ROUTES
    }
    assert set(document["components"]["schemas"]["JobRequest"]["x-tool-params"]) == {
        tool.name for tool in TOOLS
    }
    assert document["paths"]["/jobs"]["post"]["security"] == [{"bearer": []}]
    # Every documented route answers (a GET on a real job's routes).
    _, _, job = await server.json(
        "POST", "/jobs", {"tool": "date"}, {b"Authorization": [b"Bearer t"]}
    )
    for path, methods in ROUTES:
        if "GET" in methods:
            code, _, _ = await server.call("GET", path.replace("{id}", job["id"]))
            assert code == 200, path


@pytest_twisted.ensureDeferred
async def test_tools_health_and_metrics(serve):
    server = await serve()
    _, _, tools = await server.json("GET", "/tools")
    echo = next(tool for tool in tools["tools"] if tool["name"] == "echo")
    assert echo["params"]["required"] == ["text"]
    assert echo["params"]["properties"]["text"]["not"] == {"pattern": "^-"}
    _, _, job = await server.json("POST", "/jobs", {"tool": "echo", "params": {"text": "m"}})
    await server.until_done(job["id"])
    code, _, health = await server.json("GET", "/healthz")
    assert code == 200 and health == {
        "status": "ok",
        "queued": 0,
        "running": 0,
        "workers": 2,
        "queue_size": 100,
    }
    code, headers, metrics = await server.call("GET", "/metrics")
    text = metrics.decode()
    assert code == 200 and headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert 'twistnet_http_jobs_finished_total{status="succeeded",tool="echo"} 1.0' in text
    assert 'twistnet_http_requests_total{method="POST",route="/jobs",status="202"} 1.0' in text
    assert 'twistnet_http_jobs{status="queued"} 0.0' in text
    assert 'twistnet_http_job_duration_seconds_count{tool="echo"} 1.0' in text


# --- connections: the cap and slow clients -----------------------------------------------------


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


@pytest_twisted.ensureDeferred
async def test_a_stream_client_that_vanishes_leaves_nothing_behind(serve):
    server = await serve()
    _, _, job = await server.json("POST", "/jobs", {"tool": "sleep", "params": {"seconds": 30}})

    def open_and_vanish():
        with connect(server.port) as sock:
            sock.sendall(
                f"GET /jobs/{job['id']}/log HTTP/1.1\r\nHost: x\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            recv_until(sock, lambda data: b": job " in data)

    await threads.deferToThread(open_and_vanish)
    await poll(lambda: not server.runner._watchers, "the stream's watcher outlived its client")
    assert (await server.json("DELETE", f"/jobs/{job['id']}"))[2]["status"] == "cancelled"


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_write_answers_503_and_recovers(serve, monkeypatch):
    server = await serve()
    real = server.store._submit

    def disk_full(function, write=False):
        if write:
            return defer.fail(sqlite3.OperationalError("database or disk is full"))
        return real(function, write)

    monkeypatch.setattr(server.store, "_submit", disk_full)
    job = {"tool": "echo", "params": {"text": "x"}}
    code, headers, body = await server.json("POST", "/jobs", job)
    assert code == 503 and body["error"] == "store unavailable"
    assert headers.getRawHeaders(b"retry-after") == [b"5"]
    assert server.runner.queue_depth() == 0
    monkeypatch.setattr(server.store, "_submit", real)
    assert (await server.json("POST", "/jobs", job))[0] == 202
