"""
python -m benchmarks.chat_redis [--clients 1000] [--senders 10] [--rate 20] [--seconds 4]
    [--rounds 2]

The chat shared through Redis (issue 13) against one in-memory server with the same clients,
driven by the C load generator C{loadgen/chat_spread.c} (a Python client's own scheduling hid
the servers' latency), in interleaved rounds so a busy machine hurts both alike:

- cross-server latency p50/p99 at SENDERS x RATE lines/s: the clients are spread over two
  C{twistnet-chat --redis} servers on one redis-server; each line carries its send time and
  only lines from a sender on the I{other} server count (every line on one server);
- saturated deliveries/s: the senders send as fast as a window of lines allows, and the
  CPU-seconds per thousand deliveries of the chat servers and of redis-server;
- memory per idle client with --redis: RSS of one server before and after IDLE clients join.

Loopback only; each run is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.build import binary
from benchmarks.processes import Server, raise_fd_limit, twistd_executable

#: Every benchmark line has this length (with CR LF).
LINE_BYTES = 64

#: Limits set where honest benchmark senders never trip them (as benchmarks/README.md says).
LIMITS = ("--rate", "100000", "--burst", "100000", "--max-clients", "20000")


def redis_argv(sock: Path, directory: Path) -> list[str]:
    """A redis-server for the chat: unix socket only, nothing persisted, never evicting."""
    return [
        "redis-server",
        *("--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"),
        *("--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"),
        *("--dir", str(directory)),
    ]


class Client:
    """An idle chat client that drains what it is sent (for the memory figure)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)

    def read(self) -> None:
        try:
            self.sock.recv(262144)
        except BlockingIOError:
            return


def pump(selector: selectors.BaseSelector, seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0:
        for key, _ in selector.select(min(left, 0.05)):
            key.data.read()


def connect_all(port: int, clients: int) -> tuple[selectors.BaseSelector, list[Client]]:
    selector = selectors.DefaultSelector()
    everyone = []
    for i in range(clients):
        client = Client(port)
        selector.register(client.sock, selectors.EVENT_READ, client)
        everyone.append(client)
        if i % 50 == 49:
            pump(selector, 0.01)
    pump(selector, 1.0)  # the join announcements settle
    return selector, everyone


#: Saturated senders keep at most this many lines ahead of what the observer has seen.
WINDOW = 200


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spread(ports: list[int], args, rate: int, pids: list[int]) -> dict:
    """
    One C{chat_spread} run; adds the CPU-seconds the servers (and Redis) spent while the
    senders sent (the joins before are not counted).
    """
    argv = [
        str(binary("chat_spread")),
        ",".join(map(str, ports)),
        str(args.clients),
        str(args.senders),
        str(rate),
        str(int(args.seconds)),
        str(LINE_BYTES),
        str(WINDOW),
        "300",
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        phases = {}
        for line in run.stderr:
            if line.strip() in ("sending", "stopped"):
                phases[line.strip()] = [cpu_seconds(pid) for pid in pids]
        out, err = run.communicate(timeout=120 + args.seconds)
    if run.returncode != 0 or len(phases) != 2 or not out.strip():
        raise SystemExit(f"chat_spread failed ({run.returncode}): {err.strip()[:300]}")
    result = json.loads(out)
    spent = [b - a for a, b in zip(phases["sending"], phases["stopped"], strict=True)]
    result["cpu_s"] = [round(x, 2) for x in spent]
    delivered = result["deliveries_per_s"] * result["seconds"]
    result["cpu_ms_per_1k_deliveries"] = round(sum(spent) * 1e6 / max(1.0, delivered), 4)
    return result


def summary(runs: list[dict]) -> dict:
    """The median run of several (by the figure each kind of run is for)."""
    paced = sorted((r for r in runs if r["rate"]), key=lambda r: r["p99_ms"])
    flat = sorted((r for r in runs if not r["rate"]), key=lambda r: r["deliveries_per_s"])
    out = {}
    if paced:
        mid = paced[len(paced) // 2]
        out.update(
            latency_p50_ms=mid["p50_ms"],
            latency_p99_ms=mid["p99_ms"],
            samples=mid["samples"],
            lost=mid["expected"] - mid["delivered"],
            paced_cpu_s=mid["cpu_s"],
            paced_loadgen_cpu_s=mid["loadgen_cpu_s"],
        )
    if flat:
        mid = flat[len(flat) // 2]
        out.update(
            deliveries_per_s=round(mid["deliveries_per_s"]),
            cpu_ms_per_1k_deliveries=mid["cpu_ms_per_1k_deliveries"],
            cpu_s=mid["cpu_s"],
            loadgen_cpu_s=mid["loadgen_cpu_s"],
        )
    return out


def idle_memory(port: int, server: Server, clients: int) -> float:
    before = server.rss_kib()
    selector, everyone = connect_all(port, clients)
    pump(selector, 2.0)
    after = server.rss_kib()
    for client in everyone:
        selector.unregister(client.sock)
        client.sock.close()
    return round((after - before) / clients, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chat_redis")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20.0, help="lines/s per sender")
    parser.add_argument("--seconds", type=float, default=4.0, help="per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--runs", action="store_true", help="print every run, not medians")
    parser.add_argument("--idle", type=int, default=1000, help="clients for the memory figure")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    raise_fd_limit(args.clients * 2 + args.idle + 1000)
    work = Path(tempfile.mkdtemp(prefix="chat-redis-bench-"))
    sock = work / "redis.sock"
    redis = subprocess.Popen(redis_argv(sock, work), stdout=subprocess.DEVNULL)
    twistd = twistd_executable("twistnet-chat")
    listen = ("--listen", "tcp:0:interface=127.0.0.1:backlog=4096")
    shared: list[Server] = [
        Server(
            f"redis-{i}",
            [
                twistd,
                "-n",
                "--pidfile=",
                "twistnet-chat",
                *listen,
                *LIMITS,
                "--redis",
                f"unix://{sock}?db=0",
            ],
            work / f"s{i}",
        )
        for i in range(2)
    ]
    alone = Server(
        "memory", [twistd, "-n", "--pidfile=", "twistnet-chat", *listen, *LIMITS], work / "alone"
    )
    results = {}
    runs: dict[str, list[dict]] = {"redis": [], "memory": []}
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        ports = [server.start() for server in shared]
        redis_pids = [server.pid for server in shared] + [redis.pid]
        alone_port = alone.start()
        for _ in range(args.rounds):
            for rate in (int(args.rate), 0):
                runs["redis"].append(spread(ports, args, rate, redis_pids))
                runs["memory"].append(spread([alone_port], args, rate, [alone.pid]))
        results["two servers, one Redis"] = summary(runs["redis"])
        results["one in-memory server"] = summary(runs["memory"])
        results["saturated ratio (Redis / in-memory)"] = round(
            results["two servers, one Redis"]["deliveries_per_s"]
            / results["one in-memory server"]["deliveries_per_s"],
            3,
        )
        # On a fresh server: one that served the runs above has memory to reuse.
        fresh = Server("redis-idle", shared[0].argv, work / "idle")
        shared.append(fresh)
        results["KiB per idle client (--redis)"] = idle_memory(fresh.start(), fresh, args.idle)
    finally:
        for server in (*shared, alone):
            server.stop()
        redis.terminate()
        redis.wait()
        shutil.rmtree(work, ignore_errors=True)
    if args.runs:
        results["runs"] = runs
    print(
        json.dumps({"settings": vars(args), "results": results, "cpus": os.cpu_count()}, indent=2)
    )


if __name__ == "__main__":
    main()
