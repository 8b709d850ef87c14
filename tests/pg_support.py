"""
A real PostgreSQL for the tests: C{initdb} into a temporary directory, started with no TCP
(a unix socket in that directory only) and C{fsync=off} (tests need speed, not durability),
stopped at teardown. Each test gets a fresh database on the one server.

PostgreSQL refuses to run as root, so as root the server runs as the C{postgres} user in a
directory that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

#: Where Debian puts the server binaries (not on PATH), newest version last.
BIN_GLOB = "/usr/lib/postgresql/*/bin"
USER = "twistnet"


def binaries() -> Path | None:
    """The directory of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob(BIN_GLOB), key=lambda path: int(Path(path).parent.name))
    if found:
        return Path(found[-1])
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """One PostgreSQL server in C{directory}, reached by its unix socket there."""

    def __init__(self, directory: Path, bindir: Path, durable: bool = False) -> None:
        self.directory = directory
        self.bindir = bindir
        #: fsync on (benchmarks that report durable figures); tests run with it off.
        self.durable = durable
        self.data = directory / "data"
        self.log = directory / "server.log"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)

    def init(self) -> None:
        nosync = [] if self.durable else ["--no-sync"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, *nosync)

    def start(self) -> None:
        fsync = "on" if self.durable else "off"
        options = (
            f"-c listen_addresses='' -k {self.directory} -c fsync={fsync} -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        """Stop at once (as a crash would) and start again."""
        self.stop("immediate")
        self.start()

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@/{database}?host={self.directory}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = "t" + uuid.uuid4().hex[:12]
        self._run("psql", "-h", str(self.directory), "-U", USER, "-d", "postgres", "-qc",
                  f"CREATE DATABASE {name}")  # fmt: skip
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the whole session, or a skip when it is not installed."""
    bindir = binaries()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs the Debian package)")
    directory = Path(tempfile.mkdtemp(prefix="twistnet-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = PostgresServer(directory, bindir)
    server.init()
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a fresh database on the session's server."""
    return postgres_server.create_database()
