"""
The channel and site policy of twistnet-http, in memory: a StringTransport per connection
and a MemoryReactorClock for time, with the defaults a user gets (Twisted's own
web/test/test_http.py test_requestBodyTimeout is the model).
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.web import resource, server

from twistnet._connections import EVICTION_GRACE_SECONDS, Refused
from twistnet.http.channel import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT,
    JobSite,
)

GET = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
SLOW = b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Answers(resource.Resource):
    """Answers C{/} at once; holds C{/slow} open (a request in progress) until told."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[server.Request] = []

    def render_GET(self, request):
        if request.path == b"/slow":
            self.held.append(request)
            return server.NOT_DONE_YET
        return b"hello"

    def render_POST(self, request):
        self.args = request.args
        return b"got %d" % len(request.content.read())


def make_site(**options):
    reactor = MemoryReactorClock()
    site = JobSite(Answers(), reactor=reactor, **options)
    site.startFactory()
    return site, reactor


def connect(site, port: int = 40000):
    address = IPv4Address("TCP", "127.0.0.1", port)
    proto = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=address)
    proto.makeConnection(transport)
    return proto, transport


def status_and_body(transport) -> tuple[int, bytes]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_server_header_names_no_version():
    site, _ = make_site()
    proto, transport = connect(site)
    proto.dataReceived(GET)
    assert b"\r\nServer: twistnet\r\n" in transport.value()
    assert b"TwistedWeb" not in transport.value()


def test_requests_beyond_max_requests_get_a_json_503_and_the_rest_are_served():
    site, _ = make_site()
    held = []
    for port in range(DEFAULT_MAX_REQUESTS):
        proto, transport = connect(site, 41000 + port)
        proto.dataReceived(SLOW)
        held.append(transport)
    over, over_t = connect(site, 42000)
    with capturedLogs() as events:
        over.dataReceived(SLOW)
    assert status_and_body(over_t) == (
        503,
        b'{"error":"server busy","detail":"Too many requests in progress; try again later."}\n',
    )
    assert b"Retry-After: 1" in over_t.value() and over_t.disconnecting
    # Answered by the channel, yet with the headers every answer carries.
    assert b"\r\nServer: twistnet\r\n" in over_t.value()
    assert b"\r\nDate: " in over_t.value()
    assert any("refused at --max-requests 20" in str(e.get("reason")) for e in events)
    # One finishes: its slot is free for the next request, on any connection.
    site.resource.held[0].finish()
    later, later_t = connect(site, 42001)
    later.dataReceived(GET)
    assert status_and_body(later_t)[0] == 200


def test_three_hundred_trickled_headers_hold_no_request_slot():
    site, reactor = make_site()
    for port in range(300):
        proto, _ = connect(site, 43000 + port)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
    reactor.advance(DEFAULT_REQUEST_TIMEOUT / 2)
    honest, transport = connect(site, 44000)
    honest.dataReceived(GET)
    assert status_and_body(transport) == (200, b"hello")


def test_a_trickled_request_is_a_json_408_after_the_request_timeout():
    site, reactor = make_site()
    proto, transport = connect(site)
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
    for _ in range(int(DEFAULT_REQUEST_TIMEOUT) - 1):
        reactor.advance(1)
        proto.dataReceived(b"X")  # a byte now and then does not extend the deadline
    assert transport.value() == b""
    reactor.advance(1.5)
    assert status_and_body(transport)[0] == 408
    assert b'"error":"request timeout"' in transport.value()
    assert transport.disconnecting


def test_bodies_over_max_body_are_413_declared_asked_or_chunked():
    too_big = DEFAULT_MAX_BODY + 1
    requests = [
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % too_big,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        % too_big,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"10000\r\n" + b" " * 0x10000 + b"\r\n") * 17,
    ]
    for request in requests:
        site, _ = make_site()
        proto, transport = connect(site)
        proto.dataReceived(request)
        status, body = status_and_body(transport)
        assert status == 413, transport.value()[:200]
        assert b"100 Continue" not in transport.value()
        assert json.loads(body)["error"] == "request too large"
        assert transport.disconnecting


def test_a_body_at_max_body_is_taken():
    site, _ = make_site()
    proto, transport = connect(site)
    proto.dataReceived(
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % DEFAULT_MAX_BODY
        + b"x" * DEFAULT_MAX_BODY
    )
    assert status_and_body(transport) == (200, b"got %d" % DEFAULT_MAX_BODY)


def test_a_malformed_request_is_a_json_400():
    for request in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X" * 20000 + b"\r\n"):
        site, _ = make_site()
        proto, transport = connect(site)
        proto.dataReceived(request)
        status, body = status_and_body(transport)
        assert status == 400
        assert json.loads(body)["error"] == "bad request"


def test_headers_over_twisted_webs_limits_are_a_json_400():
    # 501 headers (twisted.web's maxHeaders is 500), and 17 KiB of valid headers (its
    # totalHeadersSize is 16 KiB): each is refused before any handler runs.
    many = b"".join(b"X-%d: v\r\n" % n for n in range(501))
    large = b"".join(b"X-%d: %s\r\n" % (n, b"v" * 1000) for n in range(17))
    for headers in (many, large):
        site, _ = make_site()
        proto, transport = connect(site)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        status, body = status_and_body(transport)
        assert status == 400
        assert json.loads(body)["error"] == "bad request"


def test_at_max_connections_the_longest_waiting_makes_room_and_a_fresh_burst_is_refused():
    site, reactor = make_site()
    waiting = [connect(site, 45000 + n) for n in range(1000)]
    waiting[0][0].dataReceived(b"GET / HTTP/1.1\r\n")  # a request still arriving
    # Within the grace nobody is evicted: the newcomer is refused with the JSON 503.
    refused, refused_t = connect(site, 46000)
    assert isinstance(refused, Refused)
    assert status_and_body(refused_t)[0] == 503
    assert b'"error":"server full"' in refused_t.value()
    reactor.advance(EVICTION_GRACE_SECONDS + 0.1)
    newcomer, newcomer_t = connect(site, 46001)
    assert not isinstance(newcomer, Refused)
    oldest_t = waiting[0][1]
    assert oldest_t.disconnecting and status_and_body(oldest_t)[0] == 503
    idle_t = waiting[1][1]
    assert not idle_t.disconnecting
    newcomer.dataReceived(GET)
    assert status_and_body(newcomer_t) == (200, b"hello")
    # An idle keep-alive connection is closed without a response it did not ask for.
    connect(site, 46002)
    assert idle_t.disconnecting and idle_t.value() == b""


def test_a_connection_being_served_is_never_evicted():
    site, reactor = make_site(max_connections=2)
    busy, busy_t = connect(site, 47000)
    busy.dataReceived(SLOW)
    _idle, idle_t = connect(site, 47001)
    reactor.advance(EVICTION_GRACE_SECONDS + 1)
    connect(site, 47002)
    assert idle_t.disconnecting
    assert not busy_t.disconnecting
    site.resource.held[0].finish()
    assert status_and_body(busy_t)[0] == 200


def test_a_form_body_is_not_parsed_into_args_and_the_query_still_is():
    site, _ = make_site()
    proto, transport = connect(site)
    proto.dataReceived(
        b"POST /?q=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
        b"\r\nContent-Length: 3\r\n\r\na=b"
    )
    assert status_and_body(transport) == (200, b"got 3")
    assert site.resource.args == {b"q": [b"1"]}
