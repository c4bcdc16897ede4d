"""`dispatch.delay_many` through a real broker and real workers (docs/behaviour.md#bulk):
each thread woken once, not once per item, the threads grouped into a few messages, and
every item runs, in order per thread."""

from __future__ import annotations

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.facade import BulkSubmitError
from tasks import dispatch
from tests.support.e2e_helpers import broker_client
from tests.support.workers import Stack


def queued_messages(stack: Stack) -> int:
    """Messages waiting on the namespace's queue (the Redis transport keeps one list per
    priority step, named after the queue) in the stack's broker."""
    client = broker_client(stack)
    return sum(int(client.llen(key)) for key in client.scan_iter(f"{stack.namespace}*")
               if client.type(key) == b"list")


def test_delay_many_wakes_each_thread_once_in_grouped_messages_and_all_run_in_order(
        celery_stack: Stack, publisher: Mailbox) -> None:
    items = [{"thread_id": f"bulk-{i % 60}", "agent": "echo", "input": f"item {i}"}
             for i in range(240)]
    items += [{"thread_id": "bulk-later", "agent": "echo", "input": "later", "delay_ms": 500}]
    results = dispatch.delay_many(items, chunk_size=50)
    assert len(results) == 241
    # before any worker: 60 due threads in groups of 50 (two messages), the delayed one alone
    # (a countdown is the worker's to hold: the message is on the queue already)
    assert queued_messages(celery_stack) == 3
    celery_stack.start_worker(concurrency=2)
    finals = [publisher.wait(r.id, timeout_s=120) for r in results]
    assert {f.status for f in finals} == {DispatchStatus.Acked}
    assert [f.run_response for f in finals] == [item["input"] for item in items]
    for thread in {item["thread_id"] for item in items}:
        done = [f.completed_at or 0 for f in finals if f.thread_id == thread]
        assert done == sorted(done), f"{thread} ran out of order"


def test_a_refused_item_still_wakes_the_chunks_stored_before_it(
        celery_stack: Stack, publisher: Mailbox) -> None:
    held = dispatch.delay("bulk-held", "echo", "first", dedupe_key="k", delay_ms=60_000)
    items = [{"thread_id": f"bulk-{i}", "agent": "echo", "input": i} for i in range(6)]
    items.append({"thread_id": "bulk-held", "agent": "echo", "input": "x", "dedupe_key": "k"})
    with pytest.raises(BulkSubmitError) as caught:
        dispatch.delay_many(items, chunk_size=3)
    assert caught.value.index == 6 and len(caught.value.submitted) == 6
    celery_stack.start_worker(concurrency=2)
    for receipt in caught.value.submitted:
        assert publisher.wait(receipt.dispatch_id, timeout_s=60).status == DispatchStatus.Acked
    still = publisher.store.load_dispatch(held.id)
    assert still is not None and still.status == DispatchStatus.Queued
