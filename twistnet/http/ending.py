"""
How a job's run ended, the part without IO: from the process's exit to the job's new state.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.python.failure import Failure

from twistnet.http.model import CANCELLED, FAILED, LOST, QUEUED, SUCCEEDED, TIMED_OUT


@frozen
class ProcessEnd:
    """How a job's process ended: an exit status or a signal; neither if it never ran."""

    exit_status: int | None = None
    signal: int | None = None

    @classmethod
    def from_reason(cls, reason: Failure) -> ProcessEnd:
        """From the reason Twisted gives C{processEnded}."""
        return cls(getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None))

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0 and self.signal is None

    @property
    def exit_code(self) -> int | None:
        """The job's C{exit_code}: the status, or minus the signal (as C{subprocess} does)."""
        if self.exit_status is not None:
            return self.exit_status
        return -self.signal if self.signal else None


#: A job stopped (cancelled, or the server stopping) before its process was spawned.
NOT_SPAWNED = ProcessEnd()
#: A job whose process could not be spawned: 127, as a shell reports a command it cannot run.
COULD_NOT_START = ProcessEnd(exit_status=127)


def outcome(ending: str | None, end: ProcessEnd, timeout: float) -> dict[str, Any]:
    """The status and error of a job whose run ended; C{ending} is why it was stopped, if it was."""
    if ending == CANCELLED:
        return {"status": CANCELLED, "error": "cancelled by a client"}
    if ending == TIMED_OUT:
        return {"status": TIMED_OUT, "error": f"timed out after {timeout:g} s"}
    if end.succeeded:
        return {"status": SUCCEEDED}
    if end.signal:
        return {"status": FAILED, "error": f"killed by signal {end.signal}"}
    return {"status": FAILED, "error": f"exited with status {end.exit_status}"}


def interrupted(retry_safe: bool, now: float) -> dict[str, Any]:
    """The changes for a job whose run the server's stop cut short."""
    if retry_safe:
        # Run again from the start: nothing of the cut-short run remains.
        return {
            "status": QUEUED,
            "started": None,
            "finished": None,
            "exit_code": None,
            "truncated": False,
            "output_size": 0,
        }
    return {"status": LOST, "finished": now, "error": "the server stopped while the job ran"}
