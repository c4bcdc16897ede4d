"""`async def` agents through real `celery worker` processes, prefork and threads pools: each
process runs its agents on one long-lived event loop, and their tokens reach the run's event
stream in order."""

from __future__ import annotations

import pytest

from mailbox import DispatchStatus, Mailbox
from tasks import dispatch
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.support.e2e_helpers import events_of
from tests.support.workers import Stack

AGENTS = "tests.support.custom_agents"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
@pytest.mark.stack_env(MAILBOX_AGENT_MODULES=AGENTS)
def test_async_agents_share_one_loop_per_worker_process(
        celery_stack: Stack, publisher: Mailbox, pool: str) -> None:  # noqa: F811
    import tests.support.custom_agents  # noqa: F401  (the agents, for submit)

    celery_stack.start_worker(concurrency=1 if pool == "prefork" else 2, pool=pool)
    results = [dispatch.delay(f"t-loop-{pool}-{i}", "async_loop_probe", "x") for i in range(4)]
    finals = [publisher.wait(r.id, timeout_s=60) for r in results]
    assert all(f.status == DispatchStatus.Acked for f in finals), finals
    loops = {f.run_response for f in finals}
    assert len(loops) == 1, f"more than one loop (or process) ran them: {loops}"
    for final in finals:
        tokens = [e.data["data"]["i"] for e in events_of(publisher, final.run_id, "output")]
        assert tokens == [0, 1, 2]
