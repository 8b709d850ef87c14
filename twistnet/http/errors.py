"""
The one shape of every error twistnet-http sends: C{{"error": ..., "detail": ...}} as JSON,
with the status that says what went wrong, whether a handler raised it (L{ApiError}) or the
channel answers before any handler runs (L{raw_response}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web import http

#: What the Server header says: the exact Twisted version would help only an attacker.
SERVER_NAME = b"twistnet"

#: Reason phrases for the statuses twistnet sends that Twisted's table lacks (it would say
#: "Unknown Status"): RFC 6585 added 429 after Twisted's table was written.
_MISSING_PHRASES = {429: b"Too Many Requests"}


#: Read once: twisted.web.http is a deprecation proxy whose every attribute access costs.
_PHRASES = {**http.RESPONSES, **_MISSING_PHRASES}


def phrase(status: int) -> bytes:
    """The reason phrase for C{status}."""
    return _PHRASES.get(status, b"Error")


class ApiError(Exception):
    """An error response: HTTP C{status}, a short C{error}, a sentence of C{detail}."""

    def __init__(self, status: int, error: str, detail: str, headers=None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


def encode(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def error_body(error: str, detail: str) -> bytes:
    return encode({"error": error, "detail": detail})


def raw_response(status: int, error: str, detail: str, extra: bytes = b"") -> bytes:
    """
    A complete HTTP/1.1 error response that closes the connection, for the channel, with
    the headers every twistnet-http answer carries (Server, and Date as RFC 9110 asks).
    """
    body = error_body(error, detail)
    return (
        b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n%s\r\n%s"
        % (
            status,
            phrase(status),
            SERVER_NAME,
            http.datetimeToString(),
            len(body),
            extra,
            body,
        )
    )
