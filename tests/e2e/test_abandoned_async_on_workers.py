"""An abandoned async agent through real `celery worker` processes
(docs/behaviour.md#abandonment).

The agent's coroutine swallows every cancellation. Its attempt is abandoned a grace after its
time limit and the execute task returns — so Celery's time limits no longer apply — but the
coroutine goes on on the process's agent loop. The worker's /healthz must answer 503 naming
the dispatch while it does (before, the stuck marker went with the execute task), and a grace
later the loop counts as poisoned and the process is recycled: a prefork pool process exits
as soon as it is idle and Celery starts another; a threads worker takes a warm shutdown for
its supervisor to restart.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.embedded_redis import free_port
from tests.e2e.conftest import celery_stack  # noqa: F401  (fixture)
from tests.support.e2e_helpers import wait_until
from tests.support.workers import KILLED_ON_PURPOSE, POOL_EXIT, Stack

AGENTS = "tests.support.stubborn_agents"
GRACE_S = 5  # abandoned 1 + 5 s after its start, recycled 5 s after that
ENV = {"MAILBOX_AGENT_MODULES": AGENTS, "MAILBOX_LEASE_MS": "3000",
       "MAILBOX_RETRY_BASE_MS": "50", "MAILBOX_SWEEP_INTERVAL_S": "1",
       "MAILBOX_AGENT_TIMEOUT_GRACE_S": str(GRACE_S)}


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def logs(stack: Stack) -> str:
    return "".join(p.read_text(errors="replace") for p in stack.workdir.glob("worker*.log"))


def abandon(mailbox: Mailbox, stack: Stack) -> tuple[str, str, float]:
    """Submit the stubborn agent and an echo behind it on one thread; wait until the agent's
    attempt is abandoned (dead-lettered: one attempt). (dispatch id, echo's id, when.)"""
    import tests.support.stubborn_agents  # noqa: F401  (the agents, for submit)

    receipt = mailbox.submit("t-swallows", "swallows_cancellation", {"s": 120},
                             max_attempts=1)
    nxt = mailbox.submit("t-swallows", "echo", "after the abandoned one")
    dead = wait_until(lambda: (d := mailbox.get_dispatch(receipt.dispatch_id)) is not None
                      and d.is_terminal and d, 60, "the attempt to be abandoned", stack)
    assert dead.status == DispatchStatus.DeadLetter, dead
    assert dead.last_error is not None and dead.last_error.startswith(
        f"timed out after 1 s; the agent did not stop within {GRACE_S} s and was abandoned")
    return receipt.dispatch_id, nxt.dispatch_id, time.monotonic()


@pytest.mark.slow
@pytest.mark.stack_env(**ENV)
def test_an_abandoned_coroutine_fails_the_health_check_until_its_pool_process_is_recycled(
        celery_stack: Stack, mailbox: Mailbox) -> None:  # noqa: F811
    port = free_port()
    celery_stack.start_beat()
    worker = celery_stack.start_worker(concurrency=1, MAILBOX_METRICS_PORT=str(port))
    assert health(port)[0] == 200
    children = set(Stack.pool_children(worker))
    KILLED_ON_PURPOSE.update(children)  # it recycles itself, as this test expects
    dispatch_id, echo_id, abandoned_at = abandon(mailbox, celery_stack)

    # The execute task returned: the one pool process runs the thread's next dispatch, while
    # /healthz still names the coroutine running on that process's loop.
    seen: list[tuple[int, dict[str, Any]]] = []

    def echo_done_while_stuck() -> bool:
        seen.append(health(port))
        echo = mailbox.get_dispatch(echo_id)
        return echo is not None and echo.status == DispatchStatus.Acked and seen[-1][0] == 503

    wait_until(echo_done_while_stuck, 30, "the next dispatch done while /healthz says stuck",
               celery_stack)
    body = seen[-1][1]
    assert [entry["dispatch_id"] for entry in body["stuck"]] == [dispatch_id], body
    assert {entry["pid"] for entry in body["stuck"]} == children
    assert set(Stack.pool_children(worker)) == children, "recycled before its bound"

    # A grace after the abandonment the loop counts as poisoned: the process exits, the
    # worker replaces it, and health recovers.
    wait_until(lambda: health(port)[0] == 200, 60, "the poisoned process to be recycled",
               celery_stack)
    recycled_after = time.monotonic() - abandoned_at
    print(f"\nprefork: /healthz 503 from the abandonment until {recycled_after:.1f} s after it "
          f"(grace {GRACE_S} s)")
    assert recycled_after >= GRACE_S - 1, recycled_after
    assert worker.poll() is None
    new_children = wait_until(lambda: set(Stack.pool_children(worker)) - children, 30,
                              "a new pool process", celery_stack)
    text = logs(celery_stack)
    assert "the agent loop is poisoned" in text and "exits to be replaced" in text
    exits = {int(m["pid"]): m["how"] for m in POOL_EXIT.finditer(text)}
    assert {pid: exits.get(pid) for pid in children} == dict.fromkeys(children,
                                                                       "exitcode 70"), exits
    # The new process runs agents.
    after = mailbox.submit("t-after-recycle", "echo", "fresh loop")
    final = mailbox.wait(after.dispatch_id, timeout_s=60)
    assert final.status == DispatchStatus.Acked and final.run_response == "fresh loop"
    assert set(Stack.pool_children(worker)) == new_children


@pytest.mark.slow
@pytest.mark.stack_env(**ENV)
def test_a_threads_worker_with_a_poisoned_loop_takes_a_warm_shutdown(
        celery_stack: Stack, mailbox: Mailbox) -> None:  # noqa: F811
    port = free_port()
    celery_stack.start_beat()
    worker = celery_stack.start_worker(concurrency=2, pool="threads",
                                       MAILBOX_METRICS_PORT=str(port))
    KILLED_ON_PURPOSE.add(worker.pid)  # it shuts itself down, as this test expects
    dispatch_id, echo_id, abandoned_at = abandon(mailbox, celery_stack)
    _, body = wait_until(lambda: (h := health(port))[0] == 503 and h, 30,
                         "/healthz to report the coroutine", celery_stack)
    assert [entry["dispatch_id"] for entry in body["stuck"]] == [dispatch_id], body
    assert [entry["pid"] for entry in body["stuck"]] == [worker.pid]
    final = mailbox.wait(echo_id, timeout_s=30)
    assert final.status == DispatchStatus.Acked  # the worker went on taking work meanwhile

    wait_until(lambda: worker.poll() is not None, 60, "the worker's warm shutdown",
               celery_stack)
    shut_after = time.monotonic() - abandoned_at
    print(f"\nthreads: the worker exited {shut_after:.1f} s after the abandonment "
          f"(grace {GRACE_S} s)")
    assert shut_after >= GRACE_S - 1
    assert worker.returncode == 0, worker.returncode
    assert "warm shutdown of this worker to recycle it" in logs(celery_stack)
