"""This host's clock against Redis's (mailbox.clock): the arithmetic, the limit, the warning."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from mailbox import clock
from mailbox.clock import AtMostEvery, ClockOffset


class FakeRedis:
    """Answers TIME with a fixed reply (or raises)."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply

    def time(self) -> Any:
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def ticking(*values: float) -> Any:
    it = iter(values)
    return lambda: next(it)


def test_the_offset_is_this_host_minus_redis_at_the_midpoint_of_the_round_trip() -> None:
    reading = clock.measure(FakeRedis((1000, 500_000)), ticking(1001.000, 1001.002))
    assert reading.offset_ms == pytest.approx(501.0)
    assert reading.round_trip_ms == pytest.approx(2.0)
    behind = clock.measure(FakeRedis((1000, 0)), ticking(995.0, 995.0))
    assert behind.offset_ms == pytest.approx(-5000.0)
    assert behind.describe().startswith("5.00 s behind Redis's")


def test_a_cluster_reply_per_node_takes_the_first_node() -> None:
    reply = {"127.0.0.1:7000": (2000, 0), "127.0.0.1:7001": (2000, 1000)}
    assert clock.measure(FakeRedis(reply), ticking(2000.0, 2000.0)).offset_ms == 0


def test_the_limit_is_a_sixth_of_a_lease_and_the_uncertainty_counts_for_the_host() -> None:
    assert clock.limit_ms(30_000) == 5000
    assert not ClockOffset(offset_ms=5001, round_trip_ms=4).beyond(5000)  # within ±2 ms
    assert ClockOffset(offset_ms=-5003, round_trip_ms=4).beyond(5000)
    assert not ClockOffset(offset_ms=-4999, round_trip_ms=0).beyond(5000)


def test_check_warns_only_past_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailbox.clock")
    within = clock.check(FakeRedis((100, 0)), 30_000, ticking(104.0, 104.0))
    assert within is not None and within.offset_ms == 4000
    assert not caplog.records
    ahead = clock.check(FakeRedis((100, 0)), 30_000, ticking(112.5, 112.5))
    assert ahead is not None and ahead.offset_ms == 12_500
    [record] = caplog.records
    assert "12.5 s ahead of Redis's" in record.getMessage()
    assert "5.00 s" in record.getMessage() and "NTP" in record.getMessage()


def test_check_without_redis_is_none_and_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailbox.clock")
    assert clock.check(FakeRedis(redis.ConnectionError("refused")), 30_000) is None
    assert not caplog.records


def test_checks_run_at_the_first_call_then_at_most_once_per_interval() -> None:
    now = [0.0]
    due = AtMostEvery(60, monotonic=lambda: now[0])
    assert due()
    now[0] = 59.9
    assert not due()
    now[0] = 60.0
    assert due()
    assert not due()
