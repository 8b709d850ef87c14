"""The chat's WebSocket endpoint without a browser: the page's wire protocol in memory, over
twisted.web's real HTTP channel, spoken by wsproto's client side; time on a task.Clock."""

from __future__ import annotations

import json
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from chat_helpers import NO_LIMITS, join, make_chat, take
from twistnet.chat import tap
from twistnet.chat.protocol import ChatLimits
from twistnet.chat.web import (
    HELLO_TIMEOUT_SECONDS,
    RESUME_GRACE_SECONDS,
    WHO_REFRESH_SECONDS,
    OriginPolicy,
    normal_origin,
    web_site,
)

HOST = "127.0.0.1:8080"
OWN_ORIGIN = f"http://{HOST}"


class Page:
    """One page's WebSocket, in memory: wsproto's client against the site's HTTP channel."""

    _ports = iter(range(40000, 50000))

    def __init__(self, site, clock, host=HOST, origin=OWN_ORIGIN, hello=True, token=None):
        self.clock = clock
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", "127.0.0.1", next(self._ports)),
        )
        self.channel = site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)
        self.ws = WSConnection(ConnectionType.CLIENT)
        extra = [("Origin", origin)] if origin else []
        self.channel.dataReceived(
            self.ws.send(Request(host=host, target="/ws", extra_headers=extra))
        )
        self.events = []
        self._text = ""
        self.messages = []
        self.read()
        if hello and self.accepted:
            self.send({"resume": token})

    @property
    def accepted(self) -> bool:
        return any(isinstance(event, AcceptConnection) for event in self.events)

    def read(self) -> list:
        self.clock.advance(0)
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.ws.receive_data(data)
        new = list(self.ws.events())
        for event in new:
            if isinstance(event, TextMessage):
                self._text += event.data
                if event.message_finished:
                    self.messages.append(json.loads(self._text))
                    self._text = ""
        self.events.extend(new)
        return new

    def send_raw(self, data: bytes) -> None:
        self.channel.dataReceived(data)
        self.read()

    def send(self, message) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.send_raw(self.ws.send(TextMessage(text)))

    def lines(self) -> list[str]:
        """The chat lines received since the last call."""
        self.read()
        found = [line for message in self.messages for line in message.get("lines", [])]
        self.messages = [m for m in self.messages if "lines" not in m]
        return found

    def latest(self, key: str):
        self.read()
        values = [message[key] for message in self.messages if key in message]
        return values[-1] if values else None

    def close_code(self) -> int | None:
        self.read()
        closes = [event for event in self.events if isinstance(event, CloseConnection)]
        return closes[-1].code if closes else None

    def drop(self) -> None:
        """The network goes away: no close frame."""
        self.channel.connectionLost(Failure(ConnectionLost()))


def masked_frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """A client frame's header announcing C{length} bytes, mask of zeros (payload as is)."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    return header + b"\0\0\0\0"


@pytest.fixture
def chat():
    factory, clock = make_chat(limits=ChatLimits(max_line=100, rate=0, burst=20, sendq=0))
    site = web_site(factory, ["https://chat.example.org"], clock)
    yield factory, clock, site
    clock.advance(RESUME_GRACE_SECONDS + 1)


def test_a_page_joins_the_room_telnet_users_are_in(chat):
    factory, clock, site = chat
    telnet, wire = join(factory)
    take(wire)
    page = Page(site, clock)
    assert page.accepted
    session = page.latest("session")
    assert isinstance(session, str) and len(session) >= 20
    assert any(line.startswith("*** Welcome to twistnet chat, guest-2!") for line in page.lines())
    assert page.latest("you") == "guest-2"
    assert take(wire) == ["*** guest-2 has joined"]
    page.send("hello from the web")
    assert take(wire) == ["guest-2: hello from the web"]
    telnet.dataReceived(b"hello from telnet\r\n")
    assert page.lines() == ["guest-1: hello from telnet"]
    clock.advance(WHO_REFRESH_SECONDS)
    assert page.latest("who") == ["guest-1", "guest-2"]


def test_one_message_is_one_line_even_with_line_breaks_in_it(chat):
    factory, clock, site = chat
    _, wire = join(factory)
    page = Page(site, clock)
    take(wire)
    page.send("one\nline\r\n/QUIT")
    assert take(wire) == ["guest-2: oneline/QUIT"]


def test_commands_and_renames_reach_the_page_with_its_name(chat):
    _factory, clock, site = chat
    page = Page(site, clock)
    page.lines()
    page.send("/NAME alice")
    assert page.lines() == ["*** guest-1 is now known as alice"]
    assert page.latest("you") == "alice"
    page.send("/WHO")
    assert page.lines() == ["*** 1 here:", "***   alice"]


def test_fragmented_message_is_reassembled_into_one_line(chat):
    factory, clock, site = chat
    _, wire = join(factory)
    page = Page(site, clock)
    take(wire)
    for part, last in (("frag", False), ("ment", False), ("ed", True)):
        page.send_raw(page.ws.send(TextMessage(part, message_finished=last)))
    assert take(wire) == ["guest-2: fragmented"]


def test_oversized_message_is_refused_before_it_is_buffered_and_connection_kept(chat):
    factory, clock, site = chat
    _, wire = join(factory)
    page = Page(site, clock)
    page.lines()
    take(wire)
    announced = 10 * 1024 * 1024
    # Only the header and the first 101 bytes of a 10 MiB frame: refused already.
    page.send_raw(masked_frame_header(0x1, announced) + b"x" * 101)
    assert page.lines() == ["*** Line too long (over 100 bytes): not sent."]
    page.send_raw(b"y" * 50_000)  # more of the same frame: discarded, not kept
    assert page.lines() == []
    page.send_raw(b"z" * (announced - 50_101))
    page.send("still here")
    assert take(wire) == ["guest-2: still here"]
    assert page.close_code() is None


def test_the_wire_keeps_at_most_max_line_bytes_of_a_message(chat):
    _factory, clock, site = chat
    page = Page(site, clock)
    wire = page.channel._channel.dataReceived.__self__  # the protocol the channel became
    page.send_raw(page.ws.send(TextMessage("a" * 60, message_finished=False)))
    assert wire._size == 60
    page.send_raw(page.ws.send(TextMessage("b" * 60, message_finished=False)))
    assert wire._parts == [] and wire._discarding


def test_binary_message_is_closed_with_1003(chat):
    _, clock, site = chat
    page = Page(site, clock)
    page.send_raw(page.ws.send(BytesMessage(b"\x00\x01")))
    assert page.close_code() == 1003
    assert page.transport.disconnecting


def test_bad_frame_gets_a_close_code_not_an_exception(chat):
    _, clock, site = chat
    page = Page(site, clock)
    with capturedLogs() as logged:
        page.send_raw(b"\x8f\x80\0\0\0\0")  # opcode 0xF is reserved
    assert page.close_code() == 1002
    assert page.transport.disconnecting
    assert not [event for event in logged if event.get("log_failure")]


def test_invalid_utf8_text_gets_1007(chat):
    _, clock, site = chat
    page = Page(site, clock)
    page.send_raw(masked_frame_header(0x1, 2) + b"\xff\xfe")
    assert page.close_code() == 1007


def test_ping_is_answered_with_pong(chat):
    _, clock, site = chat
    page = Page(site, clock)
    page.send_raw(page.ws.send(Ping(b"are you there")))
    pongs = [event for event in page.events if isinstance(event, Pong)]
    assert [pong.payload for pong in pongs] == [b"are you there"]


@pytest.mark.parametrize(
    ("host", "origin", "status"),
    [
        (HOST, "http://evil.example", 403),
        (HOST, "null", 403),
        ("evil.example:8080", "http://evil.example:8080", 421),  # DNS rebinding
        ("chat.example.org", "https://chat.example.org", 101),
        ("localhost:8080", "http://localhost:8080", 101),
        (HOST, None, 101),
    ],
)
def test_origin_and_host_are_checked_against_the_allow_list(chat, host, origin, status):
    factory, clock, site = chat
    page = Page(site, clock, host=host, origin=origin, hello=False)
    if status == 101:
        assert page.accepted
        return
    rejected = [event for event in page.events if isinstance(event, RejectConnection)]
    assert [event.status_code for event in rejected] == [status]
    body = b"".join(event.data for event in page.events if isinstance(event, RejectData))
    assert b"Traceback" not in body and body
    assert len(factory.registry) == 0


def test_no_first_message_closes_with_1008(chat):
    factory, clock, site = chat
    page = Page(site, clock, hello=False)
    clock.advance(HELLO_TIMEOUT_SECONDS)
    assert page.close_code() == 1008
    assert len(factory.registry) == 0


def test_abrupt_close_keeps_the_member_for_the_grace_then_it_leaves(chat):
    factory, clock, site = chat
    _, wire = join(factory)
    page = Page(site, clock)
    take(wire)
    page.drop()
    assert take(wire) == []
    assert len(factory.registry) == 2
    clock.advance(RESUME_GRACE_SECONDS)
    assert take(wire) == ["*** guest-2 has left"]
    assert len(factory.registry) == 1


def test_resume_gets_the_same_member_and_what_was_said_meanwhile(chat):
    factory, clock, site = chat
    telnet, wire = join(factory)
    page = Page(site, clock)
    page.send("/NAME alice")
    token = page.latest("session")
    page.drop()
    telnet.dataReceived(b"while you were away\r\n")
    clock.advance(RESUME_GRACE_SECONDS - 1)
    again = Page(site, clock, token=token)
    assert again.latest("session") == token
    assert again.messages[0] == {"session": token, "resumed": True}
    assert again.lines() == ["guest-1: while you were away"]
    assert again.latest("you") == "alice"
    assert take(wire)[-1] == "*** guest-2 is now known as alice"  # no leave, no join
    again.send("back")
    assert take(wire) == ["alice: back"]


def test_an_expired_or_unknown_token_gets_a_new_member(chat):
    _factory, clock, site = chat
    page = Page(site, clock, token="not-a-token")
    assert page.messages[0]["resumed"] is False


def test_web_members_count_toward_max_clients(chat):
    factory, clock = make_chat(max_clients=1)
    site = web_site(factory, [], clock)
    first = Page(site, clock)
    first.send("hi")  # it spoke: not the one evicted for a newcomer
    second = Page(site, clock)
    assert "*** The chat room is full, try again later." in second.lines()
    assert second.close_code() == 1013
    assert len(factory.registry) == 1


def test_quit_closes_with_1000_and_ends_the_session(chat):
    factory, clock, site = chat
    page = Page(site, clock)
    page.send("/QUIT")
    assert page.lines()[-1].startswith("*** Goodbye")
    assert page.close_code() == 1000
    page.drop()
    assert len(factory.registry) == 0
    assert len(site.book) == 0


def test_idle_timeout_applies_to_web_members():
    factory, clock = make_chat(limits=NO_LIMITS, idle_timeout=30)
    site = web_site(factory, [], clock)
    page = Page(site, clock)
    clock.advance(31)
    assert "idle timeout" in page.lines()[-1]
    assert page.close_code() == 1000


def test_rate_limit_applies_to_web_members():
    factory, clock = make_chat(limits=ChatLimits(max_line=100, rate=1, burst=2, sendq=0))
    site = web_site(factory, [], clock)
    page = Page(site, clock)
    page.lines()
    for _ in range(3):
        page.send("x")
    assert any("too fast" in line for line in page.lines())


def test_page_files_have_strict_headers(chat):
    _, _clock, site = chat
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    channel = site.buildProtocol(None)
    channel.makeConnection(transport)
    channel.dataReceived(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head = transport.value().split(b"\r\n\r\n", 1)[0].lower()
    assert b"200 ok" in head.split(b"\r\n")[0]
    assert b"content-security-policy: default-src 'none'; script-src 'self'" in head
    assert b"frame-ancestors 'none'" in head
    assert b"unsafe-inline" not in head
    assert b"x-content-type-options: nosniff" in head
    assert b"referrer-policy: no-referrer" in head
    assert b"content-type: text/html; charset=utf-8" in head
    channel.connectionLost(None)


def test_origin_policy_and_option_parsing():
    policy = OriginPolicy.from_options(["HTTPS://Chat.Example.org/"])
    assert policy.origins == frozenset({"https://chat.example.org"})
    assert policy.host_allowed("[::1]:80")
    assert policy.host_allowed("chat.example.org:443")
    # Any IP address, not only the one reached: a browser sent it as such, nothing rebound.
    assert policy.host_allowed("10.0.0.2")
    assert not policy.host_allowed("evil.example")
    with pytest.raises(ValueError):
        normal_origin("chat.example.org")
    options = tap.Options()
    options.parseOptions(["--web", "8080", "--web-origin", "https://a.example"])
    assert options.web_descriptions() == ["tcp:8080"]
    assert options["web-origin"] == ["https://a.example"]
    for bad in (["--web-origin", "https://a.example"], ["--web", "1", "--web-origin", "a"]):
        with pytest.raises(usage.UsageError):
            tap.Options().parseOptions(bad)
