"""
The jobs page of twistnet-http in memory (treq's StubTreq over the API resource): its files
at C{/} and C{/static/NAME} with the strict headers, HEAD, refusals, and its place in the
route table (served, not in the OpenAPI document).
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from http_support import StubApi
from twistnet._pages import STRICT_HEADERS
from twistnet.http.api import ROUTES
from twistnet.http.page import FILES

PATHS = {"/": "index.html", **{f"/static/{name}": name for name in FILES}}


@pytest.fixture
def api():
    return StubApi(token="tok")


def assert_strict(headers) -> None:
    for name, value in STRICT_HEADERS:
        assert headers.getRawHeaders(name) == [value], name
    policy = headers.getRawHeaders(b"content-security-policy")[0].decode()
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert not headers.hasHeader(b"access-control-allow-origin")


@pytest.mark.parametrize("path", sorted(PATHS))
def test_page_and_assets_are_served_with_strict_headers(api, path):
    code, headers, body = api.call("GET", path)
    assert code == 200
    assert body == FILES[PATHS[path]].body
    assert headers.getRawHeaders(b"content-type") == [FILES[PATHS[path]].content_type]
    assert_strict(headers)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_head_of_page_and_assets_has_the_length_and_no_body(api, path):
    _, get_headers, get_body = api.call("GET", path)
    code, headers, body = api.call("HEAD", path)
    assert (code, body) == (200, b"")
    assert int(headers.getRawHeaders(b"content-length")[0]) == len(get_body)
    assert headers.getRawHeaders(b"content-type") == get_headers.getRawHeaders(b"content-type")
    assert_strict(headers)


def test_page_routes_are_served_but_not_in_the_openapi_document(api):
    hidden = {r.template for r in ROUTES.routes if not r.in_openapi}
    assert hidden == {"/", "/static/{name}"}
    _, _, document = api.json("GET", "/openapi.json")
    assert not hidden & set(document["paths"])


@pytest.mark.parametrize("name", ["nope.js", "..%2Fapi.py", "..%2F..%2Fpyproject.toml", ""])
def test_a_file_the_page_lacks_is_a_json_404(api, name):
    code, _, body = api.call("GET", f"/static/{name}")
    assert code == 404
    assert json.loads(body)["error"] == "not found"


def test_the_page_only_reads(api):
    code, headers, _ = api.call("POST", "/", {"tool": "echo"})
    assert code == 405
    assert headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert api.call("DELETE", "/static/jobs.js")[0] == 405


class _Markup(HTMLParser):
    """The tags and attributes of a page, to look for anything inline."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        if self.tags and self.tags[-1][0] in ("script", "style") and data.strip():
            self.inline_script = True


def test_page_has_no_inline_script_style_or_handler_and_loads_only_its_own_files():
    markup = _Markup()
    markup.feed(FILES["index.html"].body.decode())
    assert not markup.inline_script
    for tag, attrs in markup.tags:
        assert tag != "style"
        assert "style" not in attrs and not any(name.startswith("on") for name in attrs)
        for name in ("src", "href"):
            if name in attrs and tag != "a":
                assert attrs[name].removeprefix("/static/") in FILES, attrs[name]


def test_script_shows_server_text_as_text_and_calls_only_the_api():
    script = FILES["jobs.js"].body.decode()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert forbidden not in script
    # The token lives in the tab at most, and only ever goes out as a header.
    assert "localStorage" not in script and "document.cookie" not in script
    assert '"Bearer " + token' in script
    documented = {r.template.split("/")[1] for r in ROUTES.documented()}
    # The paths the script starts a URL with (not the "/log" it appends to a job's).
    called = set(re.findall(r'(?<!\+ )["`]/([a-z.]+)', script))
    assert called and called <= documented, called - documented
