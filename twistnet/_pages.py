"""
The web pages twistnet serves from the package (the chat page, the jobs page): their files,
read once, and the strict headers every answer carries.

The pages are plain HTML, CSS and JavaScript files with no build step and nothing fetched
from elsewhere, so the Content-Security-Policy can forbid everything but the page's own files
and its own server: no inline script or style, no framing, no referrer, no type sniffing.
"""

from __future__ import annotations

from importlib import resources

from attrs import frozen
from twisted.web.server import Request

#: Only the page's own files and its own server; 'self' covers ws: and wss: to the same host.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

STRICT_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-cache"),
)

_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
}


def set_strict_headers(request: Request) -> None:
    for name, value in STRICT_HEADERS:
        request.setHeader(name, value)


@frozen
class PageFile:
    """One file of a page, with the content type it is served as."""

    body: bytes
    content_type: bytes

    def render(self, request: Request) -> bytes:
        set_strict_headers(request)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"content-length", str(len(self.body)).encode())
        if request.method == b"HEAD":
            return b""
        return self.body


def package_files(package: str, names: tuple[str, ...]) -> dict[str, PageFile]:
    """The files C{names} of C{package}'s C{static} directory, read once at start."""
    folder = resources.files(package).joinpath("static")
    files = {}
    for name in names:
        suffix = name[name.rfind(".") :]
        files[name] = PageFile(folder.joinpath(name).read_bytes(), _TYPES[suffix])
    return files
