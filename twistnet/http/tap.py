"""
The twistd face of twistnet-http: C{twistd -n twistnet-http [options]}.

It listens on 127.0.0.1:8901 by default, because it runs commands. Listening beyond loopback
needs a token (C{--token-file}, C{--token} or C{TWISTNET_HTTP_TOKEN}) or an explicit
C{--insecure}.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from twistnet._connections import ConnectionCloser
from twistnet._hosts import HostAllowList, allowed_host
from twistnet._internals import parse_description
from twistnet._processes import refuse_processes
from twistnet._tap import (
    ServiceOptions,
    ServiceRoot,
    connection_options,
    for_twistd,
    listening_services,
    non_negative_float,
    one_of,
    positive_byte_size,
    positive_int,
)
from twistnet.http._logging import LEVELS, set_level
from twistnet.http._logging import observer as log_observer
from twistnet.http.api import JobApi
from twistnet.http.channel import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT,
    JobSite,
)
from twistnet.http.cluster import DEFAULT_LEASE, ClusterRunner
from twistnet.http.pgstore import PostgresJobStore, is_postgres_url, redacted
from twistnet.http.runner import LocalRunner, unrunnable
from twistnet.http.store import SQLiteJobStore, StoreError
from twistnet.http.tools import (
    BUILTIN_TOOLS,
    ToolConfigError,
    catalogue,
    load_config,
    parse_tool_option,
)
from twistnet.metrics import ServiceMetrics

log = Logger(observer=log_observer)

DEFAULT_PORT = 8901
#: A keep-alive connection that sends nothing for this long is closed, freeing its slot.
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_QUEUE_SIZE = 1000
DEFAULT_KEEP_DAYS = 30.0
DEFAULT_DB = "twistnet-http.db"
TOKEN_VARIABLE = "TWISTNET_HTTP_TOKEN"  # noqa: S105 - a variable name, not a secret
#: How often finished jobs older than --keep-days are pruned.
PRUNE_INTERVAL = 3600.0
#: Bounds of --lease: below a second, a busy database's pause would expire live workers; the
#: issue's promise is a dead worker's jobs handed back within a minute.
MIN_LEASE = 1.0
MAX_LEASE = 60.0


def _log_level(value: str):
    try:
        return LEVELS[value.lower()]
    except KeyError:
        raise ValueError(f"expected one of {', '.join(LEVELS)}, got {value!r}") from None


_log_level.coerceDoc = "debug, info, warn, error or critical."  # type: ignore[attr-defined]


def _with_default(options: list, name: str, default) -> list:
    return [[*entry[:2], default, *entry[3:]] if entry[0] == name else entry for entry in options]


def beyond_loopback(description: str) -> bool:
    """Would this endpoint accept connections from other machines (as far as we can tell)?"""
    try:
        args, kwargs = parse_description(description)
    except Exception:
        return True
    kind = args[0] if args else ""
    if kind == "unix":
        return False
    if kind not in ("tcp", "tcp6", "ssl"):
        return True  # systemd and the rest: cannot tell, so assume so
    interface = kwargs.get("interface", "")
    if interface == "localhost":
        return False
    try:
        return not ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return True


ROLES = ("api", "worker", "both")


_role = one_of(ROLES)


def _lease(value: str) -> float:
    lease = float(value)
    if not MIN_LEASE <= lease <= MAX_LEASE:
        raise ValueError(f"expected {MIN_LEASE:g} to {MAX_LEASE:g} seconds, got {value}")
    return lease


class Options(ServiceOptions):
    """twistd -n twistnet-http [--port 8901] [--tool 'NAME=COMMAND'] [--config tools.toml]"""

    synopsis = "[options]"
    longdesc = (
        "HTTP job endpoint: POST /jobs names a declared tool and its parameters, the answer "
        "is a job id at once, GET /jobs/{id} gives the JSON result. Listens on "
        f"127.0.0.1:{DEFAULT_PORT} unless --port or --listen says otherwise. With no --tool "
        "or --config, built-in harmless tools (echo, sleep, date, wordcount) are served."
    )
    default_port = DEFAULT_PORT
    service_name = "twistnet-http"
    default_interface = "127.0.0.1"
    optFlags = [
        ["insecure", None, "Allow listening beyond loopback without a token."],
    ]
    optParameters = [
        *_with_default(connection_options(), "idle-timeout", DEFAULT_IDLE_TIMEOUT),
        [
            "max-requests",
            None,
            DEFAULT_MAX_REQUESTS,
            "Most requests in progress at once (from the request header read to the response "
            "sent); one more is answered 503. Idle and still-arriving connections count only "
            "toward --max-connections.",
            positive_int,
        ],
        [
            "request-timeout",
            None,
            DEFAULT_REQUEST_TIMEOUT,
            "Close a connection whose request (line, headers, body) is not complete this many "
            "seconds after its first byte.",
            non_negative_float,
        ],
        ["token", None, None, f"Bearer token for POST and DELETE (or ${TOKEN_VARIABLE})."],
        ["token-file", None, None, "Read the Bearer token from this file."],
        ["workers", None, os.cpu_count() or 1, "Jobs run at once.", positive_int],
        [
            "queue-size",
            None,
            DEFAULT_QUEUE_SIZE,
            "Jobs that may wait; more are refused with 429.",
            positive_int,
        ],
        ["max-body", None, DEFAULT_MAX_BODY, "Largest request body in bytes.", positive_byte_size],
        [
            "db",
            None,
            DEFAULT_DB,
            "The job database: a SQLite file (job output goes beside it), or a PostgreSQL "
            "URL, postgresql://user@host:port/dbname, shared by the nodes of a cluster (the "
            "password from the URL, $PGPASSWORD or ~/.pgpass).",
        ],
        [
            "keep-days",
            None,
            DEFAULT_KEEP_DAYS,
            "Forget finished jobs after this many days (0 = keep forever).",
            non_negative_float,
        ],
        [
            "role",
            None,
            "both",
            "With a PostgreSQL --db: api (accept and answer, run nothing), worker (run jobs, "
            "listen on no port) or both.",
            _role,
        ],
        [
            "lease",
            None,
            DEFAULT_LEASE,
            "With a PostgreSQL --db: seconds of a worker's lease; a dead worker's jobs are "
            "handed back (lost, or re-queued if retry-safe) within about this.",
            _lease,
        ],
        [
            "config",
            None,
            None,
            'A TOML file declaring tools (see "The tools file" in the README).',
        ],
        ["log-level", None, "info", "Least level logged.", _log_level],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["tool"] = []
        self["allowed-host"] = []

    def opt_allowed_host(self, value: str) -> None:
        self.append_coerced("allowed-host", allowed_host, value)

    # One line, as --help shows it.
    opt_allowed_host.__doc__ = (
        "A host name browsers use to reach this server: without a token, requests whose Host "
        "is another name (not an IP address, not localhost) are refused with 400, against DNS "
        "rebinding; repeatable, ignored with a token."
    )

    def opt_tool(self, value: str) -> None:
        """Declare a tool, NAME=COMMAND TEMPLATE, e.g. 'greet=echo hello {who}'; repeatable."""
        try:
            self["tool"].append(parse_tool_option(value))
        except ToolConfigError as error:
            raise usage.UsageError(str(error)) from None

    def postOptions(self) -> None:
        refuse_processes(
            self,
            None
            if is_postgres_url(self["db"])
            else "jobs live in one process's SQLite store and runner, so N processes would be "
            "N separate job services on one file; use a PostgreSQL --db or run one process.",
        )
        self["token"] = self._token()
        tools = list(self["tool"])
        if self["config"]:
            try:
                tools += load_config(self["config"])
            except ToolConfigError as error:
                raise usage.UsageError(f"--config: {error}") from None
        try:
            self["tools"] = catalogue(tools or BUILTIN_TOOLS)
        except ToolConfigError as error:
            raise usage.UsageError(str(error)) from None
        # A program that is not there fails now, not at a client's first job.
        for tool in self["tools"].values():
            if (problem := unrunnable(tool)) is not None:
                raise usage.UsageError(problem)
        if self["role"] != "both" and not is_postgres_url(self["db"]):
            raise usage.UsageError(
                f"--role {self['role']} needs a PostgreSQL --db shared by the cluster's nodes."
            )
        if self["token"] is None and not self["insecure"] and self["role"] != "worker":
            for description in self.endpoint_descriptions():
                if beyond_loopback(description):
                    raise usage.UsageError(
                        f"refusing to listen on {description!r} beyond loopback without a "
                        f"token: this service runs commands. Give --token-file (or --token, "
                        f"or ${TOKEN_VARIABLE}), or --insecure if you really mean it."
                    )

    def _token(self) -> bytes | None:
        given = [
            name
            for name, present in (
                ("--token", self["token"] is not None),
                ("--token-file", self["token-file"] is not None),
            )
            if present
        ]
        if len(given) > 1:
            raise usage.UsageError("give the token with --token or --token-file, not both.")
        if self["token-file"] is not None:
            try:
                token = Path(self["token-file"]).read_text().strip()
            except OSError as error:
                raise usage.UsageError(
                    f"cannot read --token-file {self['token-file']}: {error.strerror}"
                ) from None
            if not token:
                raise usage.UsageError(f"--token-file {self['token-file']} is empty.")
            source = "--token-file"
        elif self["token"] is not None:
            token, source = self["token"], "--token"
        elif os.environ.get(TOKEN_VARIABLE):
            token, source = os.environ[TOKEN_VARIABLE], f"${TOKEN_VARIABLE}"
        else:
            return None
        if not token or any(ch.isspace() for ch in token) or not token.isascii():
            raise usage.UsageError(f"the token from {source} must be printable ASCII, no spaces.")
        return token.encode()


class InOrder(MultiService):
    """Children started in order and stopped in reverse, each stop awaited before the next."""

    async def _stop(self) -> None:
        for child in reversed(list(self)):
            await defer.maybeDeferred(child.stopService)

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop())


def open_store(db: str, reactor=None) -> SQLiteJobStore | PostgresJobStore:
    """The store --db names: PostgreSQL for a postgresql:// URL, else a SQLite file."""
    if is_postgres_url(db):
        return PostgresJobStore(db, reactor)
    return SQLiteJobStore(db, reactor)


def store_name(db: str) -> str:
    """--db as it may be logged: a URL without its password, a file's absolute path."""
    return redacted(db) if is_postgres_url(db) else os.path.abspath(db)


@for_twistd
def makeService(options: usage.Options, reactor=None) -> MultiService:
    level = options["log-level"]
    set_level(_log_level(level) if isinstance(level, str) else level)
    try:
        store = open_store(options["db"], reactor)
    except StoreError as error:
        raise SystemExit(f"twistnet-http: {error}") from None
    tools = options["tools"]
    role = options["role"]
    if isinstance(store, PostgresJobStore):
        runner = ClusterRunner(
            store,
            tools,
            options["workers"],
            options["queue-size"],
            reactor,
            run_jobs=role != "api",
            lease=options["lease"],
        )
    else:
        runner = LocalRunner(store, tools, options["workers"], options["queue-size"], reactor)
    # Without a token, the Host check keeps a rebinding web page out; with one, such a page
    # cannot submit or cancel a job.
    hosts = None if options["token"] else HostAllowList(options["allowed-host"])
    api = JobApi(store, runner, tools, token=options["token"], clock=reactor, hosts=hosts)
    site = JobSite(
        api,
        max_connections=options["max-connections"],
        max_requests=options["max-requests"],
        idle_timeout=options["idle-timeout"],
        request_timeout=options["request-timeout"],
        max_body=options["max-body"],
        reactor=reactor,
    )
    top = ServiceRoot("twistnet-http", reactor)
    # The runner's last job updates must reach the store before it closes.
    jobs = InOrder()
    jobs.setServiceParent(top)
    store.setServiceParent(jobs)
    runner.setServiceParent(jobs)
    if options["keep-days"]:
        seconds = options["keep-days"] * 86400

        def prune():
            return store.prune(runner.clock.seconds() - seconds).addErrback(
                lambda failure: log.failure("pruning old jobs failed", failure)
            )

        pruner = TimerService(PRUNE_INTERVAL, prune)
        if reactor is not None:
            pruner.clock = reactor
        pruner.setServiceParent(jobs)
    ConnectionCloser(site.registry).setServiceParent(top)
    api.metrics.registry.register(ServiceMetrics(site, traffic=False))
    log.info(
        "twistnet-http: tools {tools}; jobs in {db}; {workers} workers, queue {queue}; {auth}",
        tools=", ".join(tools),
        db=store_name(options["db"]),
        workers=runner.workers,
        queue=options["queue-size"],
        auth="token required for POST and DELETE" if options["token"] else "no token",
    )
    if role == "worker":
        log.info("twistnet-http: role worker, listening on no port")
        return top
    return listening_services("twistnet-http", options.endpoint_descriptions(), site, reactor, top)
