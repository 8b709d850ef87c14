"""--baseline: an older twistnet checkout as one more contender, loaded from that checkout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.__main__ import parse
from benchmarks.processes import baseline_env, baseline_sources
from benchmarks.report import Figure, Section, markdown, versus_baseline
from benchmarks.workloads import (
    Settings,
    chat_workload,
    echo_workload,
    http_workload,
    log_workload,
)

ROOT = Path(__file__).resolve().parent.parent


def fake_checkout(where: Path, with_package: bool = True) -> Path:
    """A copy of this checkout's plugin file (and twistnet package) standing in for a baseline."""
    plugins = where / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(ROOT / "twisted" / "plugins" / "twistnet_plugins.py", plugins)
    if with_package:
        shutil.copytree(ROOT / "twistnet", where / "twistnet")
    return where


def test_baseline_env_puts_the_checkout_first_and_keeps_an_inherited_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert baseline_env(Path("/old")) == {"PYTHONPATH": "/old:/elsewhere"}
    monkeypatch.delenv("PYTHONPATH")
    assert baseline_env(Path("/old")) == {"PYTHONPATH": "/old"}
    assert baseline_env(None) is None


def test_baseline_plugin_and_service_modules_are_loaded_from_the_checkout(tmp_path):
    checkout = fake_checkout(tmp_path / "old")
    files = baseline_sources(checkout, ["twistnet-echo", "twistnet-http"])
    assert files["plugin"] == str(checkout / "twisted" / "plugins" / "twistnet_plugins.py")
    assert files["twistnet-echo"] == str(checkout / "twistnet" / "echo.py")
    assert Path(files["twistnet-http"]).is_relative_to(checkout / "twistnet")


def test_baseline_whose_services_come_from_elsewhere_is_refused(tmp_path):
    # The plugin is found there, but twistnet.echo is this checkout's: not a baseline.
    checkout = fake_checkout(tmp_path / "old", with_package=False)
    with pytest.raises(ValueError, match=r"not from .*twistnet-echo from .*twistnet/echo\.py"):
        baseline_sources(checkout, ["twistnet-echo"])


def test_baseline_that_is_no_twistnet_checkout_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(["echo", "--baseline", str(tmp_path)])
    assert exited.value.code == 2
    assert "no twisted/plugins/twistnet_plugins.py" in capsys.readouterr().err


def test_baseline_runs_right_after_twistnet_and_only_with_the_option():
    names = [c.name for c in chat_workload(Settings(baseline=Path("/old"))).contenders]
    assert names[:2] == ["twistnet-chat", "twistnet-chat (baseline)"]
    assert len(names) == 1 + len(chat_workload(Settings()).contenders)


def test_http_baseline_gets_no_max_requests_and_both_are_uncapped(tmp_path):
    workload = http_workload(Settings(baseline=Path("/old")))
    now, before = (c.make(tmp_path / c.name) for c in workload.contenders[:2])
    assert [c.twistnet for c in workload.contenders] == [True, True, True, False, False]
    assert now.argv[now.argv.index("--max-requests") + 1] == "20000"
    assert "--max-requests" not in before.argv
    for server in (now, before):
        assert server.argv[server.argv.index("--max-connections") + 1] == "20000"
    assert before.env == {"PYTHONPATH": "/old"} and now.env is None


@pytest.mark.parametrize("make", [echo_workload, chat_workload, log_workload, http_workload])
def test_each_twistnet_service_runs_on_both_reactors_side_by_side(make, tmp_path):
    contenders = make(Settings()).contenders
    ours, stock = contenders[0], contenders[1]
    assert stock.name == ours.name + " (stock reactor)" and stock.twistnet
    ours_argv, stock_argv = (c.make(tmp_path).argv for c in (ours, stock))
    assert "--reactor" not in ours_argv
    assert stock_argv[1:3] == ["--reactor", "epoll"]
    assert stock_argv[3:] == ours_argv[1:]


def test_vs_baseline_gives_now_baseline_and_their_per_round_ratio():
    section = Section("echo-1k", "echo", [Figure("rate", "messages/s")])
    for number, (now, before, peer) in enumerate([(110, 100, 50), (90, 100, 50), (120, 100, 50)]):
        section.row("twistnet-echo").add({"rate": now}, number)
        section.row("twistnet-echo (baseline)").add({"rate": before}, number)
        section.row("wire.Echo").add({"rate": peer}, number)
    assert section.baseline.contender == "twistnet-echo (baseline)"
    assert versus_baseline([section]) == [("echo (messages/s)", "110", "100", "1.10x")]
    assert versus_baseline([Section("x", "x", [Figure("rate", "r")])]) == []
    text = markdown([section], [], {}, "cmd", "settings", [], "/old (commit abc1234)")
    assert "## vs baseline" in text and "| echo (messages/s) | 110 | 100 | 1.10x |" in text
    assert "| twistnet-echo (baseline) | 100 | 1.10x | 3 |" in text
    assert "## vs baseline" not in markdown([section], [], {}, "cmd", "settings", [])
