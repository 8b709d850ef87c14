"""
The twistnet reactor as twistd runs it: the default for every service when the operator names
none, C{--reactor twistnet} by name, C{--reactor epoll} for Twisted's stock one, the same choice
in the children of C{--processes}, and Twisted's default where epoll is absent.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import SUITE_REACTOR, TWISTD, connect, recv_exactly
from twistnet import _processes
from twistnet import reactor as twistnet_reactor

LOCAL = "tcp:0:interface=127.0.0.1"
OURS = r"reactor class: twistnet\._internals\.DirectDispatchEPollReactor\."
STOCK = r"reactor class: twisted\.internet\.epollreactor\.EPollReactor\."
CHOSEN_BY_DEFAULT = "running on the twistnet reactor, the default"


def test_the_suite_runs_on_the_reactor_it_was_asked_for(reactor):
    from twisted.internet.epollreactor import EPollReactor

    from twistnet._internals import DirectDispatchEPollReactor

    expected = DirectDispatchEPollReactor if SUITE_REACTOR == "twistnet" else EPollReactor
    assert type(reactor) is expected


def echoes(server) -> bool:
    with connect(server.port()) as sock:
        sock.sendall(b"ping")
        return recv_exactly(sock, 4) == b"ping"


@pytest.mark.parametrize("plugin", ["twistnet-echo", "twistnet-chat"])
def test_a_service_runs_on_the_twistnet_reactor_when_no_reactor_is_named(twistd, plugin):
    """twistnet-chat too, whose txredisapi would install Twisted's default at import."""
    server = twistd(plugin, "--listen", LOCAL, twistd_options=[])
    server.wait_for_line(OURS)
    server.wait_for_line(CHOSEN_BY_DEFAULT)
    server.port()  # serving: a SIGTERM now is a drain, not a start cut short
    if plugin == "twistnet-echo":
        assert echoes(server)
    assert server.terminate() == 0


def test_reactor_epoll_keeps_twisted_stock_reactor(twistd):
    server = twistd("twistnet-echo", "--listen", LOCAL, twistd_options=["--reactor", "epoll"])
    server.wait_for_line(STOCK)
    assert echoes(server)
    assert server.terminate() == 0
    assert CHOSEN_BY_DEFAULT not in server.output


def test_reactor_twistnet_by_name(twistd):
    server = twistd("twistnet-echo", "--listen", LOCAL, twistd_options=["--reactor", "twistnet"])
    server.wait_for_line(OURS)
    assert echoes(server)
    assert server.terminate() == 0


def test_help_reactors_lists_the_twistnet_reactor(tmp_path):
    result = subprocess.run(
        [TWISTD, "--help-reactors"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0
    available = result.stdout.split("not available")[0]
    assert "twistnet\tepoll without the legacy log context" in available


def test_children_of_processes_run_on_the_reactor_given_to_the_parent(twistd):
    server = twistd(
        "twistnet-echo",
        *("--listen", LOCAL, "--processes", "2"),
        twistd_options=["--reactor", "epoll"],
    )
    for index in (1, 2):
        server.wait_for_line(rf"\[child {index}\] .*{STOCK}")
    assert OURS.replace("\\", "") not in server.output
    assert server.terminate() == 0


def test_child_command_names_the_parents_reactor_only_when_the_operator_did():
    named = _processes.child_argv("twistnet-echo", ["--port", "0"], "epoll")
    assert named[named.index("--reactor") + 1] == "epoll"
    assert named.index("--reactor") < named.index("twistnet-echo")
    assert "--reactor" not in _processes.child_argv("twistnet-echo", ["--port", "0"], None)


def test_install_default_leaves_an_installed_reactor_alone(reactor):
    assert twistnet_reactor.install_default() is False


def python(script: str) -> str:
    """Run C{script} in a fresh interpreter, where no reactor is installed yet: its output."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_where_epoll_is_absent_twisted_default_runs_and_says_so():
    output = python(
        "import select; del select.epoll\n"
        "from twisted.logger import globalLogPublisher\n"
        "globalLogPublisher.addObserver(lambda e: print(e.get('log_format')))\n"
        "from twistnet import reactor\n"
        "reactor.install()\n"
        "from twisted.internet import reactor as installed\n"
        "print(type(installed).__name__)\n"
    )
    assert twistnet_reactor.NO_EPOLL in output
    assert output.splitlines()[-1] == "PollReactor"


def test_the_plugin_file_and_the_reactor_module_install_no_reactor_when_imported():
    output = python(
        "import sys\n"
        "import twisted.plugins.twistnet_plugins, twistnet.reactor, twistnet._internals\n"
        "print('twisted.internet.reactor' in sys.modules)\n"
    )
    assert output.strip() == "False"


def test_service_maker_gives_the_services_options_and_keeps_the_installed_reactor(reactor):
    import twistnet.echo

    maker = twistnet_reactor.ServiceMaker("echo", "twistnet.echo", "echo", "twistnet-echo")
    assert maker.options is twistnet.echo.Options
    from twisted.internet import reactor as installed

    assert installed is reactor
