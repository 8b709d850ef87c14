"""
The jobs page of twistnet-http: plain HTML, CSS and JavaScript from the package, served at
C{/} and C{/static/NAME} with L{twistnet._pages}' strict headers.

The page is the JSON API's first client and has no other door into the service: it reads
C{/tools} and C{/jobs}, submits with a JSON C{POST /jobs}, follows a job's output on its
event stream and cancels with C{DELETE}, sending the token the person types (kept in the
tab's sessionStorage at most) as C{Authorization: Bearer}. So it needs nothing the API's
protections (JSON-only bodies, no CORS, the token on every change) would have to relax.
"""

from __future__ import annotations

from twisted.web.server import Request

from twistnet._pages import package_files, set_strict_headers
from twistnet.http.errors import ApiError

INDEX = "index.html"
#: The page's files, read once at import: a page is a few kilobytes.
FILES = package_files("twistnet.http", (INDEX, "jobs.css", "jobs.js", "favicon.svg"))


def serve(request: Request, name: str = INDEX) -> tuple[bytes, bytes]:
    """The body and content type of the page's file C{name}, its strict headers set."""
    page_file = FILES.get(name)
    if page_file is None:
        raise ApiError(404, "not found", f"The page has no file {name!r}.")
    set_strict_headers(request)
    return page_file.body, page_file.content_type
