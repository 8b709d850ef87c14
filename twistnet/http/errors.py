"""
The one shape of every error twistnet-http sends: C{{"error": ..., "detail": ...}} as JSON,
with the status that says what went wrong, whether a handler raised it (L{ApiError}) or the
channel answers before any handler runs (L{raw_response}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web import http


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
    """A complete HTTP/1.1 error response that closes the connection, for the channel."""
    body = error_body(error, detail)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n%s\r\n%s"
        % (status, http.RESPONSES.get(status, b"Error"), len(body), extra, body)
    )
