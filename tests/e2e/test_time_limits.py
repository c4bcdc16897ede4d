"""Time limits with real `celery worker` processes (docs/behaviour.md#time-limits).

A cooperative agent is told to stop at its `timeout_s` and the attempt is a transient failure
("timed out after N s"), so an agent that always hangs dead-letters once its attempts are
spent. A non-cooperative one (here: it blocks the soft-limit signal and sleeps) is abandoned a
grace after its timeout — the attempt ends, the thread moves on — while the worker's /healthz
answers 503 until Celery's hard time limit kills the pool child, which the worker replaces.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.embedded_redis import free_port
from tests.e2e.conftest import celery_stack  # noqa: F401  (fixture)
from tests.support.e2e_helpers import wait_until
from tests.support.workers import KILLED_ON_PURPOSE, Stack

AGENTS = "tests.support.custom_agents"


def health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.stack_env(MAILBOX_AGENT_MODULES=AGENTS, MAILBOX_LEASE_MS="3000",
                       MAILBOX_RETRY_BASE_MS="50", MAILBOX_SWEEP_INTERVAL_S="1")
def test_an_agent_stopping_at_its_time_limit_is_retried_then_dead_lettered(
        celery_stack: Stack, mailbox: Mailbox) -> None:  # noqa: F811
    import tests.support.custom_agents  # noqa: F401  (the agents, for submit)

    celery_stack.start_beat()
    celery_stack.start_worker(concurrency=1)
    receipt = mailbox.submit("t-coop-timeout", "slow_cooperative", {"ms": 20_000},
                             max_attempts=2)
    final = wait_until(lambda: (d := mailbox.get_dispatch(receipt.dispatch_id)) is not None
                       and d.is_terminal and d, 60, "two timed-out attempts", celery_stack)
    assert final.status == DispatchStatus.DeadLetter and final.attempt_count == 2, final
    assert final.last_error == "timed out after 1 s"


@pytest.mark.slow
@pytest.mark.stack_env(MAILBOX_AGENT_MODULES=AGENTS, MAILBOX_LEASE_MS="3000",
                       MAILBOX_RETRY_BASE_MS="50", MAILBOX_SWEEP_INTERVAL_S="1",
                       MAILBOX_AGENT_TIMEOUT_S="1", MAILBOX_AGENT_TIMEOUT_GRACE_S="2")
def test_a_hung_agent_is_abandoned_and_its_child_killed_with_the_health_check_failing(
        celery_stack: Stack, mailbox: Mailbox) -> None:  # noqa: F811
    """timeout 1 s, grace 2 s: abandoned at ~3 s; hard limit 1 + 2·2 = 5 s."""
    import tests.support.custom_agents  # noqa: F401

    port = free_port()
    celery_stack.start_beat()
    worker = celery_stack.start_worker(concurrency=1, MAILBOX_METRICS_PORT=str(port))
    assert health(port)[0] == 200
    children = set(Stack.pool_children(worker))
    KILLED_ON_PURPOSE.update(children)  # by Celery's hard time limit, as this test expects
    receipt = mailbox.submit("t-hangs", "hangs", {"s": 60}, max_attempts=1)
    nxt = mailbox.submit("t-hangs", "echo", "after the hang")
    started = time.monotonic()

    dead = wait_until(lambda: (d := mailbox.get_dispatch(receipt.dispatch_id)) is not None
                      and d.is_terminal and d, 30, "the hung attempt to be abandoned",
                      celery_stack)
    abandoned_after = time.monotonic() - started
    assert dead.status == DispatchStatus.DeadLetter, dead
    assert dead.last_error is not None and dead.last_error.startswith(
        "timed out after 1 s; the agent did not stop within 2 s and was abandoned")
    status, body = health(port)
    assert status == 503, body
    assert [entry["dispatch_id"] for entry in body["stuck"]] == [receipt.dispatch_id]

    # The hard limit kills the child; the worker replaces it, and health recovers.
    wait_until(lambda: health(port)[0] == 200, 30, "the stuck child to be killed",
               celery_stack)
    recovered_after = time.monotonic() - started
    assert set(Stack.pool_children(worker)) != children, "the stuck child was not replaced"
    assert worker.poll() is None
    logs = "".join(p.read_text() for p in celery_stack.workdir.glob("worker*.log"))
    assert "Hard time limit (5" in logs, "the hard time limit did not fire"
    final = mailbox.wait(nxt.dispatch_id, timeout_s=30)
    assert final.status == DispatchStatus.Acked and final.run_response == "after the hang"
    assert abandoned_after >= 2.5 and recovered_after < 20, (abandoned_after, recovered_after)
