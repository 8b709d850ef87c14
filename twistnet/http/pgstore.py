"""
L{PostgresJobStore}: jobs and their output in PostgreSQL, shared by every node of a cluster.

psycopg 3's blocking API runs on dedicated threads, one connection each, as the SQLite store
does: a writer thread takes every write waiting and commits them in one transaction (group
commit: one commit, one WAL flush for a burst of submissions), each in a savepoint so one
failing write fails only its caller; a reader thread answers reads in autocommit, so a GET
never waits behind a commit. Why threads rather than psycopg's asyncio API: twistd runs the
default (epoll) reactor, which every service and test of twistnet shares; the asyncio reactor
would change that for all of them, and group commit needs a single writer anyway.

Nothing is cached per process: another node may change any job at any time. Output is kept
as append-only chunk rows (C{job_output}), bounded by the runner's head+tail caps, so any
node reads any job's output.

A lost connection fails the operations in flight with L{StoreUnavailable} (the API answers
503) and is opened again for the next batch: nodes reconnect by themselves.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import conninfo
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistnet._connections import reactor_or_global
from twistnet.http import claims, pgschema
from twistnet.http._logging import observer as log_observer
from twistnet.http.model import QUEUED, RUNNING, TERMINAL, Job
from twistnet.http.store import (
    JOB_COLUMNS,
    STOP,
    IJobStore,
    Operation,
    StoreError,
    StoreUnavailable,
    listing,
    next_batch,
)

#: Finished jobs deleted per transaction when pruning: keeps each transaction (and the locks
#: it holds) short on a large table.
PRUNE_BATCH = 1000
#: Seconds a connection attempt may take before the operation fails as unavailable.
CONNECT_TIMEOUT = 5
#: A connection idle this many seconds is checked before a batch uses it.
IDLE_CHECK = 1.0
#: Seconds /healthz waits for the database: a monitor's probe must not hang for
#: CONNECT_TIMEOUT (or for ever, on a server that stopped answering) to learn it is down.
HEALTH_TIMEOUT = 1.0

_TERMINAL = sorted(TERMINAL)
_COLUMNS = JOB_COLUMNS
_SELECT = f"SELECT {_COLUMNS} FROM jobs"  # noqa: S608 - constants only
_UPDATE = "UPDATE jobs SET {} WHERE id = %s".format(  # noqa: S608
    ", ".join(f"{name.strip()} = %s" for name in _COLUMNS.split(",")[1:])
)


def is_postgres_url(db: str) -> bool:
    """Does --db name a PostgreSQL database rather than a SQLite file?"""
    return db.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL as it may be logged: without its password."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<an unparsable PostgreSQL URL>"
    params.pop("password", None)
    return conninfo.make_conninfo(**params)


def _unavailable(failure: Failure) -> Failure:
    if failure.check(psycopg.OperationalError, psycopg.InterfaceError):
        return Failure(StoreUnavailable(f"the job database is unavailable: {failure.value}"))
    return failure


_row = pgschema.pg_row
_job = pgschema.pg_job


class Batched(Operation):
    """
    An operation that a lane may run together with its neighbours of the same kind, in one
    statement: C{many(connection, [argument, ...])} answers each argument in order.
    """

    __slots__ = ("argument", "many")

    def __init__(self, many: Callable[[psycopg.Connection, list], list], argument: Any) -> None:
        super().__init__(lambda db: many(db, [argument])[0])
        self.many = many
        self.argument = argument


class _Refused(Exception):
    """A batched call failed: its transaction is to be run again, each operation alone."""


def _kind(op: Operation) -> Any:
    return getattr(op, "many", None)


class Lane:
    """
    One connection on one thread, fed by a queue. A transactional lane runs each batch of
    operations in one transaction, each operation in a savepoint (group commit); otherwise
    every statement commits by itself (autocommit).
    """

    log = Logger(observer=log_observer)

    def __init__(self, url: str, reactor, name: str, transactional: bool) -> None:
        self._url = url
        self._reactor = reactor
        self._transactional = transactional
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._db: psycopg.Connection | None = None
        self._used = 0.0
        self._stopped: defer.Deferred[None] | None = None
        #: Set for good once stopping starts: the thread may outlive its last answer a little.
        self._closing = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.commits = 0
        self.committed_operations = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> defer.Deferred[None]:
        self._closing = True
        if not self._thread.is_alive():
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        self._queue.put(STOP)
        return self._stopped

    def submit(self, function: Callable[[psycopg.Connection], Any]) -> defer.Deferred[Any]:
        return self.put(Operation(function))

    def put(self, op: Operation) -> defer.Deferred[Any]:
        if not self._thread.is_alive() or self._closing:
            return defer.fail(StoreError("the job store is not running"))
        self._queue.put(op)
        return op.deferred

    # --- on the lane's thread -------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._db is not None and time.monotonic() - self._used > IDLE_CHECK:
            # Idle a while: the server may have restarted since. Asking costs one round trip
            # and, unlike a failed batch, leaves no doubt whether anything was committed.
            try:
                self._db.execute("SELECT 1")
            except psycopg.Error:
                self._close()
        if self._db is None or self._db.closed or self._db.broken:
            self._close()
            self._db = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        self._used = time.monotonic()
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except psycopg.Error:
                pass
            self._db = None

    def _work(self) -> None:
        while True:
            operations, stop = next_batch(self._queue)
            if operations:
                self._run_batch(operations)
            if stop:
                self._close()
                self._reactor.callFromThread(self._finished_stopping)
                return

    def _run_batch(self, operations: list[Operation]) -> None:
        try:
            db = self._connection()
            if self._transactional:
                try:
                    self._commit(db, operations, careful=False)
                except _Refused:
                    self._commit(db, operations, careful=True)
                self.commits += 1
                self.committed_operations += len(operations)
            else:
                for op in operations:
                    try:
                        self._run(db, op, savepoint=False)
                    except (psycopg.OperationalError, psycopg.InterfaceError):
                        # A read is safe to repeat: once, on a new connection (the old
                        # one may be a leftover of a database restart).
                        self._close()
                        db = self._connection()
                        self._run(db, op, savepoint=False)
        except psycopg.Error:
            # The connection (or the commit) failed: nothing of this batch is known to be
            # stored. Every caller hears so; the next batch connects anew.
            failure = Failure()
            for op in operations:
                op.succeeded, op.result = False, failure
            self._close()
        self._reactor.callFromThread(self._deliver, operations)

    def _commit(self, db: psycopg.Connection, operations: list[Operation], careful: bool) -> None:
        """
        One transaction of the batch. Neighbouring L{Batched} operations run as one call
        without a savepoint (two round trips fewer), unless C{careful}: when that call
        fails, L{_Refused} rolls the whole transaction back, to be run again carefully,
        each operation in its own savepoint, so that only the refused one fails.
        """
        with db.transaction():
            for kind, group in itertools.groupby(operations, _kind):
                if kind is None or careful:
                    for op in group:
                        self._run(db, op, savepoint=True)
                else:
                    self._run_many(db, kind, list(group))

    @staticmethod
    def _run(db: psycopg.Connection, op: Operation, savepoint: bool) -> None:
        try:
            if savepoint:
                with db.transaction():
                    op.result = op.function(db)
            else:
                op.result = op.function(db)
            op.succeeded = True
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise  # the connection is gone: the whole batch failed
        except Exception:
            op.result = Failure()

    @staticmethod
    def _run_many(db: psycopg.Connection, many: Callable, group: list[Batched]) -> None:
        try:
            results = many(db, [op.argument for op in group])
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise  # the connection is gone: the whole batch failed
        except Exception as error:
            raise _Refused from error
        for op, result in zip(group, results, strict=True):
            op.result, op.succeeded = result, True

    @staticmethod
    def _deliver(operations: list[Operation]) -> None:
        for op in operations:
            op.settle()

    def _finished_stopping(self) -> None:
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)


class ChunkWriter:
    """
    A job's output as the runner writes it: each write becomes an append-only chunk row,
    committed with the writer's next batch. A write that fails is logged, once per job.
    """

    def __init__(
        self, store: PostgresJobStore, job_id: str, fence: tuple[str, int] | None = None
    ) -> None:
        self._store = store
        self._job_id = job_id
        #: (worker, attempt): the chunks are written only while the job is still theirs.
        self._fence = fence
        self._position = 0
        self._failed = False

    def write(self, data: bytes) -> int:
        position, self._position = self._position, self._position + len(data)
        job_id, data, fence = self._job_id, bytes(data), self._fence

        def insert(db: psycopg.Connection) -> None:
            if fence is not None:
                claims.fenced_output(db, job_id, position, data, *fence)
                return
            db.execute(
                "INSERT INTO job_output (job_id, pos, data) VALUES (%s, %s, %s)",
                (job_id, position, data),
            )

        self._store.write(insert).addErrback(self._not_written)
        return len(data)

    def _not_written(self, failure: Failure) -> None:
        if not self._failed:
            self._failed = True
            self._store.log.error(
                "job {job}: output could not be stored: {error}",
                job=self._job_id,
                error=failure.getErrorMessage(),
            )

    def flush(self) -> None:
        """Rows are committed in the writer's next batch, within milliseconds."""

    def close(self) -> None:
        """Nothing is held open."""

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@implementer(IJobStore)
class PostgresJobStore(Service):
    """
    Jobs in a PostgreSQL database, shared by every node that names it.

    The schema is made or migrated in the constructor (under an advisory lock, so nodes
    starting together are safe), so a bad URL or a newer schema is a clear start-up error.
    """

    log = Logger(observer=log_observer)

    def __init__(self, url: str, reactor=None) -> None:
        self._reactor = reactor_or_global(reactor)
        self.url = url
        self.display = redacted(url)
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as db:
                pgschema.migrate(db)
        except pgschema.NewerSchema as error:
            raise StoreError(f"the job database {self.display}: {error}") from None
        except psycopg.Error as error:
            raise StoreError(
                f"cannot open the job database {self.display}: {_first_line(error)}"
            ) from None
        self._writer = Lane(url, self._reactor, "twistnet-http-pg-writer", transactional=True)
        self._reader = Lane(url, self._reactor, "twistnet-http-pg-reader", transactional=False)

    @property
    def commits(self) -> int:
        return self._writer.commits

    @property
    def committed_operations(self) -> int:
        return self._writer.committed_operations

    # --- service --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._writer.start()
        self._reader.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.gatherResults([self._writer.stop(), self._reader.stop()]).addCallback(
            lambda _: None
        )

    # --- the lanes, for this module and the cluster's claims -------------------------------

    def write(self, function: Callable[[psycopg.Connection], Any]) -> defer.Deferred[Any]:
        """Run C{function(connection)} in the writer's next transaction; fires once committed."""
        return self._writer.submit(function).addErrback(_unavailable)

    def write_many(
        self, many: Callable[[psycopg.Connection, list], list], argument: Any
    ) -> defer.Deferred[Any]:
        """
        Like L{write} of C{many(connection, [argument])[0]}, but the writer runs neighbouring
        calls of the same C{many} as one call (one statement for a burst of submissions).
        """
        return self._writer.put(Batched(many, argument)).addErrback(_unavailable)

    def read(self, function: Callable[[psycopg.Connection], Any]) -> defer.Deferred[Any]:
        """Run C{function(connection)} on the reader's connection (autocommit)."""
        return self._reader.submit(function).addErrback(_unavailable)

    # --- IJobStore ------------------------------------------------------------------------

    def add(self, job: Job, idempotency_key: str | None = None) -> defer.Deferred[Job | None]:
        return self.write_many(claims.enqueue_many, (job, idempotency_key))

    def update(self, job: Job) -> defer.Deferred[None]:
        row = _row(job)
        values = (*row[1:], row[0])
        return self.write(lambda db: db.execute(_UPDATE, values) and None)

    def cached(self, job_id: str) -> Job | None:
        """Always None: another node may have changed the job, so only the database knows."""
        return None

    def get(self, job_id: str) -> defer.Deferred[Job | None]:
        def query(db: psycopg.Connection) -> Job | None:
            row = db.execute(_SELECT + " WHERE id = %s", (job_id,)).fetchone()
            return None if row is None else _job(row)

        return self.read(query)

    def list(
        self,
        status: str | None = None,
        tool: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> defer.Deferred[tuple[list[Job], str | None]]:
        return self.read(listing(status, tool, limit, cursor, "%s", _job))

    def unfinished(self) -> defer.Deferred[list[Job]]:
        def query(db: psycopg.Connection) -> list[Job]:
            rows = db.execute(
                _SELECT + " WHERE status IN (%s, %s) ORDER BY seq", (QUEUED, RUNNING)
            ).fetchall()
            return [_job(row) for row in rows]

        return self.read(query)

    async def _prune(self, before: float) -> int:
        total = 0
        while True:
            count = await self.write(lambda db: pgschema.prune_batch(db, before, PRUNE_BATCH))
            if count is None:
                self.log.info("pruning skipped: another node is pruning")
                break
            total += count
            if count < PRUNE_BATCH:
                break
        if total:
            self.log.info("pruned {count} finished jobs", count=total)
        return total

    def prune(self, before: float) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self._prune(before))

    def open_output(self, job_id: str) -> ChunkWriter:
        # A cut-short run's output goes: the new run's chunks start again at 0.
        self.write(
            lambda db: db.execute("DELETE FROM job_output WHERE job_id = %s", (job_id,)) and None
        ).addErrback(lambda failure: self.log.failure("clearing old output failed", failure))
        return ChunkWriter(self, job_id)

    def reachable(self) -> defer.Deferred[bool]:
        """Does the database answer within L{HEALTH_TIMEOUT} (for /healthz)?"""
        asked = self.read(lambda db: db.execute("SELECT 1").fetchone() == (1,))
        # Cancelled at the timeout: the reader's late answer is then dropped by the Deferred.
        return asked.addTimeout(HEALTH_TIMEOUT, self._reactor).addErrback(lambda _: False)

    def fetch_output(self, job_id: str, offset: int = 0, size: int = -1) -> defer.Deferred[bytes]:
        def query(db: psycopg.Connection) -> bytes:
            rows = db.execute(
                "SELECT pos, data FROM job_output WHERE job_id = %s"
                " AND pos + length(data) > %s ORDER BY pos",
                (job_id, offset),
            ).fetchall()
            data = b"".join(bytes(chunk) for _, chunk in rows)
            start = offset - rows[0][0] if rows else 0
            return data[start:] if size < 0 else data[start : start + size]

        return self.read(query)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
