"""The log sink's policy while writes fail, alone: retry interval and when to report."""

from __future__ import annotations

from twistnet.log.retry import REPEAT_LOG_SECONDS, RETRY_SECONDS, WriteRetry


def test_first_failure_is_reported_then_only_every_repeat_interval():
    retry = WriteRetry()
    assert not retry.failing
    assert retry.failed(100.0)
    assert retry.failing
    reported = [now for now in range(101, 170) if retry.failed(float(now))]
    assert reported == [100 + REPEAT_LOG_SECONDS, 100 + 2 * REPEAT_LOG_SECONDS]


def test_success_ends_the_outage_and_says_how_long_it_lasted():
    retry = WriteRetry()
    retry.failed(10.0)
    assert retry.elapsed(14.5) == 4.5
    assert retry.succeeded(15.0) == 5.0
    assert not retry.failing
    assert retry.elapsed(20.0) == 0.0
    assert retry.failed(21.0), "a new outage is reported at once"


def test_retries_at_a_fixed_interval_by_default():
    assert WriteRetry().interval == RETRY_SECONDS == 1.0
    assert WriteRetry(interval=0.25, repeat_log=5).interval == 0.25
