"""
twistd's daemon mode, as an operator runs it: `twistd --pidfile P --logfile L SERVICE ...`
returns at once, leaves a pidfile, and `kill $(cat P)` stops it; a start-up refusal is one
readable line on the terminal, a non-zero exit, and no pidfile left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from helpers import REACTOR_OPTIONS, TWISTD, connect, recv_exactly, wait_until


def service_args(plugin: str, tmp_path, port: int) -> list[str]:
    listen = ["--listen", f"tcp:{port}:interface=127.0.0.1"]
    extra = {
        "twistnet-log": ["--file", str(tmp_path / "lines.log")],
        "twistnet-http": ["--db", str(tmp_path / "jobs.db")],
    }
    return [plugin, *listen, *extra.get(plugin, [])]


def daemon(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TWISTD, *REACTOR_OPTIONS, "--pidfile", "twistd.pid", "--logfile", "twistd.log", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "plugin", ["twistnet-echo", "twistnet-chat", "twistnet-log", "twistnet-http"]
)
def test_daemon_start_on_a_busy_port_says_so_and_leaves_no_pidfile(tmp_path, plugin):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = daemon(tmp_path, *service_args(plugin, tmp_path, port))
    assert result.returncode == 1
    assert result.stderr == (
        f"{plugin}: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use\n"
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "twistd.pid").exists()
    assert not (tmp_path / "lines.log").exists()


def test_daemon_serves_until_killed_by_its_pidfile(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = daemon(tmp_path, *service_args("twistnet-echo", tmp_path, port))
    assert result.returncode == 0, result.stderr
    pidfile = tmp_path / "twistd.pid"
    pid = int(pidfile.read_text())
    try:
        with connect(port) as sock:
            sock.sendall(b"daemon")
            assert recv_exactly(sock, 6) == b"daemon"
    finally:
        os.kill(pid, signal.SIGTERM)  # kill $(cat twistd.pid)
    wait_until(lambda: not pidfile.exists())
    log = (tmp_path / "twistd.log").read_text()
    assert f"twistnet-echo listening on 127.0.0.1:{port}" in log
    assert "received SIGTERM, shutting down" in log
