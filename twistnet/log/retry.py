"""
What the log sink does while a write keeps failing (disk full, I/O error): when to retry and
when to tell the operator again. IO-free: the caller passes the time and does the work.
"""

from __future__ import annotations

#: How often a failed write is retried while clients are paused: often enough to resume
#: promptly once space returns, rarely enough to cost nothing. Fixed, not growing: a retry is
#: one write(2), and a longer wait would only delay recovery.
RETRY_SECONDS = 1.0

#: How often a write failure that persists is logged again: loud, but not a log flood.
REPEAT_LOG_SECONDS = 30.0


class WriteRetry:
    """The state of one outage: since when writes fail and when it was last reported."""

    def __init__(
        self, interval: float = RETRY_SECONDS, repeat_log: float = REPEAT_LOG_SECONDS
    ) -> None:
        self.interval = interval
        self.repeat_log = repeat_log
        #: When the current outage began, or None while writes succeed.
        self.since: float | None = None
        self._last_report = 0.0

    @property
    def failing(self) -> bool:
        return self.since is not None

    def failed(self, now: float) -> bool:
        """A write failed at C{now}; whether to log it (the first failure, then now and then)."""
        if self.since is None:
            self.since = self._last_report = now
            return True
        if now - self._last_report >= self.repeat_log:
            self._last_report = now
            return True
        return False

    def elapsed(self, now: float) -> float:
        """How long the current outage has lasted (0 if there is none)."""
        return 0.0 if self.since is None else now - self.since

    def succeeded(self, now: float) -> float:
        """A write went out again; returns how long the outage lasted."""
        lasted = self.elapsed(now)
        self.since = None
        return lasted
