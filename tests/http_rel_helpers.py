"""
Helpers for the twistnet-http reliability and security tests: a live `twistd -n twistnet-http`
child, plain blocking HTTP against it, and the checks every hostile-input test repeats.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
from pathlib import Path

from helpers import WAIT_SECONDS, TwistdProcess, connect, recv_until_closed, wait_until

#: Log lines that must never appear however a client behaves.
TRACEBACK = re.compile(r"Traceback|Unhandled Error|Unhandled error in Deferred|CRITICAL|#critical")


class Live:
    """A running twistnet-http child and a tiny blocking client for it."""

    def __init__(self, process: TwistdProcess, token: str | None = None) -> None:
        self.process = process
        self.port = process.port()
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body=None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        token: str | None = None,
        timeout: float = WAIT_SECONDS,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body) of one request on a fresh connection."""
        headers = dict(headers or {})
        if body is not None:
            raw = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        token = token or self.token
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=raw, headers=headers)
            response = connection.getresponse()
            content = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, content
        finally:
            connection.close()

    def json(self, method: str, path: str, body=None, **kwargs) -> tuple[int, dict]:
        status, _, content = self.request(method, path, body, **kwargs)
        return status, json.loads(content)

    def submit(self, tool: str, params=None, **kwargs) -> str:
        document = {"tool": tool, "params": params or {}}
        status, accepted = self.json("POST", "/jobs", document, **kwargs)
        assert status == 202, accepted
        return accepted["id"]

    def job(self, job_id: str) -> dict:
        status, job = self.json("GET", f"/jobs/{job_id}")
        assert status == 200, job
        return job

    def finished(self, job_id: str, timeout: float = WAIT_SECONDS) -> dict:
        def done():
            job = self.job(job_id)
            return job if job["status"] not in ("queued", "running") else None

        return wait_until(done, timeout=timeout, interval=0.05)

    def raw(self, data: bytes, timeout: float = WAIT_SECONDS) -> bytes:
        """Send raw bytes and return everything until the server closes."""
        with connect(self.port, timeout=timeout) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return recv_until_closed(sock, timeout)

    def healthy(self) -> bool:
        status, _, content = self.request("GET", "/healthz", token=None)
        return status == 200 and json.loads(content)["status"] == "ok"

    def assert_no_traceback(self) -> None:
        output = self.process.output
        found = TRACEBACK.search(output)
        assert found is None, f"the log shows {found.group()!r}:\n{output[-3000:]}"


def parse_raw_response(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one raw HTTP/1.1 response (not chunked)."""
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_json_error(status: int, headers: dict[str, str], body: bytes, *expected: int) -> dict:
    """A clean error: one of the C{expected} statuses, JSON with exactly error and detail."""
    assert status in expected, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    document = json.loads(body)
    assert set(document) == {"error", "detail"}, document
    assert all(isinstance(value, str) and value for value in document.values()), document
    return document


def process_group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group C{pgid}."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
        fields = stat.rpartition(")")[2].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def descendants(pid: int) -> list[int]:
    """Pids of every live process descended from C{pid}."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def open_sockets(port: int, count: int, deadline: float) -> list[socket.socket]:
    """Up to C{count} connections to C{port}, non-blocking, opened before C{deadline}."""
    opened = []
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect_ex(("127.0.0.1", port))
        except OSError:
            sock.close()
            break
        opened.append(sock)
    return opened


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


#: Every server start_live started, so a failing test cannot leave one running.
STARTED: list[TwistdProcess] = []


def start_live(directory, *args: str, token: str | None = None, env=None) -> Live:
    """`twistd -n twistnet-http --port 0 ARGS` in C{directory}, with C{--token} if given."""
    argv = [*([] if "--listen" in args else ["--port", "0"]), *args]
    if token is not None:
        argv += ["--token", token]
    process = TwistdProcess("twistnet-http", *argv, cwd=directory, env=env)
    STARTED.append(process)
    return Live(process, token)


def stop_leftovers() -> None:
    """Kill every server start_live started that is still running (a test failed early)."""
    while STARTED:
        process = STARTED.pop()
        if process.proc.poll() is None:
            process.kill()
