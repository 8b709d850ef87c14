"""
The chat protocol: one connection's commands, glued to IO-free parts.

L{telnet.TelnetFilter} strips telnet commands, L{lines.LineSplitter} frames lines,
L{flow.TokenBucket} limits the rate, L{flow.SendQueue} holds and caps the output; this class
only connects them to the transport and the room. Everything shared (names, history,
delivery to others) goes through an L{IRoom}. It is written for throughput: consecutive
plain lines of one chunk go to the room as one broadcast, and each member's output is sent
once per reactor turn through L{write_now} (see L{Flusher}).
"""

from __future__ import annotations

import re
from collections import deque

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twistnet._connections import ManagedFactory, ManagedProtocol, peer_name, send_at_once
from twistnet._internals import PauseCounter, pending_output_probe, write_now
from twistnet.chat.flow import SendQueue, TokenBucket, Verdict
from twistnet.chat.lines import LineSplitter
from twistnet.chat.room import EOL, IMember, IRoom, encode_lines
from twistnet.chat.telnet import TelnetFilter

#: C0 and C1 control characters other than TAB: shown to others they could drive their
#: terminals (escape sequences, bells, clearing the screen), so they are removed.
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

HELP_LINES = (
    "*** Type a line to say it to everyone. Commands (any case):",
    "***   /NAME new      change your name (alias /NICK)",
    "***   /WHO           who is here",
    "***   /ME action     say what you do, e.g. /ME waves",
    "***   /MSG name text a private message to one person",
    "***   /HELP          this list",
    "***   /EXIT          leave (alias /QUIT)",
    "***   //text         say a line that starts with /",
)

#: Names per /WHO line, so a long list arrives as lines a terminal shows well.
WHO_NAMES_PER_LINE = 10


@frozen
class ChatLimits:
    """
    The per-connection limits.

    @ivar max_line: longest line in bytes (without its line end) that is accepted.
    @ivar rate: lines per second a client may send on average; C{0} turns the limit off.
    @ivar burst: lines a client may send at once before the rate applies.
    @ivar sendq: bytes that may wait unsent for a client before it is disconnected;
        C{0} turns the cap off. The server's own bulk output is exempt.
    """

    max_line: int = 4096
    rate: float = 10.0
    burst: int = 20
    sendq: int = 1024 * 1024


def _no_delay(transport) -> None:
    """
    Turn Nagle's algorithm off: chat lines are small and interactive, and output is already
    batched once per reactor turn, so holding a line back for an ACK (up to the peer's
    delayed-ACK 40 ms) only adds latency. Through a TLS wrapper, the TCP transport below.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        set_no_delay = getattr(candidate, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # already closed, or not TCP after all: nothing to tune
            return


def _output_probe(transport):
    """
    How to measure C{transport}'s unsent output: a transport that knows (a WebSocket
    session, see L{twistnet.chat.web}) says so itself; any other is probed.
    """
    own = getattr(transport, "unsent_bytes", None)
    return own if own is not None else pending_output_probe(transport)


@implementer(IMember)
class ChatProtocol(ManagedProtocol):
    """One person in the chat, as seen from their connection."""

    idle_message = b"*** You sent nothing for too long (idle timeout). Goodbye.\r\n"
    evicted_message = (
        b"*** The room is full: making room by closing the connection that has waited "
        b"longest without saying anything. Goodbye.\r\n"
    )

    name = ""
    room: IRoom
    _closing = False
    _counter: PauseCounter | None = None
    _leave_reason = ""

    # --- connection life ------------------------------------------------------------------

    def connectionAdmitted(self) -> None:
        send_at_once(self.transport)
        factory = self.factory
        limits: ChatLimits = factory.limits
        self.room = factory.room
        self._clock: IReactorTime = factory.clock
        self._pending = _output_probe(self.transport) if limits.sendq else None
        self._counter = self._pending if isinstance(self._pending, PauseCounter) else None
        if limits.sendq and self._pending is None:
            factory.log.info(
                "--sendq is not enforced on {kind} transports",
                kind=type(self.transport).__name__,
            )
        _no_delay(self.transport)
        self._telnet = TelnetFilter()
        self._splitter = LineSplitter(limits.max_line)
        self._bucket = TokenBucket(limits.rate, limits.burst, self._clock.seconds())
        self._queue = SendQueue(limits.sendq)
        #: Lines accepted but not acted on yet: they wait while the room answers.
        self._backlog: deque[str] = deque()
        self._waiting: Deferred | None = None
        self._draining = False
        self._paused = False
        #: Output that arrives before the welcome, sent after it.
        self._held: list[bytes] | None = []
        self._wait_for(Deferred.fromCoroutine(self._join()))

    async def _join(self) -> None:
        name = await self.room.join(self)
        if self._closing:
            return
        # Asked at once, so the history holds exactly what this member will not receive.
        history = self.room.history()
        here = self.room.count()
        history_lines, count = await history, await here
        self.factory.log.info("{peer} joined as {name}", peer=peer_name(self.transport), name=name)
        held, self._held = self._held, None
        self._send_bulk(self._welcome(name, count, history_lines))
        for data in held or ():
            self._reply(data)

    def _welcome(self, name: str, here: int, history: list[bytes]) -> bytes:
        lines = [
            f"*** Welcome to twistnet chat, {name}! {here} here now."
            " /NAME yourname to pick a name, /HELP for commands.",
        ]
        if history:
            lines.append(f"*** The last {len(history)} messages:")
            return encode_lines(lines) + b"".join(history) + encode_lines(["*** (end)"])
        return encode_lines(lines)

    def connectionClosed(self, reason) -> None:
        self._closing = True
        stopping = getattr(self.factory, "stopping", False)
        # Also before the join completed: the room drops a name it was still claiming.
        self.room.leave(self, self._leave_reason, announce=not stopping).addErrback(
            self._room_failed, "leaving"
        )
        self.factory.log.info(
            "{name} ({peer}) left{why}",
            name=self.name,
            peer=peer_name(self.transport),
            why=f": {self._leave_reason}" if self._leave_reason else "",
        )

    def close(self, message: bytes = b"") -> None:
        # What is queued goes out before the last words, in order.
        self.flush()
        self._closing = True
        # No longer here from now on, not once a peer that does not read is finally gone:
        # an evicted member must not keep its place in the room (and the head count) while
        # its goodbye waits up to the close grace.
        self.room.leave(self, self._leave_reason).addErrback(self._room_failed, "leaving")
        self.release_transport()
        super().close(message)

    def release_transport(self) -> None:
        """Unregister the L{PauseCounter}, if any, so closing does not wait for it."""
        if self._counter is not None and getattr(self.transport, "producer", None) is (
            self._counter
        ):
            self.transport.unregisterProducer()

    def _idled(self) -> None:
        self._leave_reason = self._leave_reason or "idle timeout"
        super()._idled()

    def evict(self) -> None:
        self._leave_reason = "evicted to make room, had said nothing"
        super().evict()

    # --- output ---------------------------------------------------------------------------

    def deliver(self, encoded: bytes) -> None:
        """L{IMember.deliver}: queue C{encoded} for this reactor turn's flush."""
        self._reply(encoded)

    def _reply(self, data: bytes, exempt: bool = False) -> None:
        """Queue output for this client, in order with what others said (see L{SendQueue})."""
        if self._closing:
            return
        if self._held is not None:
            self._held.append(data)
            return
        if self._queue.put(data, exempt):
            self.factory.flusher.mark(self)

    def flush(self) -> None:
        """
        Send what was queued since the last flush in one write, unless that would leave
        more than --sendq bytes unsent (the server's exempt bulk output not counted).
        """
        data = self._queue.take()
        if self._closing or not data:
            return
        pending = 0
        probe = self._pending
        if probe is not None:
            pending = probe()
            if not self._queue.fits(pending, len(data)):
                self._overflow(pending + len(data))
                return
            if self._counter is not None:
                self._counter.wrote(len(data))
        self.factory.counts.bytes_out += len(data)
        if pending:
            # Queued behind what is unsent anyway: no point trying to send now.
            self.transport.write(data)
        else:
            write_now(self.transport, data)

    def _send_bulk(self, data: bytes) -> None:
        self._reply(data, exempt=True)

    def _notice(self, *lines: str) -> None:
        self._reply(encode_lines(lines))

    def _overflow(self, pending: int) -> None:
        self._closing = True
        self._leave_reason = "not reading, send queue full"
        self.close_reason = "sendq"
        self.factory.log.warn(
            "disconnecting {name} ({peer}): {pending} bytes unsent, over --sendq {cap}",
            name=self.name,
            peer=peer_name(self.transport),
            pending=pending,
            cap=self._queue.cap,
        )
        self.release_transport()
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            # It is not reading: flushing a goodbye would only keep the memory held longer.
            abort()
        else:
            self.transport.loseConnection()

    # --- input ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.factory.counts.bytes_in += len(data)
        data, answers = self._telnet.feed(data)
        if answers:
            # Ordinary output: a client flooding requests without reading meets --sendq.
            self._reply(answers)
        lines, overflowed = self._splitter.feed(data)
        if overflowed:
            self.line_too_long()
        if lines:
            self.linesReceived(lines)

    def linesReceived(self, lines: list[bytes]) -> None:
        """
        Act on complete lines (without their line ends), however they were framed: telnet
        lines here, one WebSocket message each in L{twistnet.chat.web}.
        """
        if self._closing:
            return
        # Only complete lines count as activity: a client trickling bytes of a line it
        # never finishes idles out (the slowloris defence), and is the first evicted
        # when the room is full.
        self.spoke()
        self.factory.counts.lines_in += len(lines)
        self._lines(lines)

    @property
    def max_line(self) -> int:
        return self._splitter.max_line

    def _lines(self, lines: list[bytes]) -> None:
        bucket = self._bucket if self._bucket.rate else None
        if bucket is not None:
            bucket.refill(self._clock.seconds())
        max_line = self._splitter.max_line
        backlog = self._backlog
        for raw in lines:
            if self._closing:
                return
            if bucket is not None and not bucket.take():
                self._over_rate(bucket.over())
                continue
            if len(raw) > max_line:
                self.line_too_long()
                continue
            backlog.append(_CONTROLS.sub("", raw.decode("utf-8", "replace")))
        self._drain()

    def _drain(self) -> None:
        """
        Act on the accepted lines in order. A command the room answers later holds back
        the lines after it (and reading), so they see its outcome: the name it set, say.
        """
        if self._draining:
            return
        self._draining = True
        backlog = self._backlog
        batch: list[str] = []
        while backlog and self._waiting is None and not self._closing:
            text = backlog.popleft()
            if text[:1] == "/":
                if text[:2] != "//":
                    if batch:
                        self.room.broadcast(self, batch)
                        batch = []
                    self._wait_for(self._command(text))
                    continue
                text = text[1:]
            if text and not text.isspace():
                batch.append(f"{self.name}: {text}")
        if batch:
            self.room.broadcast(self, batch)
        self._draining = False
        if backlog and self._waiting is not None and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _wait_for(self, answer: Deferred) -> None:
        self._waiting = answer
        answer.addErrback(self._room_failed, "asking the room").addBoth(self._answered, answer)

    def _answered(self, _: object, answer: Deferred) -> None:
        if self._waiting is not answer:
            return
        self._waiting = None
        if self._paused and not self._closing:
            self._paused = False
            self.transport.resumeProducing()
        self._drain()

    def _room_failed(self, failure, doing: str) -> None:
        self.factory.log.failure(
            "{name} ({peer}): the room failed {doing}",
            failure,
            name=self.name,
            peer=peer_name(self.transport),
            doing=doing,
        )
        if self._held is not None:
            # Never got in: there is no room to talk to.
            self._held = None
            self.close(encode_lines(["*** The chat cannot take you in now. Try again later."]))

    def line_too_long(self) -> None:
        """A line over --max-line was discarded (before it was buffered): say so, keep going."""
        self.factory.counts.lines_refused["max_line"] += 1
        self._notice(f"*** Line too long (over {self._splitter.max_line} bytes): not sent.")

    def _over_rate(self, verdict: Verdict) -> None:
        self.factory.counts.lines_refused["rate"] += 1
        rate = self._bucket.rate
        if verdict is Verdict.WARN:
            self._notice(
                f"*** You are sending too fast (over {rate:g} lines a second):"
                " lines dropped. Slow down or you will be disconnected."
            )
        elif verdict is Verdict.DISCONNECT:
            self._leave_reason = "flooding"
            self.close_reason = "rate"
            self.factory.log.info(
                "disconnecting {name} ({peer}): still over --rate {rate} after a warning",
                name=self.name,
                peer=peer_name(self.transport),
                rate=rate,
            )
            self.close(encode_lines(["*** Disconnected: still sending too fast after a warning."]))

    # --- commands -------------------------------------------------------------------------

    def _command(self, text: str) -> Deferred[None]:
        word, _, rest = text[1:].partition(" ")
        handler = _COMMANDS.get(word.upper())
        if handler is None:
            return Deferred.fromCoroutine(self._cmd_unknown(word))
        return Deferred.fromCoroutine(handler(self, rest.strip()))

    async def _cmd_unknown(self, word: str) -> None:
        self._notice(f"*** Unknown command /{word}. /HELP lists the commands.")

    async def _cmd_name(self, new: str) -> None:
        if not new:
            self._notice(f"*** You are {self.name}. To change it: /NAME newname")
            return
        old = self.name
        problem = await self.room.rename(self, new)
        if problem:
            self._notice(f"*** Cannot take the name {new!r}: {problem}.")
            return
        self.factory.log.info("{old} is now {new}", old=old, new=new)

    async def _cmd_who(self, _: str) -> None:
        names = await self.room.who()
        lines = [f"*** {len(names)} here:"]
        for i in range(0, len(names), WHO_NAMES_PER_LINE):
            lines.append("***   " + " ".join(names[i : i + WHO_NAMES_PER_LINE]))
        self._send_bulk(encode_lines(lines))

    async def _cmd_me(self, action: str) -> None:
        if not action:
            self._notice("*** Usage: /ME action, e.g. /ME waves")
            return
        self.room.broadcast(self, [f"* {self.name} {action}"])

    async def _cmd_msg(self, rest: str) -> None:
        recipient, _, text = rest.partition(" ")
        text = text.strip()
        if not recipient or not text:
            self._notice("*** Usage: /MSG name text")
            return
        if not await self.room.private(self, recipient, text):
            self._notice(f"*** No one here is called {recipient}.")
            return
        self._notice(f"[private to {recipient}] {text}")

    async def _cmd_exit(self, _: str) -> None:
        self._leave_reason = "quit"
        self.close_reason = "quit"
        self.close(encode_lines([f"*** Goodbye, {self.name}."]))

    async def _cmd_help(self, _: str) -> None:
        self._send_bulk(encode_lines(HELP_LINES))


_COMMANDS = {
    "NAME": ChatProtocol._cmd_name,
    "NICK": ChatProtocol._cmd_name,
    "WHO": ChatProtocol._cmd_who,
    "ME": ChatProtocol._cmd_me,
    "MSG": ChatProtocol._cmd_msg,
    "EXIT": ChatProtocol._cmd_exit,
    "QUIT": ChatProtocol._cmd_exit,
    "HELP": ChatProtocol._cmd_help,
}


class Flusher:
    """
    Sends every member's queued output once per reactor turn.

    Deliveries are queued per member and flushed by one delayed call at the end of the
    turn: when ten people speak in the same turn, each member gets one write of ten lines
    instead of ten writes, and a single message still goes out as the one bytes object
    the room encoded. Each member is flushed on its own, so one failure stops no one else.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._dirty: list[ChatProtocol] = []
        self._call = None

    def mark(self, member: ChatProtocol) -> None:
        self._dirty.append(member)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        dirty, self._dirty = self._dirty, []
        for member in dirty:
            try:
                member.flush()
            except Exception:
                self.log.failure("sending to {name} failed", name=member.name)


class ChatFactory(ManagedFactory):
    """Builds L{ChatProtocol}s sharing one room, one set of limits and one registry."""

    protocol = ChatProtocol
    log = Logger()
    full_message = b"*** The chat room is full, try again later.\r\n"

    #: Set while the service stops: leaving members are then not announced one by one.
    stopping = False

    def __init__(
        self,
        room: IRoom,
        limits: ChatLimits | None = None,
        max_connections: int = 0,
        idle_timeout: float = 0.0,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(max_connections, idle_timeout, clock)
        self.room = room
        self.limits = limits if limits is not None else ChatLimits()
        self.flusher = Flusher(self.clock)


__all__ = ["EOL", "ChatFactory", "ChatLimits", "ChatProtocol"]
