"""A real redis-server for the chat tests: unix socket only, nothing persisted, stopped after."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from benchmarks.chat_redis import redis_argv
from helpers import wait_until


class RedisServer:
    """C{redis-server} on a unix socket in C{directory}; can be killed and started again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}?db=0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            redis_argv(self.socket, self.directory),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
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


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
