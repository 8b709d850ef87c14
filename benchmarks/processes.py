"""Servers under test as child processes: started, located, measured from /proc, stopped."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PEERS = Path(__file__).parent / "peers"

#: How long a server may take to say where it listens (twistd imports a lot on a busy machine).
START_SECONDS = 60.0

#: How long a server may take to exit after SIGTERM before it is killed.
STOP_SECONDS = 10.0

_LISTENING = re.compile(r"listening on (?P<host>[\w.:\[\]-]+):(?P<port>\d+)")


class Missing(Exception):
    """A contender that cannot run here; the message says why (shown in the table)."""


def twistd_executable(service: str = "") -> str:
    """
    The twistd to run C{service} (e.g. C{twistnet-chat}) with: $TWISTNET_TWISTD_CHAT, else
    $TWISTNET_TWISTD, else the twistd installed beside this Python.
    """
    specific = "TWISTNET_TWISTD_" + service.removeprefix("twistnet-").upper() if service else ""
    return (
        (os.environ.get(specific) if specific else None)
        or os.environ.get("TWISTNET_TWISTD")
        or str(Path(sys.executable).parent / "twistd")
    )


def baseline_env(baseline: Path | None) -> dict[str, str] | None:
    """
    The environment that makes a child import twistnet, and find the twistnet_plugins
    plugin (Twisted scans C{twisted/plugins} on sys.path), from C{baseline} first.
    """
    if baseline is None:
        return None
    inherited = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([str(baseline), *([inherited] if inherited else [])])}


#: Run in a child with the baseline's environment: which files the plugin and each service's
#: module are loaded from, found the way twistd finds them (getPlugins, then the module).
_WHERE_FROM = """
import importlib, json, sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
import twisted.plugins.twistnet_plugins as plugins
files = {"plugin": plugins.__file__}
for name in sys.argv[1:]:
    if name not in makers:
        sys.exit(f"no twistd plugin {name}")
    files[name] = importlib.import_module(makers[name].module).__file__
print(json.dumps(files))
"""


def baseline_sources(baseline: Path, services: Sequence[str]) -> dict[str, str]:
    """
    Where the baseline's children load twistnet from: the plugin file and each service's
    module, checked to lie under C{baseline}. Raises C{ValueError} saying what does not.
    """
    root = baseline.resolve()
    # -P: like twistd, nothing from the working directory comes before PYTHONPATH.
    argv = [sys.executable, "-P", "-c", _WHERE_FROM, *services]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=START_SECONDS,
        check=False,
        cwd="/",
        env={**os.environ, **(baseline_env(root) or {})},
    )
    if done.returncode != 0:
        raise ValueError(f"cannot load twistnet from {baseline}: {done.stderr.strip()[-300:]}")
    files = json.loads(done.stdout)
    elsewhere = [
        f"{name} from {path}"
        for name, path in files.items()
        if root not in Path(path).resolve().parents
    ]
    if elsewhere:
        raise ValueError(f"not from {baseline}: " + "; ".join(elsewhere))
    return files


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise our soft RLIMIT_NOFILE (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    """A port free right now on 127.0.0.1, for programs that cannot be given port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_connectable(port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Server:
    """
    One server process. Its output goes to a log file (a pipe nobody drains would stall a
    server that logs every connection); the listening port is read from that log, or given.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        safe = re.sub(r"[^\w.-]", "_", name)
        self.logpath = workdir / f"{safe}.log"
        self.env = env
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.logpath, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env={**os.environ, **(self.env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_SECONDS
        if self.port is not None:
            try:
                wait_connectable(self.port, deadline)
            except OSError:
                self.stop()
                raise Missing(f"{self.name} did not accept connections: {self.tail()}") from None
            return self.port
        while True:
            match = _LISTENING.search(self.logpath.read_text(errors="replace"))
            if match:
                self.port = int(match.group("port"))
                return self.port
            if self.proc.poll() is not None:
                raise Missing(f"exited with status {self.proc.returncode}: {self.problem()}")
            if time.monotonic() > deadline:
                self.stop()
                raise Missing(f"did not say where it listens in {START_SECONDS:.0f}s")
            time.sleep(0.02)

    def tail(self, lines: int = 1) -> str:
        text = self.logpath.read_text(errors="replace").strip().splitlines()
        return " / ".join(line.strip() for line in text[-lines:]) or "(no output)"

    def problem(self) -> str:
        """The last line of the log that reads like an error, else its last line."""
        text = self.logpath.read_text(errors="replace").strip().splitlines()
        for line in reversed(text):
            if re.search(r"critical|error|Error|cannot|not available", line):
                return line.strip()[:300]
        return self.tail()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _pids(self) -> list[int]:
        """The server and its descendants (socat forks a child per connection)."""
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            parent = frontier.pop()
            children = Path(f"/proc/{parent}/task/{parent}/children")
            try:
                found = [int(pid) for pid in children.read_text().split()]
            except OSError:
                continue
            pids += found
            frontier += found
        return pids

    def rss_kib(self) -> int:
        """Resident memory of the server (and any children), in KiB."""
        total = 0
        for pid in self._pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmRSS:\s+(\d+)", status)
            total += int(match.group(1)) if match else 0
        return total

    def open_fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_SECONDS)


def require_tool(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Missing(f"{name} not found: {install_hint}")
    return path


def require_module(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Missing(f"Python module {module} missing: uv run --group bench ...")


def python_peer(script: str, *args: str) -> list[str]:
    return [sys.executable, str(PEERS / script), *args]
