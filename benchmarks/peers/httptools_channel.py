"""
A prototype, for the study in docs/benchmarks.md only: twisted.web's HTTPChannel with its
request line, header and body parsing done by httptools (llhttp, the C parser under
uvicorn), building the same twisted.web Request objects and calling the same channel hooks
(allHeadersReceived, allContentReceived, requestDone), so Resources and Sites are unchanged.

What it does not keep, and why it is not in the service: twisted.web's limits on the
header block (totalHeadersSize, maxHeaders) are not enforced; llhttp parses every pipelined
request in a buffer at once, so a request arriving while another is handled is queued
parsed (its headers, its body read into its Request) instead of held as raw bytes, and its
allHeadersReceived runs early; malformed requests get twisted.web's bare 400.
"""

from __future__ import annotations

from collections import deque

import httptools
from twisted.web import http


class HttptoolsChannel(http.HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        #: Requests parsed whole while an earlier one is being answered: (method, url, version).
        self._parsed: deque[tuple[bytes, bytes, bytes]] = deque()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._respondToBadRequestAndDisconnect()
        except httptools.HttpParserError:
            if self.transport is not None and not self.transport.disconnecting:
                self._respondToBadRequestAndDisconnect()

    # --- llhttp's callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self.length = None
        self.requests.append(self.requestFactory(self, len(self.requests)))

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-length":
            self.length = int(value)
        self.requests[-1].requestHeaders.addRawHeader(name, value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._version = b"HTTP/" + parser.get_http_version().encode()
        if self.length is None and not self._chunked():
            self.length = 0
        self.allHeadersReceived()

    def _chunked(self) -> bool:
        coding = self.requests[-1].requestHeaders.getRawHeaders(b"transfer-encoding")
        return bool(coding) and coding[-1].lower() == b"chunked"

    def on_body(self, body: bytes) -> None:
        self.requests[-1].handleContentChunk(body)

    def on_message_complete(self) -> None:
        message = (self._parser.get_method(), self._url, self._version)
        if self._handlingRequest or self._parsed:
            self._parsed.append(message)
            return
        self._dispatch(message)

    # --- the channel's hooks -----------------------------------------------------------------

    def _dispatch(self, message: tuple[bytes, bytes, bytes]) -> None:
        """What twisted.web's allContentReceived does, for the oldest request not answered."""
        self.length = 0
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.requests[0].requestReceived(*message)

    def requestDone(self, request) -> None:
        super().requestDone(request)
        if self.persistent and self._parsed and not self._handlingRequest:
            self._dispatch(self._parsed.popleft())
