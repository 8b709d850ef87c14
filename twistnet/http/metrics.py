"""
The Prometheus metrics of twistnet-http: jobs finished and their run times, requests
answered, and the queue as it stands when scraped.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from twistnet.http.model import Job

#: Methods counted by name; any other is counted as "other", so a client cannot grow the table.
_METHODS = frozenset({b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD", b"OPTIONS"})


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, runner: Any) -> None:
        self.registry = CollectorRegistry()
        #: Requests answered by (method, route, status): a plain dict, counted at no more
        #: cost than an addition per request, exported at scrape time.
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.finished = Counter(
            "twistnet_http_jobs_finished",
            "Jobs that reached a final state since start, by tool and status.",
            ["tool", "status"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "twistnet_http_job_duration_seconds",
            "Run time of finished jobs, by tool.",
            ["tool"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
            registry=self.registry,
        )
        self.registry.register(_LiveJobs(runner, self.requests))

    def job_finished(self, job: Job) -> None:
        self.finished.labels(job.tool, job.status).inc()
        if job.duration is not None:
            self.durations.labels(job.tool).observe(job.duration)

    def answered(self, method: bytes, template: str | None, status: int) -> None:
        """Count one response to C{method} on C{template} (None: no such route)."""
        name = method.decode() if method in _METHODS else "other"
        self.requests[(name, template or "unknown", str(status))] += 1


class _LiveJobs:
    """Jobs queued and running now, and the queue's capacity, read at scrape time."""

    def __init__(self, runner: Any, requests: collections.Counter) -> None:
        self.runner = runner
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "twistnet_http_requests",
            "HTTP requests answered, by method, route and status.",
            labels=["method", "route", "status"],
        )
        for labels, count in sorted(self.requests.items()):
            requests.add_metric(labels, count)
        yield requests
        jobs = GaugeMetricFamily(
            "twistnet_http_jobs", "Jobs queued or running now.", labels=["status"]
        )
        jobs.add_metric(["queued"], self.runner.queue_depth())
        jobs.add_metric(["running"], len(self.runner.active))
        yield jobs
        yield GaugeMetricFamily(
            "twistnet_http_queue_depth",
            "Jobs waiting for a worker.",
            value=self.runner.queue_depth(),
        )
        yield GaugeMetricFamily(
            "twistnet_http_queue_capacity", "The --queue-size.", value=self.runner.queue_size
        )
