"""
twistnet-http without a token answers only for its IP addresses, localhost and the names of
--allowed-host (DNS-rebinding protection); with a token, any Host. Real `twistd -n` children,
raw HTTP requests.
"""

from __future__ import annotations

import re

import pytest

from helpers import wait_until
from http_rel_helpers import assert_json_error, parse_raw_response, start_live
from twistnet.http import tap

REBINDING = "evil.example"


def get(server, host: str, path: str = "/tools", method: str = "GET", body: bytes = b"") -> tuple:
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return parse_raw_response(server.raw(request + body))


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """No token (loopback), one name allowed."""
    server = start_live(tmp_path_factory.mktemp("hosts"), "--allowed-host", "jobs.example")
    yield server
    assert server.process.terminate() == 0
    server.assert_no_traceback()


@pytest.mark.parametrize("path", ["/tools", "/", "/healthz", "/jobs/0123"])
def test_a_rebinding_host_is_refused_with_a_json_400_naming_the_option(open_server, path):
    port = open_server.port
    status, headers, body = get(open_server, f"{REBINDING}:{port}", path)
    document = assert_json_error(status, headers, body, 400)
    assert document["error"] == "host not allowed"
    assert f"--allowed-host {REBINDING}" in document["detail"]


def test_a_refused_post_creates_no_job(open_server):
    before = open_server.json("GET", "/jobs")[1]["jobs"]
    body = b'{"tool": "echo", "params": {"text": "rebound"}}'
    status, _, _ = get(open_server, REBINDING, "/jobs", "POST", body)
    assert status == 400
    assert open_server.json("GET", "/jobs")[1]["jobs"] == before


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.1:{port}", "[::1]:{port}", "localhost", "localhost:{port}",
     "jobs.example:{port}", "JOBS.example"],
)  # fmt: skip
def test_ip_addresses_localhost_and_allowed_names_are_answered(open_server, host):
    status, _, body = get(open_server, host.format(port=open_server.port))
    assert status == 200, body
    assert b'"tools"' in body


def test_refusals_are_logged_for_the_operator_without_flooding(open_server):
    burst = 20
    for number in range(burst):
        assert get(open_server, f"flood{number}.example")[0] == 400
    line = open_server.process.wait_for_line(
        r"refused: Host not in --allowed-host: 127\.0\.0\.1:\d+ \(Host '[\w.:]+'\)"
    )
    assert line
    summarized = r"(\d+) more connections turned away in 1 s: \d+ refused: Host not in"

    def logged() -> int:
        output = open_server.process.output
        alone = len(re.findall(r"refused: Host not in --allowed-host: 127", output))
        return alone + sum(int(n) for n in re.findall(summarized, output))

    # Every refusal is counted, most in a summary line: fewer lines than refusals.
    assert wait_until(lambda: logged() >= burst)
    assert (
        len(re.findall(r"refused: Host not in --allowed-host: 127", open_server.process.output))
        < burst
    )


def test_with_a_token_any_host_is_answered(tmp_path):
    server = start_live(tmp_path, token="s3cret-token")
    try:
        assert get(server, REBINDING)[0] == 200
        status, _ = server.json("POST", "/jobs", {"tool": "echo", "params": {"text": "hi"}})
        assert status == 202
    finally:
        assert server.process.terminate() == 0


def test_allowed_host_options_are_parsed_and_checked():
    options = tap.Options()
    options.parseOptions(["--allowed-host", "Jobs.Example", "--allowed-host", "b.example"])
    assert options["allowed-host"] == ["jobs.example", "b.example"]
    with pytest.raises(Exception, match="--allowed-host: expected a host name"):
        tap.Options().parseOptions(["--allowed-host", "jobs.example:8901"])


def test_in_memory_a_refusal_is_logged_even_outside_a_job_site():
    from twisted.logger import capturedLogs

    from http_support import StubApi
    from twistnet._hosts import HostAllowList

    api = StubApi()  # its requests say Host: jobs.example
    assert api.call("GET", "/tools")[0] == 200  # no allow-list given: no check
    api.resource.hosts = HostAllowList()
    with capturedLogs() as events:
        status, _, body = api.call("GET", "/tools")
    assert status == 400 and b"--allowed-host jobs.example" in body
    assert any("(Host 'jobs.example')" in event.get("peer", "") for event in events)
    api.resource.hosts = HostAllowList(["jobs.example"])
    assert api.call("GET", "/tools")[0] == 200
