"""
The channel and site policy of twistnet-http: what a client may hold (connections, requests
in progress, request time, body size) before any handler runs, each refusal a JSON error of
L{errors}' shape.

Admission counts two things, as nginx does. C{--max-requests} counts what costs: a
connection from the moment its request header has been read until its response is finished
(nginx's C{limit_conn}); one more request gets a 503. C{--max-connections} counts every open
connection, including idle keep-alive ones and requests still arriving, and is far larger:
when it is full, the connection that has waited longest without a request being served is
closed to make room (see L{twistnet._connections.ConnectionRegistry}). So a few hundred
sockets trickling request headers (slowloris) hold no request slot and lock nobody out.
"""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web import resource, server

from twistnet._connections import NORMAL, ManagedFactory, hang_up, peer_name
from twistnet._internals import JsonBadRequestChannel, handling_request
from twistnet.http._logging import LEVELS, enabled
from twistnet.http._logging import observer as log_observer
from twistnet.http.errors import SERVER_NAME, raw_response

log = Logger(observer=log_observer)

#: Default cap on a request body: a job request is a tool name and a few parameters.
DEFAULT_MAX_BODY = 1024 * 1024
#: A request's line, headers and body must all arrive within this many seconds of its
#: first byte, however slowly they trickle in (slowloris).
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Requests in progress at once: each may hold a body of up to --max-body, and this is a
#: service for a team, not the internet.
DEFAULT_MAX_REQUESTS = 20


def _server_full() -> bytes:
    return raw_response(
        503, "server full", "Too many connections; try again later.", b"Retry-After: 1\r\n"
    )


def _too_busy() -> bytes:
    return raw_response(
        503,
        "server busy",
        "Too many requests in progress; try again later.",
        b"Retry-After: 1\r\n",
    )


class JobRequest(server.Request):
    """A request whose body is held in memory and capped at the site's --max-body."""

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        self._body_size = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self.channel.site.max_body:
            self.channel.refuse_body()
            return
        self.content.write(data)

    def render(self, resrc) -> None:
        self.setHeader(b"server", SERVER_NAME)
        super().render(resrc)


class JobChannel(JsonBadRequestChannel):
    """
    An HTTP/1.1 connection under the site's admission, whose requests must arrive whole
    within the site's request timeout, with bodies no larger than --max-body.
    """

    #: Set once a final answer is sent: nothing more the client sends is read.
    closing = False
    #: Whether a request of this connection counts toward --max-requests.
    serving = False
    #: When the first byte of the request being received arrived (None: none under way).
    request_started: float | None = None
    #: Why the connection is closed, for the metrics (see L{ManagedProtocol.close_reason}).
    close_reason = NORMAL
    _abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.site.registry.admit(self)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self.request_started is None and not handling_request(self):
            # A timestamp, not a timer per request: the site's sweep enforces the deadline.
            self.request_started = self.site.reactor.seconds()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        site: JobSite = self.site
        if self.length is not None and self.length > site.max_body:
            self.refuse_body()
            return
        if site.serving >= site.max_requests:
            site.refusals.record(f"refused at --max-requests {site.max_requests}", self._peer())
            site.counts.refused["max_requests"] += 1
            self.close_reason = "max_requests"
            self.answer_and_close(_too_busy())
            return
        self.serving = True
        site.serving += 1
        site.registry.working(self)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.closing:
            return
        self.request_started = None
        super().allContentReceived()

    def requestDone(self, request) -> None:
        # Released first: finishing may start the next pipelined request at once.
        self._stop_serving()
        self.site.registry.waiting(self)
        super().requestDone(request)

    def _stop_serving(self) -> None:
        if self.serving:
            self.serving = False
            self.site.serving -= 1

    def refuse_body(self) -> None:
        self.close_reason = "max_body"
        limit = self.site.max_body
        self.answer_and_close(
            raw_response(413, "request too large", f"The body may be at most {limit} bytes.")
        )

    def bad_request(self) -> None:
        # twisted.web's own answer to a malformed request, or to a request line or headers
        # over its limits, is a bare "400 Bad Request" with no body: every error here is JSON.
        self.close_reason = "bad_request"
        self.answer_and_close(
            raw_response(
                400,
                "bad request",
                "The request is malformed, or its line or headers are too long or too many.",
            )
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or header over MAX_LENGTH: LineReceiver would hang up without a word.
        self.bad_request()

    def too_slow(self) -> None:
        """The request did not arrive whole in time: say so and hang up."""
        self.close_reason = "request_timeout"
        log.info(
            "closing {peer}: request incomplete after {seconds} s",
            peer=self._peer(),
            seconds=self.site.request_timeout,
        )
        self.answer_and_close(
            raw_response(408, "request timeout", "The request did not arrive in time.")
        )

    def timeoutConnection(self) -> None:
        """--idle-timeout: no request on a kept-alive connection for that long."""
        self.close_reason = "idle"
        super().timeoutConnection()

    def evict(self) -> None:
        """Closed to make room at --max-connections: it was idle or still sending."""
        if self.request_started is not None:
            self.answer_and_close(_server_full())
        else:
            self.hang_up()

    def answer_and_close(self, response: bytes) -> None:
        """Send a final response and close; abort if the peer does not take it in time."""
        self.transport.write(response)
        self.hang_up()

    def hang_up(self) -> None:
        self.closing = True
        self.request_started = None
        self.setTimeout(None)
        # Unregisters the channel as the transport's producer, then closes after flushing.
        self.loseConnection()
        if self._abort is None or not self._abort.active():
            self._abort = hang_up(self.transport, self.site.reactor)

    def _peer(self) -> str:
        return peer_name(self.transport)

    def connectionLost(self, reason) -> None:
        self.request_started = None
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        self._stop_serving()
        self.site.registry.release(self)
        super().connectionLost(reason)


class JobSite(ManagedFactory, server.Site):
    """The Site of the API: bounded connections, requests, request time and body size."""

    protocol = JobChannel
    requestFactory = JobRequest
    logger = Logger(observer=log_observer)

    def refusal(self) -> bytes:
        return _server_full()

    def __init__(
        self,
        api: resource.IResource,
        max_connections: int = 1000,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        idle_timeout: float | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        reactor=None,
    ) -> None:
        # No form parsing: the API takes JSON, and twisted.web reads the Content-Type of every
        # POST through the stdlib's email header parser to look for a form (about 0.1 ms of
        # CPU, a third of what a durable job submission costs).
        server.Site.__init__(
            self, api, timeout=idle_timeout or None, reactor=reactor, parsePOSTFormSubmission=False
        )
        # The keep-alive idle timeout is the channel's own (twisted.web's TimeoutMixin).
        ManagedFactory.__init__(self, max_connections, 0.0, self.reactor)
        self.api = api
        self.max_requests = max_requests
        #: Connections whose request counts toward --max-requests now.
        self.serving = 0
        self.request_timeout = request_timeout
        self.max_body = max_body
        self._sweep = task.LoopingCall(self.sweep)
        self._sweep.clock = self.reactor

    def startFactory(self) -> None:
        super().startFactory()
        if self.request_timeout and not self._sweep.running:
            interval = min(1.0, self.request_timeout / 4)
            self._sweep.start(interval, now=False).addErrback(
                lambda failure: log.failure("request timeout sweep failed", failure)
            )

    def stopFactory(self) -> None:
        if self._sweep.running:
            self._sweep.stop()
        super().stopFactory()

    def sweep(self) -> None:
        """Hang up on every connection whose request is older than the request timeout."""
        deadline = self.reactor.seconds() - self.request_timeout
        for channel in self.registry:
            started = channel.request_started
            if started is not None and started <= deadline:
                channel.too_slow()

    def log(self, request: server.Request) -> None:
        # The access log, at debug level only: a line per request costs too much otherwise.
        if enabled(LEVELS["debug"]):
            log.debug(
                "{method} {uri} {code} {size}",
                method=request.method.decode("ascii", "replace"),
                uri=request.uri.decode("ascii", "replace"),
                code=request.code,
                size=request.sentLength,
            )
