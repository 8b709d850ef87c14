"""Prometheus metrics: the collectors on fakes, then real services scraped after real traffic."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_log_udp import FailingWriter, datagram_protocol
from twisted.application.service import MultiService
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from helpers import connect, recv_exactly, recv_until, recv_until_closed, wait_until
from http_rel_helpers import start_live
from log_helpers import start_log_server
from twistnet import echo
from twistnet._connections import EVICTION_GRACE_SECONDS, ManagedFactory, ManagedProtocol
from twistnet.chat.tap import Options as ChatOptions
from twistnet.log import Options as LogOptions
from twistnet.log.metrics import LogMetrics
from twistnet.log.sink import RETRY_SECONDS
from twistnet.metrics import ServiceMetrics, add_metrics_service, service_registry

LOOPBACK = "tcp:0:interface=127.0.0.1"


def parse(text: str) -> dict[tuple, float]:
    """Every sample of a scrape, keyed by (name, (label, value), ...)."""
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def figure(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples[(name, *sorted(labels.items()))]


def collected(*collectors) -> dict[tuple, float]:
    return parse(generate_latest(service_registry(*collectors)).decode())


# --- collectors on fakes --------------------------------------------------------------------


class Quiet(ManagedProtocol):
    def dataReceived(self, data: bytes) -> None:
        self.spoke()


class QuietFactory(ManagedFactory):
    protocol = Quiet


def arrive(factory, port: int):
    address = IPv4Address("TCP", "127.0.0.1", port)
    proto = factory.buildProtocol(address)
    proto.makeConnection(StringTransport(peerAddress=address))
    return proto


def test_collector_counts_admissions_evictions_refusals_and_closes_by_reason():
    clock = task.Clock()
    factory = QuietFactory(max_connections=2, idle_timeout=60, clock=clock)
    worker = arrive(factory, 1)
    worker.dataReceived(b"x")
    silent = arrive(factory, 2)
    clock.advance(EVICTION_GRACE_SECONDS * 2)
    newcomer = arrive(factory, 3)  # the silent one makes room
    refused = arrive(factory, 4)  # the newcomer has not waited long enough to be evicted
    silent.connectionLost(None)
    refused.connectionLost(None)
    clock.advance(61)  # worker and newcomer idle out
    for proto in (worker, newcomer):
        proto.connectionLost(None)
    samples = collected(ServiceMetrics(factory))
    assert figure(samples, "twistnet_connections_accepted_total") == 3
    assert figure(samples, "twistnet_connections_refused_total", reason="max_connections") == 1
    assert figure(samples, "twistnet_connections_closed_total", reason="evicted") == 1
    assert figure(samples, "twistnet_connections_closed_total", reason="idle") == 2
    assert figure(samples, "twistnet_connections_closed_total", reason="normal") == 0
    assert figure(samples, "twistnet_connections_open") == 0
    assert figure(samples, "twistnet_connections_max") == 2
    factory.stopFactory()
    assert clock.getDelayedCalls() == []


def test_shutdown_is_the_reason_of_connections_closed_by_a_stop():
    clock = task.Clock()
    factory = QuietFactory(clock=clock)
    protos = [arrive(factory, n) for n in range(3)]
    factory.registry.close_all()
    for proto in protos:
        proto.connectionLost(None)
    samples = collected(ServiceMetrics(factory))
    assert figure(samples, "twistnet_connections_closed_total", reason="shutdown") == 3
    assert figure(samples, "twistnet_connections_open") == 0
    assert clock.getDelayedCalls() == []


def test_log_collector_counts_disk_full_pauses_and_dropped_datagrams(tmp_path):
    writer = FailingWriter()
    datagrams, clock = datagram_protocol(tmp_path, writer=writer)
    factory = ManagedFactory(clock=clock)
    factory.sink, factory.truncated = datagrams.sink, 0
    datagrams.datagramReceived(b"first\n", ("127.0.0.1", 40000))
    writer.full = True
    datagrams.datagramReceived(b"held\n", ("127.0.0.1", 40000))  # pauses, held in memory
    datagrams.datagramReceived(b"lost\n", ("127.0.0.1", 40000))  # cannot wait: dropped
    paused = collected(LogMetrics(factory, datagrams))
    assert figure(paused, "twistnet_log_disk_full_pauses_total") == 1
    assert figure(paused, "twistnet_log_paused") == 1
    assert figure(paused, "twistnet_log_udp_dropped_datagrams_total") == 1
    assert figure(paused, "twistnet_log_written_bytes_total") == len(b"first\n")
    writer.full = False
    clock.advance(RETRY_SECONDS)
    resumed = collected(LogMetrics(factory, datagrams))
    assert figure(resumed, "twistnet_log_paused") == 0
    assert figure(resumed, "twistnet_log_written_bytes_total") == len(b"first\nheld\n")
    datagrams.stopProtocol()
    datagrams.sink.close()


@pytest.mark.parametrize("options", [echo.Options, ChatOptions, LogOptions])
def test_metrics_is_off_by_default_and_a_bad_description_is_a_usage_error(options):
    parsed = options()
    parsed.parseOptions([])
    assert parsed["metrics"] is None
    parsed = options()
    parsed.parseOptions(["--metrics", "tcp:9100:interface=127.0.0.1"])
    assert parsed["metrics"] == "tcp:9100:interface=127.0.0.1"
    with pytest.raises(usage.UsageError, match="--metrics 'tcpp:9100'"):
        options().parseOptions(["--metrics", "tcpp:9100"])


def test_metrics_on_every_interface_is_warned_about_and_loopback_is_not():
    reactor = MemoryReactor()
    with capturedLogs() as events:
        add_metrics_service(MultiService(), "twistnet-echo", "tcp:9101", [], reactor)
        add_metrics_service(
            MultiService(), "twistnet-echo", r"tcp:9102:interface=\:\:1", [], reactor
        )
    warnings = [formatEvent(event) for event in events if "all interfaces" in formatEvent(event)]
    assert len(warnings) == 1 and "tcp:9101" in warnings[0]


def test_echo_service_listens_for_metrics_only_when_asked():
    for args, listeners in (([], 1), (["--metrics", "tcp:9100:interface=127.0.0.1"], 2)):
        options = echo.Options()
        options.parseOptions(["--listen", LOOPBACK, *args])
        reactor = MemoryReactor()
        top = echo.makeService(options, reactor)
        top.privilegedStartService()
        top.startService()
        assert len(reactor.tcpServers) == listeners
        top.stopService()
    assert reactor.tcpServers[1][0] == 9100
    assert reactor.tcpServers[1][3] == "127.0.0.1"


# --- real services, scraped -----------------------------------------------------------------


def metrics_port(server) -> int:
    return int(server.wait_for_line(r"serving metrics on [^\s]+:(?P<port>\d+)").group("port"))


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def scrape_when(port: int, name: str, value: float, **labels: str) -> dict[tuple, float]:
    """The first scrape in which C{name} has reached C{value} (figures follow traffic)."""
    return wait_until(
        lambda: (samples := scrape(port)).get((name, *sorted(labels.items()))) == value and samples
    )


def test_echo_scrape_shows_connections_refusals_and_bytes(twistd):
    server = twistd(
        "twistnet-echo", "--listen", LOOPBACK, "--max-connections", "1", "--metrics", LOOPBACK
    )
    port, metrics = server.port(), metrics_port(server)
    with connect(port) as first:
        first.sendall(b"hello\n")
        assert recv_exactly(first, 6) == b"hello\n"
        with connect(port) as refused:
            assert recv_until_closed(refused) == b""
        first.sendall(b"x" * 10_000)
        recv_exactly(first, 10_000)
    # Released before the next one comes, or it too would be refused at the cap.
    scrape_when(metrics, "twistnet_connections_closed_total", 1, reason="normal")
    with connect(port) as second:
        second.sendall(b"bye\n")
        recv_exactly(second, 4)
    samples = scrape_when(metrics, "twistnet_connections_closed_total", 2, reason="normal")
    assert figure(samples, "twistnet_connections_accepted_total") == 2
    assert figure(samples, "twistnet_connections_refused_total", reason="max_connections") == 1
    assert figure(samples, "twistnet_connections_open") == 0
    assert figure(samples, "twistnet_received_bytes_total") == 6 + 10_000 + 4
    assert figure(samples, "twistnet_sent_bytes_total") == 6 + 10_000 + 4
    assert figure(samples, "process_resident_memory_bytes") > 0
    assert server.terminate() == 0


def test_chat_scrape_shows_refused_lines_and_disconnections_by_reason(twistd):
    server = twistd(
        "twistnet-chat",
        "--listen",
        LOOPBACK,
        "--metrics",
        LOOPBACK,
        "--max-clients",
        "2",
        "--max-line",
        "10",
        "--rate",
        "0",
        "--sendq",
        "4096",
    )
    port, metrics = server.port(), metrics_port(server)
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with hog, connect(port) as talker:
        recv_until(talker, lambda data: b"Welcome" in data)
        hog.connect(("127.0.0.1", port))
        hog.sendall(b"hi\n")  # so that it works and is not evicted for the third
        recv_until(talker, lambda data: b": hi" in data)
        talker.sendall(b"/nick tk\nfar more than ten bytes\nshort\n")
        recv_until(talker, lambda data: b"Line too long" in data)
        with connect(port) as third:
            assert b"room is full" in recv_until_closed(third)
        line = b"y" * 10 + b"\n"
        # Bounded: 20 MB at most, far more than kernel buffers plus the 4 KiB cap.
        for _ in range(2000):
            if "over --sendq" in server.output:
                break
            talker.sendall(line * 900)
        server.wait_for_line(r"over --sendq 4096")
        talker.sendall(b"/quit\n")
        recv_until_closed(talker)
    samples = scrape_when(metrics, "twistnet_connections_closed_total", 1, reason="quit")
    assert figure(samples, "twistnet_connections_closed_total", reason="sendq") == 1
    assert figure(samples, "twistnet_connections_accepted_total") == 2
    assert figure(samples, "twistnet_connections_refused_total", reason="max_connections") == 1
    assert figure(samples, "twistnet_lines_refused_total", reason="max_line") == 1
    assert figure(samples, "twistnet_received_lines_total") >= 1 + 3 + 900 + 1
    assert figure(samples, "twistnet_received_bytes_total") >= 900 * len(line)
    assert figure(samples, "twistnet_sent_bytes_total") > 0
    assert server.terminate() == 0


def test_log_scrape_shows_bytes_written_truncations_and_a_malformed_frame(twistd, tmp_path):
    server = start_log_server(
        twistd, tmp_path, "--metrics", LOOPBACK, "--max-line", "16", "--udp-port", "0"
    )
    metrics = metrics_port(server)
    with connect(server.tcp_port) as lines:
        lines.sendall(b"one\n" + b"z" * 40 + b"\ntwo\n")
        wait_until(lambda: b"two" in server.path.read_bytes())
    with connect(server.tcp_port) as frames:
        frames.sendall(b"5 <13>a")  # auto framing: octet-counted; then a length that is none
        frames.sendall(b"bc\nnot-a-length ")
        recv_until_closed(frames)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        udp.sendto(b"datagram\n", ("127.0.0.1", server.port("udp")))
        wait_until(lambda: b"datagram" in server.path.read_bytes())
    samples = scrape_when(metrics, "twistnet_connections_closed_total", 1, reason="malformed_frame")
    written = server.path.stat().st_size
    assert figure(samples, "twistnet_log_written_bytes_total") == written
    assert figure(samples, "twistnet_log_truncated_lines_total", input="tcp") == 1
    assert figure(samples, "twistnet_log_truncated_lines_total", input="udp") == 0
    assert figure(samples, "twistnet_log_udp_dropped_datagrams_total") == 0
    assert figure(samples, "twistnet_log_rotations_total") == 0
    assert figure(samples, "twistnet_connections_accepted_total") == 2
    assert figure(samples, "twistnet_received_bytes_total") == 4 + 41 + 4 + 7 + 16
    assert server.terminate() == 0


def test_http_scrape_shows_its_connection_figures(tmp_path):
    server = start_live(tmp_path, "--max-connections", "2")
    try:
        with connect(server.port), connect(server.port):
            # Both slots held by connections that have not waited a second yet: refused.
            with connect(server.port) as third:
                assert b"503" in recv_until_closed(third)
        status, _, _ = server.request("POST", "/jobs", raw=b"x" * (2 * 1024 * 1024))
        assert status == 413
        status, _, body = server.request("GET", "/metrics")
        assert status == 200
        samples = parse(body.decode())
        turned_away = figure(
            samples, "twistnet_connections_refused_total", reason="max_connections"
        ) + figure(samples, "twistnet_connections_closed_total", reason="evicted")
        assert turned_away == 1, "refused at the cap, or (on a stalled machine) made room"
        assert figure(samples, "twistnet_connections_closed_total", reason="max_body") == 1
        assert figure(samples, "twistnet_connections_accepted_total") >= 4
        assert figure(samples, "twistnet_connections_open") >= 1
        assert figure(samples, "twistnet_connections_max") == 2
        assert ("twistnet_sent_bytes_total",) not in samples
        assert server.process.terminate() == 0
    finally:
        server.process.kill()
