"""The wake gate through `dispatch.delay()`, the broker and real workers
(docs/behaviour.md#wake-gate): a burst on one thread puts one wake-up on the broker, not one
per submit; submits to a thread whose attempt is running put none, and its holder runs them
when it settles — in order, nothing stranded."""

from __future__ import annotations

from mailbox import DispatchStatus, Mailbox
from tasks import dispatch
from tests.support.e2e_helpers import broker_client, queued_messages, wait_until
from tests.support.workers import Stack


def test_a_burst_on_an_idle_thread_publishes_one_wake_up_and_all_of_it_runs_in_order(
        celery_stack: Stack, publisher: Mailbox) -> None:
    broker = broker_client(celery_stack)
    results = [dispatch.delay("gate-burst", "echo", f"m{i}") for i in range(12)]
    assert queued_messages(broker, celery_stack.namespace) == 1
    celery_stack.start_worker(concurrency=2)
    finals = [publisher.wait(r.id, timeout_s=60) for r in results]
    assert [f.status for f in finals] == [DispatchStatus.Acked] * 12
    done = [f.completed_at or 0 for f in finals]
    assert done == sorted(done), "the thread ran out of order"


def test_submits_during_a_running_attempt_publish_nothing_and_run_after_it(
        celery_stack: Stack, publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    broker = broker_client(celery_stack)
    long = dispatch.delay("gate-busy", "sleep", {"ms": 3000})
    wait_until(lambda: (d := publisher.get_dispatch(long.id)) is not None
               and d.run_status is not None and d.run_status.value == "running",
               30, "the long attempt to run", celery_stack)
    later = [dispatch.delay("gate-busy", "echo", f"after {i}") for i in range(5)]
    assert queued_messages(broker, celery_stack.namespace) == 0, \
        "a submit to a thread with a claim in flight published a wake-up"
    finals = [publisher.wait(r.id, timeout_s=60) for r in [long, *later]]
    assert [f.status for f in finals] == [DispatchStatus.Acked] * 6
    done = [f.completed_at or 0 for f in finals]
    assert done == sorted(done)

