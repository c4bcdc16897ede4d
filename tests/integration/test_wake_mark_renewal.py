"""A sweep renews the pending-wake mark of a wake-up that may still be queued behind a
backlog, and only then (docs/behaviour.md#wake-marks, `mailbox.wake_marks`): the broker's
queue holds messages, no wake-up published a TTL later has come out of it, and the mark is
younger than the bound. Otherwise the mark lapses as before and the next sweep re-sends the
wake-up: a lost one is still repaired. Real Redis and SQL; the broker's queue length is
passed in as the sweep task passes it (`tasks.publishing.queued_messages`, tested at the
end against the real broker)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from mailbox import Mailbox
from mailbox.maintenance import sweep
from mailbox.runtime import Runtime, now_ms
from mailbox.wake_marks import (
    FRONTIER_STEP_MS,
    WAKE_PENDING_MAX_FACTOR,
    new_wake_id,
    wake_time_ms,
)
from tests.support.sweep_kit import Published, backlog, no_inline_wake, task_runtime_of

THREADS = ["wr-a", "wr-b", "wr-c"]
TTL_MS = 1500


@pytest.fixture
def rt(mailbox: Mailbox) -> Runtime:
    return mailbox.runtime(wake=no_inline_wake)


def pttls(box: Mailbox, threads: list[str] = THREADS) -> list[int]:
    coordinator = box.store.coordinator
    return [int(coordinator.client.pttl(coordinator.wake_pending_key(t))) for t in threads]


def marked(box: Mailbox, rt: Runtime) -> Published:
    """Every thread due and marked by a first sweep whose wake-ups nobody consumes."""
    backlog(box, THREADS)
    published = Published()
    assert sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS).woken == THREADS
    return published


def test_a_busy_queue_keeps_the_marks_alive_past_their_ttl(mailbox: Mailbox,
                                                            rt: Runtime) -> None:
    published = marked(mailbox, rt)
    time.sleep(0.8)
    assert max(pttls(mailbox)) < TTL_MS - 500
    report = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=7)
    assert (report.woken, report.already_pending, report.renewed) == ([], THREADS, THREADS)
    assert min(pttls(mailbox)) > TTL_MS - 500, "the marks were not given a whole TTL again"
    time.sleep(0.9)  # past the first marks' expiry: the renewed ones still stand
    again = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=7)
    assert (again.woken, again.already_pending) == ([], THREADS)
    assert published.threads() == THREADS, "a duplicate wake-up was queued"


@pytest.mark.parametrize("queued", [0, None], ids=["empty queue", "queue unknown"])
def test_without_messages_queued_nothing_is_renewed_and_the_marks_lapse(
        mailbox: Mailbox, rt: Runtime, queued: int | None) -> None:
    """An empty queue holds no wake-up; an unknown one is treated as before renewal."""
    published = marked(mailbox, rt)
    report = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=queued)
    assert (report.already_pending, report.renewed) == (THREADS, [])
    wait_for_marks_to_lapse(mailbox)
    resent = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=queued)
    assert resent.woken == THREADS and published.threads() == THREADS * 2


def test_a_later_wake_up_out_of_the_queue_means_this_one_was_lost(mailbox: Mailbox,
                                                                  rt: Runtime) -> None:
    """Wake-ups come out of the queue in the order they went in: once one published a TTL
    after ours has been consumed, ours is not queued any more, whatever the queue holds."""
    published = marked(mailbox, rt)
    coordinator = mailbox.store.coordinator
    sent_at = max(wake_time_ms(w) or 0 for _, w in published.wakes)
    coordinator.advance_wake_frontier(sent_at + TTL_MS - 100, 60_000)  # within the slack
    kept = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=7)
    assert kept.renewed == THREADS
    coordinator.advance_wake_frontier(sent_at + TTL_MS + 2000, 60_000)
    lost = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=7)
    assert (lost.already_pending, lost.renewed) == (THREADS, [])
    wait_for_marks_to_lapse(mailbox)
    resent = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=7)
    assert resent.woken == THREADS


def test_no_mark_is_renewed_past_the_bound(mailbox: Mailbox, rt: Runtime) -> None:
    """Ten TTLs after its wake-up was published a mark is not renewed, and a renewal just
    before gives it only what is left of them."""
    published = marked(mailbox, rt)
    sent_at = max(wake_time_ms(w) or 0 for _, w in published.wakes)
    bound = WAKE_PENDING_MAX_FACTOR * TTL_MS
    late = sweep(rt, sent_at + bound, publish=published, pending_ttl_ms=TTL_MS, queued=7)
    assert (late.already_pending, late.renewed) == (THREADS, [])
    first_sent = min(wake_time_ms(w) or 0 for _, w in published.wakes)
    near = sweep(rt, first_sent + bound - 400, publish=published, pending_ttl_ms=TTL_MS,
                 queued=7)
    assert near.renewed == THREADS
    assert max(pttls(mailbox)) <= 400 + (sent_at - first_sent), "renewed past the bound"
    wait_for_marks_to_lapse(mailbox)


def test_a_start_up_sweep_renews_nothing_and_wakes_every_due_thread(mailbox: Mailbox,
                                                                    rt: Runtime) -> None:
    """A worker's start-up sweep (`wake_all`) trusts no mark, queue busy or not."""
    published = marked(mailbox, rt)
    start_up = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=7,
                     wake_all=True)
    assert (start_up.woken, start_up.already_pending, start_up.renewed) == (THREADS, [], [])
    assert published.threads() == THREADS * 2


def test_a_renewal_that_fails_still_wakes_the_page(mailbox: Mailbox, rt: Runtime,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewal comes after the page's wake-ups are published, and whatever it raises the
    sweep goes on: a mark not renewed lapses as before renewal."""
    published = marked(mailbox, rt)
    backlog(mailbox, ["wr-new"], per_thread=1)
    coordinator = mailbox.store.coordinator

    def broken(*_: object) -> list[bool]:
        raise ValueError("a frontier that is not a number")

    monkeypatch.setattr(coordinator, "renew_wakes_pending", broken)
    report = sweep(rt, now_ms(), publish=published, pending_ttl_ms=TTL_MS, queued=7)
    assert (report.woken, report.already_pending, report.renewed) == (["wr-new"], THREADS, [])
    assert published.threads() == [*THREADS, "wr-new"]


def test_a_mark_stamped_far_ahead_of_the_clock_is_not_renewed(mailbox: Mailbox,
                                                              rt: Runtime) -> None:
    backlog(mailbox, ["wr-ahead"])
    coordinator = mailbox.store.coordinator
    ahead = _minted_after(new_wake_id(), 3600_000)
    coordinator.client.set(coordinator.wake_pending_key("wr-ahead"), ahead, px=TTL_MS)
    report = sweep(rt, now_ms(), publish=Published(), pending_ttl_ms=TTL_MS, queued=7)
    assert (report.already_pending, report.renewed) == (["wr-ahead"], [])


def test_a_mark_whose_id_tells_no_time_is_never_renewed(mailbox: Mailbox, rt: Runtime) -> None:
    """A mark set before wake-up ids carried their publish time lapses as it always did."""
    backlog(mailbox, ["wr-old"])
    coordinator = mailbox.store.coordinator
    key = coordinator.wake_pending_key("wr-old")
    coordinator.client.set(key, "5f0c3c1e9a7d4c2e8b1f0a2b3c4d5e6f", px=TTL_MS)
    report = sweep(rt, now_ms(), publish=Published(), pending_ttl_ms=TTL_MS, queued=7)
    assert (report.already_pending, report.renewed) == (["wr-old"], [])
    assert coordinator.client.get(key) == b"5f0c3c1e9a7d4c2e8b1f0a2b3c4d5e6f"


def test_renewal_touches_only_the_mark_it_read(mailbox: Mailbox, rt: Runtime) -> None:
    """Between the sweep's read and its renewal the consumer may clear the mark, or a newer
    wake-up replace it: neither is extended, and a cleared mark is not brought back."""
    published = marked(mailbox, rt)
    coordinator = mailbox.store.coordinator
    newer = new_wake_id()
    coordinator.client.set(coordinator.wake_pending_key("wr-a"), newer, px=300)
    coordinator.client.delete(coordinator.wake_pending_key("wr-b"))
    renewed = coordinator.renew_wakes_pending(
        [(t, published.last(t), 60_000) for t in THREADS])
    assert renewed == [False, False, True]
    assert 0 < pttls(mailbox, ["wr-a"])[0] <= 300
    assert coordinator.client.exists(coordinator.wake_pending_key("wr-b")) == 0
    assert pttls(mailbox, ["wr-c"])[0] > TTL_MS


def test_the_frontier_only_moves_forward(mailbox: Mailbox) -> None:
    coordinator = mailbox.store.coordinator
    assert coordinator.wake_frontier() is None
    assert coordinator.advance_wake_frontier(5_000, 60_000) == 5_000
    assert coordinator.advance_wake_frontier(4_000, 60_000) == 5_000
    assert coordinator.advance_wake_frontier(6_000, 60_000) == 6_000
    assert coordinator.wake_frontier() == 6_000
    assert 0 < coordinator.client.pttl(coordinator.keys.wake_frontier()) <= 60_000


def wait_for_marks_to_lapse(box: Mailbox, threads: list[str] = THREADS) -> None:
    coordinator = box.store.coordinator
    deadline = time.monotonic() + 30
    while any(coordinator.client.exists(coordinator.wake_pending_key(t)) for t in threads):
        assert time.monotonic() < deadline, "the wake marks never lapsed"
        time.sleep(0.05)


# ========================================================== through the Celery task bodies
@pytest.fixture
def tasks_runtime(mailbox: Mailbox) -> Iterator[Mailbox]:
    with task_runtime_of(mailbox) as box:
        yield box


def test_a_consumed_wake_up_moves_the_frontier_at_most_once_a_step(
        tasks_runtime: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks  # noqa: F401  (registers the tasks)
    import tasks.publishing as publishing

    dispatch_module = sys.modules["tasks.dispatch"]
    monkeypatch.setattr(publishing, "_frontier_written", {})
    coordinator = tasks_runtime.store.coordinator
    first = _minted_after(new_wake_id(), -3 * FRONTIER_STEP_MS)  # wake-ups that waited
    close = _minted_after(first, 10)
    for wake_id in (first, close):  # nothing due on the thread: the claim finds nothing
        assert dispatch_module.dispatch.apply(args=("wr-idle",), task_id=wake_id).successful()
    assert coordinator.wake_frontier() == wake_time_ms(first)  # `close`: within one step
    late_id = _minted_after(first, FRONTIER_STEP_MS)
    assert dispatch_module.dispatch.apply(args=("wr-idle",), task_id=late_id).successful()
    assert coordinator.wake_frontier() == wake_time_ms(late_id)
    # An id stamped ahead of the consumer's clock moves the frontier no further than now.
    before = now_ms()
    ahead = _minted_after(new_wake_id(), 3600_000)
    assert dispatch_module.dispatch.apply(args=("wr-idle",), task_id=ahead).successful()
    assert before <= (coordinator.wake_frontier() or 0) <= now_ms()
    frontier = coordinator.wake_frontier()
    # An id without a time (Celery's own, a delayed wake-up's) moves nothing.
    assert dispatch_module.dispatch.apply(args=("wr-idle",),
                                          task_id="not-a-uuid7").successful()
    assert coordinator.wake_frontier() == frontier


def _minted_after(wake_id: str, ms: int) -> str:
    """A UUIDv7 hex like `wake_id`, minted `ms` later (earlier when negative)."""
    value = int(wake_id, 16) + (ms << 80)
    return f"{value:032x}"


def test_the_sweep_task_counts_the_queue_and_renews_what_may_be_in_it(
        tasks_runtime: Mailbox) -> None:
    import tasks.maintenance as maintenance_task
    from tasks.app import app
    from tasks.publishing import queued_messages

    box = tasks_runtime
    backlog(box, THREADS)
    queue = box.settings.namespace
    try:
        first = maintenance_task.sweep()
        assert queued_messages(queue) == 3
        second = maintenance_task.sweep()
        assert queued_messages(queue) == 3, "a duplicate wake-up was queued"
    finally:
        with app.pool.acquire(block=True) as conn:
            conn.default_channel.queue_purge(queue)
    assert (first["woken"], first["renewed"]) == (3, 0)
    assert (second["woken"], second["already_pending"], second["renewed"]) == (0, 3, 3)
    assert queued_messages(queue) == 0
    after_purge = maintenance_task.sweep()  # the queue is empty: nothing renewed
    assert (after_purge["woken"], after_purge["renewed"]) == (0, 0)


def test_an_unreachable_broker_counts_as_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.app import app
    from tasks.publishing import queued_messages

    def refuse(*_: object, **__: object) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(app.pool, "acquire", refuse)
    assert queued_messages("any") is None
