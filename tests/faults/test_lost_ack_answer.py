"""A worker's settle acks and claims the thread's next dispatch in one transaction; when the
answer to its COMMIT is lost (the connection dropped after it), ack recovery finds the ack
landed and starts the claim that transaction made (docs/behaviour.md#ack-recovery) — through
a real `celery worker` whose ack is made to lose its answer (`tests.support.fault_hooks`,
`lost-acks`). Before, that claim waited out its lease and was reclaimed by the sweep as a
failed attempt."""

from __future__ import annotations

import pytest

from mailbox import DispatchStatus, Mailbox
from tasks import dispatch
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.support.e2e_helpers import events_of, worker_logs
from tests.support.fault_hooks import Faults
from tests.support.workers import Stack

HOOKS = ["tests.support.fault_hooks"]
LEASE_MS = 10_000


@pytest.mark.stack_env(MAILBOX_LEASE_MS=str(LEASE_MS), MAILBOX_SWEEP_INTERVAL_S="1")
def test_a_lost_ack_answer_starts_the_claim_it_made_without_spending_an_attempt(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    faults = Faults(publisher.store.coordinator.client, publisher.settings.namespace)
    faults.lose_ack_answer("lost-ack")
    celery_stack.start_beat()
    first = dispatch.delay("lost-ack", "echo", "one")
    second = dispatch.delay("lost-ack", "echo", "two")
    celery_stack.start_worker(concurrency=1, include=HOOKS, FAULT_HOOKS="1")

    done = [publisher.wait(r.id, timeout_s=60) for r in (first, second)]
    hit = faults.next_hit(timeout_s=5)
    assert hit is not None and (hit["fault"], hit["claimed"]) == ("lost_ack", True), \
        f"the fault was not taken{worker_logs(celery_stack)}"
    assert [d.status for d in done] == [DispatchStatus.Acked] * 2
    assert done[1].attempt_count == 0, "the claim was reclaimed as a failed attempt"
    assert done[0].completed_at is not None and done[1].completed_at is not None
    waited_ms = done[1].completed_at - done[0].completed_at
    assert waited_ms < LEASE_MS / 2, f"the claim waited {waited_ms} ms: its lease ran out"
    finishes = [e.data["status"] for e in events_of(publisher, done[0].run_id, "run_finish")]
    assert finishes == ["acked"], "the landed ack is reported once"
    assert not faults.client.smembers(faults.keys.lost_acks)
