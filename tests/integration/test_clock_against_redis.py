"""This host's clock measured against a real Redis (mailbox.clock): where an operator meets it
— the worker's scrape, `python -m mailbox stats` — and the warning a skewed host logs."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mailbox import Mailbox, clock
from mailbox.audit import audit
from mailbox.coordination import Coordinator
from mailbox.dev.embedded_redis import free_port
from mailbox.store import MailboxStore
from tasks import monitoring
from tasks import runtime as task_runtime


@pytest.fixture
def installed(mailbox: Mailbox) -> Iterator[Mailbox]:
    """This test's Mailbox as the process's (what a worker's scrape reads)."""
    previous = task_runtime.install(mailbox, mailbox.runtime())
    try:
        yield mailbox
    finally:
        if previous is None:
            task_runtime.reset(close=False)
        else:
            task_runtime.install(*previous)


def test_this_host_and_redis_agree_within_a_second(mailbox: Mailbox) -> None:
    reading = clock.measure(mailbox.store.coordinator.client)
    assert abs(reading.offset_ms) < 1000, reading
    assert 0 <= reading.round_trip_ms < 1000
    assert not reading.beyond(clock.limit_ms(mailbox.settings.lease_ms))


def test_a_host_a_minute_ahead_is_warned_about(mailbox: Mailbox,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailbox.clock")
    client = mailbox.store.coordinator.client
    assert clock.check(client, mailbox.settings.lease_ms) is not None
    assert not caplog.records, "a synchronised host is not warned about"
    reading = clock.check(client, mailbox.settings.lease_ms, clock=lambda: time.time() + 60)
    assert reading is not None and 59_000 < reading.offset_ms < 61_000
    [record] = caplog.records
    assert "ahead of Redis's" in record.getMessage() and "NTP" in record.getMessage()


def test_the_scrape_reports_the_offset_and_leaves_it_out_without_redis(
        installed: Mailbox) -> None:
    offset = monitoring.build_registry().get_sample_value("mailbox_clock_offset_seconds")
    assert offset is not None and abs(offset) < 1

    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    broken = Mailbox(MailboxStore(installed.store.engine,
                                  Coordinator(dead, installed.settings.namespace)),
                     installed.settings)
    task_runtime.install(broken, broken.runtime())
    scrape: Any = monitoring.build_registry()
    assert scrape.get_sample_value("mailbox_clock_offset_seconds") is None
    assert scrape.get_sample_value("mailbox_store_up") == 1, "the store gauges stay"


def test_the_audit_warns_when_this_host_is_off_and_keeps_exit_0(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "clock_offset" in audit(mailbox).checks
    assert not [f for f in audit(mailbox).warnings if f.check == "clock_offset"]
    # This host a minute ahead, measured against the real Redis.
    monkeypatch.setattr(clock, "read", functools.partial(
        clock.read, clock=lambda: time.time() + 60))
    report = audit(mailbox)
    [finding] = [f for f in report.warnings if f.check == "clock_offset"]
    assert report.ok and "ahead of Redis's" in finding.sample[0]
