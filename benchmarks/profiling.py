"""
Profiles of the twistnet servers under load, taken with py-spy (the `bench` group) in an
extra run after the measured rounds, so sampling never disturbs a reported figure.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.processes import Server

#: Samples per second: enough for a profile of a few seconds, light on a 2-core machine.
RATE = 250


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile(server: Server, run: Callable[[], object], out: Path) -> tuple[str, Path] | None:
    """Run C{run} while py-spy samples C{server}; a top-functions summary and the raw file."""
    tool = py_spy()
    if tool is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".txt")
    spy = subprocess.Popen(
        [
            tool,
            "record",
            "--pid",
            str(server.pid),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
            err = "py-spy did not stop"
    if not raw.exists():
        return f"py-spy failed: {err.strip()[-200:]}", raw
    return summarize(raw.read_text()), raw


_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^)]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    short = "/".join(Path(path).parts[-2:]) if "site-packages" in path or "/" in path else path
    return f"{match.group('function')} ({short})"


def summarize(collapsed: str, top: int = 12) -> str:
    """Self and inclusive shares of the busiest functions in py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [_name(frame) for frame in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "no samples"
    lines = [f"{total} samples; self% incl% function (file)"]
    for function, samples in own.most_common(top):
        lines.append(
            f"{100 * samples / total:5.1f} {100 * inclusive[function] / total:5.1f}  {function}"
        )
    return "\n".join(lines)
