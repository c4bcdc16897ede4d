"""Retries' wake-ups through real `celery -A tasks worker` processes
(docs/behaviour.md#future-wakes): a retry on a busy thread sends no wake-up that would find
the thread busy, and the settle that leaves the thread idle wakes it when the retry is due.
Wake-up tasks are counted from the workers' INFO logs (`benchmarks.soak.wake_counts`: each
task's end line says what it claimed, None for nothing). No beat runs: without the wake-ups
the mailbox sends itself, a retry would wait for a sweep that never comes."""

from __future__ import annotations

import time

import pytest

from benchmarks.soak import wake_counts
from mailbox import DispatchStatus, Mailbox
from tasks import dispatch
from tests.support.workers import Stack

BACKOFF_MS = 600


def retry_wake_ups(stack: Stack) -> dict[str, int]:
    counts = wake_counts(sorted(stack.workdir.glob("worker*.log")), None)
    return counts["by_source"].get("delayed or other", {"ran": 0, "no_op": 0})


@pytest.mark.stack_env(MAILBOX_RETRY_BASE_MS=str(BACKOFF_MS))
def test_a_retry_behind_a_longer_dispatch_costs_no_wake_up(celery_stack: Stack,
                                                          publisher: Mailbox) -> None:
    """The retry comes due while the next dispatch still runs: the old delayed wake-up found
    the thread busy (a no-op); now that dispatch's ack claims the retry itself."""
    celery_stack.start_worker(concurrency=1)
    flaky = dispatch.delay("fw-e2e-busy", "flaky", {"fail_times": 1})
    slow = dispatch.delay("fw-e2e-busy", "sleep", {"ms": 2 * BACKOFF_MS})
    retried = publisher.wait(flaky.id, timeout_s=30)
    assert retried.status == DispatchStatus.Acked and retried.attempt_count == 1
    assert publisher.wait(slow.id, timeout_s=30).status == DispatchStatus.Acked
    time.sleep(0.5)  # the workers' log lines of the last tasks
    assert retry_wake_ups(celery_stack) == {"ran": 0, "no_op": 0}


@pytest.mark.stack_env(MAILBOX_RETRY_BASE_MS=str(BACKOFF_MS))
def test_a_retry_behind_a_quick_dispatch_is_woken_when_due(celery_stack: Stack,
                                                          publisher: Mailbox) -> None:
    """The next dispatch ends before the retry is due: its settle leaves the thread idle
    and sends the one wake-up, for when the retry is due, which claims it."""
    celery_stack.start_worker(concurrency=1)
    flaky = dispatch.delay("fw-e2e-quick", "flaky", {"fail_times": 1})
    quick = dispatch.delay("fw-e2e-quick", "echo", "quick")
    done_quick = publisher.wait(quick.id, timeout_s=30)
    retried = publisher.wait(flaky.id, timeout_s=30)
    assert retried.status == DispatchStatus.Acked and retried.attempt_count == 1
    assert retried.completed_at is not None and done_quick.completed_at is not None
    assert retried.completed_at - done_quick.completed_at < BACKOFF_MS + 2000, \
        "woken when due, not by a sweep"
    time.sleep(0.5)
    assert retry_wake_ups(celery_stack) == {"ran": 1, "no_op": 0}
