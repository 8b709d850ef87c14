"""
The JSON API of twistnet-http as one resource: each route declared at its handler with
L{route}, dispatched on the request path, so an unknown path or method gets a JSON 404 or
405 like everything else, and HEAD is answered wherever GET is.

Every error is C{{"error": ..., "detail": ...}} with the status that says what went wrong.
A handler's unexpected exception is a 500 of the same shape and a log line; the server goes
on serving. Reads are open; requests that change state (POST, DELETE) need the Bearer token
when one is set, compared in constant time.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from twistnet._connections import reactor_or_global
from twistnet._hosts import HostAllowList
from twistnet.http import openapi, page, parse
from twistnet.http._logging import observer as log_observer
from twistnet.http.errors import ApiError, encode, error_body, phrase
from twistnet.http.hosts import check_host
from twistnet.http.metrics import Metrics
from twistnet.http.model import STATUSES, Job, Tool
from twistnet.http.routing import RouteTable, route
from twistnet.http.runner import IRunner, QueueFull
from twistnet.http.sse import EventStream
from twistnet.http.store import MAX_LIMIT, IJobStore, StoreUnavailable

log = Logger(observer=log_observer)

#: The most output one GET /jobs/{id}/log response carries.
LOG_CHUNK = 1024 * 1024
#: Rendered finished jobs kept for fast GET /jobs/{id}: a finished job never changes.
RENDERED_CACHE = 1024
#: Retry-After (seconds) when a new job could not be stored (a full disk, say).
STORE_RETRY_AFTER = 5
#: Job ids are made here (uuid4 hex); anything else in the path is simply not a job.
JOB_ID = re.compile(r"[0-9a-f]{32}")

#: An Idempotency-Key: what a client may reasonably send (a UUID, say), and no more.
IDEMPOTENCY_KEY = re.compile(rb"[\x21-\x7e]{1,255}")

_JSON = parse.JSON


class JobApi(resource.Resource):
    """The whole API as one leaf resource: the routes of L{ROUTES}."""

    isLeaf = True

    def __init__(
        self,
        store: IJobStore,
        runner: IRunner,
        tools: dict[str, Tool],
        token: bytes | None = None,
        clock=None,
        hosts: HostAllowList | None = None,
    ) -> None:
        super().__init__()
        clock = reactor_or_global(clock)
        self.store = store
        self.runner = runner
        self.tools = tools
        self.clock = clock
        #: The Host allow-list (None: no check, as with a token); see L{hosts.check_host}.
        self.hosts = hosts
        # Digests: the constant-time comparison then also hides the length of the token.
        self._expected = hashlib.sha256(b"Bearer " + token).digest() if token else None
        self.metrics = Metrics(runner)
        runner.on_finished.append(self.metrics.job_finished)
        self._rendered: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._openapi = encode(openapi.document(tools.values(), bool(token), ROUTES))
        self._tools = encode({"tools": [tool.describe() for tool in tools.values()]})
        #: The figures of the last /healthz of a local store, and its body.
        self._health: tuple[tuple[int, ...] | None, bytes] = (None, b"")
        self._handlers: dict[str, dict[bytes, Callable[..., Any]]] = {
            template: {method: getattr(self, name) for method, name in methods.items()}
            for template, methods in _DISPATCH.items()
        }
        #: Requests whose client went before its asynchronous answer was ready.
        self._departed: weakref.WeakSet[server.Request] = weakref.WeakSet()

    # --- dispatch -------------------------------------------------------------------------

    def render(self, request: server.Request) -> bytes | int:
        template, args = ROUTES.match(request.postpath)
        handlers = self._handlers.get(template) if template else None
        try:
            if self.hosts is not None:
                check_host(request, self.hosts)
            if handlers is None:
                raise ApiError(404, "not found", "No such route; GET /openapi.json lists them.")
            handler = handlers.get(request.method)
            if handler is None:
                allowed = _ALLOW[template]
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
            if not request.finished:
                request.notifyFinish().addErrback(self._went, request)
            result.addErrback(self._late_failure, request, template)
            return server.NOT_DONE_YET
        return self._body(request, self._ok(request, template, *result))

    def _went(self, _, request: server.Request) -> None:
        self._departed.add(request)

    def _open(self, request: server.Request) -> bool:
        """May the response still be written: not finished, and its client still there?"""
        return not request.finished and request not in self._departed

    @staticmethod
    def _body(request: server.Request, body: bytes) -> bytes:
        """C{body} for a synchronous answer; for HEAD, only its length."""
        if request.method == b"HEAD":
            # Twisted would send the length too, but log that it "eats" the body.
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def _ok(self, request, template, body: bytes, content_type: bytes = _JSON, status: int = 200):
        request.setResponseCode(status, phrase(status))
        request.setHeader(b"content-type", content_type)
        self.metrics.answered(request.method, template, status)
        return body

    def _error(self, request, template, failure: ApiError) -> bytes:
        for name, value in failure.headers.items():
            request.setHeader(name, value)
        body = self._ok(
            request, template, error_body(failure.error, failure.detail), status=failure.status
        )
        return self._body(request, body)

    def _send(self, request, template, body: bytes, content_type: bytes = _JSON, status: int = 200):
        """Finish an asynchronous response, unless the client has gone."""
        if not self._open(request):
            return
        request.setHeader(b"content-length", b"%d" % len(body))
        # For HEAD, Twisted's Request.write sends the headers and drops the body.
        request.write(self._ok(request, template, body, content_type, status))
        request.finish()

    def _late_failure(self, failure, request, template) -> None:
        if failure.check(ApiError):
            error = failure.value
        elif failure.check(StoreUnavailable):
            # The database is down or restarting: a moment's wait, not a server error.
            log.warn("the job store is unavailable: {error}", error=failure.getErrorMessage())
            error = _unavailable()
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
            if self._open(request):
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

    @route("/jobs", "GET")
    def list_jobs(self, request: server.Request) -> defer.Deferred[None]:
        args = request.args
        status = parse.query(args, b"status")
        if status is not None and status not in STATUSES:
            raise ApiError(400, "bad request", f"status must be one of {', '.join(STATUSES)}.")
        limit = parse.int_query(args, b"limit", 50, 1, MAX_LIMIT)
        cursor = parse.query(args, b"cursor")
        if cursor is not None and parse.whole_number(cursor, parse.MAX_CURSOR) is None:
            raise ApiError(400, "bad request", "cursor must be the next_cursor of a previous page.")

        def page(found: tuple[list[Job], str | None]) -> None:
            jobs, next_cursor = found
            summaries = []
            for job in jobs:
                summary = job.to_json()
                del summary["output"]
                summaries.append(summary)
            self._send(request, "/jobs", encode({"jobs": summaries, "next_cursor": next_cursor}))

        return self.store.list(status, parse.query(args, b"tool"), limit, cursor).addCallback(page)

    @route("/jobs", "POST")
    def submit(self, request: server.Request) -> defer.Deferred[None]:
        self._authorize(request)
        request.content.seek(0)
        job = parse.submission(
            request.content.read(),
            request.getHeader(b"content-type"),
            self.tools,
            self.clock.seconds(),
            uuid.uuid4().hex,
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

        key = request.getHeader(b"idempotency-key")
        if key is None:
            submitted = self.runner.submit(job)
        else:
            if not IDEMPOTENCY_KEY.fullmatch(key):
                raise ApiError(
                    400, "bad request", "Idempotency-Key must be 1 to 255 printable ASCII bytes."
                )
            submitted = self.runner.submit(job, idempotency_key=key.decode("ascii"))
        return submitted.addCallbacks(accepted, self._refused)

    def _refused(self, failure) -> None:
        if failure.check(StoreUnavailable):
            # Not stored (a full disk, a failing database): the job does not exist, and
            # the client may try again later; the operator gets the reason, once.
            log.error("could not store a new job: {error}", error=failure.getErrorMessage())
            raise _unavailable("The job could not be stored; try again later.")
        failure.trap(QueueFull)  # anything else is a bug: a 500 and a traceback in the log
        raise ApiError(
            429,
            "queue full",
            f"{_jobs_are_waiting(self.runner.queue_size)} already; try again later.",
            {b"retry-after": str(failure.value.retry_after).encode()},
        )

    def _job_or_404(self, job_id: str) -> defer.Deferred[Job]:
        if not JOB_ID.fullmatch(job_id):
            return defer.fail(ApiError(404, "unknown job", f"No job with id {job_id!r}."))

        def found(job: Job | None) -> Job:
            if job is None:
                raise ApiError(404, "unknown job", f"No job with id {job_id!r}.")
            return job

        return self.store.get(job_id).addCallback(found)

    @route("/jobs/{id}", "GET")
    def get_job(self, request: server.Request, job_id: str):
        rendered = self._rendered.get(job_id)
        if rendered is not None:
            return (rendered,)
        job = self.store.cached(job_id)
        found = defer.succeed(job) if job is not None else self._job_or_404(job_id)
        return found.addCallback(self._render_job).addCallback(
            lambda body: self._send(request, "/jobs/{id}", body)
        )

    async def _render(self, job: Job) -> bytes:
        output = (await self.store.fetch_output(job.id, 0, LOG_CHUNK)).decode("utf-8", "replace")
        body = encode(job.to_json(output))
        if job.terminal:
            self._rendered[job.id] = body
            while len(self._rendered) > RENDERED_CACHE:
                self._rendered.popitem(last=False)
        return body

    def _render_job(self, job: Job) -> defer.Deferred[bytes]:
        """The job as GET /jobs/{id} shows it, with its output (read from the store)."""
        return defer.Deferred.fromCoroutine(self._render(job))

    @route("/jobs/{id}", "DELETE")
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
            self._send(request, "/jobs/{id}", await self._render_job(cancelled))

        return defer.Deferred.fromCoroutine(cancel())

    @route("/jobs/{id}/log", "GET")
    def job_log(self, request: server.Request, job_id: str) -> defer.Deferred[None]:
        offset = parse.int_query(request.args, b"offset", 0, 0, parse.MAX_QUERY_INT)
        streaming = b"text/event-stream" in (request.getHeader(b"accept") or b"")

        async def respond() -> None:
            job = await self._job_or_404(job_id)
            if streaming:
                resume = request.getHeader(b"last-event-id")
                start = (
                    parse.whole_number(resume.decode("latin-1"), parse.MAX_QUERY_INT)
                    if resume
                    else None
                )
                start = offset if start is None else start
                self.metrics.answered(request.method, "/jobs/{id}/log", 200)
                stream = EventStream(
                    request, job, start, self.runner, self.store, self.clock, LOG_CHUNK
                )
                stream.start()
                return
            data = await self.store.fetch_output(job.id, offset, LOG_CHUNK)
            request.setHeader(b"x-next-offset", str(offset + len(data)).encode())
            request.setHeader(b"x-job-status", job.status.encode())
            self._send(request, "/jobs/{id}/log", data, b"text/plain; charset=utf-8")

        return defer.Deferred.fromCoroutine(respond())

    # --- the page (served, not described) ------------------------------------------------

    @route("/", "GET", in_openapi=False)
    def index(self, request: server.Request):
        return page.serve(request)

    @route("/static/{name}", "GET", in_openapi=False)
    def page_file(self, request: server.Request, name: str):
        return page.serve(request, name)

    # --- the rest -------------------------------------------------------------------------

    @route("/tools", "GET")
    def list_tools(self, request: server.Request):
        return (self._tools,)

    @route("/openapi.json", "GET")
    def openapi(self, request: server.Request):
        return (self._openapi,)

    @route("/healthz", "GET")
    def health(self, request: server.Request):
        runner = self.runner
        figures = (runner.queue_depth(), len(runner.active), runner.workers, runner.queue_size)
        # A store on a server (PostgreSQL) may be out of reach; a local file is not asked.
        reachable = getattr(self.store, "reachable", None)
        if reachable is None:
            # Encoded again only when a figure has changed: probes poll an idle service.
            if self._health[0] != figures:
                self._health = (figures, encode(_health(*figures)))
            return (self._health[1],)
        body = _health(*figures)

        def answer(ok: bool) -> None:
            body["store"] = "reachable" if ok else "unreachable"
            if not ok:
                body["status"] = "store unreachable"
            self._send(request, "/healthz", encode(body), status=200 if ok else 503)

        return reachable().addCallback(answer)

    @route("/metrics", "GET")
    def prometheus(self, request: server.Request):
        return (generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())


def _health(queued: int, running: int, workers: int, queue_size: int) -> dict[str, Any]:
    return {
        "status": "ok",
        "queued": queued,
        "running": running,
        "workers": workers,
        "queue_size": queue_size,
    }


def _unavailable(detail: str = "The job store is unavailable; try again later.") -> ApiError:
    return ApiError(
        503, "store unavailable", detail, {b"retry-after": str(STORE_RETRY_AFTER).encode()}
    )


def _jobs_are_waiting(count: int) -> str:
    return "1 job is waiting" if count == 1 else f"{count} jobs are waiting"


def _with_head(methods: dict[str, str]) -> dict[bytes, str]:
    """A route's methods as dispatched: HEAD, where GET is, by the GET handler (RFC 9110)."""
    dispatched: dict[bytes, str] = {}
    for method, handler in methods.items():
        dispatched[method.encode()] = handler
        if method == "GET" and "HEAD" not in methods:
            dispatched[b"HEAD"] = handler
    return dispatched


#: Every route of the API, declared at its handler above.
ROUTES = RouteTable.collect(JobApi)
_DISPATCH = {template: _with_head(methods) for template, methods in ROUTES.methods.items()}
_ALLOW = {template: b", ".join(methods) for template, methods in _DISPATCH.items()}
