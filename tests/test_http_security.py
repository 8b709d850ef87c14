"""
twistnet-http's security promises, checked against a live `twistd -n twistnet-http`: no shell,
no option injection, no tool by path, no client-raised timeout, capped output and bodies, a
constant-time token that never leaks into the log, the database or a tool, and TLS.
"""

from __future__ import annotations

import http.client
import inspect
import json
import ssl
import statistics
import time
from pathlib import Path

import pytest

from helpers import make_certificate, run_twistd
from http_rel_helpers import assert_json_error, start_live
from twistnet.http import api
from twistnet.http.runner import OUTPUT_HEAD, OUTPUT_TAIL

TOKEN = "s3cr3t-T0ken-for-the-security-tests"

SECURITY_TOOLS = """
[tools.show]
command = "printf %s {{text}}"
cwd = "{cwd}"

[tools.count]
command = "seq {{n}}"

[tools.count.params.n]
type = "integer"

[tools.nap]
command = "sleep {{seconds}}"
timeout = 2

[tools.nap.params.seconds]
type = "integer"
min = 0
max = 10

[tools.large]
command = "sh -c 'yes abcdefghijklmnopqrstuvwxyz | head -c 300000'"

[tools.env]
command = "env"
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    directory = tmp_path_factory.mktemp("security")
    (directory / "tools.toml").write_text(SECURITY_TOOLS.format(cwd=directory))
    server = start_live(
        directory,
        "--config",
        "tools.toml",
        "--max-body",
        "4096",
        "--log-level",
        "debug",
        env={"TWISTNET_HTTP_TOKEN": TOKEN},
    )
    server.token = TOKEN
    server.directory = directory
    yield server
    assert server.process.terminate() == 0
    server.assert_no_traceback()


METACHARACTERS = [
    "; touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "a\ntouch pwned",
    "a\r\ntouch pwned",
    "| touch pwned",
    "&& touch pwned",
    "> pwned",
    "* ? [a-z]",
    "~ $HOME ${PATH}",
    "'\"\\",
    "{text} %s %n",
    "a b  c\t",
    "héllo ☃ \u202e",
]


def test_metacharacters_stay_literal_no_shell_anywhere(live):
    ids = {live.submit("show", {"text": value}): value for value in METACHARACTERS}
    for job_id, value in ids.items():
        job = live.finished(job_id)
        assert job["status"] == "succeeded", job
        assert job["output"] == value
    assert not (live.directory / "pwned").exists()


@pytest.mark.parametrize(
    ("tool", "params"),
    [
        ("show", {"text": "--version"}),
        ("show", {"text": "-rf"}),
        ("show", {"text": "-"}),
        ("show", {"text": "--"}),
        ("show", {"text": "-n5"}),
        ("count", {"n": -1}),
        ("count", {"n": -5}),
    ],
)
def test_parameter_values_cannot_become_options(live, tool, params):
    status, headers, content = live.request("POST", "/jobs", {"tool": tool, "params": params})
    error = assert_json_error(status, headers, content, 400)
    assert "option" in error["detail"], error


def test_a_dash_inside_a_value_is_fine(live):
    job = live.finished(live.submit("show", {"text": "a-b --c"}))
    assert job["output"] == "a-b --c"


@pytest.mark.parametrize(
    "name", ["/bin/sh", "../x", "sh", "./show", "show/../env", "/usr/bin/env", "..", ".", ""]
)
def test_tools_cannot_be_named_by_path(live, name):
    status, headers, content = live.request("POST", "/jobs", {"tool": name})
    assert_json_error(status, headers, content, 404)


def test_a_tool_declared_with_a_path_for_a_name_is_refused_at_start(tmp_path):
    result = run_twistd("twistnet-http", "--port", "0", "--tool", "/bin/sh=echo hi", cwd=tmp_path)
    assert result.returncode != 0
    assert "never a path" in result.stdout + result.stderr


@pytest.mark.parametrize("timeout", [2.0001, 3, 1e9, "1", True, 0, -1, None])
def test_clients_cannot_raise_a_tools_timeout(live, timeout):
    body = {"tool": "nap", "params": {"seconds": 10}, "timeout": timeout}
    if timeout is None:
        del body["timeout"]
        job = live.finished(live.submit("nap", {"seconds": 10}))
        assert job["status"] == "timed_out" and job["error"] == "timed out after 2 s"
        return
    status, headers, content = live.request("POST", "/jobs", body)
    assert_json_error(status, headers, content, 400)


def test_a_client_may_ask_for_less_time(live):
    status, accepted = live.json(
        "POST", "/jobs", {"tool": "nap", "params": {"seconds": 10}, "timeout": 0.5}
    )
    assert status == 202
    job = live.finished(accepted["id"])
    assert job["status"] == "timed_out" and job["error"] == "timed out after 0.5 s"


def test_output_is_capped_head_and_tail(live):
    job = live.finished(live.submit("large"))
    cap = OUTPUT_HEAD + OUTPUT_TAIL + 100  # the omission marker
    assert job["truncated"] is True and len(job["output"]) <= cap
    assert "bytes of output omitted" in job["output"]
    status, _, log = live.request("GET", f"/jobs/{job['id']}/log")
    assert status == 200 and len(log) <= cap


def test_bodies_over_max_body_are_413(live):
    body = {"tool": "show", "params": {"text": "x" * 5000}}
    status, headers, content = live.request("POST", "/jobs", body)
    assert_json_error(status, headers, content, 413)


def test_the_token_is_compared_in_constant_time(live):
    source = inspect.getsource(api.JobApi._authorize)
    assert "hmac.compare_digest(" in source and "==" not in source
    wrong = {
        "equal length": "Bearer " + "x" * len(TOKEN),
        "one char off": "Bearer " + TOKEN[:-1] + "X",
        "prefix": "Bearer " + TOKEN[:5],
        "longer": "Bearer " + TOKEN + "x",
        "empty": "Bearer ",
        "no scheme": TOKEN,
        "lower-case token": "Bearer " + TOKEN.lower(),
        "basic": "Basic " + TOKEN,
        "non-ascii": "Bearer \u00e9\u00e9",
    }
    timings: dict[str, float] = {}
    for label, header in wrong.items():
        taken = []
        for _ in range(20):
            started = time.perf_counter()
            status, headers, content = live.request(
                "POST",
                "/jobs",
                {"tool": "show", "params": {"text": "x"}},
                headers={"Authorization": header.encode("utf-8").decode("latin-1")},
                token="unused",
            )
            taken.append(time.perf_counter() - started)
            assert_json_error(status, headers, content, 401)
            assert "bearer" in headers["www-authenticate"].lower()
        timings[label] = statistics.median(taken) * 1000
    # Reads need no token; and the right one works.
    assert live.request("GET", "/healthz", token="unused")[0] == 200
    assert live.json("POST", "/jobs", {"tool": "show", "params": {"text": "ok"}})[0] == 202
    # The scheme is case-insensitive (RFC 9110); only the token must match exactly.
    status, _, _ = live.request(
        "POST",
        "/jobs",
        {"tool": "show", "params": {"text": "any case"}},
        headers={"Authorization": "bEARER " + TOKEN},
        token="unused",
    )
    assert status == 202
    print(f"\n401 median ms by kind of wrong token: {timings}")


def test_the_token_never_reaches_the_log_the_database_or_a_tool(live):
    job = live.finished(live.submit("env"))
    assert TOKEN not in job["output"] and "TWISTNET_HTTP_TOKEN" not in job["output"]
    live.request("POST", "/jobs", {"tool": "nope"}, headers={"Authorization": "Bearer " + TOKEN})
    live.request("POST", "/jobs", {"tool": "show"}, token=TOKEN[:-1] + "Z")
    live.request("DELETE", f"/jobs/{job['id']}", token=TOKEN)
    live.request("GET", f"/jobs?tool={TOKEN[:-1]}", token=TOKEN)
    assert TOKEN not in live.process.output
    assert TOKEN[:-1] + "Z" not in live.process.output
    assert "Authorization" not in live.process.output and "Bearer" not in live.process.output
    stored = [path for path in Path(live.directory).rglob("*") if path.is_file()]
    assert any(path.name.startswith("twistnet-http.db") for path in stored)
    for path in stored:
        assert TOKEN.encode() not in path.read_bytes(), path


def test_tls_through_an_ssl_endpoint(tmp_path):
    key, cert = make_certificate(tmp_path)
    server = start_live(
        tmp_path,
        "--listen",
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        token=TOKEN,
    )
    context = ssl.create_default_context(cafile=str(cert))

    def call(method, path, body=None):
        connection = http.client.HTTPSConnection(
            "localhost", server.port, context=context, timeout=20
        )
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        content = response.read()
        tls = connection.sock.version()
        connection.close()
        return response.status, content, tls

    status, content, tls = call("POST", "/jobs", b'{"tool": "echo", "params": {"text": "tls"}}')
    assert status == 202 and tls.startswith("TLS")
    job_id = json.loads(content)["id"]
    status, content, _ = call("GET", f"/jobs/{job_id}")
    assert status == 200
    # Plain HTTP on the TLS port gets nowhere, and the server goes on serving TLS.
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        plain.request("GET", "/healthz")
        plain.getresponse().read()
    assert call("GET", "/healthz")[0] == 200
    assert server.process.terminate() == 0
    server.assert_no_traceback()
