"""
Where jobs live: the L{IJobStore} interface and L{SQLiteJobStore}, its SQLite implementation.

SQLite is used through one connection owned by one dedicated thread, fed by a queue.
The thread takes every operation waiting in the queue at once and runs them in a single
transaction (group commit), so submissions arriving together cost one commit, one fsync,
and each caller's Deferred fires only after that commit: a 202 is never sent for a job that
is not on disk. Job output is kept in files beside the database, one per job.

L{twistnet.http.pgstore.PostgresJobStore}, shared by several machines, implements
L{IJobStore} the same way; nothing outside this module knows about SQLite.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from twistnet._connections import reactor_or_global
from twistnet.http._logging import observer as log_observer
from twistnet.http.model import QUEUED, RUNNING, TERMINAL, Job

#: The most operations committed in one transaction: bounds the latency one commit adds to
#: the first operation of a large batch.
MAX_BATCH = 1000
#: Jobs kept in memory for fast GET /jobs/{id}; the database has the rest.
CACHE_SIZE = 4096
#: The most jobs one listing returns.
MAX_LIMIT = 500


class StoreError(Exception):
    """The store cannot be opened or used; the message is for the operator."""


class StoreUnavailable(StoreError):
    """A write could not be committed (disk full, I/O error): worth retrying later."""


def _unavailable(failure: Failure) -> Failure:
    if failure.check(sqlite3.OperationalError, OSError):
        return Failure(StoreUnavailable(f"the job could not be stored: {failure.value}"))
    return failure


class IJobStore(Interface):
    """Durable jobs and their output. Every method returns a Deferred unless noted."""

    def add(job: Job, idempotency_key: str | None = None) -> defer.Deferred[Job | None]:
        """
        Store a new job; fires with None once it is durable. With an C{idempotency_key}
        another job was stored with, store nothing and fire with that job instead (a
        client's retry gets the job its first attempt made).
        """

    def update(job: Job) -> defer.Deferred[None]:
        """Store a job's new state; fires once it is durable."""

    def get(job_id: str) -> defer.Deferred[Job | None]:
        """The job with this id, or None."""

    def cached(job_id: str) -> Job | None:
        """The job if held in memory, else None, which says nothing (synchronous)."""

    def list(
        status: str | None, tool: str | None, limit: int, cursor: str | None
    ) -> defer.Deferred[tuple[list[Job], str | None]]:
        """Jobs newest first, filtered; and the cursor of the next page (None at the end)."""

    def unfinished() -> defer.Deferred[list[Job]]:
        """Jobs queued or running, oldest first (what a restart must deal with)."""

    def prune(before: float) -> defer.Deferred[int]:
        """Forget finished jobs that finished before C{before}, with their output."""

    def open_output(job_id: str) -> BinaryIO:
        """A new, empty file for the job's output, replacing that of a cut-short run."""

    def fetch_output(job_id: str, offset: int, size: int) -> defer.Deferred[bytes]:
        """Up to C{size} bytes (all, if negative) of the job's output from C{offset}."""


#: The columns of a job row, in the order of L{job_row}, in every store.
JOB_COLUMNS = (
    "id, tool, params, status, timeout, created, started, finished, "
    "exit_code, result, error, truncated, output_size, pid"
)
_COLUMNS = JOB_COLUMNS

# SQL below is built only from these constants and fixed fragments; every value is a bound
# parameter (hence the S608 exemptions).
_INSERT = f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 14)})"  # noqa: S608
_UPDATE = "UPDATE jobs SET {} WHERE id = ?".format(  # noqa: S608
    ", ".join(f"{name.strip()} = ?" for name in _COLUMNS.split(",")[1:])
)
_SELECT = f"SELECT {_COLUMNS} FROM jobs"  # noqa: S608
_INSERT_KEYED = (
    f"INSERT INTO jobs ({_COLUMNS}, idempotency_key) VALUES ({', '.join('?' * 15)})"  # noqa: S608
    " ON CONFLICT (idempotency_key) DO NOTHING"
)
_TERMINAL = sorted(TERMINAL)
_PRUNABLE = f"finished < ? AND status IN ({', '.join('?' * len(_TERMINAL))})"
_SELECT_PRUNABLE = "SELECT id FROM jobs WHERE " + _PRUNABLE  # noqa: S608
_DELETE_PRUNABLE = "DELETE FROM jobs WHERE " + _PRUNABLE  # noqa: S608

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tool TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    timeout REAL NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    exit_code INTEGER,
    result TEXT,
    error TEXT,
    truncated INTEGER NOT NULL DEFAULT 0,
    output_size INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    idempotency_key TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_tool ON jobs (tool, seq);
CREATE INDEX IF NOT EXISTS jobs_by_finished ON jobs (finished);
"""


def listing(
    status: str | None,
    tool: str | None,
    limit: int,
    cursor: str | None,
    mark: str,
    to_job: Callable[[tuple], Job],
) -> Callable[[Any], tuple[list[Job], str | None]]:
    """
    The query of one page of the listing, for a DB-API connection whose placeholder is
    C{mark}: newest first, filtered; a cursor is the C{seq} of the previous page's end.
    """
    limit = max(1, min(limit, MAX_LIMIT))
    where, args = [], []
    for condition, value in (("status =", status), ("tool =", tool), ("seq <", cursor)):
        if value is not None:
            where.append(f"{condition} {mark}")
            args.append(int(value) if condition == "seq <" else value)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    sql = f"SELECT seq, {_COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT {mark}"  # noqa: S608

    def query(db) -> tuple[list[Job], str | None]:
        rows = db.execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [to_job(row[1:]) for row in rows], (str(rows[-1][0]) if more else None)

    return query


def job_row(job: Job, encode: Callable[[Any], Any] = json.dumps) -> tuple:
    """C{job} as the values of L{_COLUMNS}; C{encode} makes JSON values storable."""
    return (
        job.id,
        job.tool,
        encode(job.params),
        job.status,
        job.timeout,
        job.created,
        job.started,
        job.finished,
        job.exit_code,
        None if job.result is None else encode(job.result),
        job.error,
        job.truncated,
        job.output_size,
        job.pid,
    )


def job_from_row(row: tuple, decode: Callable[[Any], Any] = json.loads) -> Job:
    """The job in a row of L{_COLUMNS}; C{decode} reads back what C{job_row} encoded."""
    (id, tool, params, status, timeout, created, started, finished) = row[:8]
    (exit_code, result, error, truncated, output_size, pid) = row[8:14]
    return Job(
        id=id,
        tool=tool,
        params=decode(params),
        status=status,
        timeout=timeout,
        created=created,
        started=started,
        finished=finished,
        exit_code=exit_code,
        result=None if result is None else decode(result),
        error=error,
        truncated=bool(truncated),
        output_size=output_size,
        pid=pid,
    )


_row = job_row
_job = job_from_row


def _add_idempotency_keys(db: sqlite3.Connection) -> None:
    """Give a database made before Idempotency-Key its column (NULL for old jobs) and index."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "idempotency_key" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN idempotency_key TEXT")
    # Unique where set: NULLs (jobs sent without a key) never conflict.
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (idempotency_key)")


class Operation:
    """
    One call to run on a store's thread with its connection, and the Deferred that hears
    how it went, back in the reactor thread (L{settle}). Shared by the SQLite and the
    PostgreSQL stores.
    """

    __slots__ = ("deferred", "function", "result", "succeeded", "write")

    def __init__(self, function: Callable[[Any], Any], write: bool = False) -> None:
        self.function = function
        self.write = write
        self.deferred: defer.Deferred[Any] = defer.Deferred()
        self.result: Any = None
        self.succeeded = False

    def settle(self) -> None:
        """Fire the Deferred with the result or the failure (in the reactor thread)."""
        if self.succeeded:
            self.deferred.callback(self.result)
        else:
            self.deferred.errback(self.result)


#: Put on a store's queue to end its thread once what is queued before it has run.
STOP = object()


def next_batch(pending: queue.SimpleQueue) -> tuple[list[Operation], bool]:
    """
    On a store's thread: wait for the next operation, take whatever else is queued already
    (up to L{MAX_BATCH}: one transaction's worth), and say whether a stop was among them.
    """
    batch = [pending.get()]
    while len(batch) < MAX_BATCH:
        try:
            batch.append(pending.get_nowait())
        except queue.Empty:
            break
    operations = [op for op in batch if op is not STOP]
    return operations, len(operations) < len(batch)


@implementer(IJobStore)
class SQLiteJobStore(Service):
    """
    Jobs in one SQLite database in WAL mode, through one dedicated connection thread.

    The connection is opened (and the schema made) in the constructor, so a bad path is a
    clear start-up error; the thread starts with the service.
    """

    log = Logger(observer=log_observer)

    def __init__(self, path: str | os.PathLike, reactor=None, cache_size: int = CACHE_SIZE):
        self._reactor = reactor_or_global(reactor)
        self.path = Path(path)
        self.output_dir = self.path.with_name(self.path.name + ".output")
        try:
            self.output_dir.mkdir(exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (fsync) before its Deferred fires, power cuts included;
            # group commit pays that once per batch.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            _add_idempotency_keys(self._db)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the job database {self.path}: {error}") from None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred[None] | None = None
        #: Set for good once stopping starts: the thread may outlive its last answer a little.
        self._closing = False
        self._cache: OrderedDict[str, Job] = OrderedDict()
        self._cache_size = cache_size
        self.commits = 0
        self.committed_operations = 0

    # --- service ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._thread = threading.Thread(target=self._work, name="twistnet-http-store", daemon=True)
        self._thread.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._closing = True
        if self._thread is None:
            self._db.close()
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        self._queue.put(STOP)
        return self._stopped

    # --- the connection thread ----------------------------------------------------------

    def _work(self) -> None:
        while True:
            operations, stop = next_batch(self._queue)
            self._run_batch(operations)
            if stop:
                self._db.close()
                self._reactor.callFromThread(self._finished_stopping)
                return

    def _run_batch(self, operations: list[Operation]) -> None:
        writes = any(op.write for op in operations)
        if writes:
            self._db.execute("BEGIN IMMEDIATE")
        for op in operations:
            try:
                op.result = op.function(self._db)
                op.succeeded = True
            except Exception:
                op.result = Failure()
        if writes:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                failure = Failure()
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                for op in operations:
                    if op.write:
                        op.succeeded, op.result = False, failure
        if operations:
            self._reactor.callFromThread(self._deliver, operations, writes)

    def _deliver(self, operations: list[Operation], committed: bool) -> None:
        if committed:
            self.commits += 1
            self.committed_operations += sum(op.write for op in operations)
        for op in operations:
            op.settle()

    def _finished_stopping(self) -> None:
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)

    def _submit(self, function: Callable[[sqlite3.Connection], Any], write: bool = False):
        if self._thread is None or not self._thread.is_alive() or self._closing:
            return defer.fail(StoreError("the job store is not running"))
        op = Operation(function, write)
        self._queue.put(op)
        return op.deferred

    # --- the cache ----------------------------------------------------------------------

    def _remember(self, job: Job) -> None:
        self._cache[job.id] = job
        self._cache.move_to_end(job.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # --- IJobStore ----------------------------------------------------------------------

    def add(self, job: Job, idempotency_key: str | None = None) -> defer.Deferred[Job | None]:
        row = _row(job)
        if idempotency_key is None:
            self._remember(job)
            return self._submit(
                lambda db: db.execute(_INSERT, row) and None, write=True
            ).addErrback(_unavailable)

        def insert(db: sqlite3.Connection) -> Job | None:
            if db.execute(_INSERT_KEYED, (*row, idempotency_key)).rowcount:
                return None
            found = db.execute(_SELECT + " WHERE idempotency_key = ?", (idempotency_key,))
            return _job(found.fetchone())

        def stored(existing: Job | None) -> Job | None:
            # Remembered only once stored: a retry's job never exists, so must not be served.
            if existing is None:
                self._remember(job)
                return None
            return self._cache.get(existing.id, existing)

        return self._submit(insert, write=True).addCallbacks(stored, _unavailable)

    def update(self, job: Job) -> defer.Deferred[None]:
        row = _row(job)
        self._remember(job)
        values = (*row[1:], row[0])
        return self._submit(lambda db: db.execute(_UPDATE, values) and None, write=True)

    def cached(self, job_id: str) -> Job | None:
        """The job if it is in memory (synchronous; None says nothing about the database)."""
        return self._cache.get(job_id)

    def get(self, job_id: str) -> defer.Deferred[Job | None]:
        job = self._cache.get(job_id)
        if job is not None:
            return defer.succeed(job)

        def query(db: sqlite3.Connection) -> Job | None:
            row = db.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _job(row)

        def remember(found: Job | None) -> Job | None:
            if found is not None and job_id not in self._cache:
                self._remember(found)
            return self._cache.get(job_id, found)

        return self._submit(query).addCallback(remember)

    def list(
        self,
        status: str | None = None,
        tool: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> defer.Deferred[tuple[list[Job], str | None]]:
        return self._submit(
            listing(
                status, tool, limit, cursor, "?", lambda row: self._cache.get(row[0]) or _job(row)
            )
        )

    def _cached_or_new(self, row: tuple) -> Job:
        return self._cache.get(row[0]) or _job(row)

    def unfinished(self) -> defer.Deferred[list[Job]]:
        def query(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute(
                _SELECT + " WHERE status IN (?, ?) ORDER BY seq",
                (QUEUED, RUNNING),
            ).fetchall()
            return [_job(row) for row in rows]

        return self._submit(query)

    def prune(self, before: float) -> defer.Deferred[int]:
        args = (before, *_TERMINAL)

        def delete(db: sqlite3.Connection) -> list[str]:
            ids = [row[0] for row in db.execute(_SELECT_PRUNABLE, args)]
            db.execute(_DELETE_PRUNABLE, args)
            return ids

        def forget(ids: list[str]) -> int:
            for job_id in ids:
                self._cache.pop(job_id, None)
                try:
                    self._output_path(job_id).unlink()
                except FileNotFoundError:
                    pass
            if ids:
                self.log.info("pruned {count} finished jobs", count=len(ids))
            return len(ids)

        return self._submit(delete, write=True).addCallback(forget)

    def _output_path(self, job_id: str) -> Path:
        # Ids are made by the service (hex), never taken from a client unchecked.
        return self.output_dir / f"{job_id}.log"

    def open_output(self, job_id: str) -> BinaryIO:
        return open(self._output_path(job_id), "wb")

    def read_output(self, job_id: str, offset: int = 0, size: int = -1) -> bytes:
        try:
            with open(self._output_path(job_id), "rb") as output:
                # Past the end there is nothing; and a far offset is EINVAL to seek().
                if offset >= os.fstat(output.fileno()).st_size:
                    return b""
                output.seek(offset)
                return output.read(size)
        except FileNotFoundError:
            return b""

    def fetch_output(self, job_id: str, offset: int = 0, size: int = -1) -> defer.Deferred[bytes]:
        return defer.succeed(self.read_output(job_id, offset, size))
