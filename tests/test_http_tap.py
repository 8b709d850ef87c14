"""twistnet-http options, makeService, and the service end to end as `twistd -n twistnet-http`."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from helpers import run_twistd, wait_until
from http_support import group_gone
from twistnet.http import Options, makeService
from twistnet.http.channel import JobSite
from twistnet.http.tap import beyond_loopback


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch):
    monkeypatch.delenv("TWISTNET_HTTP_TOKEN", raising=False)


# --- options ----------------------------------------------------------------------------------


def test_defaults():
    options = parse()
    assert options.endpoint_descriptions() == ["tcp:8901:backlog=511:interface=127.0.0.1"]
    assert options["max-connections"] == 1000
    assert options["max-requests"] == 20
    assert options["idle-timeout"] == 60.0
    assert options["request-timeout"] == 10.0
    assert options["workers"] == (os.cpu_count() or 1)
    assert options["queue-size"] == 1000
    assert options["max-body"] == 1024 * 1024
    assert options["db"] == "twistnet-http.db"
    assert options["token"] is None
    assert set(options["tools"]) == {"echo", "sleep", "date", "wordcount"}


def test_tools_from_options_and_config(tmp_path):
    config = tmp_path / "tools.toml"
    config.write_text('[tools.hello]\ncommand = "echo hello {who}"\n')
    options = parse("--tool", "greet=echo hi {who}", "--config", str(config))
    assert set(options["tools"]) == {"greet", "hello"}
    assert options["tools"]["greet"].command({"who": "a b"}) == ["echo", "hi", "a b"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tool", "nocommand"], "expected NAME=COMMAND"),
        (["--tool", "a=echo", "--tool", "a=true"], "declared twice"),
        (["--config", "/nonexistent.toml"], "cannot read"),
        (["--workers", "0"], "1 or more"),
        (["--queue-size", "x"], "whole number"),
        (["--log-level", "loud"], "expected one of"),
        (["--token", "a", "--token-file", "/x"], "not both"),
        (["--token-file", "/nonexistent"], "cannot read --token-file"),
        (["--token", "has space"], "no spaces"),
        (["--listen", "tcp:0"], "beyond loopback without a token"),
        (["--listen", "tcp:0:interface=0.0.0.0"], "beyond loopback"),
        (["--listen", "tcp:0:interface=192.168.1.1"], "beyond loopback"),
    ],
)
def test_bad_options_are_usage_errors_with_a_sentence(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_token_sources(tmp_path, monkeypatch):
    assert parse("--token", "abc")["token"] == b"abc"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert parse("--token-file", str(token_file))["token"] == b"from-file"
    monkeypatch.setenv("TWISTNET_HTTP_TOKEN", "from-env")
    assert parse()["token"] == b"from-env"
    # With a token, listening everywhere is allowed.
    assert parse("--listen", "tcp:0")["token"] == b"from-env"


def test_loopback_check():
    assert not beyond_loopback("tcp:8901:interface=127.0.0.1")
    assert not beyond_loopback("tcp6:8901:interface=\\:\\:1")
    assert not beyond_loopback("unix:/run/jobs.sock")
    assert not beyond_loopback("tcp:8901:interface=localhost")
    assert beyond_loopback("tcp:8901")
    assert beyond_loopback("systemd:domain=INET:index=0")
    assert parse("--listen", "tcp:0", "--insecure")["insecure"]


def test_make_service_listens_with_the_capped_site(tmp_path):
    reactor = MemoryReactorClock()
    options = parse("--listen", "tcp:7100:interface=127.0.0.1", "--db", str(tmp_path / "j.db"))
    service = makeService(options, reactor=reactor)
    service.privilegedStartService()
    ((port, factory, _, interface),) = reactor.tcpServers
    assert (port, interface) == (7100, "127.0.0.1")
    assert isinstance(factory, JobSite)
    assert factory.registry.max_connections == 1000
    assert factory.max_requests == 20
    assert factory.max_body == 1024 * 1024
    jobs = [type(s).__name__ for s in service.services[0]]
    assert jobs == ["SQLiteJobStore", "LocalRunner", "TimerService"]
    service.services[0].services[0].stopService()
    options = parse("--keep-days", "0", "--db", str(tmp_path / "j.db"))
    without_pruning = makeService(options, reactor=MemoryReactorClock())
    assert [type(s).__name__ for s in without_pruning.services[0]] == [
        "SQLiteJobStore",
        "LocalRunner",
    ]
    without_pruning.services[0].services[0].stopService()


# --- end to end: twistd -n twistnet-http --------------------------------------------------------


def request(port, method, path, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def finished(port, job_id):
    def done():
        _, job = request(port, "GET", f"/jobs/{job_id}")
        return job if job["status"] not in ("queued", "running") else None

    return wait_until(done, interval=0.05)


def test_twistd_with_builtin_tools_runs_a_job_and_logs_requests_at_debug(twistd):
    server = twistd("twistnet-http", "--port", "0", "--log-level", "debug")
    port = server.port()
    server.wait_for_line("tools echo, sleep, date, wordcount")
    status, accepted = request(port, "POST", "/jobs", {"tool": "echo", "params": {"text": "hi"}})
    assert status == 202
    job = finished(port, accepted["id"])
    assert job["status"] == "succeeded" and job["output"] == "hi\n"
    server.wait_for_line(r"POST /jobs 202")
    assert server.terminate() == 0


SLOW_CONFIG = """
[tools.slow]
command = "sh -c 'echo $$; exec sleep 30'"

[tools.slowsafe]
command = "sleep 30"
retry_safe = true
"""


def test_restart_keeps_finished_jobs_marks_running_lost_and_runs_queued(twistd, tmp_path):
    (tmp_path / "tools.toml").write_text(SLOW_CONFIG)
    argv = ("--port", "0", "--workers", "1", "--config", "tools.toml", "--tool", "hi=echo hi")
    server = twistd("twistnet-http", *argv)
    port = server.port()
    done = request(port, "POST", "/jobs", {"tool": "hi"})[1]["id"]
    finished(port, done)
    running = request(port, "POST", "/jobs", {"tool": "slow"})[1]["id"]
    queued = request(port, "POST", "/jobs", {"tool": "hi"})[1]["id"]
    wait_until(lambda: request(port, "GET", f"/jobs/{running}")[1]["output"].strip())
    pgid = int(request(port, "GET", f"/jobs/{running}")[1]["output"])
    # A crash: nothing gets to clean up.
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    restarted = twistd("twistnet-http", *argv)
    port = restarted.port()
    assert finished(port, done)["output"] == "hi\n"
    lost = request(port, "GET", f"/jobs/{running}")[1]
    assert lost["status"] == "lost" and "stopped while the job ran" in lost["error"]
    assert finished(port, queued)["status"] == "succeeded"
    # The crashed job's process group was killed by the restart: no orphan.
    wait_until(lambda: group_gone(pgid))
    restarted.wait_for_line(f"killing its leftover process group {pgid}")
    assert restarted.terminate() == 0


def test_sigterm_with_a_running_job_exits_zero_and_requeues_a_safe_one(twistd, tmp_path):
    (tmp_path / "tools.toml").write_text(SLOW_CONFIG)
    server = twistd("twistnet-http", "--port", "0", "--config", "tools.toml")
    port = server.port()
    safe = request(port, "POST", "/jobs", {"tool": "slowsafe"})[1]["id"]
    unsafe = request(port, "POST", "/jobs", {"tool": "slow"})[1]["id"]
    wait_until(lambda: request(port, "GET", f"/jobs/{unsafe}")[1]["output"].strip())
    pgid = int(request(port, "GET", f"/jobs/{unsafe}")[1]["output"])
    assert server.terminate(timeout=15) == 0
    assert group_gone(pgid)
    restarted = twistd("twistnet-http", "--port", "0", "--config", "tools.toml")
    port = restarted.port()
    assert request(port, "GET", f"/jobs/{unsafe}")[1]["status"] == "lost"
    assert request(port, "GET", f"/jobs/{safe}")[1]["status"] in ("queued", "running")
    assert request(port, "DELETE", f"/jobs/{safe}")[1]["status"] == "cancelled"
    assert restarted.terminate() == 0


def test_token_from_the_environment_end_to_end(twistd):
    server = twistd("twistnet-http", "--port", "0", env={"TWISTNET_HTTP_TOKEN": "e2e-secret"})
    port = server.port()
    job = {"tool": "date"}
    assert request(port, "POST", "/jobs", job)[0] == 401
    assert request(port, "POST", "/jobs", job, token="nope")[0] == 401
    status, accepted = request(port, "POST", "/jobs", job, token="e2e-secret")
    assert status == 202
    assert finished(port, accepted["id"])["status"] == "succeeded"
    assert server.terminate() == 0
    assert "e2e-secret" not in server.output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "tcp:0"], "beyond loopback without a token"),
        (["--tool", "x={prog}"], "the program itself cannot be a parameter"),
        (["--db", "/nonexistent/dir/jobs.db"], "cannot open the job database"),
    ],
)
def test_refusals_at_start_are_one_clear_line(argv, message, tmp_path):
    result = run_twistd("twistnet-http", "--port", "0", *argv, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output
    assert "Traceback" not in output
