"""How an agent's ending is judged, through real `celery worker` processes (issue 11's
findings, where a user meets them):

- an agent that sees `ctx.cancelled()` after `cancel()` and then raises is not retried: the
  run ends cancelled (before, the raise was retried and the cancel undone);
- an agent returning a suspended termination without `ctx.suspend` dead-letters after its one
  attempt, saying what to use (before, each attempt waited out a lease: five leases);
- a run pinned to an agent version no worker has is put back, without spending attempts, and
  runs once a worker with that version joins (a rolling deploy).
"""

from __future__ import annotations

import time

import pytest

from mailbox import DispatchStatus, Mailbox, RunStatus, Termination
from tasks import dispatch
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.support.e2e_helpers import events_of, wait_for_events, wait_until
from tests.support.workers import Stack

AGENTS = "tests.support.custom_agents"


@pytest.mark.stack_env(MAILBOX_AGENT_MODULES=AGENTS, MAILBOX_LEASE_MS="3000")
def test_cancel_then_raise_ends_the_run_cancelled_not_retried(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    import tests.support.custom_agents  # noqa: F401  (the agents, for submit)

    celery_stack.start_worker(concurrency=2)
    result = dispatch.delay("t-cancel-raise", "raise_when_cancelled", {"ms": 20_000})
    wait_until(lambda: (d := publisher.get_dispatch(result.id)) is not None
               and d.run_status == RunStatus.running, 30, "the agent to run", celery_stack)
    assert publisher.cancel(result.id) is True
    final = publisher.wait(result.id, timeout_s=30)
    assert final.status == DispatchStatus.Acked and final.attempt_count == 0, final
    run = publisher.get_run(final.run_id)
    assert run is not None and run.termination == Termination.cancelled()
    assert len(events_of(publisher, final.run_id, "run_started")) == 1, "retried"
    # run_finish follows the ack: the dispatch can be seen Acked a moment before it exists.
    finish = wait_for_events(publisher, final.run_id, "run_finish", 1, celery_stack)
    assert len(finish) == 1 and finish[0].data["termination"] == {"type": "cancelled"}


@pytest.mark.stack_env(MAILBOX_AGENT_MODULES=AGENTS, MAILBOX_LEASE_MS="3000",
                       MAILBOX_SWEEP_INTERVAL_S="1")
def test_a_suspended_termination_returned_dead_letters_at_once(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    import tests.support.custom_agents  # noqa: F401

    celery_stack.start_beat()
    celery_stack.start_worker(concurrency=1)
    started = time.monotonic()
    result = dispatch.delay("t-bad-suspend", "returns_suspended", "x")
    final = publisher.wait(result.id, timeout_s=30)
    elapsed = time.monotonic() - started
    assert final.status == DispatchStatus.DeadLetter and final.attempt_count == 0, final
    assert final.last_error is not None and "use ctx.suspend" in final.last_error
    assert elapsed < 3.0, f"took {elapsed:.1f}s: it waited for a lease to run out"
    assert len(events_of(publisher, final.run_id, "run_started")) == 1


@pytest.mark.stack_env(MAILBOX_LEASE_MS="3000", MAILBOX_RETRY_BASE_MS="100",
                       MAILBOX_RETRY_MAX_MS="300", MAILBOX_SWEEP_INTERVAL_S="1")
def test_a_version_no_worker_has_waits_for_the_deploy(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    """The submitting process has `versioned@2` (tests.support.custom_agents_v2); the first
    worker only has version 1. The dispatch is put back (attempts unspent) until a worker
    with version 2 starts, which runs it; then the old worker stops, as in a rolling deploy.
    (While both run, which worker takes the put-back dispatch is the broker's choice: with
    two idle workers Redis hands messages to them in turn, so a chain of an even number of
    messages can bring it back to the old worker many times over.)"""
    import tests.support.custom_agents_v2  # noqa: F401  (version 2, for submit)

    celery_stack.start_beat()
    old = celery_stack.start_worker(concurrency=1, MAILBOX_AGENT_MODULES=AGENTS)  # v1 only
    result = dispatch.delay("t-deploy", "versioned", "hello")

    def deferred() -> bool:
        current = publisher.get_dispatch(result.id)
        return current is not None and current.deferred_since is not None

    wait_until(deferred, 30, "the old worker to put the dispatch back", celery_stack)
    time.sleep(1.0)  # it keeps coming back to the old worker, and keeps being put back
    waiting = publisher.get_dispatch(result.id)
    assert waiting is not None and waiting.status in (DispatchStatus.Queued,
                                                      DispatchStatus.Claimed)
    assert waiting.attempt_count == 0
    assert "run_started" not in [e.type for e in events_of(publisher, waiting.run_id)]

    celery_stack.start_worker(concurrency=1,
                              MAILBOX_AGENT_MODULES=f"{AGENTS},tests.support.custom_agents_v2")
    celery_stack.stop_warm(old)  # what it holds, it finishes or gives back
    final = publisher.wait(result.id, timeout_s=60)
    assert final.status == DispatchStatus.Acked and final.attempt_count == 0, final
    assert final.run_response == "v2: hello"
