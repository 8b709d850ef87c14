"""
The --redis benchmark runs end to end on a tiny load: the C load generator spreads its
clients over two servers, every line reaches every other client, and the figures are there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_redis_benchmark_measures_both_rooms_without_losing_a_line():
    if shutil.which("redis-server") is None or shutil.which("gcc") is None:
        pytest.fail("redis-server and gcc are needed (.ci/run installs them)")
    argv = [sys.executable, "-m", "benchmarks.chat_redis"]
    argv += ["--clients", "12", "--senders", "2", "--rate", "20", "--seconds", "1"]
    argv += ["--rounds", "1", "--idle", "10"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    for room in ("two servers, one Redis", "one in-memory server"):
        figures = results[room]
        assert figures["lost"] == 0, figures
        assert figures["samples"] > 0 and figures["latency_p99_ms"] >= figures["latency_p50_ms"]
        assert figures["deliveries_per_s"] > 0 and figures["cpu_ms_per_1k_deliveries"] > 0
    # With two servers only lines from the other server count: about half the samples.
    assert results["two servers, one Redis"]["samples"] < results["one in-memory server"]["samples"]
    assert results["saturated ratio (Redis / in-memory)"] > 0
