"""
The HTTP face of twistnet-http: the JSON API resource, and the Site and channel that bound
what a client can hold (connections, request time, body size).

Every error is C{{"error": ..., "detail": ...}} with the status that says what went wrong.
A handler's unexpected exception is a 500 of the same shape and a log line; the server goes
on serving. Reads are open; requests that change state (POST, DELETE) need the Bearer token
when one is set, compared in constant time.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web import resource, server

from twistnet.http import openapi
from twistnet.http._logging import observer as log_observer
from twistnet.http.errors import ApiError, encode, error_body
from twistnet.http.model import STATUSES, Job, ParamError, Tool
from twistnet.http.runner import IRunner, QueueFull
from twistnet.http.store import MAX_LIMIT, IJobStore, StoreUnavailable

log = Logger(observer=log_observer)

#: Seconds between comments on an idle event stream, so a vanished client is noticed.
SSE_KEEPALIVE = 15.0
#: The most output one GET /jobs/{id}/log response carries.
LOG_CHUNK = 1024 * 1024
#: Rendered finished jobs kept for fast GET /jobs/{id}: a finished job never changes.
RENDERED_CACHE = 1024
#: The largest number a query (cursor, offset) or Last-Event-ID may carry: SQLite's
#: integers and file offsets are signed 64-bit.
MAX_QUERY_INT = 2**63 - 1
#: A cursor is a row number: 18 digits are plenty, and the document's pattern says so.
MAX_CURSOR = 10**18 - 1
#: Retry-After (seconds) when a new job could not be stored (a full disk, say).
STORE_RETRY_AFTER = 5
#: Job ids are made here (uuid4 hex); anything else in the path is simply not a job.
JOB_ID = re.compile(r"[0-9a-f]{32}")

_JSON = b"application/json"


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


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


class _LiveJobs:
    """Jobs queued and running now, and the queue's capacity, read at scrape time."""

    def __init__(self, runner: Any, requests: collections.Counter) -> None:
        self.runner = runner
        self.requests = requests

    def collect(self):
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


class JobApi(resource.Resource):
    """
    The whole API as one leaf resource: the routes of L{openapi.ROUTES}, dispatched on the
    request path, so an unknown path or method gets a JSON 404 or 405 like everything else.
    """

    isLeaf = True

    def __init__(
        self,
        store: IJobStore,
        runner: IRunner,
        tools: dict[str, Tool],
        token: bytes | None = None,
        clock=None,
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.store = store
        self.runner = runner
        self.tools = tools
        self.clock = clock
        # Digests: the constant-time comparison then also hides the length of the token.
        self._expected = hashlib.sha256(b"Bearer " + token).digest() if token else None
        self.metrics = Metrics(runner)
        runner.on_finished.append(self.metrics.job_finished)
        self._rendered: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._openapi = encode(openapi.document(tools.values(), token_required=bool(token)))
        self._tools = encode({"tools": [tool.describe() for tool in tools.values()]})
        self._routes: dict[str, dict[bytes, Callable[..., Any]]] = {
            "/jobs": {b"GET": self.list_jobs, b"POST": self.submit},
            "/jobs/{id}": {b"GET": self.get_job, b"DELETE": self.cancel},
            "/jobs/{id}/log": {b"GET": self.job_log},
            "/tools": {b"GET": self.list_tools},
            "/openapi.json": {b"GET": self.openapi},
            "/healthz": {b"GET": self.health},
            "/metrics": {b"GET": self.prometheus},
        }
        assert {
            path: tuple(m.decode() for m in methods) for path, methods in self._routes.items()
        } == dict(openapi.ROUTES)

    # --- dispatch -------------------------------------------------------------------------

    @staticmethod
    def route(segments: list[bytes]) -> tuple[str | None, list[str]]:
        """The route template for a path and its arguments (None: no such route)."""
        if len(segments) == 1:
            return _TOP_LEVEL.get(segments[0]), []
        if not segments or segments[0] != b"jobs":
            return None, []
        job_id = segments[1].decode("utf-8", "replace")
        if len(segments) == 2:
            return "/jobs/{id}", [job_id]
        if len(segments) == 3 and segments[2] == b"log":
            return "/jobs/{id}/log", [job_id]
        return None, []

    def render(self, request: server.Request) -> bytes | int:
        template, args = self.route(request.postpath)
        handlers = self._routes.get(template) if template else None
        try:
            if handlers is None:
                raise ApiError(404, "not found", "No such route; GET /openapi.json lists them.")
            handler = handlers.get(request.method)
            if handler is None:
                allowed = b", ".join(handlers)
                raise ApiError(
                    405,
                    "method not allowed",
                    f"{template} allows {allowed.decode()}.",
                    {b"allow": allowed},
                )
            result = handler(request, *args)
        except ApiError as failure:
            return self._error(request, template, failure)
        except Exception:
            log.failure(
                "handler for {method} {path} failed", method=request.method, path=request.path
            )
            return self._error(
                request, template, ApiError(500, "internal error", "The error is logged.")
            )
        if isinstance(result, defer.Deferred):
            result.addErrback(self._late_failure, request, template)
            return server.NOT_DONE_YET
        return self._ok(request, template, *result)

    def _count(self, request: server.Request, template: str | None, status: int) -> None:
        method = request.method.decode() if request.method in _METHODS else "other"
        self.metrics.requests[(method, template or "unknown", str(status))] += 1

    def _ok(self, request, template, body: bytes, content_type: bytes = _JSON, status: int = 200):
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        self._count(request, template, status)
        return body

    def _error(self, request, template, failure: ApiError) -> bytes:
        for name, value in failure.headers.items():
            request.setHeader(name, value)
        return self._ok(
            request, template, error_body(failure.error, failure.detail), status=failure.status
        )

    def _send(self, request, template, body: bytes, content_type: bytes = _JSON, status: int = 200):
        """Finish an asynchronous response, unless the client has gone."""
        if request.finished or request._disconnected:
            return
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(self._ok(request, template, body, content_type, status))
        request.finish()

    def _late_failure(self, failure, request, template) -> None:
        if failure.check(ApiError):
            error = failure.value
        else:
            log.failure(
                "handler for {method} {path} failed",
                failure,
                method=request.method,
                path=request.path,
            )
            error = ApiError(500, "internal error", "The error is logged.")
        if request.startedWriting:
            # A stream already under way cannot change its status: end it.
            if not (request.finished or request._disconnected):
                request.finish()
            return
        for name, value in error.headers.items():
            request.setHeader(name, value)
        self._send(request, template, error_body(error.error, error.detail), status=error.status)

    def _authorize(self, request: server.Request) -> None:
        if self._expected is None:
            return
        scheme, _, credentials = (request.getHeader(b"authorization") or b"").partition(b" ")
        # The scheme is case-insensitive (RFC 9110, section 11.1); the token is not.
        given = scheme.capitalize() + b" " + credentials
        # Constant time: the comparison must not reveal how much of a guess was right.
        if not hmac.compare_digest(hashlib.sha256(given).digest(), self._expected):
            raise ApiError(
                401,
                "unauthorized",
                "This request changes state: send Authorization: Bearer <token>.",
                {b"www-authenticate": b'Bearer realm="twistnet-http"'},
            )

    # --- jobs -----------------------------------------------------------------------------

    def submit(self, request: server.Request) -> defer.Deferred[None]:
        self._authorize(request)
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != _JSON:
            raise ApiError(
                415, "unsupported media type", "Send the job as Content-Type: application/json."
            )
        request.content.seek(0)
        document = _parse_json(request.content.read())
        if not isinstance(document, dict):
            raise ApiError(400, "bad request", "The body must be a JSON object.")
        unknown = set(document) - {"tool", "params", "timeout"}
        if unknown:
            raise ApiError(
                400,
                "bad request",
                f"Unknown field {sorted(unknown)[0]!r}; expected tool, params, timeout.",
            )
        name = document.get("tool")
        if not isinstance(name, str):
            raise ApiError(400, "bad request", "Field 'tool' is required and must be a string.")
        tool = self.tools.get(name)
        if tool is None:
            raise ApiError(404, "unknown tool", f"No tool named {name!r}; GET /tools lists them.")
        try:
            params = tool.validate(document.get("params", {}))
        except ParamError as error:
            raise ApiError(400, "bad parameter", str(error)) from None
        timeout = _timeout(document.get("timeout"), tool)
        job = Job(
            id=uuid.uuid4().hex,
            tool=tool.name,
            params=params,
            timeout=timeout,
            created=self.clock.seconds(),
        )

        def accepted(job: Job) -> None:
            location = f"/jobs/{job.id}"
            request.setHeader(b"location", location.encode())
            self._send(
                request,
                "/jobs",
                encode({"id": job.id, "status": job.status, "url": location}),
                status=202,
            )

        def refused(failure):
            if failure.check(StoreUnavailable):
                # Not stored (a full disk, a failing database): the job does not exist, and
                # the client may try again later; the operator gets the reason, once.
                log.error("could not store a new job: {error}", error=failure.getErrorMessage())
                raise ApiError(
                    503,
                    "store unavailable",
                    "The job could not be stored; try again later.",
                    {b"retry-after": str(STORE_RETRY_AFTER).encode()},
                )
            failure.trap(QueueFull)  # anything else is a bug: a 500 and a traceback in the log
            raise ApiError(
                429,
                "queue full",
                f"{self.runner.queue_size} jobs are waiting already; try again later.",
                {b"retry-after": str(failure.value.retry_after).encode()},
            )

        return self.runner.submit(job).addCallbacks(accepted, refused)

    def _job_or_404(self, job_id: str) -> defer.Deferred[Job]:
        if not JOB_ID.fullmatch(job_id):
            return defer.fail(ApiError(404, "unknown job", f"No job with id {job_id!r}."))

        def found(job: Job | None) -> Job:
            if job is None:
                raise ApiError(404, "unknown job", f"No job with id {job_id!r}.")
            return job

        return self.store.get(job_id).addCallback(found)

    def get_job(self, request: server.Request, job_id: str):
        rendered = self._rendered.get(job_id)
        if rendered is not None:
            return (rendered,)
        job = self.store.cached(job_id)
        if job is not None:
            return (self._render_job(job),)
        return self._job_or_404(job_id).addCallback(
            lambda job: self._send(request, "/jobs/{id}", self._render_job(job))
        )

    def _render_job(self, job: Job) -> bytes:
        output = self.store.read_output(job.id, 0, LOG_CHUNK).decode("utf-8", "replace")
        body = encode(job.to_json(output))
        if job.terminal:
            self._rendered[job.id] = body
            while len(self._rendered) > RENDERED_CACHE:
                self._rendered.popitem(last=False)
        return body

    def cancel(self, request: server.Request, job_id: str) -> defer.Deferred[None]:
        self._authorize(request)

        async def cancel() -> None:
            job = await self._job_or_404(job_id)
            if job.terminal:
                raise ApiError(409, "already finished", f"Job {job_id} has already {job.status}.")
            cancelled = await self.runner.cancel(job_id)
            if cancelled is None:
                raise ApiError(
                    409, "already finished", f"Job {job_id} is not queued or running here."
                )
            self._send(request, "/jobs/{id}", self._render_job(cancelled))

        return defer.Deferred.fromCoroutine(cancel())

    def list_jobs(self, request: server.Request) -> defer.Deferred[None]:
        args = request.args
        status = _query(args, b"status")
        if status is not None and status not in STATUSES:
            raise ApiError(400, "bad request", f"status must be one of {', '.join(STATUSES)}.")
        limit = _int_query(args, b"limit", 50, 1, MAX_LIMIT)
        cursor = _query(args, b"cursor")
        if cursor is not None and _whole_number(cursor, MAX_CURSOR) is None:
            raise ApiError(400, "bad request", "cursor must be the next_cursor of a previous page.")

        def page(found: tuple[list[Job], str | None]) -> None:
            jobs, next_cursor = found
            summaries = []
            for job in jobs:
                summary = job.to_json()
                del summary["output"]
                summaries.append(summary)
            self._send(request, "/jobs", encode({"jobs": summaries, "next_cursor": next_cursor}))

        return self.store.list(status, _query(args, b"tool"), limit, cursor).addCallback(page)

    def job_log(self, request: server.Request, job_id: str) -> defer.Deferred[None]:
        offset = _int_query(request.args, b"offset", 0, 0, MAX_QUERY_INT)
        streaming = b"text/event-stream" in (request.getHeader(b"accept") or b"")

        async def respond() -> None:
            job = await self._job_or_404(job_id)
            if streaming:
                resume = request.getHeader(b"last-event-id")
                start = _whole_number(resume.decode("latin-1"), MAX_QUERY_INT) if resume else None
                start = offset if start is None else start
                self._count(request, "/jobs/{id}/log", 200)
                EventStream(self, request, job, start).start()
                return
            data = self.store.read_output(job.id, offset, LOG_CHUNK)
            request.setHeader(b"x-next-offset", str(offset + len(data)).encode())
            request.setHeader(b"x-job-status", job.status.encode())
            self._send(request, "/jobs/{id}/log", data, b"text/plain; charset=utf-8")

        return defer.Deferred.fromCoroutine(respond())

    # --- the rest -------------------------------------------------------------------------

    def list_tools(self, request: server.Request):
        return (self._tools,)

    def openapi(self, request: server.Request):
        return (self._openapi,)

    def health(self, request: server.Request):
        return (
            encode(
                {
                    "status": "ok",
                    "queued": self.runner.queue_depth(),
                    "running": len(self.runner.active),
                    "workers": self.runner.workers,
                    "queue_size": self.runner.queue_size,
                }
            ),
        )

    def prometheus(self, request: server.Request):
        return (generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())


_TOP_LEVEL = {path.lstrip("/").encode(): path for path, _ in openapi.ROUTES if path.count("/") == 1}
_METHODS = frozenset({b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD", b"OPTIONS"})


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except UnicodeDecodeError:
        raise ApiError(400, "malformed JSON", "The body is not valid UTF-8.") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON", "The body is nested too deeply.") from None
    except ValueError as error:
        raise ApiError(400, "malformed JSON", f"The body is not valid JSON: {error}.") from None


def _timeout(value: Any, tool: Tool) -> float:
    if value is None:
        return tool.timeout
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ApiError(400, "bad request", "timeout must be a number of seconds more than 0.")
    if value > tool.timeout:
        raise ApiError(
            400, "bad request", f"timeout may be at most {tool.timeout:g} s for tool {tool.name!r}."
        )
    return float(value)


def _query(args: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")


def _int_query(args, name: bytes, default: int, low: int, high: int | None) -> int:
    text = _query(args, name)
    if text is None:
        return default
    number = _whole_number(text, MAX_QUERY_INT if high is None else high)
    if number is None or number < low:
        bound = f"{low}-{high if high is not None else MAX_QUERY_INT}"
        raise ApiError(400, "bad request", f"{name.decode()} must be a whole number, {bound}.")
    return number


def _whole_number(text: str, high: int) -> int | None:
    """C{text} as a number of ASCII digits no larger than C{high}, or None."""
    # str.isdigit() also says yes to digits int() refuses ('\u00b2') and to numbers too large
    # for SQLite or a file offset: either was a 500.
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > high:
        return None
    return int(text)


class EventStream:
    """
    A job's output as server-sent events: one event per line of output (without its line
    break), whose id is the byte offset after that line, so Last-Event-ID resumes exactly;
    a final C{end} event gives the status.
    """

    def __init__(self, api: JobApi, request: server.Request, job: Job, offset: int) -> None:
        self.api = api
        self.request = request
        self.job = job
        self.offset = offset
        self.unwatch: Callable[[], None] | None = None
        self.keepalive: IDelayedCall | None = None
        self.done = False

    def start(self) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b": job %s\n\n" % self.job.id.encode())
        request.notifyFinish().addBoth(self._gone)
        if not self.job.terminal:
            self.unwatch = self.api.runner.watch(self.job.id, self._changed)
            if not self.api.runner.is_active(self.job.id):
                # Finished between the lookup and the watch: read its final state.
                self.api.store.get(self.job.id).addCallback(
                    lambda job: self._changed(job or self.job)
                )
                return
        self._changed(self.job)

    def _changed(self, job: Job) -> None:
        if self.done:
            return
        self.job = job
        data = self.api.store.read_output(job.id, self.offset, LOG_CHUNK)
        if not job.terminal and len(data) < LOG_CHUNK:
            # Whole lines only while it runs, so an event never splits a line or a character.
            data = data[: data.rfind(b"\n") + 1]
        if data:
            events = []
            for line in data.splitlines(keepends=True):
                self.offset += len(line)
                # A CR inside a line would end an SSE field: it becomes a line break.
                text = line.rstrip(b"\r\n").decode("utf-8", "replace").replace("\r", "\n")
                fields = "".join(f"data: {part}\n" for part in text.split("\n"))
                events.append(f"id: {self.offset}\n{fields}\n")
            self.request.write("".join(events).encode())
        if job.terminal:
            end = encode({"status": job.status, "exit_code": job.exit_code})
            self.request.write(b"event: end\nid: %d\ndata: %s\n" % (self.offset, end))
            self._close()
            self.request.finish()
            return
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        if self.keepalive is not None and self.keepalive.active():
            self.keepalive.reset(SSE_KEEPALIVE)
        else:
            self.keepalive = self.api.clock.callLater(SSE_KEEPALIVE, self._ping)

    def _ping(self) -> None:
        self.keepalive = None
        if not self.done:
            self.request.write(b": keepalive\n\n")
            self._arm_keepalive()

    def _close(self) -> None:
        self.done = True
        if self.unwatch is not None:
            self.unwatch()
            self.unwatch = None
        if self.keepalive is not None and self.keepalive.active():
            self.keepalive.cancel()
        self.keepalive = None

    def _gone(self, _: Any) -> None:
        self._close()
