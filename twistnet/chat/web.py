"""
The chat in a browser: one page and a WebSocket endpoint whose members sit in the same room
as telnet users.

A browser member I{is} a L{ChatProtocol}, built by the chat's own factory (so it counts
toward --max-clients and shutdown closes it) and given a L{WebSession} as its transport: one
WebSocket text message in is one line, each write out is one JSON message of lines. Names,
commands, history, rate, --max-line, --sendq and --idle-timeout are the telnet member's own
code, not a copy.

Why wsproto under a twisted.web resource and not C{twisted.web.websocket}: Twisted's wire
protocol reassembles a message without a size limit before any hook sees it, has no hook for
C{Origin}, and asserts on refused connections. wsproto hands frames over in pieces as they
arrive, so L{WebSocketWire} counts a message's size as it comes and discards the rest of one
over --max-line; the upgrade itself is the one private call Twisted's own implementation makes
(L{twistnet._internals.upgrade_channel}).

Reconnecting: a session outlives its WebSocket by L{RESUME_GRACE_SECONDS}. A page that comes
back with the session's token in its first message gets the same member back (same name, what
was said meanwhile, no second welcome); the room never saw it leave.

Wire format. Page to server: first C{{"resume": token-or-null}}, then one text message per
line. Server to page: C{{"session": token, "resumed": bool}}, C{{"lines": [...]}},
C{{"you": name}} when the member's name changed, C{{"who": [names]}} when people came, went
or renamed.
"""

from __future__ import annotations

import json
import secrets
from urllib.parse import urlsplit

from attrs import field, frozen
from twisted.internet import protocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from wsproto import ConnectionType
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from twistnet._connections import Refused, peer_name
from twistnet._hosts import HostAllowList
from twistnet._internals import pending_output_probe, upgrade_channel
from twistnet._pages import package_files, set_strict_headers
from twistnet.chat.protocol import ChatFactory
from twistnet.chat.room import EOL

#: Seconds a dropped page may take to come back as the same member.
RESUME_GRACE_SECONDS = 30.0
#: Seconds a new WebSocket has to send its first message (the resume request).
HELLO_TIMEOUT_SECONDS = 10.0
#: Seconds between two refreshes of a page's list of who is here: a burst of joins costs one.
WHO_REFRESH_SECONDS = 0.25
#: Largest first message: a resume token is 24 characters.
MAX_HELLO = 256

#: WebSocket close codes (RFC 6455 section 7.4.1).
NORMAL = 1000
GOING_AWAY = 1001
UNSUPPORTED = 1003
POLICY = 1008
TRY_AGAIN_LATER = 1013

WEBSOCKET_PATH = b"ws"
PAGE_FILES = ("index.html", "chat.js", "chat.css", "favicon.svg")


@frozen
class OriginPolicy:
    """
    Which C{Host} and C{Origin} a request may carry. C{Host} must name this server: an IP
    address, C{localhost}, or the host of an allowed origin (a rebinding attacker's domain
    names none of them; see L{twistnet._hosts}). C{Origin}, when a browser sends one, must be
    the page's own (the scheme and C{Host} of the request) or one of C{origins}
    (C{--web-origin}).
    """

    origins: frozenset[str] = frozenset()
    hosts: HostAllowList = field(init=False)

    @hosts.default
    def _hosts_of_origins(self) -> HostAllowList:
        return HostAllowList(urlsplit(origin).hostname or "" for origin in self.origins)

    @classmethod
    def from_options(cls, origins: list[str]) -> OriginPolicy:
        return cls(frozenset(normal_origin(origin) for origin in origins))

    def host_allowed(self, host: bytes | str | None) -> bool:
        return self.hosts.allows(host)

    def origin_allowed(self, origin: str | None, own: str) -> bool:
        if origin is None:
            return True  # not a browser: no page of another site can be behind it
        origin = origin.lower()
        return origin == own.lower() or origin in self.origins


def normal_origin(origin: str) -> str:
    """C{origin} as browsers send it (C{scheme://host[:port]}); ValueError if it is none."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"{origin!r} is not an origin such as https://chat.example.org")
    return f"{parts.scheme}://{parts.netloc}"


class SessionBook:
    """The sessions of one web endpoint by token, and the grace each gets when its page drops."""

    def __init__(self, clock: IReactorTime, grace: float = RESUME_GRACE_SECONDS) -> None:
        self.clock = clock
        self.grace = grace
        self._sessions: dict[str, WebSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: WebSession) -> None:
        self._sessions[session.token] = session

    def remove(self, session: WebSession) -> None:
        if self._sessions.get(session.token) is session:
            del self._sessions[session.token]

    def claim(self, token: object) -> WebSession | None:
        """The detached session C{token} names, if it is still waiting for its page."""
        session = self._sessions.get(token) if isinstance(token, str) else None
        if session is None or session.wire is not None:
            return None
        return session


class WebSession:
    """
    The transport a browser member's L{ChatProtocol} writes to, across reconnects: while its
    page is away, what is said waits here (up to --sendq), for L{SessionBook.grace} seconds.
    """

    log = Logger()
    connected = True
    disconnected = False
    disconnecting = False
    producer = None

    def __init__(self, book: SessionBook, wire: WebSocketWire, sendq: int) -> None:
        self.token = secrets.token_urlsafe(18)
        self.book = book
        self.wire: WebSocketWire | None = wire
        self.member: protocol.Protocol | None = None
        self._sendq = sendq
        self._peer = wire.transport.getPeer()
        self._host = wire.transport.getHost()
        self._away: list[str] = []
        self._away_bytes = 0
        self._expiry = None
        self._paused = False
        self._name_sent = ""
        self._who_call = None
        self.close_code = NORMAL

    # --- the ITransport the member sees ----------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnected:
            return
        lines = data.decode("utf-8", "replace").split(EOL)
        if lines[-1] == "":
            lines.pop()
        if self.wire is None:
            self._hold(lines, len(data))
            return
        self._send_lines(lines)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        if self.wire is None:
            self.end(ConnectionDone())
        elif getattr(getattr(self.member, "factory", None), "stopping", False):
            # The server is stopping: the page comes back when it is up again.
            self.wire.close(GOING_AWAY)
        else:
            self.wire.close(self.close_code)

    def abortConnection(self) -> None:
        if self.wire is None:
            self.end(ConnectionLost())
        else:
            self.wire.abort()

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def pauseProducing(self) -> None:
        self._paused = True
        if self.wire is not None:
            self.wire.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self.wire is not None:
            self.wire.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()

    def unsent_bytes(self) -> int:
        """Output not yet sent: the socket's buffer, or what waits while the page is away."""
        if self.wire is None:
            return self._away_bytes
        return self.wire.unsent()

    # --- the page ---------------------------------------------------------------------------

    def start(self, member: protocol.Protocol) -> None:
        self.member = member
        self.book.add(self)
        self.wire.send({"session": self.token, "resumed": False})
        if isinstance(member, Refused):
            self.close_code = TRY_AGAIN_LATER
        member.makeConnection(self)

    def attach(self, wire: WebSocketWire) -> None:
        """The page is back, on C{wire}: send what waited, carry on."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self.wire = wire
        self._peer = wire.transport.getPeer()
        if self._paused:
            wire.transport.pauseProducing()
        wire.send({"session": self.token, "resumed": True})
        away, self._away, self._away_bytes = self._away, [], 0
        self._name_sent = ""
        if away:
            self._send_lines(away)
        else:
            self._send_name()
        self._refresh_who()
        self.log.info(
            "{name} ({peer}) is back on the web page", name=self._name(), peer=peer_name(self)
        )

    def line(self, text: str) -> None:
        member = self.member
        if member is None or self.disconnecting or not hasattr(member, "linesReceived"):
            return
        raw = text.encode("utf-8", "replace")
        member.factory.counts.bytes_in += len(raw)
        member.linesReceived([raw])

    def line_too_long(self) -> None:
        member = self.member
        if member is not None and hasattr(member, "line_too_long"):
            member.line_too_long()

    def wire_lost(self, wire: WebSocketWire, reason: Failure) -> None:
        if wire is not self.wire:
            return
        self.wire = None
        if self.disconnecting or self.member is None:
            self.end(reason)
            return
        self._expiry = self.book.clock.callLater(self.book.grace, self._expired)

    def end(self, reason) -> None:
        """The member is gone for good."""
        if self.disconnected:
            return
        self.disconnected = True
        self.connected = False
        self.book.remove(self)
        for call in (self._expiry, self._who_call):
            if call is not None and call.active():
                call.cancel()
        if self.member is not None:
            if not isinstance(reason, Failure):
                reason = Failure(reason if isinstance(reason, Exception) else ConnectionLost())
            self.member.connectionLost(reason)

    def _expired(self) -> None:
        self._expiry = None
        self.close_code = NORMAL
        self.end(ConnectionLost("the page did not come back in time"))

    def _hold(self, lines: list[str], size: int) -> None:
        self._away.extend(lines)
        self._away_bytes += size
        if self._sendq and self._away_bytes > self._sendq:
            self._away = []
            self.end(ConnectionLost("the page stayed away while its output passed --sendq"))

    def _send_lines(self, lines: list[str]) -> None:
        self.wire.send({"lines": lines})
        self._send_name()
        if any(line.startswith("*** ") for line in lines):
            self._refresh_who()

    def _name(self) -> str:
        return getattr(self.member, "name", "")

    def _send_name(self) -> None:
        name = self._name()
        if name and name != self._name_sent and self.wire is not None:
            self._name_sent = name
            self.wire.send({"you": name})

    def _refresh_who(self) -> None:
        """Soon tell the page who is here: announcements come in bursts, so wait a little."""
        if self._who_call is None:
            self._who_call = self.book.clock.callLater(WHO_REFRESH_SECONDS, self._ask_who)

    def _ask_who(self) -> None:
        self._who_call = None
        room = getattr(self.member, "room", None)
        if room is None or self.disconnected:
            return
        room.who().addCallbacks(self._got_who, self._who_failed)

    def _got_who(self, names: list[str]) -> None:
        if self.wire is not None and not self.disconnected:
            self.wire.send({"who": names})

    def _who_failed(self, failure: Failure) -> None:
        self.log.failure("asking the room who is here failed", failure)


class WebSocketWire(protocol.Protocol):
    """
    One WebSocket connection, after the handshake: frames in and out through wsproto, each
    text message capped at C{max_message} bytes as it arrives (the rest of a longer one is
    discarded, not buffered), bad frames answered with a close code.
    """

    log = Logger()

    def __init__(self, endpoint: ChatWebSocket, connection) -> None:
        self.endpoint = endpoint
        self._connection = connection
        self._parts: list[str] = []
        self._size = 0
        self._discarding = False
        self._closing = False
        self.session: WebSession | None = None
        self._hello_timer = None
        self._probe = None

    @property
    def max_message(self) -> int:
        return self.endpoint.factory.limits.max_line if self.session else MAX_HELLO

    def connectionMade(self) -> None:
        self._probe = pending_output_probe(self.transport)
        self._hello_timer = self.endpoint.clock.callLater(HELLO_TIMEOUT_SECONDS, self._no_hello)

    def unsent(self) -> int:
        return self._probe() if self._probe is not None else 0

    # --- out --------------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        if self._closing or self._connection.state is not ConnectionState.OPEN:
            return
        self.transport.write(self._connection.send(TextMessage(json.dumps(message))))

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        if self._closing:
            return
        self._closing = True
        if self._connection.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self.transport.write(self._connection.send(CloseConnection(code, reason)))
        self.transport.loseConnection()

    def abort(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    # --- in ---------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._connection.receive_data(data)
        except LocalProtocolError:
            self.abort()
            return
        for event in self._connection.events():
            if self._closing:
                return
            if isinstance(event, TextMessage):
                self._text(event)
            elif isinstance(event, Ping):
                self.transport.write(self._connection.send(event.response()))
            elif isinstance(event, BytesMessage):
                self.close(UNSUPPORTED, "text messages only")
            elif isinstance(event, CloseConnection):
                # The peer's close, or wsproto's verdict on a bad frame (code 1002, 1007...).
                self.close(event.code, event.reason or "")

    def _text(self, event: TextMessage) -> None:
        if self._discarding:
            self._discarding = not event.message_finished
            return
        self._size += len(event.data.encode("utf-8"))
        if self._size > self.max_message:
            self._parts, self._size = [], 0
            self._discarding = not event.message_finished
            if self.session is None:
                self.close(POLICY, "first message too long")
            else:
                self.session.line_too_long()
            return
        self._parts.append(event.data)
        if event.message_finished:
            text, self._parts, self._size = "".join(self._parts), [], 0
            if self.session is None:
                self._hello(text)
            else:
                self.session.line(text)

    def _hello(self, text: str) -> None:
        self._cancel_hello_timer()
        try:
            hello = json.loads(text)
        except ValueError:
            hello = None
        if not isinstance(hello, dict):
            self.close(POLICY, 'first message must be {"resume": token or null}')
            return
        endpoint = self.endpoint
        session = endpoint.book.claim(hello.get("resume"))
        if session is not None:
            self.session = session
            session.attach(self)
            return
        self.session = WebSession(endpoint.book, self, endpoint.factory.limits.sendq)
        self.session.start(endpoint.factory.buildProtocol(self.transport.getPeer()))

    def _no_hello(self) -> None:
        self._hello_timer = None
        self.close(POLICY, "no first message in time")

    def _cancel_hello_timer(self) -> None:
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._closing = True
        self._cancel_hello_timer()
        if self.session is not None:
            self.session.wire_lost(self, reason)


class ChatWebSocket(resource.Resource):
    """The WebSocket endpoint: checks the handshake, C{Host} and C{Origin}, then upgrades."""

    isLeaf = True
    log = Logger()

    def __init__(self, factory: ChatFactory, policy: OriginPolicy, book: SessionBook) -> None:
        super().__init__()
        self.factory = factory
        self.policy = policy
        self.book = book
        self.clock = book.clock

    def render_GET(self, request: server.Request):
        origin = request.getHeader(b"origin")
        scheme = "https" if request.isSecure() else "http"
        own = f"{scheme}://{(request.getHeader(b'host') or b'').decode('latin-1')}"
        if not self.policy.origin_allowed(origin.decode("latin-1") if origin else None, own):
            self.log.info("refused a WebSocket from origin {origin}", origin=origin)
            return _refuse(request, 403, "This page's origin may not use this chat.")
        handshake = H11Handshake(ConnectionType.SERVER)
        headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        try:
            handshake.initiate_upgrade_connection(headers, request.uri)
        except RemoteProtocolError as error:
            return _refuse(request, 400, f"Not a WebSocket handshake: {error}.")
        accept = handshake.send(AcceptConnection())
        wire = WebSocketWire(self, handshake.connection)
        channel = request.channel
        upgrade_channel(channel, wire)
        channel.transport.write(accept)
        return server.NOT_DONE_YET


def _refuse(request: server.Request, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    set_strict_headers(request)
    return (message + "\n").encode()


class ChatSite(resource.Resource):
    """
    The web face: the page's files at C{/}, the WebSocket at C{/ws}; every request's
    C{Host} checked first (421 when it names another server).
    """

    def __init__(self, factory: ChatFactory, policy: OriginPolicy, book: SessionBook) -> None:
        super().__init__()
        self.policy = policy
        self.files = package_files("twistnet.chat", PAGE_FILES)
        self.websocket = ChatWebSocket(factory, policy, book)

    def getChildWithDefault(self, path: bytes, request: server.Request):
        if not self.policy.host_allowed(request.getHeader(b"host")):
            return _Answer(421, "This server does not answer for that host name.")
        if path == WEBSOCKET_PATH and not request.postpath:
            return self.websocket
        if path == b"favicon.ico" and not request.postpath:
            path = b"favicon.svg"  # asked for by browsers whatever the page says
        name = "index.html" if path == b"" else path.decode("utf-8", "replace")
        if request.postpath or name not in self.files:
            return _Answer(404, "Not found.")
        return _File(self.files[name])


class _File(resource.Resource):
    isLeaf = True

    def __init__(self, page_file) -> None:
        super().__init__()
        self.page_file = page_file

    def render_GET(self, request: server.Request) -> bytes:
        return self.page_file.render(request)

    render_HEAD = render_GET


class _Answer(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render(self, request: server.Request) -> bytes:
        return _refuse(request, self.code, self.message)


def web_site(factory: ChatFactory, origins: list[str], clock: IReactorTime) -> server.Site:
    """The HTTP factory of C{--web}: pages and WebSockets for C{factory}'s room."""
    book = SessionBook(clock)
    site = server.Site(ChatSite(factory, OriginPolicy.from_options(origins), book), reactor=clock)
    site.displayTracebacks = False
    site.noisy = False
    site.book = book
    return site
