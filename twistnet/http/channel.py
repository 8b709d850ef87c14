"""
The channel and site policy of twistnet-http: what a client may hold (connections, request
time, body size) before any handler runs, each refusal a JSON error of L{errors}' shape.
"""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web import http, resource, server

from twistnet._connections import CLOSE_GRACE_SECONDS, ConnectionRegistry, peer_name
from twistnet.http._logging import LEVELS, enabled
from twistnet.http._logging import observer as log_observer
from twistnet.http.errors import raw_response

log = Logger(observer=log_observer)

#: Default cap on a request body: a job request is a tool name and a few parameters.
DEFAULT_MAX_BODY = 1024 * 1024
#: A request's line, headers and body must all arrive within this many seconds of its
#: first byte, however slowly they trickle in (slowloris).
DEFAULT_REQUEST_TIMEOUT = 10.0


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


class JobChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection admitted under --max-connections, whose requests must arrive
    whole within the site's request timeout, with bodies no larger than --max-body.
    """

    admitted = False
    refused = False
    #: When the first byte of the request being received arrived (None: none under way).
    request_started: float | None = None
    _twistnet_abort_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        site: JobSite = self.site
        if not site.registry.admit(self):
            log.info(
                "refused {peer}: at --max-connections {cap}",
                peer=peer_name(self.transport),
                cap=site.registry.max_connections,
            )
            self._hang_up(
                raw_response(
                    503,
                    "server full",
                    "Too many connections; try again later.",
                    b"Retry-After: 1\r\n",
                )
            )
            return
        self.admitted = True
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self.request_started is None and not self._handlingRequest:
            # A timestamp, not a timer per request: the site's sweep enforces the deadline.
            self.request_started = self.site.reactor.seconds()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.max_body:
            self.refuse_body()
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self.request_started = None
        super().allContentReceived()

    def refuse_body(self) -> None:
        limit = self.site.max_body
        self._hang_up(
            raw_response(413, "request too large", f"The body may be at most {limit} bytes.")
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's own answer to a malformed request, or to a request line or headers
        # over its limits, is a bare "400 Bad Request" with no body: every error here is JSON.
        self._hang_up(
            raw_response(
                400,
                "bad request",
                "The request is malformed, or its line or headers are too long or too many.",
            )
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or header over MAX_LENGTH: LineReceiver would hang up without a word.
        self._respondToBadRequestAndDisconnect()

    def too_slow(self) -> None:
        """The request did not arrive whole in time: say so and hang up."""
        log.info(
            "closing {peer}: request incomplete after {seconds} s",
            peer=peer_name(self.transport),
            seconds=self.site.request_timeout,
        )
        self._hang_up(raw_response(408, "request timeout", "The request did not arrive in time."))

    def _hang_up(self, response: bytes) -> None:
        """Send a final response and close; abort if the peer does not take it in time."""
        self.refused = True
        self.request_started = None
        self.setTimeout(None)
        self.transport.write(response)
        if self.admitted:
            self.loseConnection()  # also unregisters the channel as the transport's producer
        else:
            self.transport.loseConnection()
        self._twistnet_abort_call = self.callLater(
            CLOSE_GRACE_SECONDS, self.transport.abortConnection
        )

    def connectionLost(self, reason) -> None:
        self.request_started = None
        if self._twistnet_abort_call is not None and self._twistnet_abort_call.active():
            self._twistnet_abort_call.cancel()
        self._twistnet_abort_call = None
        if self.admitted:
            self.site.registry.release(self)
        super().connectionLost(reason)


class JobSite(server.Site):
    """The Site of the API: bounded connections, request time and body size."""

    protocol = JobChannel
    requestFactory = JobRequest
    noisy = False

    def __init__(
        self,
        api: resource.IResource,
        max_connections: int = 20,
        idle_timeout: float | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        reactor=None,
    ) -> None:
        super().__init__(api, timeout=idle_timeout or None, reactor=reactor)
        self.api = api
        self.registry = ConnectionRegistry(max_connections, self.reactor)
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

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.requestFactory = self.requestFactory
        return channel

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
