"""A Celery message is only a wake-up (DESIGN.md §5, §4.1 invariant 6), with real workers.

Lost wake-ups are repaired by the sweep a worker runs when it starts; duplicated wake-ups are
harmless because the claim and its token decide; delayed availability lives in `available_at`.
No beat runs in these tests, so nothing but the mechanism under test can deliver the work.
"""

from __future__ import annotations

import time

from mailbox import DispatchStatus, Mailbox, RunStatus
from tasks import dispatch
from tests.support.e2e_helpers import (
    broker_client,
    describe_events,
    drop_queue,
    events_of,
    queued_messages,
    received_count,
    status_counts,
    wait_all_terminal,
    wait_for_events,
    wait_until,
    worker_logs,
)
from tests.support.workers import Stack


def test_lost_wake_ups_are_delivered_by_the_start_up_sweep(celery_stack: Stack,
                                                           publisher: Mailbox) -> None:
    # 20 dispatches over 5 threads, submitted while no worker runs.
    ids: dict[str, str] = {}
    for n in range(20):
        thread_id = f"lost-{n % 5}"
        ids[dispatch.delay(thread_id, "echo", f"lost #{n}").id] = f"lost #{n}"
    client = broker_client(celery_stack)
    # One wake-up per thread: a thread whose wake-up still waits is not woken again
    # (docs/behaviour.md#wake-gate).
    assert queued_messages(client, publisher.settings.namespace) >= 5, \
        "the wake-ups were not in the broker queue: the test would prove nothing"

    dropped = drop_queue(client, publisher.settings.namespace)
    print(f"dropped from the broker: {dropped}")
    assert dropped["messages"] >= 5, dropped
    assert queued_messages(client, publisher.settings.namespace) == 0

    celery_stack.start_worker(concurrency=2)
    final = wait_all_terminal(publisher, ids, timeout_s=30, stack=celery_stack)
    logs = worker_logs(celery_stack)
    assert status_counts(publisher) == {"Acked": 20}, f"{status_counts(publisher)}{logs}"
    for dispatch_id, text in ids.items():
        d = final[dispatch_id]
        assert d.status == DispatchStatus.Acked and d.run_response == text, (d, logs)
        assert len(events_of(publisher, d.run_id, "run_started")) == 1, \
            describe_events(publisher, d.run_id)
        run = publisher.get_run(d.run_id)
        assert run is not None and run.status == RunStatus.done and run.response == text
    # Nothing but the sweep could have delivered them: no wake-up survived the drop.
    assert received_count(celery_stack, "mailbox.sweep") >= 1, logs


def test_duplicated_wake_ups_execute_each_dispatch_once(celery_stack: Stack,
                                                        publisher: Mailbox) -> None:
    namespace = publisher.settings.namespace
    celery_stack.start_worker(concurrency=4)
    ids: list[str] = []
    for n in range(24):
        thread_id = f"dup-{n % 6}"
        result = dispatch.delay(thread_id, "sleep", {"ms": 30})
        ids.append(result.id)
        for _ in range(3):  # 4 wake-ups per dispatch in all, racing the claim of the original
            dispatch.apply_async(args=(thread_id,), queue=namespace)

    final = wait_all_terminal(publisher, ids, timeout_s=60, stack=celery_stack)
    logs = worker_logs(celery_stack)
    assert status_counts(publisher) == {"Acked": 24}, f"{status_counts(publisher)}{logs}"
    instances: set[str] = set()
    for dispatch_id in ids:
        d = final[dispatch_id]
        started = events_of(publisher, d.run_id, "run_started")
        finished = wait_for_events(publisher, d.run_id, "run_finish", 1, celery_stack)
        assert d.status == DispatchStatus.Acked and d.attempt_count == 0, (d, logs)
        assert d.run_response == "slept 30", d
        assert len(started) == 1 and len(finished) == 1, (
            f"run {d.run_id}: {len(started)} run_started, {len(finished)} run_finish\n"
            f"{describe_events(publisher, d.run_id)}{logs}")
        assert started[0].dispatch_id == dispatch_id
        assert d.dispatch_instance_id is not None
        instances.add(d.dispatch_instance_id)
    assert len(instances) == 24, "two dispatches share one runtime invocation"
    # The duplicates really reached the worker (else this test proves nothing); the
    # delay() calls' own wake-ups are fewer (docs/behaviour.md#wake-gate).
    wait_until(lambda: received_count(celery_stack, "mailbox.dispatch") >= 3 * 24, 60,
               "the worker to receive every duplicated wake-up", celery_stack)


def test_delayed_dispatch_waits_for_available_at_without_blocking_its_thread(
        celery_stack: Stack, publisher: Mailbox) -> None:
    namespace = publisher.settings.namespace
    celery_stack.start_worker(concurrency=2)
    thread_id = "delayed"
    # Long enough that the due dispatch starts well before it on a busy machine.
    delay_ms = 5000
    late = dispatch.delay(thread_id, "echo", "late", delay_ms=delay_ms, priority=0)
    now = dispatch.delay(thread_id, "echo", "now", priority=128)
    stored = publisher.get_dispatch(late.id)
    assert stored is not None
    available_at = stored.available_at
    assert available_at == stored.created_at + delay_ms, stored

    # Early wake-ups must not start it: the claim decides on available_at, not the message.
    early = 0
    while int(time.time() * 1000) < available_at - 1000:
        dispatch.apply_async(args=(thread_id,), queue=namespace)
        early += 1
        time.sleep(0.2)
    assert early >= 5, f"only {early} early wake-ups were sent"

    first = publisher.wait(now.id, timeout_s=20)
    final = publisher.wait(late.id, timeout_s=20)
    logs = worker_logs(celery_stack)
    assert first.status == DispatchStatus.Acked and first.run_response == "now", (first, logs)
    assert final.status == DispatchStatus.Acked and final.run_response == "late", (final, logs)
    late_started = events_of(publisher, final.run_id, "run_started")
    now_started = events_of(publisher, first.run_id, "run_started")
    assert len(late_started) == 1 and len(now_started) == 1
    assert late_started[0].ts >= available_at, (
        f"started at {late_started[0].ts}, {available_at - late_started[0].ts} ms before its "
        f"available_at {available_at}\n{describe_events(publisher, final.run_id)}{logs}")
    # Priority 0 does not let a not-yet-due dispatch hold up the thread's due work.
    assert now_started[0].ts < available_at, (
        f"the due dispatch waited for the delayed one: started {now_started[0].ts}, "
        f"available_at {available_at}{logs}")


def test_a_claimed_chain_overtakes_a_backlog_of_wake_ups(celery_stack: Stack,
                                                       publisher: Mailbox) -> None:
    """Phases are served before wake-ups: a chain holding a lease does not wait behind a
    burst of wake-ups (each hop of a FIFO queue would, and leases would run out between
    phases). Wake-ups ride kombu's lowest priority list; phases the default one."""
    from tasks.publishing import publish_wake, start_next
    from tasks.runtime import runtime

    namespace = publisher.settings.namespace
    client = broker_client(celery_stack)
    receipt = dispatch.delay("thread-overtake", "echo", "first through")
    drop_queue(client, namespace)  # its own wake-up is not needed: we claim it here
    assert start_next(runtime(), "thread-overtake") == receipt.id  # claimed; verify is on the queue
    assert client.llen(namespace) == 1, "the chain's first phase is not on the default list"
    backlog = 300
    for n in range(backlog):
        publish_wake(namespace, f"thread-idle-{n}")
    low = f"{namespace}\x06\x169"
    assert client.llen(low) == backlog, "wake-ups are not on the lowest priority list"

    celery_stack.start_worker(concurrency=1)
    final = publisher.wait(receipt.id, timeout_s=60)
    left = client.llen(low)
    assert final.status == DispatchStatus.Acked, worker_logs(celery_stack)
    # All five phases ran while most of the backlog still waited. Not all of it: with acks on
    # receipt the worker takes a message into its pool's buffer while its process runs a
    # phase, and runs it next (a wake-up on an empty thread takes a millisecond or two). A
    # FIFO queue would leave none: each phase behind all 300.
    assert left >= backlog // 2, f"only {left} of {backlog} wake-ups were still queued"
