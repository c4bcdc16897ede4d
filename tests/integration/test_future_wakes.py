"""Who wakes a thread's work for later (docs/behaviour.md#future-wakes): a worker's settle that
puts a dispatch back for later (a retry in backoff, a deferral) sends no delayed wake-up of
its own; the thread's next due dispatch is claimed now and its settle inherits the retry,
and whichever settle leaves the thread idle with work for later wakes it once, when the
earliest of it is due. Real SQL and Redis; the worker runtime's `start` and `wake` are
recorded (the e2e suite runs the same through `celery worker` processes:
tests/e2e/test_retry_wake_ups.py)."""

from __future__ import annotations

from dataclasses import replace

from mailbox import DispatchStatus, Mailbox
from mailbox.context import PhaseContext
from mailbox.phases import run_chain
from mailbox.runtime import Runtime
from tests.support.phase_kit import Wakes, claim, load, make_runtime


def worker_runtime(box: Mailbox, wakes: Wakes) -> tuple[Runtime, list[PhaseContext]]:
    started: list[PhaseContext] = []
    rt = replace(make_runtime(box, wakes, retry_base_ms=60_000, retry_max_ms=60_000),
                 start=started.append)
    return rt, started


def test_a_retry_on_a_busy_thread_is_woken_by_the_settle_that_leaves_the_thread_idle(
        mailbox: Mailbox) -> None:
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    retried = mailbox.submit("fw-busy", "flaky", {"fail_times": 1})
    second = mailbox.submit("fw-busy", "echo", "two")
    third = mailbox.submit("fw-busy", "echo", "three")

    out = run_chain(rt, claim(rt, "fw-busy"))
    assert out.settled == "transient_error"
    retry_at = load(mailbox, retried.dispatch_id).available_at
    assert wakes.calls == [("fw-busy", 0)], \
        "the nack sent no delayed wake-up; the settle woke the thread for its next dispatch"

    nxt = claim(rt, "fw-busy")  # what that wake-up does in a worker
    assert nxt.dispatch_id == second.dispatch_id
    assert run_chain(rt, nxt).settled == "completed"
    assert [c.dispatch_id for c in started] == [third.dispatch_id], "the ack claimed the next"
    assert wakes.calls == [("fw-busy", 0)], "the thread is still busy: nothing to wake"

    before = rt.clock()
    assert run_chain(rt, started[0]).settled == "completed"
    [(thread, delay)] = wakes.calls[1:]
    assert thread == "fw-busy"
    assert retry_at - rt.clock() <= delay <= retry_at - before, \
        "the ack that left the thread idle woke it for when the retry is due"
    assert load(mailbox, retried.dispatch_id).status == DispatchStatus.Queued


def test_an_idle_ack_with_nothing_for_later_wakes_nothing(mailbox: Mailbox) -> None:
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    mailbox.submit("fw-idle", "echo", "only")
    assert run_chain(rt, claim(rt, "fw-idle")).settled == "completed"
    assert wakes.calls == [] and started == []


def test_a_runtime_that_does_not_start_chains_still_wakes_each_retry_itself(
        mailbox: Mailbox) -> None:
    """Without `Runtime.start` (an in-process waker that claims for itself) nothing
    inherits a retry: its nack sends the delayed wake-up, as before."""
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, retry_base_ms=60_000, retry_max_ms=60_000)
    mailbox.submit("fw-plain", "flaky", {"fail_times": 1})
    mailbox.submit("fw-plain", "echo", "two")
    assert run_chain(rt, claim(rt, "fw-plain")).settled == "transient_error"
    delays = sorted(delay for _, delay in wakes.calls)
    assert delays[0] == 0 and delays[-1] == 60_000, wakes.calls
