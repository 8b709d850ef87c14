"""
Flow limits without IO: L{TokenBucket} for what a client sends, L{SendQueue} for what waits
to be sent to it. Both take the time or the transport's backlog as arguments, so tests drive
them with plain numbers.
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    """What to do with a line over the rate."""

    WARN = "warn"
    DROP = "drop"
    DISCONNECT = "disconnect"


class TokenBucket:
    """
    C{rate} lines a second on average, C{burst} at once. Past the rate a client is warned
    once, then its lines are dropped; more than C{burst} dropped after the warning and it
    is to be disconnected. A full bucket forgives: warning and count start over.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now
        self._warned = False
        self._dropped = 0

    def refill(self, now: float) -> None:
        tokens = self._tokens + (now - self._stamp) * self.rate
        self._stamp = now
        if tokens >= self.burst:
            tokens = float(self.burst)
            self._warned = False
            self._dropped = 0
        self._tokens = tokens

    def take(self) -> bool:
        """Spend a token for one line; false if none is left."""
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def over(self) -> Verdict:
        """Count one line refused by L{take}: what to tell the client."""
        self._dropped += 1
        if not self._warned:
            self._warned = True
            return Verdict.WARN
        if self._dropped > self.burst:
            return Verdict.DISCONNECT
        return Verdict.DROP


class SendQueue:
    """
    What waits for one client's next write, and the cap on what may wait unsent.

    Deliveries are queued and taken as one write per reactor turn. C{exempt} output (the
    server's own bulk output: welcome, history, /WHO, /HELP) may overrun the cap by its own
    size, so an honest client never trips the cap on it; one exempt burst at a time, so a
    client repeating /WHO without reading still trips it.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._out: list[bytes] = []
        self._credit = 0
        self._exempt_queued = 0

    def __bool__(self) -> bool:
        return bool(self._out)

    def put(self, data: bytes, exempt: bool = False) -> bool:
        """Queue C{data}; true if the queue was empty (a flush needs scheduling)."""
        if exempt and len(data) > self._exempt_queued:
            self._exempt_queued = len(data)
        self._out.append(data)
        return len(self._out) == 1

    def take(self) -> bytes:
        """Everything queued, as one bytes object (the very object if only one)."""
        out, self._out = self._out, []
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def fits(self, pending: int, size: int) -> bool:
        """
        Whether C{size} more bytes may go behind C{pending} unsent ones without passing the
        cap, counting the exempt output queued since the last call.
        """
        exempt = self._exempt_queued
        self._exempt_queued = 0
        if not (pending or exempt):
            # All sent: nothing of earlier exempt output can still be waiting.
            self._credit = 0
            return True
        # What is still unsent of earlier exempt output is at most all that is unsent.
        credit = max(min(self._credit, pending), exempt)
        self._credit = credit
        return pending + size - credit <= self.cap
