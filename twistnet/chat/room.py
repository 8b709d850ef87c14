"""
The chat room: who is here under which name, the recent history, and delivery.

The room knows nothing of transports or bytes on the wire beyond encoding each message once:
it talks to members through L{IMember}. L{IRoom} is the seam a room shared between several
processes (L{twistnet.chat.redis_room}) implements without touching the protocol: whatever
needs a round trip to a broker returns a Deferred, which the in-memory L{Room} fires at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

#: Longest name in characters: short enough for a line prefix, long enough for a real name.
MAX_NAME_LENGTH = 32

#: Lines end in CR LF on the wire: what telnet needs, and what nc users' terminals accept.
EOL = "\r\n"


class IMember(Interface):
    """Someone in a room, as the room sees them."""

    name = Attribute("The member's current name (str), set by the room.")

    def deliver(encoded: bytes) -> None:
        """
        Send C{encoded} (one or more whole CR LF terminated lines) to this member.

        The same bytes object is handed to every recipient of a broadcast; a member that
        cannot take it (gone, over its send queue) deals with that itself.
        """


class IRoom(Interface):
    """
    A chat room. All names compare ignoring case. What may need a broker round trip returns
    a L{Deferred}; the rest returns at once and keeps each sender's lines in order.
    """

    def join(member: IMember) -> Deferred[str]:
        """
        Add C{member} under a fresh unique provisional name, announce it; fires with the
        name once C{member} receives what others say.
        """

    def leave(member: IMember, reason: str = "", announce: bool = True) -> Deferred[None]:
        """Remove C{member}; tell the others unless C{announce} is false. Idempotent."""

    def rename(member: IMember, new: str) -> Deferred[str | None]:
        """Rename C{member} and announce it; fires with C{None} or why the name was refused."""

    def who() -> Deferred[list[str]]:
        """The names of everyone here, sorted ignoring case."""

    def count() -> Deferred[int]:
        """How many members are here."""

    def broadcast(sender: IMember | None, lines: Sequence[str]) -> None:
        """
        Deliver C{lines} (text without line ends) to everyone but C{sender}, as one write,
        and remember them in the history.
        """

    def announce(line: str) -> None:
        """Deliver a server notice to everyone (not kept in the history)."""

    def private(sender: IMember, recipient: str, line: str) -> Deferred[bool]:
        """Deliver C{line} to the member named C{recipient} only; false if there is none."""

    def history() -> Deferred[list[bytes]]:
        """
        The recent broadcast lines, oldest first, encoded as delivered. Called right when
        L{join} fired, it holds exactly what C{member} will not receive.
        """


def name_problem(name: str) -> str | None:
    """Why C{name} cannot be a chat name, or C{None} if it can."""
    if not name:
        return "a name needs at least one character"
    if len(name) > MAX_NAME_LENGTH:
        return f"a name has at most {MAX_NAME_LENGTH} characters"
    if not name.isprintable() or any(c.isspace() for c in name):
        return "a name may only hold printable characters, no spaces"
    return None


def encode_lines(lines: Iterable[str]) -> bytes:
    """Lines of text as one bytes object on the wire: UTF-8, each ending in CR LF."""
    return "".join(line + EOL for line in lines).encode("utf-8", "replace")


@implementer(IRoom)
class Room:
    """
    The in-process room. Broadcasts encode once and hand the same bytes to each member on
    its own, so a member whose delivery fails never stops the others (as
    C{twisted.words.service.Group.receive} does).
    """

    log = Logger()

    def __init__(self, history_size: int = 20, guest_prefix: str = "guest-") -> None:
        self._by_key: dict[str, IMember] = {}
        # A tuple snapshot of the members, rebuilt only when someone joins or leaves, so a
        # broadcast neither copies the member list nor trips over a leave during delivery.
        self._members: tuple[IMember, ...] = ()
        self._history: deque[bytes] = deque(maxlen=history_size)
        self._guest_prefix = guest_prefix
        self._guests = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    @property
    def members(self) -> tuple[IMember, ...]:
        return self._members

    def _fresh_name(self) -> str:
        while True:
            self._guests += 1
            name = f"{self._guest_prefix}{self._guests}"
            if name.casefold() not in self._by_key:
                return name

    def _changed(self) -> None:
        self._members = tuple(self._by_key.values())

    def join(self, member: IMember) -> Deferred[str]:
        name = self._fresh_name()
        member.name = name
        self._by_key[name.casefold()] = member
        self._changed()
        self._send_all(encode_lines([f"*** {name} has joined"]), exclude=member)
        return succeed(name)

    def leave(self, member: IMember, reason: str = "", announce: bool = True) -> Deferred[None]:
        key = member.name.casefold()
        if self._by_key.get(key) is member:
            del self._by_key[key]
            self._changed()
            if announce:
                why = f" ({reason})" if reason else ""
                self._send_all(encode_lines([f"*** {member.name} has left{why}"]))
        return succeed(None)

    def rename(self, member: IMember, new: str) -> Deferred[str | None]:
        return succeed(self._rename(member, new))

    def _rename(self, member: IMember, new: str) -> str | None:
        problem = name_problem(new)
        if problem:
            return problem
        old = member.name
        if new == old:
            return f"you are already called {old}"
        holder = self._by_key.get(new.casefold())
        if holder is not None and holder is not member:
            return f"{holder.name} is already taken"
        del self._by_key[old.casefold()]
        member.name = new
        self._by_key[new.casefold()] = member
        self._changed()
        self._send_all(encode_lines([f"*** {old} is now known as {new}"]))
        return None

    def who(self) -> Deferred[list[str]]:
        return succeed(sorted((member.name for member in self._members), key=str.casefold))

    def count(self) -> Deferred[int]:
        return succeed(len(self._by_key))

    def broadcast(self, sender: IMember | None, lines: Sequence[str]) -> None:
        if not lines:
            return
        if len(lines) == 1:
            encoded = (lines[0] + EOL).encode("utf-8", "replace")
            self._history.append(encoded)
        else:
            encoded_lines = [(line + EOL).encode("utf-8", "replace") for line in lines]
            self._history.extend(encoded_lines)
            encoded = b"".join(encoded_lines)
        self._send_all(encoded, exclude=sender)

    def announce(self, line: str) -> None:
        self._send_all(encode_lines([line]))

    def private(self, sender: IMember, recipient: str, line: str) -> Deferred[bool]:
        target = self._by_key.get(recipient.casefold())
        if target is None:
            return succeed(False)
        self._deliver(target, encode_lines([f"[private] {sender.name}: {line}"]))
        return succeed(True)

    def history(self) -> Deferred[list[bytes]]:
        return succeed(list(self._history))

    def _send_all(self, encoded: bytes, exclude: IMember | None = None) -> None:
        for member in self._members:
            if member is exclude:
                continue
            try:
                member.deliver(encoded)
            except Exception:
                self.log.failure("delivery to {name} failed", name=member.name)

    def _deliver(self, member: IMember, encoded: bytes) -> None:
        try:
            member.deliver(encoded)
        except Exception:
            self.log.failure("delivery to {name} failed", name=member.name)
