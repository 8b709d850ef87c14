"""
The figures of twistnet-log beyond its connections: what reached the file, rotations,
pauses on a full disk, and what UDP lost meanwhile; read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from twistnet.log.protocol import LineLogFactory
from twistnet.log.udp import DatagramLogProtocol


class LogMetrics:
    """Collector for the sink of C{factory} and, with C{--udp-port}, its datagram input."""

    def __init__(self, factory: LineLogFactory, datagrams: DatagramLogProtocol | None) -> None:
        self.factory = factory
        self.datagrams = datagrams

    def collect(self) -> Iterator[Metric]:
        sink = self.factory.sink
        yield CounterMetricFamily(
            "twistnet_log_written_bytes",
            "Bytes written to the log file (across rotations).",
            value=sink.bytes_written,
        )
        yield CounterMetricFamily(
            "twistnet_log_rotations", "Rotations by --rotate-bytes.", value=sink.rotations
        )
        yield CounterMetricFamily(
            "twistnet_log_disk_full_pauses",
            "Times writing failed (disk full) and reading from clients was paused.",
            value=sink.pauses,
        )
        yield GaugeMetricFamily(
            "twistnet_log_paused",
            "1 while writing fails and reading from clients is paused, else 0.",
            value=int(sink.blocked),
        )
        truncated = CounterMetricFamily(
            "twistnet_log_truncated_lines",
            "Lines and frames (tcp) or datagrams (udp) cut at --max-line.",
            labels=["input"],
        )
        truncated.add_metric(["tcp"], self.factory.truncated)
        if self.datagrams is not None:
            truncated.add_metric(["udp"], self.datagrams.truncated)
        yield truncated
        if self.datagrams is not None:
            yield CounterMetricFamily(
                "twistnet_log_udp_dropped_datagrams",
                "Datagrams dropped because the file could not be written (UDP cannot wait).",
                value=self.datagrams.drops.total,
            )
