"""The rule that decides whether a sweep renews a pending-wake mark (`mailbox.wake_marks`),
and the publish time read from a wake-up's id."""

from __future__ import annotations

import uuid

import pytest
import uuid6

from mailbox.runtime import now_ms
from mailbox.settings import Settings
from mailbox.wake_marks import (
    FUTURE_SLACK_MS,
    SWEEP_WAKE_PREFIX,
    new_sweep_wake_id,
    new_wake_id,
    renewal_ms,
    still_queued,
    wake_pending_max_ms,
    wake_time_ms,
)

NOW, TTL, MAX = 1_000_000, 30_000, 300_000


def queued(published_at: int | None, *, messages: int | None = 5,
           frontier: int | None = None, now: int = NOW) -> bool:
    return still_queued(published_at, now, queued=messages, frontier=frontier, ttl_ms=TTL,
                        max_ms=MAX)


def test_a_wake_up_may_be_queued_only_while_the_queue_holds_messages() -> None:
    assert queued(NOW - 60_000)
    assert not queued(NOW - 60_000, messages=0)
    assert not queued(NOW - 60_000, messages=None)
    assert not queued(NOW - 60_000, messages=-1)


def test_an_id_without_a_time_is_never_taken_for_queued() -> None:
    assert not queued(None)


def test_no_wake_up_is_trusted_past_the_bound() -> None:
    assert queued(NOW - MAX + 1)
    assert not queued(NOW - MAX)
    assert not queued(NOW - 10 * MAX)


def test_a_publish_time_far_ahead_of_the_clock_is_not_trusted() -> None:
    """Ids stamped ahead (another host's clock, a process that minted many at once) are
    trusted up to FUTURE_SLACK_MS; further ahead, the mark lapses as without renewal, or
    the bound would not hold."""
    assert queued(NOW + FUTURE_SLACK_MS)
    assert not queued(NOW + FUTURE_SLACK_MS + 1)
    assert not queued(NOW + 3600_000)


def test_a_renewal_never_outlives_the_bound() -> None:
    assert renewal_ms(NOW - 60_000, NOW, TTL, MAX) == TTL
    assert renewal_ms(NOW - MAX + 10_000, NOW, TTL, MAX) == 10_000
    assert renewal_ms(NOW - MAX + 1, NOW, TTL, MAX) == 1
    assert renewal_ms(NOW + 5_000, NOW, TTL, MAX) == TTL


def test_a_wake_up_published_a_ttl_before_one_that_came_out_was_lost() -> None:
    published = NOW - 100_000
    assert queued(published, frontier=None)
    assert queued(published, frontier=published - 50_000)  # the queue is not there yet
    assert queued(published, frontier=published + TTL)  # within the slack: prefetch order
    assert not queued(published, frontier=published + TTL + 1)


def test_wake_ids_carry_their_publish_time() -> None:
    before = now_ms()
    for wake_id in (new_wake_id(), new_sweep_wake_id(), str(uuid6.uuid7())):
        published = wake_time_ms(wake_id)
        assert published is not None and before <= published <= now_ms() + 1000, wake_id
    assert new_sweep_wake_id().startswith(SWEEP_WAKE_PREFIX)


def test_many_wake_ids_minted_at_once_do_not_run_ahead_of_the_clock() -> None:
    """A sweep mints one id per due thread: stamped with the clock, not a millisecond apart
    each (uuid6.uuid7's ordering), which would put a page of 10,000 ten seconds ahead."""
    ids = [new_sweep_wake_id() for _ in range(10_000)]
    assert max(wake_time_ms(i) or 0 for i in ids) <= now_ms()
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i[len(SWEEP_WAKE_PREFIX):]).version == 7 for i in ids[:10])


UUID4 = uuid.UUID("5f0c3c1e-9a7d-4c2e-8b1f-0a2b3c4d5e6f")


@pytest.mark.parametrize("wake_id", [UUID4.hex, str(UUID4), "", "not-an-id",
                                     SWEEP_WAKE_PREFIX + UUID4.hex,
                                     SWEEP_WAKE_PREFIX + "x" * 100, "x" * 10_000])
def test_other_ids_tell_no_time(wake_id: str) -> None:
    assert wake_time_ms(wake_id) is None


def test_the_bound_is_ten_ttls() -> None:
    assert wake_pending_max_ms(Settings.from_env({})) == 1_200_000
    fast = Settings.from_env({"MAILBOX_SWEEP_INTERVAL_S": "1", "MAILBOX_LEASE_MS": "1500"})
    assert wake_pending_max_ms(fast) == 40_000
