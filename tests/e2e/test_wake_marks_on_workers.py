"""How long a wake-up counts as pending (docs/behaviour.md#wake-marks), through the broker,
real `celery worker` processes and beat: a sweep that finds wake-ups still queued renews their
marks and queues no duplicate, the workers that take wake-ups move the frontier, and a
wake-up lost while the queue stays busy is re-sent once later wake-ups have come out of the
queue — not only when the backlog drains or the bound passes."""

from __future__ import annotations

import threading
import time

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.runtime import now_ms, uuid7_ms
from mailbox.wake_marks import WAKE_PENDING_MAX_FACTOR, new_wake_id, wake_pending_ttl_ms
from tasks import dispatch
from tests.support.e2e_helpers import broker_client, queued_messages, wait_until
from tests.support.workers import Stack


def test_wake_ups_still_queued_keep_their_marks_and_workers_move_the_frontier(
        celery_stack: Stack, publisher: Mailbox) -> None:
    import tasks.maintenance as maintenance_task

    broker = broker_client(celery_stack)
    coordinator = publisher.store.coordinator
    results = [dispatch.delay(f"gate-renew-{i}", "echo", f"m{i}") for i in range(3)]
    assert queued_messages(broker, celery_stack.namespace) == 3
    swept = maintenance_task.sweep()
    assert (swept["woken"], swept["already_pending"], swept["renewed"]) == (0, 3, 3)
    assert queued_messages(broker, celery_stack.namespace) == 3, "a duplicate was queued"
    assert coordinator.wake_frontier() is None
    celery_stack.start_worker(concurrency=2)
    finals = [publisher.wait(r.id, timeout_s=60) for r in results]
    assert [f.status for f in finals] == [DispatchStatus.Acked] * 3
    frontier = coordinator.wake_frontier()
    first = min(uuid7_ms(r.id) or 0 for r in results)
    assert frontier is not None and first <= frontier <= now_ms()


FEED_S = 40.0


def sweep_results(stack: Stack) -> list[str]:
    """The worker's log lines of finished sweeps (each shows the sweep's counts)."""
    log = stack.workdir / "worker1.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines()
            if "mailbox.sweep" in line and "succeeded" in line and "'renewed'" in line]


@pytest.mark.stack_env(MAILBOX_SWEEP_INTERVAL_S="1", MAILBOX_LEASE_MS="2000")
def test_a_wake_up_lost_while_the_queue_stays_busy_is_re_sent(celery_stack: Stack,
                                                               publisher: Mailbox) -> None:
    """One worker (-c 1) and a feeder that wakes a new thread every 0.25 s with a 250 ms
    agent: the queue never empties while the feeder runs. A thread whose wake-up was lost
    (its mark stands, no message) is woken again once wake-ups published a TTL after it
    have come out of the queue, while the feeder still runs: well before the bound, and
    before the queue drains."""
    settings = publisher.settings
    ttl = wake_pending_ttl_ms(settings)
    assert ttl == 4000  # 4 sweeps of 1 s, above the 2 s lease
    worker = celery_stack.start_worker(concurrency=1)
    wait_until(lambda: sweep_results(celery_stack), 30, "the worker's start-up sweep",
               celery_stack)
    assert worker.poll() is None
    broker = broker_client(celery_stack)
    stop = threading.Event()
    fed: list[str] = []

    def feed() -> None:
        i = 0
        while not stop.is_set():
            fed.append(dispatch.delay(f"busy-{i}", "sleep", {"ms": 250}).id)
            i += 1
            stop.wait(0.25)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        wait_until(lambda: queued_messages(broker, celery_stack.namespace) >= 3, 30,
                   "a backlog", celery_stack)
        # The lost wake-up: stored, its thread marked pending, no message on the broker.
        lost = publisher.submit("lost-wake", "echo", "lost", wake=False)
        coordinator = publisher.store.coordinator
        coordinator.client.set(coordinator.wake_pending_key("lost-wake"), new_wake_id(),
                               px=ttl)
        lost_at = time.monotonic()
        celery_stack.start_beat()
        final = publisher.wait(lost.dispatch_id, timeout_s=FEED_S)
        repaired_s = time.monotonic() - lost_at
        backlog_then = queued_messages(broker, celery_stack.namespace)
    finally:
        stop.set()
        feeder.join()
    assert final.status == DispatchStatus.Acked
    assert repaired_s < WAKE_PENDING_MAX_FACTOR * ttl / 1000, \
        f"repaired only after {repaired_s:.1f} s: the bound, not the frontier"
    assert backlog_then > 0, "repaired only once the queue drained"
    assert any("'renewed': 0" not in line for line in sweep_results(celery_stack)), \
        "no sweep renewed a mark: the backlog never held a wake-up"
    assert all(publisher.wait(d, timeout_s=120).status == DispatchStatus.Acked for d in fed)
