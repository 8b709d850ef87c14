"""
twistnet-http API resource in memory (treq's StubTreq over an in-memory store and fake
processes): routing, every answer and refusal, the event stream, HEAD; no socket, no thread.
"""

from __future__ import annotations

import json
import signal

import pytest
from openapi_spec_validator import validate
from twisted.internet import defer, error
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from http_support import MemoryStore, StubApi, job
from twistnet.http import api as api_module
from twistnet.http import openapi
from twistnet.http.api import ROUTES
from twistnet.http.store import StoreUnavailable
from twistnet.http.tools import BUILTIN_TOOLS, word_count

TOKEN = "tok"


@pytest.fixture
def api():
    return StubApi(token=TOKEN, workers=1, queue_size=5)


# --- jobs -------------------------------------------------------------------------------------


def test_submit_runs_the_tool_and_the_job_is_served_from_memory(api):
    code, headers, body = api.call("POST", "/jobs", {"tool": "echo", "params": {"text": "x"}})
    assert code == 202
    job_id = json.loads(body)["id"]
    assert headers.getRawHeaders(b"location") == [f"/jobs/{job_id}".encode()]
    ((_, _, argv, *_),) = api.clock.spawned
    assert argv[-2:] == ["echo", "x"]
    code, _, body = api.call("GET", f"/jobs/{job_id}")
    assert code == 200 and json.loads(body)["status"] == "running"
    api.run(job_id, b"x\n")
    _, _, done = api.json("GET", f"/jobs/{job_id}")
    assert done["status"] == "succeeded" and done["output"] == "x\n" and done["exit_code"] == 0


def test_python_tool_result_and_metacharacters_stay_literal():
    api = StubApi()
    text = "x; touch pwned | $(touch pwned) `touch pwned` && echo *"
    echo = api.submit("echo", {"text": text})
    count = api.submit("wordcount", {"text": "a b\nc"})
    # One argv element, no shell: the metacharacters are the text itself.
    assert api.clock.spawned[0][2][-1] == text
    fed = json.loads(api.process(count).transport.written)
    api.run(count, result=word_count(**fed))
    api.run(echo, (text + "\n").encode())
    assert api.json("GET", f"/jobs/{count}")[2]["result"] == {"lines": 2, "words": 3, "chars": 5}
    assert api.json("GET", f"/jobs/{echo}")[2]["output"] == text + "\n"


def test_list_is_newest_first_filtered_and_paginated():
    api = StubApi(workers=5)
    ids = []
    for n in range(5):
        ids.append(api.submit("echo", {"text": str(n)}) if n % 2 == 0 else api.submit("date"))
    code, _, page = api.json("GET", "/jobs?limit=2")
    assert code == 200 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert "output" not in page["jobs"][0]
    _, _, rest = api.json("GET", f"/jobs?limit=10&cursor={page['next_cursor']}")
    assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:] and rest["next_cursor"] is None
    _, _, echoes = api.json("GET", "/jobs?tool=echo")
    assert [j["id"] for j in echoes["jobs"]] == [ids[4], ids[2], ids[0]]
    for job_id in ids:
        api.run(job_id)
    _, _, done = api.json("GET", "/jobs?status=succeeded&tool=date")
    assert [j["id"] for j in done["jobs"]] == [ids[3], ids[1]]


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
def test_bad_submissions_say_what_is_wrong(api, body, status, detail):
    code, headers, error_document = api.json("POST", "/jobs", body)
    assert code == status
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert set(error_document) == {"error", "detail"}
    assert detail in error_document["detail"]
    assert not api.clock.spawned


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
        (b'{"tool": "echo", "params": {"text": "\\ud800"}}', b"application/json", 400, "text"),
    ],
)
def test_malformed_bodies_are_400_and_other_types_415(api, raw, content_type, status, detail):
    headers = {b"Content-Type": [content_type]} if content_type else {}
    code, _, body = api.call("POST", "/jobs", raw=raw, headers=headers)
    assert code == status, body
    assert detail in json.loads(body)["detail"]


def test_unknown_jobs_routes_and_methods(api):
    for path in (
        "/jobs/" + "0" * 32,
        "/jobs/../../etc/passwd",
        "/jobs/%2e%2e%2f",
        "/jobs/x/log",
        "/jobs/x/y/z",
        "/tools/",
        "/nope",
    ):
        code, _, body = api.json("GET", path)
        assert code == 404 and body["error"] in ("unknown job", "not found"), path
    code, headers, body = api.json("PUT", "/jobs")
    assert code == 405 and headers.getRawHeaders(b"allow") == [b"GET, HEAD, POST"]
    code, headers, _ = api.json("OPTIONS", "/healthz")
    assert code == 405 and headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert api.json("DELETE", "/jobs/" + "0" * 32)[0] == 404
    for query in (
        "status=bogus",
        "limit=0",
        "limit=501",
        "limit=x",
        "cursor=abc",
        "cursor=" + "9" * 40,
    ):
        assert api.json("GET", f"/jobs?{query}")[0] == 400, query
    for offset in ("-1", "9" * 40):
        assert api.json("GET", "/jobs/" + "0" * 32 + f"/log?offset={offset}")[0] == 400


def test_queue_full_is_429_too_many_requests_with_retry_after():
    api = StubApi(workers=1, queue_size=1)
    first = api.submit("sleep", {"seconds": 30})
    second = api.submit("sleep", {"seconds": 30})
    response = defer.ensureDeferred(_raw_response(api, "POST", {"tool": "sleep"}))
    code, phrase, headers, body = response.result
    assert (code, phrase) == (429, b"Too Many Requests")
    assert body == {"error": "queue full", "detail": "1 job is waiting already; try again later."}
    assert int(headers.getRawHeaders(b"retry-after")[0]) >= 1
    code, _, cancelled = api.json("DELETE", f"/jobs/{second}")
    assert code == 200 and cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    assert api.json("POST", "/jobs", {"tool": "echo", "params": {"text": "x"}})[0] == 202
    # A running job's cancel is answered once its process has ended.
    cancelling = api.request("DELETE", f"/jobs/{first}")
    api.run(first, exit_code=None, signum=signal.SIGTERM)
    assert json.loads(api.answer(cancelling)[2])["status"] == "cancelled"
    assert api.json("DELETE", f"/jobs/{first}")[0] == 409


def test_a_larger_queue_says_jobs_are_waiting():
    api = StubApi(workers=1, queue_size=2)
    for _ in range(3):
        api.submit("sleep")
    assert api.json("POST", "/jobs", {"tool": "sleep"})[2]["detail"].startswith(
        "2 jobs are waiting"
    )


async def _raw_response(api, method, body):
    response = await api.stub.request(
        method,
        "http://jobs.example/jobs",
        data=json.dumps(body).encode(),
        headers={b"Content-Type": [b"application/json"]},
    )
    return response.code, response.phrase, response.headers, json.loads(await response.content())


def test_cancel_queued_then_conflict_once_finished(api):
    first = api.submit("sleep")
    second = api.submit("sleep")
    code, _, body = api.call("DELETE", f"/jobs/{second}")
    assert code == 200 and json.loads(body)["status"] == "cancelled"
    assert len(api.clock.spawned) == 1
    assert api.call("DELETE", f"/jobs/{second}")[0] == 409
    assert api.call("DELETE", f"/jobs/{first}", token="wrong")[0] == 401


def test_token_guards_state_changes_compared_in_constant_time(monkeypatch):
    compared = []
    real = api_module.hmac.compare_digest
    monkeypatch.setattr(
        api_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b)
    )
    api = StubApi(token="s3cret-token")
    document = {"tool": "echo", "params": {"text": "x"}}
    for authorization in ([], [b"Bearer wrong"], [b"s3cret-token"]):
        headers = {b"Authorization": authorization}
        code, response_headers, body = api.json("POST", "/jobs", document, headers=headers)
        assert code == 401 and body["error"] == "unauthorized"
        assert response_headers.getRawHeaders(b"www-authenticate")
    code, _, body = api.json("POST", "/jobs", document)
    assert code == 202
    wrong = {b"Authorization": [b"Bearer nope"]}
    assert api.json("DELETE", f"/jobs/{body['id']}", headers=wrong)[0] == 401
    assert api.json("GET", f"/jobs/{body['id']}", headers=wrong)[0] == 200
    assert len(compared) == 5


def test_handler_exception_is_a_500_logged_and_the_server_keeps_serving(api, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(api.store, "list", broken, raising=False)
    with capturedLogs() as events:
        code, _, body = api.json("GET", "/jobs")
    assert code == 500 and body == {"error": "internal error", "detail": "The error is logged."}
    assert any("disk on fire" in str(event.get("log_failure")) for event in events)
    monkeypatch.setattr(api.store, "list", lambda *a: defer.fail(RuntimeError("later")))
    with capturedLogs() as events:
        assert api.json("GET", "/jobs")[0] == 500
    assert any("later" in str(event.get("log_failure")) for event in events)
    assert api.json("GET", "/healthz")[0] == 200


def test_a_store_that_cannot_write_answers_503_and_recovers(api, monkeypatch):
    real = api.store.add
    monkeypatch.setattr(
        api.store, "add", lambda job: defer.fail(StoreUnavailable("database or disk is full"))
    )
    document = {"tool": "echo", "params": {"text": "x"}}
    with capturedLogs() as events:
        code, headers, body = api.json("POST", "/jobs", document)
    assert code == 503 and body["error"] == "store unavailable"
    assert headers.getRawHeaders(b"retry-after") == [b"5"]
    assert api.runner.queue_depth() == 0
    assert [e["log_format"] for e in events if "disk is full" in str(e.get("error"))] == [
        "could not store a new job: {error}"
    ]
    monkeypatch.setattr(api.store, "add", real)
    assert api.json("POST", "/jobs", document)[0] == 202


def test_cancel_and_timeout_signal_the_process_group():
    api = StubApi(workers=2)
    running = api.submit("sleep", {"seconds": 30})
    code, _, timed = api.json("POST", "/jobs", {"tool": "sleep", "timeout": 0.5})
    assert code == 202
    cancelling = api.request("DELETE", f"/jobs/{running}")
    assert api.signals == [(api.process(running).pid, signal.SIGTERM)]
    api.run(running, exit_code=None, signum=signal.SIGTERM)
    code, _, cancelled = api.answer(cancelling)
    assert code == 200 and json.loads(cancelled)["status"] == "cancelled"
    api.clock.advance(0.5)
    assert api.signals[-1] == (api.process(timed["id"]).pid, signal.SIGTERM)
    api.run(timed["id"], exit_code=None, signum=signal.SIGTERM)
    timed_out = api.json("GET", f"/jobs/{timed['id']}")[2]
    assert timed_out["status"] == "timed_out" and timed_out["error"] == "timed out after 0.5 s"


# --- the log and its event stream ---------------------------------------------------------------


def test_log_from_an_offset_and_the_live_event_stream():
    import treq

    api = StubApi()
    job_id = api.submit("echo", {"text": "x"})
    path = f"/jobs/{job_id}/log"
    received = []
    response = api.stub.request(
        "GET", "http://jobs.example" + path, headers={b"Accept": [b"text/event-stream"]}
    )
    api.stub.flush()
    response = response.result
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    done = treq.collect(response, received.append)
    proto = api.process(job_id)
    proto.childDataReceived(1, b"line 1\nline")
    api.stub.flush()
    # The first line went out while the job still ran; the partial second line waits.
    assert b"id: 7\ndata: line 1\n\n" in b"".join(received)
    assert b"line 2" not in b"".join(received)
    proto.childDataReceived(1, b" 2\nline 3\n")
    api.run(job_id)
    api.stub.flush()
    assert done.called
    stream = b"".join(received).decode()
    assert _messages(stream) == [("7", "line 1"), ("14", "line 2"), ("21", "line 3")]
    assert stream.endswith('event: end\nid: 21\ndata: {"status":"succeeded","exit_code":0}\n\n')
    resumed = []
    response = api.stub.request(
        "GET",
        "http://jobs.example" + path,
        headers={b"Accept": [b"text/event-stream"], b"Last-Event-ID": [b"7"]},
    )
    api.stub.flush()
    treq.collect(response.result, resumed.append)
    api.stub.flush()
    assert [t for _, t in _messages(b"".join(resumed).decode())] == ["line 2", "line 3"]
    code, headers, raw = api.call("GET", f"{path}?offset=7")
    assert code == 200 and raw == b"line 2\nline 3\n"
    assert headers.getRawHeaders(b"x-next-offset") == [b"21"]
    assert headers.getRawHeaders(b"x-job-status") == [b"succeeded"]


def _messages(stream: str) -> list[tuple[str, str]]:
    """(id, data) of each message event in an event stream."""
    found = []
    for block in stream.split("\n\n"):
        lines = block.split("\n")
        if any(line.startswith("event:") for line in lines):
            continue
        ids = [line[4:] for line in lines if line.startswith("id: ")]
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            found.append((ids[0], "\n".join(data)))
    return found


def _dummy(api, path: bytes, method=b"GET", **headers) -> DummyRequest:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = method
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    return request


def test_a_stream_client_that_vanishes_leaves_no_watcher_or_timer():
    api = StubApi()
    job_id = api.submit("sleep", {"seconds": 30})
    request = _dummy(api, f"/jobs/{job_id}/log".encode(), accept=b"text/event-stream")
    api.resource.render(request)
    assert request.written == [f": job {job_id}\n\n".encode()]
    assert api.runner._watchers and api.clock.getDelayedCalls()
    request.processingFailed(Failure(error.ConnectionDone()))
    assert not api.runner._watchers
    assert [call.func.__name__ for call in api.clock.getDelayedCalls()] == ["terminate"]


def test_an_answer_ready_after_the_client_went_is_not_written():
    slow = defer.Deferred()

    class SlowStore(MemoryStore):
        def get(self, job_id):
            return slow

    api = StubApi(store=SlowStore())
    request = _dummy(api, b"/jobs/" + b"0" * 32)
    api.resource.render(request)
    request.processingFailed(Failure(error.ConnectionDone()))
    slow.callback(job(0))
    assert request.written == [] and not request.finished


# --- HEAD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [r.template for r in ROUTES.documented() if r.method == "GET"])
def test_head_is_answered_like_get_without_a_body(template):
    api = StubApi()
    job_id = api.submit("echo", {"text": "x"})
    api.run(job_id, b"x\n")
    path = template.replace("{id}", job_id)
    get_code, get_headers, get_body = api.call("GET", path)
    with capturedLogs() as events:
        code, headers, body = api.call("HEAD", path)
    assert (code, body) == (get_code, b"") and code == 200
    length = int(headers.getRawHeaders(b"content-length")[0])
    # The metrics count requests, so the HEAD's page is a little longer than the GET's.
    assert length == len(get_body) if template != "/metrics" else length > len(get_body)
    assert headers.getRawHeaders(b"content-type") == get_headers.getRawHeaders(b"content-type")
    assert not [e for e in events if "eat it" in e.get("log_format", "")]


def test_head_of_an_unknown_job_and_of_an_event_stream():
    api = StubApi()
    with capturedLogs() as events:
        code, headers, body = api.call("HEAD", "/jobs/" + "0" * 32)
    assert (code, body) == (404, b"") and int(headers.getRawHeaders(b"content-length")[0]) > 0
    assert not [e for e in events if "eat it" in e.get("log_format", "")]
    job_id = api.submit("sleep")
    code, headers, body = api.call(
        "HEAD", f"/jobs/{job_id}/log", headers={b"Accept": [b"text/event-stream"]}
    )
    assert (code, body) == (200, b"")
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    assert not api.runner._watchers


# --- the route table, the document, tools, health and metrics --------------------------------


def test_every_documented_route_has_its_operation_written_and_no_other():
    routes = {(r.template, r.method.lower()) for r in ROUTES.documented()}
    for token_required in (False, True):
        written = {
            (path, method)
            for path, item in openapi.operations(token_required).items()
            for method in item
            if method != "parameters"
        }
        assert written == routes


def test_a_route_left_out_of_the_document_is_still_served():
    from twistnet.http.routing import Route, RouteTable

    table = RouteTable([*ROUTES.routes, Route("/hidden", "GET", "page", in_openapi=False)])
    assert table.match([b"hidden"]) == ("/hidden", [])
    document = openapi.document(BUILTIN_TOOLS, False, table)
    assert "/hidden" not in document["paths"]
    assert list(document["paths"]) == list(dict.fromkeys(r.template for r in ROUTES.documented()))


def test_openapi_document_validates_and_lists_every_route():
    api = StubApi(token="t")
    code, _, document = api.json("GET", "/openapi.json")
    assert code == 200
    validate(document)
    documented = {}
    for declared in ROUTES.documented():
        documented.setdefault(declared.template, [])
        documented[declared.template].append(declared.method.lower())
    assert {
        path: [m for m in item if m != "parameters"] for path, item in document["paths"].items()
    } == documented
    assert set(document["components"]["schemas"]["JobRequest"]["x-tool-params"]) == {
        tool.name for tool in BUILTIN_TOOLS
    }
    assert document["paths"]["/jobs"]["post"]["security"] == [{"bearer": []}]
    job_id = api.submit("date")
    for declared in ROUTES.documented():
        if declared.method == "GET":
            assert api.call("GET", declared.template.replace("{id}", job_id))[0] == 200


def test_healthz_follows_the_queue_between_probes():
    api = StubApi(workers=1, queue_size=100)
    assert api.json("GET", "/healthz")[2]["queued"] == 0
    first = api.submit("echo", {"text": "a"})
    api.submit("echo", {"text": "b"})
    assert api.json("GET", "/healthz")[2] == {
        "status": "ok",
        "queued": 1,
        "running": 1,
        "workers": 1,
        "queue_size": 100,
    }
    api.run(first, b"a\n")
    health = api.json("GET", "/healthz")[2]
    assert (health["queued"], health["running"]) == (0, 1)


def test_tools_health_and_metrics():
    api = StubApi(workers=2, queue_size=100)
    _, _, tools = api.json("GET", "/tools")
    echo = next(tool for tool in tools["tools"] if tool["name"] == "echo")
    assert echo["params"]["required"] == ["text"]
    assert echo["params"]["properties"]["text"]["not"] == {"pattern": "^-"}
    job_id = api.submit("echo", {"text": "m"})
    api.clock.advance(0.25)
    api.run(job_id, b"m\n")
    code, _, health = api.json("GET", "/healthz")
    assert code == 200 and health == {
        "status": "ok",
        "queued": 0,
        "running": 0,
        "workers": 2,
        "queue_size": 100,
    }
    code, headers, metrics = api.call("GET", "/metrics")
    text = metrics.decode()
    assert code == 200 and headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert 'twistnet_http_jobs_finished_total{status="succeeded",tool="echo"} 1.0' in text
    assert 'twistnet_http_requests_total{method="POST",route="/jobs",status="202"} 1.0' in text
    assert 'twistnet_http_jobs{status="queued"} 0.0' in text
    assert 'twistnet_http_job_duration_seconds_count{tool="echo"} 1.0' in text


def test_the_documented_idempotency_key_is_the_one_the_server_takes():
    import re

    (header,) = openapi.operations(False)["/jobs"]["post"]["parameters"]
    assert (header["name"], header["in"]) == ("Idempotency-Key", "header")
    documented = re.compile(header["schema"]["pattern"])
    api = StubApi()
    for key, takes in [("k" * 255, True), ("!~", True), ("k" * 256, False), ("a b", False)]:
        assert bool(documented.match(key)) is takes
        code, _, _ = api.call(
            "POST",
            "/jobs",
            body={"tool": "date"},
            headers={b"Idempotency-Key": [key.encode()]},
        )
        assert code == (202 if takes else 400), key
    retry = api.call("POST", "/jobs", body={"tool": "date"}, headers={b"Idempotency-Key": [b"!~"]})
    assert json.loads(retry[2])["id"] == api.store.keyed["!~"]  # the first job, not a new one
