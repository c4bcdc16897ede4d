"""Abandoned async agents are visible and bounded (mailbox/agent_run.py, mailbox/agent_loop.py,
tasks/health.py; docs/behaviour.md#abandonment).

A coroutine that swallows its cancellation is let go when its attempt is abandoned: the
execute thread returns at once. Before, the stuck report was cleared right then — /healthz
never showed the coroutine still running on the shared loop, Celery's time limits no longer
applied (the task had returned), and nothing ever ended it. Now the process stays reported
stuck until the coroutine has really ended, and a coroutine still running a grace after its
abandonment has poisoned the loop: the runtime's `recycle` hook is called (a worker ends the
process; tests/e2e/test_abandoned_async_on_workers.py shows that with real workers).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mailbox import DispatchStatus, Mailbox, Termination
from mailbox.agents import AgentContext, agent
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import Runtime
from tasks import health, monitoring
from tests.support.phase_kit import Wakes, claim, load, make_runtime, ops

WAIT_S = 30  # generous: the CI machine is slow and loaded


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


class Recorder:
    """Runtime.stuck / Runtime.recycle, recorded with the time of each call (and passed on
    to `then`, when given)."""

    def __init__(self, then: Callable[..., None] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.at: list[float] = []
        self.then = then

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)
        self.at.append(time.monotonic())
        if self.then is not None:
            self.then(*args)


class Stubborn:
    """An async agent that swallows every cancellation (up to `heeds_after` of them; None:
    all) and goes on until the test releases it. `blocking_s`: first blocks the loop itself
    that long, as a sync call inside a coroutine does."""

    def __init__(self, heeds_after: int | None = None, blocking_s: float = 0) -> None:
        self.heeds_after = heeds_after
        self.blocking_s = blocking_s
        self.started = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()
        self.cancellations = 0

    async def __call__(self, ctx: AgentContext) -> str:
        self.started.set()
        try:
            if self.blocking_s:
                time.sleep(self.blocking_s)  # the loop does nothing else meanwhile
            deadline = time.monotonic() + WAIT_S
            while not self.release.is_set() and time.monotonic() < deadline:
                try:
                    await asyncio.sleep(0.02)
                except asyncio.CancelledError:
                    self.cancellations += 1
                    if self.heeds_after is not None and self.cancellations > self.heeds_after:
                        raise
            return "late"
        finally:
            self.ended.set()


def start(box: Mailbox, rt: Runtime, stubborn: Stubborn, thread: str
          ) -> tuple[str, threading.Thread, dict[str, Any]]:
    name = f"test-agent-{uuid.uuid4().hex[:12]}"
    agent(name, "1")(stubborn)
    receipt = box.submit(thread, name, "go")
    ctx = claim(rt, thread)
    results: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: results.update(out=run_chain(rt, ctx)))
    runner.start()
    assert stubborn.started.wait(WAIT_S), "the agent never started"
    box.cancel(receipt.dispatch_id)
    return receipt.dispatch_id, runner, results


def healthz() -> tuple[str, dict[str, Any]]:
    """The worker's /healthz, answered in this process from the markers it reads."""
    status: list[str] = []
    app = monitoring.health_app(lambda environ, start_response: [b""])
    body = b"".join(app({"PATH_INFO": "/healthz"}, lambda s, headers: status.append(s)))
    return status[0], json.loads(body)


def test_an_abandoned_coroutine_keeps_the_process_reported_stuck_until_it_ends(
        mailbox: Mailbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the worker's own marker files: /healthz answers 503 naming the dispatch for as
    long as the let-go coroutine runs — not just until the execute thread returned — and
    200 once it has ended (here within the bound, so nothing is recycled)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    grace_s = 5
    stuck, recycle = Recorder(then=health.mark_stuck), Recorder()
    rt = replace(make_runtime(mailbox, Wakes(), lease_ms=3000, agent_timeout_grace_s=grace_s),
                 stuck=stuck, recycle=recycle)
    stubborn = Stubborn()
    dispatch_id, runner, results = start(mailbox, rt, stubborn, "t-let-go")

    runner.join(grace_s + WAIT_S)
    assert not runner.is_alive(), "the execute thread waited for the stubborn coroutine"
    abandoned_at = stuck.at[0]
    assert results["out"].reason.startswith("abandoned"), results["out"]
    assert load(mailbox, dispatch_id).termination == Termination.cancelled()
    # The execute thread has returned; the coroutine still runs, and the process says so.
    assert not stubborn.ended.is_set()
    assert stuck.calls == [(dispatch_id, True)]
    status, body = healthz()
    assert status.startswith("503"), body
    assert [entry["dispatch_id"] for entry in body["stuck"]] == [dispatch_id]
    # A cancellation more (at the abandonment) was swallowed too: delivered on the agent
    # loop, so it may land a moment after the execute thread returned.
    wait_for(lambda: stubborn.cancellations >= 2, "the abandonment's cancellation")

    stubborn.release.set()
    wait_for(lambda: len(stuck.calls) == 2, "the stuck report to be cleared")
    assert stuck.calls[1] == (dispatch_id, False) and stubborn.ended.is_set()
    assert healthz() == ("200 OK", {"ok": True, "stuck": []})
    if stuck.at[1] - abandoned_at < grace_s:  # ended within the bound: nothing recycled
        assert recycle.calls == []


def test_a_coroutine_still_running_a_grace_after_its_abandonment_recycles_the_process(
        mailbox: Mailbox) -> None:
    grace_s = 1
    stuck, recycle = Recorder(), Recorder()
    rt = replace(make_runtime(mailbox, Wakes(), lease_ms=3000, agent_timeout_grace_s=grace_s),
                 stuck=stuck, recycle=recycle)
    overdue, ended = ops("abandoned_coroutine", "overdue"), ops("abandoned_coroutine", "ended")
    stubborn = Stubborn()
    dispatch_id, runner, _ = start(mailbox, rt, stubborn, "t-poisoned")
    try:
        runner.join(WAIT_S)
        assert not runner.is_alive()
        wait_for(lambda: recycle.calls, "the process to be recycled")
        assert recycle.at[0] - stuck.at[0] >= grace_s - 0.1, "recycled before the bound"
        (reason,), = recycle.calls
        assert dispatch_id in reason and "the agent loop is poisoned" in reason, reason
        assert stuck.calls == [(dispatch_id, True)], "still stuck: the coroutine runs"
        assert ops("abandoned_coroutine", "overdue") == overdue + 1
        # The thread moved on long ago: its next dispatch is claimable.
        nxt = mailbox.submit("t-poisoned", "echo", "next")
        assert wait_for(lambda: claim_next(rt, "t-poisoned"), "the next claim").dispatch_id \
            == nxt.dispatch_id
    finally:
        stubborn.release.set()
    wait_for(lambda: len(stuck.calls) == 2, "the stuck report to be cleared")
    assert stuck.calls[1] == (dispatch_id, False)
    assert ops("abandoned_coroutine", "ended") == ended + 1
    assert len(recycle.calls) == 1


def test_a_coroutine_that_heeds_the_second_cancellation_ends_at_its_abandonment(
        mailbox: Mailbox) -> None:
    """The abandonment cancels the coroutine once more: one that swallowed the first
    cancellation but not the next ends there, and is not recycled."""
    stuck, recycle = Recorder(), Recorder()
    rt = replace(make_runtime(mailbox, Wakes(), lease_ms=3000, agent_timeout_grace_s=1),
                 stuck=stuck, recycle=recycle)
    stubborn = Stubborn(heeds_after=1)
    dispatch_id, runner, results = start(mailbox, rt, stubborn, "t-heeds-later")
    runner.join(WAIT_S)
    assert results["out"].reason.startswith("abandoned")
    assert stubborn.ended.wait(WAIT_S)
    wait_for(lambda: stuck.calls and not stuck.calls[-1][1], "the stuck report to clear")
    assert stubborn.cancellations == 2
    assert recycle.calls == []  # final: the watchdog clears the report after any recycle
    assert load(mailbox, dispatch_id).status == DispatchStatus.Acked
    stubborn.release.set()


def test_a_coroutine_blocking_the_loop_is_bounded_all_the_same(mailbox: Mailbox) -> None:
    """A sync call inside the coroutine blocks the loop itself, so no cancellation reaches
    it; the watchdog is a thread of its own and still recycles the process in time."""
    grace_s = 1
    stuck, recycle = Recorder(), Recorder()
    rt = replace(make_runtime(mailbox, Wakes(), lease_ms=3000, agent_timeout_grace_s=grace_s),
                 stuck=stuck, recycle=recycle)
    stubborn = Stubborn(heeds_after=0, blocking_s=6)
    dispatch_id, runner, _ = start(mailbox, rt, stubborn, "t-blocked-loop")
    try:
        runner.join(WAIT_S)
        assert not runner.is_alive()
        wait_for(lambda: recycle.calls, "the process to be recycled")
        assert not stubborn.ended.is_set(), "the blocking call ended before the bound"
        assert stuck.calls == [(dispatch_id, True)]
    finally:
        stubborn.release.set()
        assert stubborn.ended.wait(WAIT_S)  # the shared loop is free again for other tests
    wait_for(lambda: len(stuck.calls) == 2, "the stuck report to be cleared")
