"""twistnet-http API resource in memory (treq's StubTreq): routing and refusals, no sockets."""

from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq

from http_support import make_runner
from twistnet.http.tools import BUILTIN_TOOLS, catalogue
from twistnet.http.web import JobApi

BASE = "http://jobs.example"


def result_of(deferred):
    results = []
    deferred.addBoth(results.append)
    assert results, "the response did not complete in memory"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def api():
    runner, clock, _ = make_runner(workers=1, queue_size=5)
    resource = JobApi(runner.store, runner, catalogue(BUILTIN_TOOLS), token=b"tok", clock=clock)
    stub = StubTreq(resource)

    def call(method, path, body=None, token="tok", raw=None, headers=None):
        headers = dict(headers or {})
        if token:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault(b"Content-Type", [b"application/json"])
        response = stub.request(method, BASE + path, data=data, headers=headers)
        stub.flush()
        response = result_of(response)
        content = stub.content(response)
        stub.flush()
        return response.code, response.headers, result_of(content)

    call.runner = runner
    call.clock = clock
    return call


def test_submit_runs_the_tool_and_the_job_is_served_from_memory(api):
    code, headers, body = api("POST", "/jobs", {"tool": "echo", "params": {"text": "x"}})
    assert code == 202
    job_id = json.loads(body)["id"]
    assert headers.getRawHeaders(b"location") == [f"/jobs/{job_id}".encode()]
    ((_, _, argv, *_),) = api.clock.spawned
    assert argv[-2:] == ["echo", "x"]
    code, _, body = api("GET", f"/jobs/{job_id}")
    assert code == 200 and json.loads(body)["status"] == "running"


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "status"),
    [
        ("POST", "/jobs", None, b'{"tool": "echo", "params": {"text": "\\ud800"}}', 400),
        ("GET", "/jobs?cursor=" + "9" * 40, None, None, 400),
        ("GET", "/jobs/" + "0" * 32 + "/log?offset=" + "9" * 40, None, None, 400),
        ("HEAD", "/jobs", None, None, 405),
        ("GET", "/", None, None, 404),
        ("GET", "/jobs/x/y/z", None, None, 404),
        ("GET", "/tools/", None, None, 404),
        ("OPTIONS", "/healthz", None, None, 405),
    ],
)
def test_refusals(api, method, path, body, raw, status):
    headers = {b"Content-Type": [b"application/json"]} if raw else None
    code, response_headers, content = api(method, path, body, raw=raw, headers=headers)
    assert code == status
    if method != "HEAD":
        assert set(json.loads(content)) == {"error", "detail"}
    if status == 405:
        assert response_headers.getRawHeaders(b"allow")


def test_cancel_queued_then_conflict_once_finished(api):
    first = json.loads(api("POST", "/jobs", {"tool": "sleep"})[2])["id"]
    second = json.loads(api("POST", "/jobs", {"tool": "sleep"})[2])["id"]
    code, _, body = api("DELETE", f"/jobs/{second}")
    assert code == 200 and json.loads(body)["status"] == "cancelled"
    assert len(api.clock.spawned) == 1
    assert api("DELETE", f"/jobs/{second}")[0] == 409
    assert api("DELETE", f"/jobs/{first}", token="wrong")[0] == 401
