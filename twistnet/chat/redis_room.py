"""
A room shared by several chat servers through Redis: L{RedisRoom}, an L{IRoom}.

Every line goes through one Redis stream per room (C{XADD} with C{MAXLEN}, read with
C{XREAD BLOCK} on a connection of its own), so every server delivers the same lines in the
same order, its own members included; a sequence number in each entry shows a gap (lines
trimmed before a slow server read them) and stops a duplicate. Names, guests included, are
claimed by Lua scripts (L{redis_lua}), so two servers never hand out the same one. Each
server keeps a liveness key with a TTL; any server finding one expired announces that
server's members gone and frees their names, once. While Redis is unreachable the room
serves this server's members alone and says so, then registers them again.

The client is txredisapi (Twisted-native: no second event loop; AUTH with a user name, TLS
and any command through C{execute_command}). No other module knows Redis.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from attrs import frozen
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twistnet.chat import redis_lua
from twistnet.chat.room import EOL, IMember, IRoom, encode_lines, name_problem

#: Entries the stream keeps (approximately): what a server that fell behind can catch up on.
STREAM_MAXLEN = 10_000

#: Entries read at once: large enough to catch up fast, small enough to keep turns short.
READ_COUNT = 500

#: How long one blocking read waits for news before asking again (ms).
BLOCK_MS = 1000

#: A Redis command taking longer than this counts as Redis being unreachable (s).
COMMAND_TIMEOUT = 3.0

#: Backoff between attempts to reach Redis again (s): from the first to the cap.
RETRY_FIRST, RETRY_MAX = 0.2, 5.0

UNREACHABLE = "*** The shared room is unreachable: your lines reach only this server for now."
REACHABLE = "*** The shared room is back: lines reach every server again."


class RedisUrlError(ValueError):
    """A --redis URL this chat cannot use; the message says why in one sentence."""


@frozen(repr=False)
class RedisSettings:
    """Where Redis is and how to log in; L{safe_url} is what logs may show."""

    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ca: str | None = None

    @property
    def safe_url(self) -> str:
        user = f"{self.username or ''}:***@" if self.password else ""
        if self.scheme == "unix":
            return f"unix://{user}{self.path}?db={self.db}"
        return f"{self.scheme}://{user}{self.host}:{self.port}/{self.db}"

    def __repr__(self) -> str:
        return f"RedisSettings({self.safe_url})"


def parse_redis_url(url: str, password: str | None = None, ca: str | None = None):
    """
    C{redis://[user:password@]host:port/db}, C{rediss://...} (TLS) or
    C{unix://[user:password@]/path/redis.sock?db=N} as L{RedisSettings}; C{password}
    (from --redis-password-file) wins over one in the URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "sentinel" in scheme or "cluster" in scheme or "," in parts.netloc:
        raise RedisUrlError(
            "Redis Sentinel and Redis Cluster are not supported: give one Redis server "
            "(redis://host:port/db, rediss://... or unix:///path?db=N)"
        )
    if scheme not in ("redis", "rediss", "unix"):
        raise RedisUrlError(
            f"--redis takes redis://, rediss:// or unix:// URLs, not {parts.scheme or url!r}"
        )
    username = unquote(parts.username) if parts.username else None
    password = (
        password if password is not None else (unquote(parts.password) if parts.password else None)
    )
    try:
        if scheme == "unix":
            if not parts.path:
                raise RedisUrlError("a unix:// Redis URL needs a socket path: unix:///path?db=N")
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            return RedisSettings(
                "unix", path=parts.path, db=db, username=username, password=password
            )
        db = int(parts.path.strip("/") or 0)
        port = parts.port or 6379
    except ValueError as exc:
        if isinstance(exc, RedisUrlError):
            raise
        raise RedisUrlError("the Redis port and database must be numbers") from None
    if not parts.hostname:
        raise RedisUrlError("a Redis URL needs a host: redis://host:port/db")
    if ca and scheme != "rediss":
        raise RedisUrlError("--redis-ca only applies to a rediss:// (TLS) URL")
    return RedisSettings(
        scheme, host=parts.hostname, port=port, db=db, username=username, password=password, ca=ca
    )


def connect(settings: RedisSettings, refused: Callable[[str], None] = lambda why: None):
    """
    A lazily connecting, reconnecting txredisapi connection (one socket). Over TLS the
    server's certificate must be signed by C{settings.ca} (else the system's CAs) and name
    C{settings.host}; C{refused} hears why a handshake failed.
    """
    common = dict(
        dbid=settings.db,
        password=settings.password,
        username=settings.username,
        connectTimeout=COMMAND_TIMEOUT,
        convertNumbers=False,
    )
    if settings.scheme == "unix":
        return txredisapi.lazyUnixConnection(settings.path, **common)
    if settings.scheme == "redis":
        return txredisapi.lazyConnection(settings.host, settings.port, **common)
    return _tls_connection(settings, refused)


def _tls_connection(settings: RedisSettings, refused: Callable[[str], None]):
    """
    txredisapi's own TLS path sends AUTH before the handshake is over, so a refused
    certificate shows as "could not auth" and stops its reconnecting for good; this one logs
    in once the handshake is done and reports why one failed.
    """
    from twisted.internet import reactor, ssl
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    trust = None
    if settings.ca:
        with open(settings.ca, "rb") as pem:
            trust = ssl.Certificate.loadPEM(pem.read())
    factory = txredisapi.RedisFactory(
        f"{settings.host}:{settings.port}",
        dbid=settings.db,
        poolsize=1,
        isLazy=True,
        password=settings.password,
        convertNumbers=False,
        username=settings.username,
    )
    factory.protocol = _protocol_after_handshake(refused)
    endpoint = HostnameEndpoint(reactor, settings.host, settings.port, timeout=COMMAND_TIMEOUT)
    factory.startConnecting(
        wrapClientTLS(ssl.optionsForClientTLS(settings.host, trustRoot=trust), endpoint)
    )
    return factory.handler


def _protocol_after_handshake(refused: Callable[[str], None]) -> type:
    @implementer(IHandshakeListener)
    class AfterHandshake(txredisapi.RedisProtocol):
        _secured = False

        def connectionMade(self) -> None:
            pass  # not yet: AUTH waits for the handshake

        def handshakeCompleted(self) -> None:
            self._secured = True
            super().connectionMade()

        def connectionLost(self, why) -> None:
            if not self._secured:
                refused(f"TLS handshake failed: {_tls_reason(why.value)}")
            super().connectionLost(why)

    return AfterHandshake


def _tls_reason(error: BaseException) -> str:
    """What a person can act on: the verification that failed, not the OpenSSL tuple."""
    from OpenSSL.SSL import Error
    from service_identity import VerificationError

    if isinstance(error, VerificationError):
        return "the certificate does not name this host"
    if isinstance(error, Error) and error.args and isinstance(error.args[0], list):
        # [(library, function, reason), ...]
        return "; ".join(str(r[-1]) for r in error.args[0] if r) or "refused"
    return str(error) or type(error).__name__


@implementer(IRoom)
class RedisRoom(Service):
    """
    One room shared through Redis. A L{Service}: started, it registers this server and
    reads the stream; stopped, it announces its members' departure to the other servers.

    @param connect: makes a new Redis connection (the room uses two: commands, and the
        blocking stream reads), given a callable to tell why a TLS handshake was refused.
    """

    log = Logger()

    def __init__(
        self,
        connect: Callable[[Callable[[str], None]], object],
        prefix: str = "twistnet",
        ttl: float = 10.0,
        history_size: int = 20,
        guest_prefix: str = "guest-",
        clock: IReactorTime | None = None,
        where: str = "",
    ) -> None:
        from twistnet._connections import reactor_or_global

        self._connect = connect
        self._clock = reactor_or_global(clock)
        self._ttl = ttl
        self._where = where
        self.server_id = secrets.token_hex(8)
        tag = "{" + prefix + "}"
        self._keys = {
            name: f"{tag}:{name}"
            for name in ("names", "stream", "seq", "guests", "servers", "epoch")
        }
        self._members_key = f"{tag}:members:{self.server_id}"
        self._alive_key = f"{tag}:alive:{self.server_id}"
        self._tag = tag
        self._guest_prefix = guest_prefix
        #: Guest names handed out while Redis is unreachable: unique to this server.
        self._local_guest_prefix = f"{guest_prefix}{self.server_id[:4]}-"
        self._local_guests = 0
        self._member_ids: dict[IMember, str] = {}
        #: Members whose join waits for this server's first registration.
        self._joining: set[IMember] = set()
        self._by_id: dict[str, IMember] = {}
        self._next_id = 0
        self._history: deque[bytes] = deque(maxlen=history_size)
        self._cursor = "$"
        self._seq: int | None = None
        self._epoch: str | None = None
        self._shared = False
        self._ever_shared = False
        self._running = False
        self._first_attempt: Deferred[None] = Deferred()
        self._commands = None
        self._reader = None
        self._loops: list[Deferred] = []
        self._sleeping: Deferred | None = None
        #: Lines and notices of this reactor turn, appended by one SAY at its end.
        self._said: list[tuple[str, str, str, IMember | None]] = []
        self._say_call = None
        #: Why Redis refused us last (a TLS handshake): logged once, not per attempt.
        self._refusal: str | None = None

    # --- life -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._running = True
        self._commands = self._connect(self._refused)
        self._reader = self._connect(self._refused)
        self.log.info(
            "chat room shared through Redis at {where} as server {server}",
            where=self._where,
            server=self.server_id,
        )
        self._loops = [
            Deferred.fromCoroutine(loop()).addErrback(_stopped)
            for loop in (self._keep_registered, self._read_stream)
        ]

    async def stopService(self) -> None:
        super().stopService()
        self._running = False
        if self._shared:
            try:
                await self._script(
                    redis_lua.REAP,
                    [
                        self._keys["servers"],
                        self._alive_key,
                        self._members_key,
                        self._keys["names"],
                        self._keys["stream"],
                        self._keys["seq"],
                    ],
                    [self.server_id, STREAM_MAXLEN, "server shutting down", "1"],
                )
            except Exception as exc:
                self.log.warn("could not announce this server's departure: {why}", why=exc)
        self._shared = False
        for loop in self._loops:
            loop.cancel()
        for connection in (self._commands, self._reader):
            try:
                await connection.disconnect()
            except Exception as exc:
                self.log.debug("closing a Redis connection: {why}", why=exc)

    def _refused(self, why: str) -> None:
        if why != self._refusal:
            self._refusal = why
            self.log.error("cannot reach Redis at {where}: {why}", where=self._where, why=why)

    def _sleep(self, seconds: float) -> Deferred:
        return task.deferLater(self._clock, seconds, lambda: None)

    def _timed(self, d: Deferred, timeout: float = COMMAND_TIMEOUT) -> Deferred:
        return d.addTimeout(timeout, self._clock)

    def _script(self, script: str, keys: list, args: list) -> Deferred:
        if self._said:
            # What members said earlier in this turn reaches Redis first: one order.
            self._send_said()
        return self._timed(self._commands.eval(script, keys, [str(a) for a in args]))

    # --- registration, liveness and the janitor ------------------------------------------

    async def _keep_registered(self) -> None:
        delay = RETRY_FIRST
        while self._running:
            try:
                if self._shared:
                    await self._heartbeat()
                else:
                    await self._register()
                delay = RETRY_FIRST
                wait = self._ttl / 3
            except defer.CancelledError:
                if not self._running:
                    return
                self._lost("no answer")
                wait, delay = delay, min(delay * 2, RETRY_MAX)
            except Exception as exc:
                self._lost(str(exc) or type(exc).__name__)
                wait, delay = delay, min(delay * 2, RETRY_MAX)
            if not self._first_attempt.called:
                self._first_attempt.callback(None)
            await self._sleep(wait)

    async def _heartbeat(self) -> None:
        state = await self._script(
            redis_lua.HEARTBEAT,
            [self._keys["servers"], self._alive_key, self._keys["epoch"]],
            [self.server_id, int(self._ttl * 1000), self._epoch],
        )
        if state == "dead":
            self.log.warn(
                "this server was declared dead (paused past --redis-ttl): "
                "registering its members again"
            )
            self._shared = False
            await self._register()
        elif state == "epoch":
            self.log.warn(
                "Redis lost its data (restarted without persistence): "
                "registering this server's members again"
            )
            self._shared = False
            await self._register()
        await self._reap_dead()

    async def _register(self) -> None:
        epoch = await self._script(
            redis_lua.REGISTER,
            [self._keys["servers"], self._alive_key, self._keys["epoch"]],
            [self.server_id, int(self._ttl * 1000), secrets.token_hex(8)],
        )
        if epoch != self._epoch:
            if self._epoch is not None:
                # A new dataset: old stream positions and sequence numbers mean nothing.
                self._cursor, self._seq = "0-0", None
            else:
                await self._catch_history()
            self._epoch = epoch
        # Members who joined, renamed or left while Redis was out of reach.
        known = await self._timed(self._commands.execute_command("HKEYS", self._members_key))
        for member_id in known or ():
            if member_id not in self._by_id:
                await self._leave_script(member_id, "", announce=True)
        for member in list(self._member_ids):
            if member not in self._joining:
                await self._claim(member, "is back")
        was_shared = self._ever_shared
        self._shared = self._ever_shared = True
        self._refusal = None
        if was_shared:
            self.log.info("Redis reachable again: this server's members registered again")
            self._tell_local(REACHABLE)

    async def _catch_history(self) -> None:
        """The recent lines of the shared room, and where to read on from."""
        entries = await self._timed(
            self._commands.execute_command(
                "XREVRANGE", self._keys["stream"], "+", "-", "COUNT", STREAM_MAXLEN // 10
            )
        )
        if not entries:
            self._cursor = "0-0"
            return
        self._cursor = entries[0][0]
        newest = _unpack(entries[0][1])
        self._seq = newest[0] if newest else None
        lines: list[bytes] = []
        for _, raw in entries:
            entry = _unpack(raw)
            if entry and entry[1] == "line":
                lines[:0] = _split_lines(entry[4])
                if len(lines) >= (self._history.maxlen or 0):
                    break
        self._history.extend(lines)

    async def _reap_dead(self) -> None:
        servers = await self._timed(
            self._commands.execute_command("SMEMBERS", self._keys["servers"])
        )
        for server in servers or ():
            if server == self.server_id:
                continue
            reaped = await self._script(
                redis_lua.REAP,
                [
                    self._keys["servers"],
                    f"{self._tag}:alive:{server}",
                    f"{self._tag}:members:{server}",
                    self._keys["names"],
                    self._keys["stream"],
                    self._keys["seq"],
                ],
                [server, STREAM_MAXLEN, "their server stopped answering", "0"],
            )
            if reaped:
                self.log.info(
                    "server {server} stopped answering: its members announced gone", server=server
                )

    def _lost(self, why: str) -> None:
        if not self._shared:
            return
        self._shared = False
        self.log.warn("Redis unreachable ({why}): serving this server's members alone", why=why)
        self._tell_local(UNREACHABLE)

    def _tell_local(self, line: str) -> None:
        encoded = encode_lines([line])
        for member in list(self._member_ids):
            _deliver(member, encoded)

    # --- reading the stream ---------------------------------------------------------------

    async def _read_stream(self) -> None:
        await self._first_attempt
        delay = RETRY_FIRST
        while self._running:
            if not self._shared:
                await self._sleep(delay)
                continue
            try:
                reply = await self._timed(
                    self._reader.execute_command(
                        "XREAD",
                        "COUNT",
                        READ_COUNT,
                        "BLOCK",
                        BLOCK_MS,
                        "STREAMS",
                        self._keys["stream"],
                        self._cursor,
                    ),
                    BLOCK_MS / 1000 + COMMAND_TIMEOUT,
                )
            except defer.CancelledError:
                if not self._running:
                    return
                self._lost("no answer to a stream read")
                continue
            except Exception as exc:
                self._lost(str(exc) or type(exc).__name__)
                continue
            for _, entries in reply or ():
                if entries:
                    self._cursor = entries[-1][0]
                    self._dispatch(*filter(None, (_unpack(raw) for _, raw in entries)))

    def _dispatch(self, *entries: tuple[int, str, str, str, str]) -> None:
        """
        The entries of one read, in order. Consecutive lines and notices reach each member
        as one delivery (a busy server reads hundreds at once: one call per member, not one
        per member and line); a private line or a gap notice ends such a run.
        """
        run: list[tuple[bytes, IMember | None]] = []
        for seq, kind, skip, to, data in entries:
            if self._seq is not None:
                if seq <= self._seq:
                    continue  # already delivered
                missed = seq - self._seq - 1
                if missed:
                    self._deliver_run(run)
                    self.log.warn("this server fell behind: {missed} lines missed", missed=missed)
                    self._tell_local(f"*** This server fell behind: you missed {missed} lines.")
            self._seq = seq
            encoded = data.encode("utf-8", "replace")
            if kind == "private":
                self._deliver_run(run)
                member = self._owned(to)
                if member is not None:
                    _deliver(member, encoded)
                continue
            if kind == "line":
                self._history.extend(_split_lines(data))
            run.append((encoded, self._owned(skip) if skip else None))
        self._deliver_run(run)

    def _deliver_run(self, run: list[tuple[bytes, IMember | None]]) -> None:
        """Each member gets the run but what it said itself; C{run} is emptied."""
        if not run:
            return
        whole = run[0][0] if len(run) == 1 else b"".join(encoded for encoded, _ in run)
        skipped = {skip for _, skip in run if skip is not None}
        for member in list(self._member_ids):
            data = whole
            if member in skipped:
                data = b"".join(encoded for encoded, skip in run if skip is not member)
            if data:
                _deliver(member, data)
        run.clear()

    def _owned(self, owner: str) -> IMember | None:
        server, _, member_id = owner.partition(":")
        if server != self.server_id:
            return None
        return self._by_id.get(member_id)

    def _owner(self, member: IMember) -> str:
        return f"{self.server_id}:{self._member_ids[member]}"

    # --- IRoom ----------------------------------------------------------------------------

    async def _join(self, member: IMember) -> str:
        self._next_id += 1
        member_id = str(self._next_id)
        self._member_ids[member] = member_id
        self._by_id[member_id] = member
        self._joining.add(member)
        try:
            await self._first_attempt
        finally:
            self._joining.discard(member)
        if member not in self._member_ids:
            return ""  # gone while this server was still registering: nothing to claim
        if self._shared:
            try:
                return await self._claim(member, "has joined")
            except Exception as exc:
                self._lost(str(exc) or type(exc).__name__)
        self._local_guests += 1
        member.name = name = f"{self._local_guest_prefix}{self._local_guests}"
        self._deliver_here("notice", f"*** {name} has joined{EOL}", member)
        return name

    def join(self, member: IMember) -> Deferred[str]:
        return Deferred.fromCoroutine(self._join(member))

    async def _claim(self, member: IMember, what: str) -> str:
        """Register C{member} under its name if free (else a guest name), announced."""
        wanted = member.name
        name = await self._script(
            redis_lua.JOIN,
            [
                self._keys["names"],
                self._members_key,
                self._keys["stream"],
                self._keys["seq"],
                self._keys["guests"],
            ],
            [
                self._owner(member),
                self._member_ids[member],
                STREAM_MAXLEN,
                self._guest_prefix,
                self._guest_prefix.casefold(),
                wanted.casefold(),
                wanted,
                what,
            ],
        )
        if member not in self._member_ids:
            # Gone while the claim was under way: free the name again.
            return name
        member.name = name
        if wanted and name != wanted:
            _deliver(
                member,
                encode_lines(
                    [
                        f"*** While this server was out of touch someone took the name {wanted}:"
                        f" you are now {name}."
                    ]
                ),
            )
        return name

    def leave(self, member: IMember, reason: str = "", announce: bool = True) -> Deferred[None]:
        member_id = self._member_ids.pop(member, None)
        if member_id is None:
            return succeed(None)
        del self._by_id[member_id]
        if not (self._shared and self._running):
            if announce and member.name:
                why = f" ({reason})" if reason else ""
                self._deliver_here("notice", f"*** {member.name} has left{why}{EOL}", None)
            return succeed(None)
        # Sent after the join's script on the same connection, so it runs after it even when
        # the join has not answered yet: no name is left claimed.
        return self._leave_script(member_id, reason, announce).addErrback(self._failed, "leave")

    def _leave_script(self, member_id: str, reason: str, announce: bool) -> Deferred:
        return self._script(
            redis_lua.LEAVE,
            [self._keys["names"], self._members_key, self._keys["stream"], self._keys["seq"]],
            [
                f"{self.server_id}:{member_id}",
                member_id,
                STREAM_MAXLEN,
                f" ({reason})" if reason else "",
                "1" if announce else "0",
            ],
        ).addCallback(lambda _: None)

    async def _rename(self, member: IMember, new: str) -> str | None:
        problem = name_problem(new)
        if problem:
            return problem
        if not self._shared:
            return self._rename_here(member, new)
        try:
            outcome, other = await self._script(
                redis_lua.RENAME,
                [self._keys["names"], self._members_key, self._keys["stream"], self._keys["seq"]],
                [self._owner(member), self._member_ids[member], STREAM_MAXLEN, new.casefold(), new],
            )
        except Exception as exc:
            self._lost(str(exc) or type(exc).__name__)
            return "the shared room did not answer, try again"
        if outcome == "ok":
            member.name = new
            return None
        if outcome == "same":
            return f"you are already called {other}"
        if outcome == "taken":
            return f"{other} is already taken"
        return "you are not registered in the shared room yet, try again"

    def _rename_here(self, member: IMember, new: str) -> str | None:
        """Renaming while Redis is unreachable: unique among this server's members."""
        old = member.name
        if new == old:
            return f"you are already called {old}"
        for other in self._member_ids:
            if other is not member and other.name.casefold() == new.casefold():
                return f"{other.name} is already taken"
        member.name = new
        self._deliver_here("notice", f"*** {old} is now known as {new}{EOL}", None)
        return None

    def rename(self, member: IMember, new: str) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._rename(member, new))

    async def _who(self) -> list[str]:
        if self._shared:
            try:
                held = await self._timed(
                    self._commands.execute_command("HVALS", self._keys["names"])
                )
                names = [value.partition(" ")[2] for value in held or ()]
                return sorted(names, key=str.casefold)
            except Exception as exc:
                self._lost(str(exc) or type(exc).__name__)
        return sorted((m.name for m in self._member_ids), key=str.casefold)

    def who(self) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._who())

    async def _count(self) -> int:
        if self._shared:
            try:
                return int(
                    await self._timed(self._commands.execute_command("HLEN", self._keys["names"]))
                )
            except Exception as exc:
                self._lost(str(exc) or type(exc).__name__)
        return len(self._member_ids)

    def count(self) -> Deferred[int]:
        return Deferred.fromCoroutine(self._count())

    def broadcast(self, sender: IMember | None, lines: Sequence[str]) -> None:
        if not lines:
            return
        data = "".join(line + EOL for line in lines)
        skip = self._owner(sender) if sender in self._member_ids else ""
        self._append("line", skip, data, sender)

    def announce(self, line: str) -> None:
        self._append("notice", "", line + EOL, None)

    def _append(self, kind: str, skip: str, data: str, sender: IMember | None) -> None:
        if not self._shared:
            self._deliver_here(kind, data, sender)
            return
        if not self._said:
            self._say_call = self._clock.callLater(0, self._send_said)
        self._said.append((kind, skip, data, sender))

    def _send_said(self) -> None:
        """One round trip for a turn's lines (at saturation, one instead of one per read)."""
        said, self._said = self._said, []
        if self._say_call is not None and self._say_call.active():
            self._say_call.cancel()
        self._say_call = None
        if not self._shared:
            for kind, _, data, sender in said:
                self._deliver_here(kind, data, sender)
            return
        args: list = [STREAM_MAXLEN]
        for kind, skip, data, _ in said:
            args += (kind, skip, data)
        self._script(redis_lua.SAY, [self._keys["stream"], self._keys["seq"]], args).addErrback(
            self._append_failed, said
        )

    def _append_failed(self, failure, said: list) -> None:
        self._lost(failure.getErrorMessage() or failure.type.__name__)
        for kind, _, data, sender in said:
            self._deliver_here(kind, data, sender)

    def _deliver_here(self, kind: str, data: str, sender: IMember | None) -> None:
        if self._said:
            # Said while Redis was reachable, earlier in this turn: it goes first.
            self._send_said()
        if kind == "line":
            self._history.extend(_split_lines(data))
        encoded = data.encode("utf-8", "replace")
        for member in list(self._member_ids):
            if member is not sender:
                _deliver(member, encoded)

    async def _private(self, sender: IMember, recipient: str, line: str) -> bool:
        data = f"[private] {sender.name}: {line}{EOL}"
        if self._shared:
            try:
                return bool(
                    await self._script(
                        redis_lua.PRIVATE,
                        [self._keys["names"], self._keys["stream"], self._keys["seq"]],
                        [recipient.casefold(), STREAM_MAXLEN, data],
                    )
                )
            except Exception as exc:
                self._lost(str(exc) or type(exc).__name__)
        for member in self._member_ids:
            if member.name.casefold() == recipient.casefold():
                _deliver(member, data.encode("utf-8", "replace"))
                return True
        return False

    def private(self, sender: IMember, recipient: str, line: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._private(sender, recipient, line))

    def history(self) -> Deferred[list[bytes]]:
        return succeed(list(self._history))

    def _failed(self, failure, doing: str) -> None:
        self._lost(failure.getErrorMessage() or failure.type.__name__)
        self.log.warn("Redis {doing} failed: {why}", doing=doing, why=failure.getErrorMessage())


def _stopped(failure) -> None:
    failure.trap(defer.CancelledError)


def _unpack(raw: list) -> tuple[int, str, str, str, str] | None:
    """
    (seq, kind, skip, to, data) of a stream entry (see L{redis_lua}); None for one this
    version did not write.
    """
    if len(raw) != 4 or raw[0] != "seq" or raw[2] != "m":
        return None
    head, _, data = raw[3].partition("\n")
    parts = head.split(" ", 2)
    if len(parts) != 3:
        return None
    kind, skip, to = parts
    return int(raw[1]), kind, skip, to, data


def _split_lines(data: str) -> list[bytes]:
    return [(line + EOL).encode("utf-8", "replace") for line in data.split(EOL)[:-1]]


def _deliver(member: IMember, encoded: bytes) -> None:
    try:
        member.deliver(encoded)
    except Exception:
        RedisRoom.log.failure("delivery to {name} failed", name=getattr(member, "name", "?"))
