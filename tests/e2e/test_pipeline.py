"""End to end with real `celery -A tasks worker` processes (DESIGN.md §5)."""

from __future__ import annotations

from mailbox import DispatchStatus, Mailbox, RunStatus
from tasks import dispatch
from tests.support.workers import Stack


def test_echo_round_trip(celery_stack: Stack, publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    result = dispatch.delay("thread-echo", "echo", "hello")
    final = publisher.wait(result.id, timeout_s=30)
    assert final.status == DispatchStatus.Acked
    assert final.run_response == "hello"
    run = publisher.get_run(final.run_id)
    assert run is not None and run.status == RunStatus.done and run.response == "hello"


def test_transient_failures_are_retried_until_success(celery_stack: Stack,
                                                       publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    result = dispatch.delay("thread-flaky", "flaky", {"fail_times": 2})
    final = publisher.wait(result.id, timeout_s=30)
    assert final.status == DispatchStatus.Acked
    assert final.attempt_count == 2
    assert final.run_response == "ok after 2 failures"


def test_retries_exhausted_dead_letter(celery_stack: Stack, publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    result = dispatch.delay("thread-exhaust", "flaky", {"fail_times": 10}, max_attempts=3)
    final = publisher.wait(result.id, timeout_s=30)
    assert final.status == DispatchStatus.DeadLetter
    assert final.attempt_count == 3
    assert "flaky failure 3 of 10" in (final.last_error or "")
    run = publisher.get_run(final.run_id)
    assert run is not None and run.status == RunStatus.done
    assert run.termination is not None and run.termination.type == "error"


def test_permanent_error_dead_letters_after_one_run(celery_stack: Stack,
                                                    publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    result = dispatch.delay("thread-fail", "fail", "x")
    final = publisher.wait(result.id, timeout_s=30)
    assert final.status == DispatchStatus.DeadLetter
    assert final.attempt_count == 0
    assert final.last_error == "requested failure"
    started = [e for e in publisher.events.read(final.run_id) if e.type == "run_started"]
    assert len(started) == 1
