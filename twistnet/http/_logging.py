"""
The --log-level of twistnet-http: its loggers emit through a filter whose threshold the
service sets at start-up, leaving other services and Twisted's own logging alone.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    PredicateResult,
    globalLogPublisher,
)

#: The levels --log-level accepts, by name.
LEVELS = {level.name: level for level in LogLevel.iterconstants()}

_threshold = [LogLevel.info]


def _at_threshold(event: dict) -> PredicateResult:
    level = event.get("log_level", LogLevel.info)
    return PredicateResult.maybe if level >= _threshold[0] else PredicateResult.no


#: The observer every twistnet-http logger writes to: C{Logger(observer=observer)}.
observer = FilteringLogObserver(globalLogPublisher, [_at_threshold])


def set_level(level: LogLevel) -> None:
    """Emit events of C{level} and above from now on."""
    _threshold[0] = level


def enabled(level: LogLevel) -> bool:
    return level >= _threshold[0]
