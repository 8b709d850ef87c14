"""
Job states on their way to the store, the part without IO: which to try again.

What the API shows must reach the database, or a restart would undo it; when the store
refuses a write (a full disk), the job's newest state is tried again until it is stored.
Only the newest state matters: an older one the store refused is superseded, not retried.
"""

from __future__ import annotations

from twistnet.http.model import Job


class PendingStates:
    """Each job's newest state until the store has it, and the jobs whose write it refused."""

    def __init__(self) -> None:
        self._newest: dict[str, Job] = {}
        self._refused: set[str] = set()

    def record(self, job: Job) -> None:
        """C{job} is this job's newest state, about to be written."""
        self._newest[job.id] = job

    def is_newest(self, job: Job) -> bool:
        return self._newest.get(job.id) is job

    def stored(self, job: Job) -> bool:
        """The store has C{job}; true when that ends a refusal (worth a log line)."""
        if not self.is_newest(job):
            return False
        del self._newest[job.id]
        if job.id in self._refused:
            self._refused.discard(job.id)
            return True
        return False

    def refused(self, job: Job) -> bool:
        """The store refused C{job} (its newest state); true at the first refusal."""
        first = job.id not in self._refused
        self._refused.add(job.id)
        return first

    @property
    def waiting(self) -> bool:
        """Is some refused state still to be tried again?"""
        return bool(self._refused)

    def to_retry(self) -> list[Job]:
        """The newest state of each job whose write the store refused."""
        return [self._newest[job_id] for job_id in sorted(self._refused) if job_id in self._newest]
