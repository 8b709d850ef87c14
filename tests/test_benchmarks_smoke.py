"""The benchmark harness keeps working: a tiny echo run (no wrk, no socat needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def row(report: str, contender: str) -> list[str]:
    """The cells of C{contender}'s row in the first table that has one."""
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == contender:
            return cells
    raise AssertionError(f"no row for {contender!r} in:\n{report}")


def test_smoke_run_reports_twistnet_echo_and_its_ratio_to_wire_echo(tmp_path):
    output = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "echo", "--smoke", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = output.read_text()
    assert "## Machine" in report and "- cores:" in report
    ours = row(report, "twistnet-echo")
    assert re.fullmatch(r"[\d,]+", ours[1]), ours  # messages/s, measured
    assert int(ours[1].replace(",", "")) > 0
    theirs = row(report, "wire.Echo")
    assert re.fullmatch(r"\d+\.\d\dx", theirs[-2]), theirs  # twistnet ÷ wire.Echo
    assert "echo 1 KiB: twistnet >= 1.4x wire.Echo" in report
    assert "twistnet ÷ contender" in done.stdout
