"""
Prometheus metrics for the TCP services (C{--metrics DESCRIPTION}, off by default): what
happened to their connections, read from the plain integers of
L{twistnet._connections.ConnectionCounts} when scraped, so the hot path never pays more than
an addition.

The page is rendered in the reactor thread: prometheus_client's own Twisted resource runs
the collectors in a thread pool (through WSGI), where they would read connection state the
reactor is changing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.web import resource, server

from twistnet import _processes
from twistnet._connections import ManagedFactory
from twistnet._tap import check_endpoint, listening_services

log = Logger()


def metrics_endpoint(description: str) -> str:
    return check_endpoint(description, "--metrics")


metrics_endpoint.coerceDoc = "A server endpoint description."  # type: ignore[attr-defined]


def metrics_option() -> list:
    """The C{--metrics} optParameter shared by echo, chat and log."""
    return [
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint, e.g. "
            "tcp:9100:interface=127.0.0.1; bind loopback or a private interface "
            "(off unless given)",
            metrics_endpoint,
        ]
    ]


class ServiceMetrics:
    """
    The connection figures of a L{ManagedFactory}, read at scrape time; with C{traffic},
    also the bytes its protocols count (twistnet-http counts requests instead).
    """

    def __init__(self, factory: ManagedFactory, traffic: bool = True) -> None:
        self.factory = factory
        self.traffic = traffic

    def collect(self) -> Iterator[Metric]:
        counts = self.factory.counts
        registry = self.factory.registry
        yield GaugeMetricFamily(
            "twistnet_connections_open", "Connections open now.", value=len(registry)
        )
        yield GaugeMetricFamily(
            "twistnet_connections_max",
            "The cap on connections open at once (0: no cap).",
            value=registry.max_connections,
        )
        yield CounterMetricFamily(
            "twistnet_connections_accepted",
            "Connections accepted since start.",
            value=counts.accepted,
        )
        yield _by_reason(
            "twistnet_connections_refused",
            "Connections turned away since start, by reason.",
            counts.refused,
            ["max_connections"],
        )
        yield _by_reason(
            "twistnet_connections_closed",
            "Connections gone since start, by why they were closed.",
            counts.closed,
            ["normal", "idle", "evicted", "shutdown"],
        )
        if not self.traffic:
            return
        yield CounterMetricFamily(
            "twistnet_received_bytes", "Bytes received from clients.", value=counts.bytes_in
        )
        yield CounterMetricFamily(
            "twistnet_sent_bytes", "Bytes sent to clients.", value=counts.bytes_out
        )


class LineMetrics:
    """The line figures of a line-oriented service (chat), read at scrape time."""

    def __init__(self, factory: ManagedFactory) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        counts = self.factory.counts
        yield CounterMetricFamily(
            "twistnet_received_lines",
            "Complete lines received from clients.",
            value=counts.lines_in,
        )
        yield _by_reason(
            "twistnet_lines_refused",
            "Lines received but not passed on, by reason.",
            counts.lines_refused,
            ["max_line", "rate"],
        )


def _by_reason(
    name: str, documentation: str, counts: dict[str, int], always: Iterable[str]
) -> CounterMetricFamily:
    """A counter by C{reason}; the C{always} reasons appear at 0 before they first happen."""
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason in sorted({*always, *counts}):
        family.add_metric([reason], counts.get(reason, 0))
    return family


def service_registry(*collectors: object) -> CollectorRegistry:
    """A registry of its own (not the global one) with C{collectors} and the process figures."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


class MetricsPage(resource.Resource):
    """C{generate_latest(registry)} as Prometheus' text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class MetricsSite(server.Site):
    """Serves only C{/metrics}, without an access log line per scrape."""

    noisy = False

    def __init__(self, registry: CollectorRegistry, reactor=None) -> None:
        root = resource.Resource()
        root.putChild(b"metrics", MetricsPage(registry))
        super().__init__(root, reactor=reactor)

    def log(self, request: server.Request) -> None:
        """A scrape every 15 s would otherwise add a line to the service's log each time."""


def add_metrics_service(
    parent: MultiService,
    name: str,
    description: str | None,
    collectors: Iterable[object],
    reactor=None,
) -> None:
    """
    Serve the metrics of C{collectors} on C{description} under C{parent}; nothing when
    C{description} is None (C{--metrics} not given).
    """
    if description is None:
        return
    description = _processes.own_endpoint(description)
    if description.startswith("tcp:") and "interface=" not in description:
        log.warn(
            "{service}: --metrics {description} listens on all interfaces: anyone who can "
            "reach it reads the metrics; add :interface=127.0.0.1",
            service=name,
            description=description,
        )
    site = MetricsSite(service_registry(*collectors), reactor)
    listening_services(name, [description], site, reactor, parent, serving="serving metrics on")
