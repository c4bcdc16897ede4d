"""Workers killed with SIGKILL mid-execute (DESIGN.md §5, §4.1 invariant 6; reference §4.13).

A worker lost mid-phase does not requeue its message: the dispatch stays Claimed until its
lease runs out, then the sweep (beat, every second here) reclaims it as one failed attempt and
wakes the thread, and a surviving worker runs it again. A crash loop therefore ends in the
dead letter once the attempts are spent, and the sweep reconciles the run.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from mailbox import DispatchStatus, Mailbox, RunStatus, Termination
from tasks import dispatch
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.support.e2e_helpers import (
    describe_events,
    events_of,
    received_count,
    wait_for_events,
    wait_until,
    worker_logs,
)
from tests.support.workers import Stack

LEASE_MS = 2000
SLEEP_MS = 5000

pytestmark = pytest.mark.stack_env(MAILBOX_LEASE_MS=str(LEASE_MS),
                                   MAILBOX_SWEEP_INTERVAL_S="1")


def _kill_mid_execute(stack: Stack, box: Mailbox, worker: subprocess.Popen[bytes],
                      dispatch_id: str, attempt: int) -> int:
    """Wait until attempt `attempt` is executing, then SIGKILL the worker's process group.
    Returns the last `lease_until` seen before the kill (the lease ends no earlier)."""
    submitted = box.get_dispatch(dispatch_id)
    assert submitted is not None
    run_id = submitted.run_id
    wait_until(lambda: len(events_of(box, run_id, "run_started")) > attempt, 60,
               f"attempt {attempt} of {dispatch_id} to start", stack)
    current = box.get_dispatch(dispatch_id)
    assert current is not None and current.status == DispatchStatus.Claimed, current
    assert current.attempt_count == attempt, current
    assert current.dispatch_instance_id is not None, "not executing yet"
    # Only earlier, crashed attempts have ended (the sweep's "retrying" run_finish).
    assert len(events_of(box, run_id, "run_finish")) == attempt, describe_events(box, run_id)
    assert current.lease_until is not None
    stack.kill(worker, signal.SIGKILL)
    assert worker.poll() is not None
    return current.lease_until


def test_killed_worker_is_reclaimed_and_completed_by_another(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    celery_stack.start_beat()
    first = celery_stack.start_worker(concurrency=2)
    result = dispatch.delay("thread-kill", "sleep", {"ms": SLEEP_MS})
    lease_until = _kill_mid_execute(celery_stack, publisher, first, result.id, attempt=0)

    celery_stack.start_worker(concurrency=2)
    final = publisher.wait(result.id, timeout_s=90)
    logs = worker_logs(celery_stack)
    events = describe_events(publisher, final.run_id)
    assert final.status == DispatchStatus.Acked, f"{final}\n{events}{logs}"
    assert final.attempt_count == 1, f"the crash must count as one attempt: {final}{logs}"
    assert final.run_response == f"slept {SLEEP_MS}", final

    started = events_of(publisher, final.run_id, "run_started")
    assert [e.data["attempt"] for e in started] == [0, 1], f"{events}{logs}"
    # Reclaimed only once the dead worker's lease had run out (never while it was live).
    assert started[1].ts > lease_until, f"second start {started[1].ts}, lease {lease_until}"
    rescheduled = events_of(publisher, final.run_id, "run_rescheduled")
    assert [e.data["reason"] for e in rescheduled] == ["expired_lease_reclaimed"], events
    # Every attempt that ends has its run_finish: the crashed one (from the sweep, "retrying")
    # and the one that completed ("acked").
    finished = wait_for_events(publisher, final.run_id, "run_finish", 2, celery_stack)
    assert [e.data["status"] for e in finished] == ["retrying", "acked"], events

    run = publisher.get_run(final.run_id)
    assert run is not None, final
    assert run.status == RunStatus.done, f"{run}{logs}"
    assert run.termination == Termination.natural_end(), run
    assert run.response == f"slept {SLEEP_MS}", run
    assert run.finished_at is not None and run.finished_at >= started[1].ts, run


def test_crash_loop_ends_in_the_dead_letter(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    celery_stack.start_beat()
    worker = celery_stack.start_worker(concurrency=1)
    result = dispatch.delay("thread-crash-loop", "sleep", {"ms": SLEEP_MS}, max_attempts=2)
    for attempt in range(2):
        _kill_mid_execute(celery_stack, publisher, worker, result.id, attempt=attempt)
        worker = celery_stack.start_worker(concurrency=1)

    # The last worker's sweep finds the second expired lease with the budget spent.
    final = publisher.wait(result.id, timeout_s=90)
    logs = worker_logs(celery_stack)
    events = describe_events(publisher, final.run_id)
    assert final.status == DispatchStatus.DeadLetter, f"{final}\n{events}{logs}"
    assert final.attempt_count == 2, final
    assert final.last_error == "lease expired; max attempts reached", final

    reason = "lease expired; max attempts reached"

    def reconciled() -> bool:
        run = publisher.get_run(final.run_id)
        return run is not None and run.status == RunStatus.done

    wait_until(reconciled, 60, "the sweep to reconcile the dead-lettered run", celery_stack)
    run = publisher.get_run(final.run_id)
    assert run is not None
    assert run.termination == Termination.error(reason), run
    assert run.error == reason, run
    assert run.finished_at is not None, run

    started = events_of(publisher, final.run_id, "run_started")
    assert [e.data["attempt"] for e in started] == [0, 1], f"{events}{logs}"
    finished = wait_for_events(publisher, final.run_id, "run_finish", 2, celery_stack)
    assert [e.data["status"] for e in finished] == ["retrying", "dead_letter"], events
    # A few more sweeps: a dead letter is never run again.
    sweeps = received_count(celery_stack, "mailbox.sweep")
    wait_until(lambda: received_count(celery_stack, "mailbox.sweep") >= sweeps + 3, 60,
               "three more sweeps", celery_stack)
    assert len(events_of(publisher, final.run_id, "run_started")) == 2, \
        describe_events(publisher, final.run_id)
