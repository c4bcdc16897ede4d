"""Thread control with real worker processes: interrupt, cancel, suspend/resume, replay."""

from __future__ import annotations

import time

import pytest

from mailbox import DispatchStatus, Mailbox, RunStatus, ValidationError
from tasks import dispatch
from tasks.publishing import publish_wake
from tests.support.workers import Stack

# A long agent that only a cancel or an interrupt ends in time: the bound on stopping it is
# generous for a loaded machine and still a fraction of the agent's own run.
AGENT_MS = 60_000
STOP_WITHIN_S = 20.0


def _wait_running(box: Mailbox, dispatch_id: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = box.get_dispatch(dispatch_id)
        if current is not None and current.run_status == RunStatus.running:
            return
        time.sleep(0.02)
    raise AssertionError(f"{dispatch_id} never started running")


def test_interrupt_stops_a_run_held_by_another_worker_process(celery_stack: Stack,
                                                              publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    long_run = dispatch.delay("thread-int", "sleep", {"ms": AGENT_MS})
    queued = dispatch.delay("thread-int", "echo", "old news")
    _wait_running(publisher, long_run.id)
    interrupted_at = time.monotonic()
    newer = dispatch.delay("thread-int", "echo", "latest", interrupt=True)
    stopped = publisher.wait(long_run.id, timeout_s=STOP_WITHIN_S)
    latency = time.monotonic() - interrupted_at
    assert stopped.status == DispatchStatus.Superseded, stopped
    # Stopped, not finished: far sooner than the agent's own end (a busy machine may take
    # a few seconds to get there; an agent left to run would take a minute).
    assert latency < STOP_WITHIN_S, f"the running agent took {latency:.2f}s to stop"
    old_run = publisher.get_run(stopped.run_id)
    assert old_run is not None and old_run.status == RunStatus.done
    assert old_run.termination is not None and old_run.termination.type == "cancelled"
    superseded = publisher.wait(queued.id, timeout_s=30)
    assert superseded.status == DispatchStatus.Superseded
    final = publisher.wait(newer.id, timeout_s=30)
    assert final.status == DispatchStatus.Acked and final.run_response == "latest"


def test_interrupt_racing_the_claim_never_starts_the_old_dispatch(celery_stack: Stack,
                                                                  publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    for i in range(8):
        thread = f"thread-race-{i}"
        old = dispatch.delay(thread, "sleep", {"ms": 3000})
        time.sleep(0.005 * i)  # land the interrupt at different points of the claim path
        publisher.interrupt(thread)
        interrupted_ms = int(time.time() * 1000)
        final = publisher.wait(old.id, timeout_s=30)
        assert final.status == DispatchStatus.Superseded, final
        late_starts = [e for e in publisher.events.read(final.run_id)
                       if e.type == "run_started" and e.ts > interrupted_ms]
        assert late_starts == [], f"iteration {i}: the old dispatch started after the interrupt"


def test_cancel_queued_and_running(celery_stack: Stack, publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    running = dispatch.delay("thread-cancel", "sleep", {"ms": AGENT_MS})
    queued = dispatch.delay("thread-cancel", "echo", "never")
    _wait_running(publisher, running.id)
    assert publisher.cancel(queued.id) is True
    assert publisher.get_dispatch(queued.id).status == DispatchStatus.Cancelled  # type: ignore[union-attr]
    queued_run = publisher.get_run(publisher.get_dispatch(queued.id).run_id)  # type: ignore[union-attr]
    assert queued_run is not None and queued_run.status == RunStatus.done
    assert publisher.cancel(running.id) is True
    final = publisher.wait(running.id, timeout_s=STOP_WITHIN_S)
    assert final.status == DispatchStatus.Acked, final
    assert final.termination is not None and final.termination.type == "cancelled"
    assert publisher.cancel("no-such-dispatch") is False
    assert publisher.cancel(running.id) is False  # already finished: nothing to do


def test_suspend_resume_completes_the_same_run(celery_stack: Stack, publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    first = dispatch.delay("thread-ask", "ask", "ship it?")
    parked = publisher.wait(first.id, timeout_s=30)
    assert parked.status == DispatchStatus.Acked and parked.run_status == RunStatus.waiting
    run = publisher.get_run(parked.run_id)
    assert run is not None and run.status == RunStatus.waiting
    assert run.waiting is not None and run.waiting["action"] == "approve"
    assert publisher.store.list_dispatches("thread-ask", [DispatchStatus.Claimed]) == []
    receipt = publisher.resume(parked.run_id, {"approved": True})
    assert receipt.run_id == parked.run_id and receipt.resumed
    done = publisher.wait(receipt.dispatch_id, timeout_s=30)
    assert done.status == DispatchStatus.Acked
    run = publisher.get_run(parked.run_id)
    assert run is not None and run.status == RunStatus.done
    assert run.response == '{"approved": true}'
    with pytest.raises(ValidationError, match="not waiting"):
        publisher.resume(parked.run_id, "again")


def test_new_input_on_a_waiting_thread_resumes_its_run(celery_stack: Stack,
                                                       publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=1)
    parked = publisher.wait(dispatch.delay("thread-wait", "ask", "name?").id, timeout_s=30)
    follow_up = dispatch.delay("thread-wait", "ask", "Ada")
    done = publisher.wait(follow_up.id, timeout_s=30)
    assert done.run_id == parked.run_id
    run = publisher.get_run(parked.run_id)
    assert run is not None and run.status == RunStatus.done and run.response == "Ada"


def test_worker_crash_while_suspended_or_resuming_loses_nothing(celery_stack: Stack,
                                                                publisher: Mailbox) -> None:
    worker = celery_stack.start_worker(concurrency=1)
    parked = publisher.wait(dispatch.delay("thread-crash", "ask", "ok?").id, timeout_s=30)
    Stack.kill(worker)  # crash while the run waits for a human: no lease is held
    receipt = publisher.resume(parked.run_id, "yes")  # queued while no worker runs
    assert publisher.get_dispatch(receipt.dispatch_id).status == DispatchStatus.Queued  # type: ignore[union-attr]
    celery_stack.start_worker(concurrency=1)  # its start-up sweep finds the queued resume
    publish_wake(publisher.settings.namespace, "thread-crash")
    done = publisher.wait(receipt.dispatch_id, timeout_s=30)
    assert done.status == DispatchStatus.Acked
    run = publisher.get_run(parked.run_id)
    assert run is not None and run.status == RunStatus.done and run.response == "yes"


def test_replay_dead_letter_and_refuse_after_interrupt(celery_stack: Stack,
                                                       publisher: Mailbox) -> None:
    celery_stack.start_worker(concurrency=2)
    dead = publisher.wait(dispatch.delay("thread-dlq", "fail", "x").id, timeout_s=30)
    assert dead.status == DispatchStatus.DeadLetter
    listed = publisher.dead_letters(thread_id="thread-dlq")
    assert [d.dispatch_id for d in listed] == [dead.dispatch_id]
    assert publisher.dead_letters(thread_id="thread-dlq", error_contains="requested") == listed
    assert publisher.dead_letters(thread_id="thread-dlq", agent="echo") == []
    replay = publisher.replay(dead.dispatch_id)
    assert replay.dispatch_id != dead.dispatch_id and replay.thread_id == "thread-dlq"
    again = publisher.wait(replay.dispatch_id, timeout_s=30)
    assert again.status == DispatchStatus.DeadLetter  # `fail` always fails: a fresh budget
    publisher.interrupt("thread-dlq")
    with pytest.raises(ValidationError, match="moved on"):
        publisher.replay(dead.dispatch_id)
    # Replay is idempotent: the dead letter was replayed already, so even forced it answers
    # with that replay; the replay's own dead letter is what runs again.
    repeat = publisher.replay(dead.dispatch_id, force=True)
    assert repeat.already_replayed and repeat.run_id == replay.run_id
    forced = publisher.replay(replay.dispatch_id, force=True)
    assert not forced.already_replayed
    assert publisher.wait(forced.dispatch_id, timeout_s=30).status == DispatchStatus.DeadLetter
    assert publisher.purge_dead_letters([dead.dispatch_id]) == 1
    assert publisher.get_dispatch(dead.dispatch_id) is None
