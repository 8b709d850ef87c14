"""
Fixtures shared by every twistnet test.

pytest-twisted runs the global reactor but offers no fixture for it and does not check that a
test cleaned up, so both are here: C{reactor}, C{listen} (a real port on 127.0.0.1 chosen by
the OS, stopped with its connections at teardown), C{twistd} (a service as a child process),
an autouse check that no reader, writer or delayed call outlives its test, and one that no
twistnet-http server a test module started outlives the module.

The suite runs on the twistnet reactor, as the services do by default, or on Twisted's stock
one with TWISTNET_REACTOR=stock (tests/helpers.py passes the same choice to every twistd).
"""

from __future__ import annotations

import sys

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, task

from helpers import SUITE_REACTOR, TwistdProcess, eventually
from http_rel_helpers import stop_leftovers

#: How long teardown waits for connections and timers to wind down before calling it a leak.
SETTLE_SECONDS = 5.0


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """
    Install the suite's reactor before pytest-twisted installs its default: it then finds an
    C{EPollReactor} (ours is one) in place and runs it. Nothing imported above may import
    C{twisted.internet.reactor}, which would install Twisted's default first.
    """
    assert "twisted.internet.reactor" not in sys.modules, "a reactor was installed too early"
    # pytest-twisted's own --reactor (asyncio, qt5reactor), if given, is left to it.
    if SUITE_REACTOR == "twistnet" and config.getoption("reactor") == "default":
        from twistnet import reactor

        reactor.install()


def _global_reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def reactor():
    """The running global reactor, for tests that need real sockets."""
    return _global_reactor()


def _reactor_state(reactor) -> tuple[set, set, set]:
    return (
        set(reactor.getReaders()),
        set(reactor.getWriters()),
        {call for call in reactor.getDelayedCalls() if call.active()},
    )


async def _settle(reactor, baseline) -> tuple[set, set, set]:
    """Let the reactor run until it is back to C{baseline} or the time is up."""

    def leaks() -> tuple[set, set, set]:
        readers, writers, calls = _reactor_state(reactor)
        return readers - baseline[0], writers - baseline[1], calls - baseline[2]

    try:
        await eventually(lambda: not any(leaks()), timeout=SETTLE_SECONDS)
    except AssertionError:
        pass  # the caller reports what is left
    return leaks()


@pytest.fixture(autouse=True)
def no_reactor_leaks():
    """Fail a test that leaves readers, writers or delayed calls on the reactor."""
    global_reactor = _global_reactor()
    # One reactor turn first, so the reactor's own wakers are part of the baseline.
    pytest_twisted.blockon(task.deferLater(global_reactor, 0, lambda: None))
    baseline = _reactor_state(global_reactor)
    yield
    leaks = pytest_twisted.blockon(defer.ensureDeferred(_settle(global_reactor, baseline)))
    readers, writers, calls = leaks
    assert not readers and not writers and not calls, (
        f"test leaked reactor state: readers={readers} writers={writers} delayed calls={calls}"
    )


@pytest.fixture(scope="module", autouse=True)
def no_server_left_behind():
    """A test that fails before stopping its twistnet-http server does not leave it running."""
    yield
    stop_leftovers()


@pytest.fixture
def listen(reactor):
    """
    C{await listen(factory)} listens on 127.0.0.1 on a free port and returns the port;
    teardown stops listening and closes the connections the factory accepted.
    """
    ports = []
    factories = []

    async def start(factory, interface: str = "127.0.0.1"):
        endpoint = endpoints.serverFromString(reactor, f"tcp:0:interface={interface}")
        port = await endpoint.listen(factory)
        ports.append(port)
        factories.append(factory)
        return port

    yield start

    async def stop():
        for port in ports:
            await port.stopListening()
        for factory in factories:
            registry = getattr(factory, "registry", None)
            if registry is not None:
                await registry.close_all(grace=1.0)

    pytest_twisted.blockon(defer.ensureDeferred(stop()))


@pytest.fixture
def twistd(tmp_path):
    """
    C{twistd("twistnet-echo", "--listen", ...)} starts a service as a child process in a
    temporary directory; teardown stops any still running (SIGTERM, then SIGKILL).
    """
    started: list[TwistdProcess] = []

    def start(plugin: str, *args: str, cwd=None, env=None, twistd_options=None) -> TwistdProcess:
        process = TwistdProcess(
            plugin, *args, cwd=cwd or tmp_path, env=env, twistd_options=twistd_options
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            try:
                process.terminate(timeout=10)
            except AssertionError:
                pass
