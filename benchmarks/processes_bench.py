"""
python -m benchmarks.processes_bench [--seconds S] [--rounds N] [--only echo|http] ...

``--processes N`` (issue 15) on this machine: twistnet with 2 processes side by side, in one
run of interleaved rounds, with 1 process and with the peers run as a user runs them on two
cores. Echo, 1 KiB request/response (the C echo client): twistnet-echo ``--processes 1`` and
``2``, and two uvloop echo processes on one port (``SO_REUSEPORT``). HTTP, GET of a finished
job (wrk): twistnet-http ``--processes 1`` and ``2`` on a private PostgreSQL with fsync on,
and a bare aiohttp handler under ``gunicorn -w 2 -k aiohttp.GunicornWebWorker``.

Each row: throughput, the CPU-seconds of the server processes (the whole process tree:
parent and children, or both peers; from /proc/PID/stat utime+stime), of PostgreSQL (its
whole tree, for twistnet-http: a GET reads the job from it; the aiohttp peer serves a fixed
body and reads nothing), of the load generator (getrusage of the reaped child), and server
CPU per message. Ratios are medians of per-round ratios. Loopback only; each measurement
bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.build import binary
from benchmarks.pg_cluster import check_durable, cpu_seconds, private_server
from benchmarks.processes import (
    PEERS,
    START_SECONDS,
    Missing,
    Server,
    free_port,
    python_peer,
    raise_fd_limit,
    require_module,
    require_tool,
)
from benchmarks.workloads import (
    SLACK_SECONDS,
    HttpState,
    JobServer,
    Settings,
    TwistdServer,
    wrk,
)

#: What a --processes child logs once its own listener is up (relayed by the parent).
SERVING = "serving 127.0.0.1:"
#: What gunicorn logs as each worker starts.
GUNICORN_WORKER = "Booting worker with pid"
#: The figures per measurement, in the table's order.
COLUMNS = (
    ("rate", "msgs/s", 0),
    ("server_cpu", "server CPU-s", 2),
    ("db_cpu", "db CPU-s", 2),
    ("load_cpu", "loadgen CPU-s", 2),
    ("server_us", "server CPU µs/msg", 1),
    ("server_db_us", "server+db CPU µs/msg", 1),
)


def wait_for_lines(server: Server, text: str, count: int) -> None:
    """Wait until C{text} appears C{count} times in C{server}'s log (each worker up)."""
    deadline = time.monotonic() + START_SECONDS
    while server.logpath.read_text(errors="replace").count(text) < count:
        if not server.alive() or time.monotonic() > deadline:
            server.stop()
            raise Missing(f"{server.name}: {count} x {text!r} never logged: {server.problem()}")
        time.sleep(0.05)


class Supervised(TwistdServer):
    """A twistnet service under twistd; with --processes N, started once all N serve."""

    def start(self) -> int:
        port = super().start()
        if "--processes" in self.argv:
            count = int(self.argv[self.argv.index("--processes") + 1])
            if count > 1:
                # The parent announces the port when it binds; the children listen after.
                wait_for_lines(self, SERVING, count)
        return port


class SupervisedJobServer(JobServer, Supervised):
    """twistnet-http, its first job submitted only once every child serves."""


def tree_cpu(servers: list[Server]) -> float:
    """CPU-seconds used so far by C{servers} and all their descendants still alive."""
    total = 0.0
    for server in servers:
        for pid in server._pids():
            try:
                total += cpu_seconds(pid)
            except OSError:  # gone since the tree was read
                continue
    return total


def postgres_cpu(postmaster: int) -> float:
    """
    CPU-seconds of a PostgreSQL server: the postmaster, its children (every backend and
    helper is one), and the children it has reaped (its cutime and cstime).
    """
    stat = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    for pid in [postmaster, *map(int, children)]:
        try:
            total += cpu_seconds(pid)
        except OSError:  # gone since the list was read
            continue
    return total


def reaped_children_cpu() -> float:
    """CPU-seconds of the children this process has waited for (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Contender:
    """One row: the processes that serve it, where, and its measurements per round."""

    name: str
    servers: list[Server]
    port: int
    path: str = ""
    twistnet_processes: int = 0
    #: Round number: what was measured in it.
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)

    def alive(self) -> bool:
        return all(server.alive() for server in self.servers)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def measure(
    contender: Contender, load: Callable[[], tuple[float, float]], postmaster: int | None
) -> dict[str, float]:
    """Run C{load} (returning messages/s and messages) and account the CPU it caused."""
    server_before, load_before = tree_cpu(contender.servers), reaped_children_cpu()
    db_before = postgres_cpu(postmaster) if postmaster else 0.0
    rate, messages = load()
    server_cpu = tree_cpu(contender.servers) - server_before
    db_cpu = postgres_cpu(postmaster) - db_before if postmaster else 0.0
    if not contender.alive():
        raise RuntimeError(f"{contender.name} exited during the run")
    per = 1e6 / max(messages, 1)
    return {
        "rate": rate,
        "server_cpu": server_cpu,
        "db_cpu": db_cpu,
        "load_cpu": reaped_children_cpu() - load_before,
        "server_us": server_cpu * per,
        "server_db_us": (server_cpu + db_cpu) * per,
    }


def echo_load(port: int, connections: int, size: int, seconds: float):
    """The C echo client for C{seconds}, counted from its first message (no warm-up)."""
    argv = [str(binary("echo_client")), str(port), str(connections), str(size)]
    argv += [str(int(seconds * 1000)), "0"]

    def run() -> tuple[float, float]:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + SLACK_SECONDS, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"echo client failed: {done.stderr.strip()[-300:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        return summary["msgs_per_s"], summary["messages"]

    return run


def http_load(port: int, path: str, settings: Settings):
    """wrk for C{settings.duration} (whole seconds, as wrk takes them)."""

    def run() -> tuple[float, float]:
        result = wrk(port, path, settings)
        if result["errors"]:
            raise RuntimeError(f"{result['errors']:.0f} failed requests")
        return result["requests_per_s"], result["requests_per_s"] * max(1, round(settings.duration))

    return run


# --- the contenders ---------------------------------------------------------------------------


def twistnet_echo(workdir: Path, processes: int) -> Contender:
    args = ("--max-connections", "0", "--processes", str(processes))
    server = Supervised("twistnet-echo", args, workdir / f"echo-p{processes}")
    port = server.start()
    return Contender(f"twistnet-echo --processes {processes}", [server], port, "", processes)


def uvloop_pair(workdir: Path) -> Contender:
    require_module("uvloop")
    port = free_port()
    servers = []
    for index in (1, 2):
        argv = python_peer("echo_uvloop_reuseport.py", str(port))
        servers.append(Server(f"uvloop-{index}", argv, workdir / "uvloop"))
        servers[-1].start()
    return Contender("uvloop x 2 (SO_REUSEPORT)", servers, port)


def twistnet_http(workdir: Path, state: HttpState, url: str, processes: int) -> Contender:
    server = SupervisedJobServer(state, workdir / f"http-p{processes}")
    # Later options win: the PostgreSQL database replaces the default's SQLite file.
    server.argv += ["--db", url, "--processes", str(processes)]
    port = server.start()
    name = f"twistnet-http --processes {processes}"
    return Contender(name, [server], port, server.job_path, processes)


def gunicorn_aiohttp(workdir: Path, state: HttpState) -> Contender:
    require_module("gunicorn")
    require_module("aiohttp")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "aiohttp.GunicornWebWorker"]
    argv += ["-b", f"127.0.0.1:{port}", "--chdir", str(PEERS), "http_aiohttp:gunicorn_app"]
    env = {"TWISTNET_JOB_JSON": str(state.body_file)}
    server = Server("gunicorn aiohttp", argv, workdir / "gunicorn", port=port, env=env)
    server.start()
    wait_for_lines(server, GUNICORN_WORKER, 2)
    return Contender("aiohttp, gunicorn -w 2", [server], port, state.job_path)


# --- running and reporting --------------------------------------------------------------------


def interleave(contenders: list[Contender], rounds: int, load_of, postmaster: int | None) -> None:
    for number in range(1, rounds + 1):
        for contender in contenders:
            try:
                measured = measure(contender, load_of(contender), postmaster)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
                print(f"   round {number} {contender.name}: {error}", flush=True)
                continue
            contender.rounds[number] = measured
            shown = ", ".join(f"{label} {measured[key]:.{d}f}" for key, label, d in COLUMNS)
            print(f"   round {number} {contender.name}: {shown}", flush=True)


def median(contender: Contender, key: str) -> float | None:
    values = [r[key] for r in contender.rounds.values()]
    return statistics.median(values) if values else None


def ratio(a: Contender, b: Contender, key: str) -> float | None:
    """The median of per-round ratios a/b (rounds measured back to back)."""
    pairs = [(a.rounds[n][key], b.rounds[n][key]) for n in a.rounds.keys() & b.rounds.keys()]
    pairs = [(x, y) for x, y in pairs if y]
    return statistics.median(x / y for x, y in pairs) if pairs else None


def table(title: str, unit: str, contenders: list[Contender]) -> dict:
    print(f"\n{title}")
    labels = [label.replace("msgs", unit) for _, label, _ in COLUMNS]
    print(f"  {'':32}" + "".join(f"{label:>22}" for label in labels))
    rows = {}
    for contender in contenders:
        figures = {key: median(contender, key) for key, _, _ in COLUMNS}
        rows[contender.name] = figures
        cells = "".join(
            f"{'-' if figures[key] is None else format(figures[key], f',.{d}f'):>22}"
            for key, _, d in COLUMNS
        )
        print(f"  {contender.name:32}{cells}")
    return rows


def ratios(contenders: list[Contender], cpu_key: str) -> dict:
    by_processes = {c.twistnet_processes: c for c in contenders if c.twistnet_processes}
    two, one = by_processes.get(2), by_processes.get(1)
    peers = [c for c in contenders if not c.twistnet_processes]
    found = {}
    if two and one:
        found[f"{two.name} / {one.name}: throughput"] = ratio(two, one, "rate")
        found[f"{two.name} / {one.name}: {cpu_key} (target <= 1.1)"] = ratio(two, one, cpu_key)
    for peer in peers if two else []:
        found[f"{two.name} / {peer.name}: throughput"] = ratio(two, peer, "rate")
        found[f"{two.name} / {peer.name}: server CPU per msg"] = ratio(two, peer, "server_us")
    for label, value in found.items():
        print(f"  {label}: {'-' if value is None else f'{value:.2f}x'}")
    return found


def start_each(makers: list[Callable[[], Contender]]) -> list[Contender]:
    started = []
    for make in makers:
        try:
            started.append(make())
        except Missing as error:
            print(f"   not measured: {error}", flush=True)
    return started


def run_echo(args, workdir: Path) -> dict:
    contenders = start_each(
        [
            lambda: twistnet_echo(workdir, 1),
            lambda: twistnet_echo(workdir, 2),
            lambda: uvloop_pair(workdir),
        ]
    )
    try:
        for contender in contenders:  # warm-up, not measured
            measure(contender, echo_load(contender.port, args.connections, 1024, args.warmup), None)
        interleave(
            contenders,
            args.rounds,
            lambda c: echo_load(c.port, args.connections, 1024, args.seconds),
            None,
        )
    finally:
        for contender in contenders:
            contender.stop()
    title = f"echo: {args.connections} connections x 1,024 B request/response, {args.seconds} s"
    rows = table(title, "msgs", contenders)
    return {"rows": rows, "ratios": ratios(contenders, "server_us")}


def run_http(args, workdir: Path) -> dict:
    require_tool("wrk", "apt-get install wrk")
    # Its own directory: as root, PostgreSQL runs as the postgres user, who must reach it.
    db_dir = Path(tempfile.mkdtemp(prefix="twistnet-pg-"))
    pg = private_server(db_dir)
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    state, contenders = HttpState(), []
    try:
        urls = [pg.create_database() for _ in range(2)]
        for url in urls:
            check_durable(url)
        contenders = start_each(
            [
                lambda: twistnet_http(workdir, state, urls[0], 1),
                lambda: twistnet_http(workdir, state, urls[1], 2),
                lambda: gunicorn_aiohttp(workdir, state),
            ]
        )
        warm = Settings(duration=args.warmup, http_connections=args.http_connections)
        timed = Settings(duration=args.seconds, http_connections=args.http_connections)
        for contender in contenders:
            measure(contender, http_load(contender.port, contender.path, warm), postmaster)
        interleave(contenders, args.rounds, lambda c: http_load(c.port, c.path, timed), postmaster)
    finally:
        for contender in contenders:
            contender.stop()
        pg.stop()
        shutil.rmtree(db_dir, ignore_errors=True)
    conns = args.http_connections
    title = f"http: GET /jobs/{{id}} of a finished job, {conns} connections (wrk), {args.seconds} s"
    rows = table(title, "req", contenders)
    return {"rows": rows, "ratios": ratios(contenders, "server_db_us")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="per contender, once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50, help="echo connections")
    parser.add_argument("--http-connections", type=int, default=50)
    parser.add_argument("--only", choices=("echo", "http"))
    args = parser.parse_args(argv)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="twistnet-processes-bench-"))
    results = {}
    try:
        if args.only in (None, "echo"):
            results["echo"] = run_echo(args, workdir)
        if args.only in (None, "http"):
            results["http"] = run_http(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
