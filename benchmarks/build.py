"""The C load generators and the C echo peer, compiled on first use into benchmarks/.build/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from benchmarks.processes import Missing

HERE = Path(__file__).parent
BUILD = HERE / ".build"
SOURCES = {
    "echo_client": HERE / "loadgen" / "echo_client.c",
    "chat_client": HERE / "loadgen" / "chat_client.c",
    "chat_spread": HERE / "loadgen" / "chat_spread.c",
    "log_pusher": HERE / "loadgen" / "log_pusher.c",
    "idle_holder": HERE / "loadgen" / "idle_holder.c",
    "echo_epoll": HERE / "peers" / "echo_epoll.c",
}
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


def binary(name: str) -> Path:
    """The compiled program C{name}, rebuilt when its source or the shared header changed."""
    source = SOURCES[name]
    target = BUILD / name
    inputs = [source, HERE / "loadgen" / "common.h"]
    if target.exists() and target.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return target
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise Missing("no C compiler: apt-get install gcc")
    BUILD.mkdir(exist_ok=True)
    result = subprocess.run(
        [cc, *CFLAGS, "-I", str(HERE / "loadgen"), "-o", str(target), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise Missing(f"{source.name} did not compile: {result.stderr.strip()[:300]}")
    return target
