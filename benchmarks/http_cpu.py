"""
Server CPU per HTTP request: twistnet-http (GET of a finished job, GET /healthz) against the
bare twisted.web resource and aiohttp peers, under the same bounded wrk load, in paired rounds.

CPU-seconds per request (utime + stime from /proc before and after each run) barely moves
when other processes share the machine, unlike requests per second; both are printed.

    uv run --group bench python -m benchmarks.http_cpu --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

from benchmarks.processes import Missing, Server, python_peer, require_tool
from benchmarks.workloads import HttpState, JobServer, http_peer, parse_wrk

#: wrk connections: enough to keep one server core busy, few enough for a shared 2-core box.
CONNECTIONS = 32


def contenders(
    state: HttpState, workdir: Path, extra: tuple[str, ...], baseline: Path | None = None
) -> dict[str, Server]:
    """The servers, started: twistnet-http first (its finished job is what the peers serve)."""
    twistnet = JobServer(state, workdir / "twistnet")
    twistnet.argv += list(extra)
    servers: dict[str, Server] = {"twistnet-http": twistnet}
    stock = JobServer(state, workdir / "stock", twistd_options=("--reactor", "epoll"))
    stock.argv += list(extra)
    servers["twistnet-http (stock reactor)"] = stock
    if baseline is not None:
        before = JobServer(state, workdir / "before", baseline)
        before.argv += ["--max-requests", "20000", *extra]
        servers["twistnet-http (before)"] = before
    servers["bare twisted.web"] = http_peer("bare twisted.web", "http_twisted_web.py", state)(
        workdir / "web"
    )
    servers["bare twisted.web + httptools"] = Server(
        "bare twisted.web + httptools",
        # The body file is known once twistnet-http has started: the argv is filled in then.
        [],
        workdir / "httptools",
    )
    servers["bare aiohttp"] = http_peer("bare aiohttp", "http_aiohttp.py", state, "aiohttp")(
        workdir / "aiohttp"
    )
    started = {}
    for name, server in servers.items():
        if name == "bare twisted.web + httptools":
            script = ("http_twisted_web.py", "0", str(state.body_file), "httptools")
            server.argv = python_peer(*script)
        try:
            server.start()
            started[name] = server
        except Missing as missing:
            print(f"{name}: not measured ({missing})")
    return started


def load(port: int, path: str, seconds: int, connections: int) -> dict[str, float]:
    wrk = require_tool("wrk", "apt-get install wrk")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    done = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return parse_wrk(done.stdout)


def measure(server: Server, path: str, seconds: int, connections: int) -> tuple[float, float]:
    """Microseconds of server CPU per request, and requests per second."""
    before = server.cpu_seconds()
    result = load(server.port, path, seconds, connections)
    used = server.cpu_seconds() - before
    if result["errors"]:
        raise SystemExit(f"{server.name} {path}: {result['errors']:.0f} errors")
    requests = result["requests_per_s"] * seconds
    return used / requests * 1e6, result["requests_per_s"]


def report(figures: dict[str, list[tuple[float, float]]]) -> None:
    """Medians, and each case's CPU per request against the bare twisted.web of its round."""
    base = figures.get("bare twisted.web GET job") or figures.get("twistnet-http (before) GET job")
    for label, runs in figures.items():
        cpu = statistics.median(c for c, _ in runs)
        rate = statistics.median(r for _, r in runs)
        line = f"median {label:36} {cpu:7.1f} us/request {rate:9.0f} req/s"
        if base:
            ratios = [b / c for (c, _), (b, _) in zip(runs, base, strict=True)]
            line += f"  twisted.web CPU / this CPU, paired: {statistics.median(ratios):5.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.build/http_cpu"))
    parser.add_argument(
        "--twistnet-arg", action="append", default=[], help="one more twistnet-http option"
    )
    parser.add_argument("--skip", action="append", default=[], help="a contender to leave out")
    parser.add_argument("--no-healthz", action="store_true", help="GET of the job only")
    parser.add_argument(
        "--baseline", type=Path, help="an older checkout, measured as twistnet-http (before)"
    )
    options = parser.parse_args()
    state = HttpState()
    servers = contenders(
        state, options.workdir.resolve(), tuple(options.twistnet_arg), options.baseline
    )
    try:
        cases = []
        for name, server in servers.items():
            if name in options.skip:
                continue
            job = getattr(server, "job_path", state.job_path)
            cases.append((f"{name} GET job", server, job))
            if name.startswith("twistnet-http") and not options.no_healthz:
                cases.append((f"{name} GET /healthz", server, "/healthz"))
        for server in servers.values():  # warm up: imports, caches, the JIT-free first path
            load(server.port, getattr(server, "job_path", state.job_path), 1, options.connections)
        figures: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in cases}
        for round_ in range(options.rounds):
            for label, server, path in cases:
                figures[label].append(measure(server, path, options.duration, options.connections))
                cpu, rate = figures[label][-1]
                print(f"round {round_ + 1} {label:36} {cpu:7.1f} us/request {rate:9.0f} req/s")
        print()
        report(figures)
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
