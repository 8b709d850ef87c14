"""
--processes N, end to end: one parent twistd binds, N children serve the one port, a dead
child is replaced, SIGTERM ends them all, and no child outlives a SIGKILLed parent.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from redis_support import redis_server_fixture  # noqa: F401  (the redis_server fixture)

from chat_helpers import ChatClient
from helpers import (
    REACTOR_OPTIONS,
    TWISTD,
    connect,
    make_certificate,
    recv_exactly,
    recv_until_closed,
    run_twistd,
    tls_client,
    wait_until,
)

pytest_plugins = ["pg_support"]

LOCAL = "tcp:0:interface=127.0.0.1"


def child_pids(server, count: int) -> dict[int, int]:
    """{child index: pid} of the children started so far (the latest of each index)."""
    server.wait_for_line(rf"started child {count} \(pid \d+\)")
    pids = {}
    for match in re.finditer(r"started child (\d+) \(pid (\d+)\)", server.output):
        pids[int(match.group(1))] = int(match.group(2))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _owner(local_port: int, server_port: int, pids) -> int | None:
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        here, there = (int(a.split(":")[1], 16) for a in fields[1:3])
        if (here, there) == (server_port, local_port):
            inode = fields[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def serving_pid(client: socket.socket, server_port: int, pids) -> int | None:
    """
    Which process holds the server side of C{client}'s connection (by socket inode): a
    connection the kernel completed may wait a moment in the accept queue, so poll.
    """
    local_port = client.getsockname()[1]
    found: list[int] = []
    wait_until(lambda: found.append(_owner(local_port, server_port, pids)) or found[-1])
    return found[-1]


def echo_once(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def start(twistd, count: int = 2, *extra: str, listen: str = LOCAL):
    server = twistd("twistnet-echo", "--listen", listen, "--processes", str(count), *extra)
    server.tcp_port = server.port()
    server.pids = child_pids(server, count)
    for index in range(1, count + 1):
        server.wait_for_line(rf"\[child {index}\] .*twistnet-echo serving 127\.0\.0\.1:")
    return server


def test_two_children_share_one_port_and_both_serve(twistd):
    server = start(twistd)
    clients = [connect(server.tcp_port) for _ in range(40)]
    try:
        for sock in clients:
            assert echo_once(sock) == b"ping"
        owners = [serving_pid(sock, server.tcp_port, server.pids.values()) for sock in clients]
        counts = {pid: owners.count(pid) for pid in server.pids.values()}
        print(f"connections per child: {sorted(counts.values())}")
        assert None not in owners
        assert all(count > 0 for count in counts.values()), counts
        # The parent never accepts: every connection is a child's.
        assert sum(counts.values()) == len(clients)
    finally:
        for sock in clients:
            sock.close()
    assert server.terminate() == 0
    for pid in server.pids.values():
        wait_until(lambda pid=pid: not alive(pid))


def test_tls_on_two_processes_both_children_serve(twistd, tmp_path):
    key, cert = make_certificate(tmp_path)
    server = start(twistd, listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    server.wait_for_line(r"\[child 2\] .*twistnet-echo serving 127\.0\.0\.1:\d+ \(shared, ssl\)")
    clients = [tls_client(server.tcp_port, cert) for _ in range(30)]
    try:
        for sock in clients:
            assert echo_once(sock) == b"ping"
            assert sock.version() is not None  # a TLS session, not plain TCP
        owners = [serving_pid(sock, server.tcp_port, server.pids.values()) for sock in clients]
        assert None not in owners
        assert set(owners) == set(server.pids.values())
    finally:
        for sock in clients:
            sock.close()
    assert server.terminate() == 0


def test_tls_with_an_unreadable_key_is_refused_once_by_the_parent(tmp_path):
    _, cert = make_certificate(tmp_path)
    missing = tmp_path / "missing-key.pem"
    listen = f"ssl:0:interface=127.0.0.1:privateKey={missing}:certKey={cert}"
    result = run_twistd("twistnet-echo", "--listen", listen, "--processes", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"No such file or directory: '{missing}'" in output
    assert "started child" not in output and "Traceback" not in output


def test_a_killed_child_is_replaced_and_the_other_childs_clients_never_notice(twistd):
    server = start(twistd)
    clients = [connect(server.tcp_port) for _ in range(30)]
    for sock in clients:
        assert echo_once(sock) == b"ping"
    victim = server.pids[1]
    owners = [serving_pid(sock, server.tcp_port, server.pids.values()) for sock in clients]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_line(r"child 1 died \(signal SIGKILL\) after [\d.]+ s; restarting it in 0")
    server.wait_for_line(rf"started child 1 \(pid (?!{victim}\))\d+\)")
    for sock, owner in zip(clients, owners, strict=True):
        if owner != victim:
            assert echo_once(sock, b"still here") == b"still here"
        sock.close()
    with connect(server.tcp_port) as newcomer:
        assert echo_once(newcomer) == b"ping"
    assert server.terminate() == 0


def test_sigkill_of_the_parent_leaves_no_child_behind(twistd):
    server = start(twistd)
    server.proc.kill()
    server.proc.wait(10)
    for pid in server.pids.values():
        assert wait_until(lambda pid=pid: not alive(pid), timeout=10)


def test_a_second_instance_on_the_same_port_is_refused(twistd):
    server = start(twistd)
    port = server.tcp_port
    result = run_twistd(
        "twistnet-echo", "--listen", f"tcp:{port}:interface=127.0.0.1", "--processes", "2"
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stdout + result.stderr
    with connect(port) as sock:
        assert echo_once(sock) == b"ping"
    assert server.terminate() == 0


def test_daemon_mode_one_pidfile_the_parents(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            *(TWISTD, *REACTOR_OPTIONS, "--pidfile", "twistd.pid", "--logfile", "twistd.log"),
            "twistnet-echo",
            *("--listen", f"tcp:{port}:interface=127.0.0.1", "--processes", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "twistd.pid").read_text())
    log = tmp_path / "twistd.log"
    wait_until(lambda: log.read_text().count("twistnet-echo serving") == 2)
    children = [int(p) for p in re.findall(r"started child \d \(pid (\d+)\)", log.read_text())]
    with connect(port) as sock:
        assert echo_once(sock) == b"ping"
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not (tmp_path / "twistd.pid").exists())
    for child in children:
        wait_until(lambda child=child: not alive(child))
    assert "[child 1]" in log.read_text() and "[child 2]" in log.read_text()


@pytest.mark.parametrize(
    ("plugin", "argv", "message"),
    [
        ("twistnet-chat", [], "share it through Redis (--redis URL) or run one process"),
        ("twistnet-http", [], "use a PostgreSQL --db or run one process"),
        ("twistnet-log", [], "run one process per file"),
        ("twistnet-echo", ["--udp-port", "0"], "UDP echo is not shared between processes"),
        ("twistnet-echo", ["--listen", "unix:/tmp/x.sock"], "shares TCP and TLS listeners only"),
        ("twistnet-echo", ["--processes", "0"], "expected 1 or more processes"),
    ],
)
def test_processes_refused_where_they_cannot_work(plugin, argv, message):
    result = run_twistd(plugin, "--processes", "2", *argv)
    assert result.returncode == 1
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_auto_is_one_process_per_cpu():
    from twistnet._processes import process_count

    assert process_count("auto") == (os.cpu_count() or 1)
    assert process_count("3") == 3


def test_chat_on_two_processes_is_one_room_through_redis(twistd, redis_server):
    server = twistd(
        "twistnet-chat",
        "--listen",
        LOCAL,
        "--redis",
        redis_server.url,
        "--redis-ttl",
        "3",
        "--processes",
        "2",
    )
    port = server.port()
    pids = child_pids(server, 2)
    for index in (1, 2):
        server.wait_for_line(rf"\[child {index}\] .*chat room shared through Redis")
    clients, owners = [], []
    try:
        # Connect until two people sit on different children (the kernel spreads them).
        while len(set(owners)) < 2 and len(clients) < 40:
            client = ChatClient(port)  # returns once welcomed
            clients.append(client)
            owners.append(serving_pid(client.sock, port, pids.values()))
        assert len(set(owners)) == 2, owners
        speaker, listener = clients[0], clients[-1]
        speaker.send("hello across processes")
        assert b"hello across processes" in listener.wait_for(b"hello across processes")
        listener.send("and back")
        assert b"and back" in speaker.wait_for(b"and back")
    finally:
        for client in clients:
            client.close()
    assert server.terminate() == 0


def clients_on_every_child(port: int, pids: dict[int, int], make=connect, limit: int = 40):
    """Connections opened until each child serves at least one (the kernel spreads them)."""
    clients, owners = [], []
    while len(set(owners)) < len(pids) and len(clients) < limit:
        client = make(port)
        clients.append(client)
        owners.append(serving_pid(getattr(client, "sock", client), port, pids.values()))
    assert set(owners) == set(pids.values()), owners
    return clients, owners


def test_sigterm_drains_every_child_and_the_parent_exits_zero(twistd):
    server = start(twistd)
    clients, _ = clients_on_every_child(server.tcp_port, server.pids)
    try:
        for sock in clients:
            assert echo_once(sock) == b"ping"
        assert server.terminate() == 0
        for sock in clients:
            sock.settimeout(20)
            assert sock.recv(1) == b"", "an orderly close (FIN), not a reset"
    finally:
        for sock in clients:
            sock.close()
    for index in (1, 2):
        assert re.search(rf"child {index} exited \(exit status 0\)", server.output)
    assert "Traceback" not in server.output


def test_sigterm_tells_the_clients_of_every_child_goodbye(twistd, redis_server):
    server = twistd(
        *("twistnet-chat", "--listen", LOCAL, "--redis", redis_server.url),
        *("--redis-ttl", "3", "--processes", "2"),
    )
    port = server.port()
    pids = child_pids(server, 2)
    for index in (1, 2):
        server.wait_for_line(rf"\[child {index}\] .*chat room shared through Redis")
    clients, _ = clients_on_every_child(port, pids, ChatClient)
    try:
        assert server.terminate() == 0
        for client in clients:
            rest = client.received + recv_until_closed(client.sock)
            assert b"*** The server is shutting down. Goodbye.\r\n" in rest
    finally:
        for client in clients:
            client.close()
    for index in (1, 2):
        assert re.search(rf"child {index} exited \(exit status 0\)", server.output)


def test_sighup_to_the_parent_is_forwarded_and_keeps_the_clients_connected(twistd):
    server = start(twistd)
    clients, _ = clients_on_every_child(server.tcp_port, server.pids)
    try:
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_for_line(r"forwarded SIGHUP to 2 children")
        # Give the forwarded signal time to land, waiting on something that can be seen.
        with connect(server.tcp_port) as late:
            assert echo_once(late) == b"ping"
        for sock in clients:
            assert echo_once(sock, b"still here") == b"still here"
    finally:
        for sock in clients:
            sock.close()
    assert server.terminate() == 0


# --- twistnet-http on PostgreSQL --------------------------------------------------------------

TOOLS = """
[tools.once]
command = "sh -c 'echo $1 >> runs.txt; echo ran $1' once {{n}}"
cwd = "{cwd}"
"""


def http_call(port: int, method: str, path: str, body=None, pids=None):
    """One request on a fresh connection: status, JSON body, and the pid that answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, payload, {"content-type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read() or b"{}")
        # Asked once answered: a connection still in the accept queue has no owner yet.
        owner = serving_pid(connection.sock, port, pids) if pids else None
        return response.status, answer, owner
    finally:
        connection.close()


def test_http_on_two_processes_is_one_job_service_on_one_database(twistd, postgres_url, tmp_path):
    import psycopg

    (tmp_path / "tools.toml").write_text(TOOLS.format(cwd=tmp_path))
    server = twistd(
        *("twistnet-http", "--listen", LOCAL, "--db", postgres_url, "--config"),
        *(str(tmp_path / "tools.toml"), "--queue-size", "1000", "--processes", "2"),
    )
    port = server.port()
    pids = child_pids(server, 2)
    for index in (1, 2):
        server.wait_for_line(rf"\[child {index}\] .*twistnet-http serving 127\.0\.0\.1:")
    count = 60

    def submit(n: int) -> str:
        job = {"tool": "once", "params": {"n": str(n)}}
        status, body, _ = http_call(port, "POST", "/jobs", job)
        assert status == 202, body
        return body["id"]

    with ThreadPoolExecutor(3) as pool:  # new connections, spread over the children
        ids = list(pool.map(submit, range(count)))
    runs = tmp_path / "runs.txt"
    wait_until(lambda: runs.exists() and len(runs.read_text().split()) >= count, timeout=60)
    with psycopg.connect(postgres_url) as db:
        wait_until(
            lambda: (
                db.execute("SELECT count(*) FROM jobs WHERE status = 'succeeded'").fetchone()[0]
                == count
            ),
            timeout=30,
        )
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == count, "one database"
    assert sorted(map(int, runs.read_text().split())) == list(range(count)), "ran twice or never"
    answered_by = set()
    for n in range(count):
        status, body, owner = http_call(port, "GET", f"/jobs/{ids[n]}", pids=pids.values())
        assert status == 200 and body["output"] == f"ran {n}\n", body
        answered_by.add(owner)
    assert answered_by == set(pids.values()), "every child answers GETs of any job"
    assert server.terminate() == 0


def test_each_child_serves_its_own_metrics_on_the_next_port():
    """--metrics tcp:P under --processes 2: child 1 on P, child 2 on P + 1."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from helpers import TwistdProcess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    server = TwistdProcess(
        "twistnet-echo",
        *("--listen", LOCAL, "--processes", "2"),
        *("--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"),
    )
    try:
        port = server.port()
        pids = child_pids(server, 2)
        for index, expected in ((1, metrics_port), (2, metrics_port + 1)):
            server.wait_for_line(rf"\[child {index}\] .*serving metrics on 127\.0\.0\.1:{expected}")
        clients, _ = clients_on_every_child(port, pids)
        for sock in clients:
            assert echo_once(sock) == b"ping"
        accepted = 0
        for each in (metrics_port, metrics_port + 1):
            text = urllib.request.urlopen(f"http://127.0.0.1:{each}/metrics", timeout=10).read()
            for family in text_string_to_metric_families(text.decode()):
                if family.name == "twistnet_connections_accepted":
                    accepted += sum(sample.value for sample in family.samples)
        assert accepted == len(clients)
        for sock in clients:
            sock.close()
    finally:
        assert server.terminate() == 0
