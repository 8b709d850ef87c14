"""The benchmark harness's own arithmetic: medians, ratios, targets, wrk and py-spy parsing."""

from __future__ import annotations

import pytest

from benchmarks.profiling import summarize
from benchmarks.report import Figure, Section, Target, markdown_table
from benchmarks.workloads import Failed, check_lines, parse_wrk

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:4242/jobs/abc
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  500.00us  20.00ms   90.00%
    Req/Sec    12.00k     1.00k   14.00k    70.00%
  Latency Distribution
     50%    1.95ms
     75%    2.20ms
     90%    2.60ms
     99%  850.00us
  120000 requests in 5.00s, 30.00MB read
  Non-2xx or 3xx responses: 20000
Requests/sec:  24000.00
Transfer/sec:      6.00MB
"""


def section_with(values: dict[str, list[float]]) -> Section:
    section = Section("echo-1k", "echo", [Figure("rate", "messages/s"), Figure("p99", "p99")])
    for contender, rates in values.items():
        for rate in rates:
            section.row(contender).add({"rate": rate, "p99": 1.0})
    return section


def test_ratio_is_the_median_of_per_round_ratios_of_the_first_figure_to_the_first_row():
    section = section_with({"twistnet": [100, 300, 200], "peer": [50, 1000, 100]})
    # Per round: 2.0, 0.3, 2.0. A noisy round of one contender does not swing the ratio.
    assert section.ratio("peer") == pytest.approx(2.0)
    assert section.subject.median("rate") == 200


def test_ratio_of_medians_when_rounds_do_not_pair():
    section = section_with({"twistnet": [100, 300, 200]})
    section.row("peer").add({"rate": 50.0, "p99": 1.0}, round_number=7)
    assert section.ratio("peer") == pytest.approx(4.0)


def test_target_met_and_not_met_and_at_most():
    section = section_with({"twistnet": [140], "peer": [100]})
    sections = {"echo-1k": section}
    assert Target("t", "echo-1k", "peer", 1.4).evaluate(sections) == ("met", pytest.approx(1.4))
    assert Target("t", "echo-1k", "peer", 1.5).evaluate(sections)[0] == "NOT met"
    assert Target("t", "echo-1k", "peer", 1.4, at_most=True).evaluate(sections)[0] == "NOT met"
    assert Target("t", "echo-1k", None, 100).evaluate(sections)[0] == "met"
    assert Target("t", "chat", "peer", 1.0).evaluate(sections)[0] == "not run"


def test_missing_contender_is_shown_with_its_reason_and_no_ratio():
    section = section_with({"twistnet": [1.0]})
    section.row("peer").missing = "socat not found: apt-get install socat"
    table = markdown_table(section)
    assert "| peer | not measured (see below) |" in table
    assert "- peer: missing: socat not found: apt-get install socat" in table
    assert section.ratio("peer") is None


def test_wrk_report_is_parsed_with_units_and_failed_responses():
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed["requests_per_s"] == 24000.0
    assert parsed["ok_per_s"] == pytest.approx(20000.0)
    assert parsed["p50_ms"] == pytest.approx(1.95)
    assert parsed["p99_ms"] == pytest.approx(0.85)
    assert parsed["errors"] == 20000


def test_unreadable_wrk_output_fails_the_round():
    with pytest.raises(Failed):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_profile_summary_gives_self_and_inclusive_shares():
    collapsed = (
        "mainLoop (base.py:1);doPoll (epollreactor.py:2);send (util.py:3) 30\n"
        "mainLoop (base.py:1);doPoll (epollreactor.py:2) 10\n"
    )
    lines = summarize(collapsed).splitlines()
    assert lines[0].startswith("40 samples")
    assert lines[1].split()[:2] == ["75.0", "75.0"] and "send" in lines[1]
    assert lines[2].split()[:2] == ["25.0", "100.0"] and "doPoll" in lines[2]


def test_log_check_refuses_a_missing_or_broken_line(tmp_path):
    path = tmp_path / "lines.log"
    path.write_bytes((b"x" * 9 + b"\n") * 5)
    check_lines(path, 5, 10)
    with pytest.raises(Failed, match="only 5"):
        check_lines(path, 6, 10)
    path.write_bytes((b"x" * 9 + b"\n") * 2 + b"x" * 18 + b"\n" + b"x" * 9 + b"\n")
    with pytest.raises(Failed, match="not whole"):
        check_lines(path, 3, 10)
