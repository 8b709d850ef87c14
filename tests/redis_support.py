"""A real redis-server for the chat tests: unix socket only, nothing persisted, stopped after."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from benchmarks.chat_redis import redis_argv
from helpers import make_certificate, wait_until


class RedisServer:
    """C{redis-server} on a unix socket in C{directory}; can be killed and started again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}?db=0"
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return redis_argv(self.socket, self.directory)

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self.socket.exists)

    def kill(self) -> None:
        """Gone at once, its data with it (no persistence): what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-s", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()


class TlsRedisServer(RedisServer):
    """
    The same C{redis-server} also listening for TLS on a free loopback port, with a throwaway
    self-signed certificate for C{hostname} and 127.0.0.1 (C{ca} is the file to trust).
    """

    def __init__(self, directory: Path, hostname: str = "localhost") -> None:
        super().__init__(directory)
        self.key, self.ca = make_certificate(directory, hostname)
        self.tls_port = free_port()
        self.tls_url = f"rediss://localhost:{self.tls_port}/0"

    def argv(self) -> list[str]:
        return [
            *super().argv(),
            *("--bind", "127.0.0.1", "--tls-port", str(self.tls_port)),
            *("--tls-cert-file", str(self.ca), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"),
        ]

    def start(self) -> None:
        super().start()
        wait_until(lambda: _accepts(self.tls_port))


def free_port() -> int:
    """A loopback port free now (redis-server takes a number, not port 0 read back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _require_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")


@pytest.fixture(name="tls_redis_server")
def tls_redis_server_fixture(tmp_path_factory):
    _require_redis()
    server = TlsRedisServer(tmp_path_factory.mktemp("redis-tls"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path_factory):
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
