"""twistnet-http's cluster options (--db postgresql://..., --role, --lease) and the services
makeService builds for each role, against a real PostgreSQL."""

from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from twistnet.http import Options, makeService
from twistnet.http.cluster import DEFAULT_LEASE, ClusterRunner
from twistnet.http.pgstore import PostgresJobStore
from twistnet.http.runner import LocalRunner

pytest_plugins = ["pg_support"]


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch):
    monkeypatch.delenv("TWISTNET_HTTP_TOKEN", raising=False)


def test_role_and_lease_default_to_one_node_that_does_both():
    options = parse()
    assert options["role"] == "both" and options["lease"] == DEFAULT_LEASE


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_role_needs_a_postgresql_database(role):
    with pytest.raises(usage.UsageError, match=f"--role {role} needs a PostgreSQL --db"):
        parse("--role", role)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--role", "boss"), "expected one of api, worker, both"),
        (("--lease", "0.5"), "expected 1 to 60 seconds"),
        (("--lease", "600"), "expected 1 to 60 seconds"),
    ],
)
def test_bad_cluster_options_are_refused_with_a_reason(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse("--db", "postgresql:///x", *argv)


def listeners(service) -> list:
    found = []
    for child in service:
        if isinstance(child, StreamServerEndpointService):
            found.append(child)
        elif hasattr(child, "__iter__"):
            found += listeners(child)
    return found


def runner_of(service):
    for child in service:
        if isinstance(child, LocalRunner):
            return child
        if hasattr(child, "__iter__") and (runner := runner_of(child)) is not None:
            return runner
    return None


def test_a_worker_listens_on_no_port_and_an_api_node_runs_nothing(postgres_url):
    reactor = MemoryReactorClock()
    worker = makeService(parse("--db", postgres_url, "--role", "worker", "--lease", "3"), reactor)
    assert listeners(worker) == []
    runner = runner_of(worker)
    assert isinstance(runner, ClusterRunner) and runner.run_jobs and runner.lease == 3
    assert isinstance(runner.db, PostgresJobStore)
    api = makeService(parse("--db", postgres_url, "--role", "api"), reactor)
    assert len(listeners(api)) == 1
    api_runner = runner_of(api)
    assert not api_runner.run_jobs and api_runner.workers == 0


def test_a_sqlite_path_keeps_the_local_runner(tmp_path):
    service = makeService(parse("--db", str(tmp_path / "jobs.db")), MemoryReactorClock())
    assert type(runner_of(service)) is LocalRunner
