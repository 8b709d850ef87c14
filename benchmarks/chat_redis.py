"""
python -m benchmarks.chat_redis [--clients 1000] [--senders 10] [--rate 20] [--seconds 10]

The chat shared through Redis (issue 13) against one in-memory server with the same clients:

- cross-server latency p50/p99 at SENDERS x RATE lines/s: the clients are spread over two
  C{twistnet-chat --redis} servers on one redis-server; each line carries its send time, and
  the probe clients on the I{other} server note when it arrives;
- saturated deliveries/s: the senders send as fast as a window of unacknowledged lines allows;
  every client counts the lines it receives;
- memory per idle client with --redis: RSS of one server before and after IDLE clients join.

One Python process drives all clients with C{selectors}; only the probes parse lines, the
rest count bytes, so the client is not what is measured at these rates. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.processes import Server, raise_fd_limit, twistd_executable

#: Every benchmark line has this length (with CR LF), so bytes received count deliveries.
LINE_BYTES = 64

#: Probe clients per server: enough samples, little parsing.
PROBES = 5

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
    def __init__(self, port: int, server: int, probe: bool, single: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.server = server
        self.probe = probe
        #: With one server every line counts; with two only lines from the other one.
        self.single = single
        self.received = 0
        self.buffer = b""
        self.latencies: list[float] = []

    def read(self) -> None:
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        self.received += len(data)
        if not self.probe:
            return
        now = time.perf_counter()
        lines = (self.buffer + data).split(b"\r\n")
        self.buffer = lines.pop()
        for line in lines:
            # "guest-N: BENCH <server> <sent time> xxx"
            at = line.find(b"BENCH ")
            if at >= 0:
                fields = line[at:].split()
                if self.single or int(fields[1]) != self.server:
                    self.latencies.append(now - float(fields[2]))


def bench_line(server: int) -> bytes:
    head = f"BENCH {server} {time.perf_counter():.6f} ".encode()
    return head + b"x" * (LINE_BYTES - len(head) - 2 - len("guest-NNNN: ")) + b"\r\n"


def pump(selector: selectors.BaseSelector, seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0:
        for key, _ in selector.select(min(left, 0.05)):
            key.data.read()


def connect_all(ports: list[int], clients: int) -> tuple[selectors.BaseSelector, list[Client]]:
    selector = selectors.DefaultSelector()
    everyone = []
    for i in range(clients):
        server = i % len(ports)
        client = Client(
            ports[server], server, probe=i // len(ports) < PROBES, single=len(ports) == 1
        )
        selector.register(client.sock, selectors.EVENT_READ, client)
        everyone.append(client)
        if i % 50 == 49:
            pump(selector, 0.01)
    pump(selector, 1.0)  # the join announcements settle
    return selector, everyone


def measure(ports: list[int], args) -> dict:
    selector, everyone = connect_all(ports, args.clients)
    senders = [c for c in everyone if not c.probe][: args.senders]
    for client in everyone:
        client.latencies.clear()
    interval = 1.0 / args.rate
    start = time.perf_counter()
    next_send = start
    while time.perf_counter() - start < args.seconds:
        if time.perf_counter() >= next_send:
            for sender in senders:
                sender.sock.send(bench_line(sender.server))
            next_send += interval
        pump(selector, max(0.0, min(next_send - time.perf_counter(), 0.01)))
    pump(selector, 1.0)
    samples = sorted(s * 1000 for c in everyone for s in c.latencies)
    # Saturation: each sender keeps sending; count received bytes over the window.
    before = sum(c.received for c in everyone)
    line = bench_line(0)
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for sender in senders:
            try:
                sender.sock.send(line * 8)
            except BlockingIOError:
                pass
        pump(selector, 0.001)
    elapsed = time.perf_counter() - start
    deliveries = (sum(c.received for c in everyone) - before) / LINE_BYTES / elapsed
    for client in everyone:
        selector.unregister(client.sock)
        client.sock.close()
    return {
        "latency_p50_ms": round(statistics.median(samples), 2) if samples else None,
        "latency_p99_ms": round(samples[int(len(samples) * 0.99) - 1], 2) if samples else None,
        "samples": len(samples),
        "deliveries_per_s": round(deliveries),
    }


def idle_memory(port: int, server: Server, clients: int) -> float:
    before = server.rss_kib()
    selector, everyone = connect_all([port], clients)
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
    parser.add_argument("--seconds", type=float, default=10.0)
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
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        ports = [server.start() for server in shared]
        results["two servers, one Redis"] = measure(ports, args)
        results["one in-memory server"] = measure([alone.start()], args)
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
    print(
        json.dumps({"settings": vars(args), "results": results, "cpus": os.cpu_count()}, indent=2)
    )


if __name__ == "__main__":
    main()
