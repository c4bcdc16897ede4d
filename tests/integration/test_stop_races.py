"""Stops against the end of the handler, and stops followed by a lost lease
(mailbox/heartbeat.py, mailbox/agent_run.py; docs/behaviour.md#stop-kinds, #abandonment).

1. A stop the heartbeat decides after the handler ended — in the moments before execute
   stops the heartbeat — must not override what the handler did: a finished answer used to
   become `cancelled` or "timed out". The tests decide the stop exactly there, by patching
   `Heartbeat.stop` (called only after the handler ended) to trigger it and wait until the
   heartbeat has decided it. A stop decided before the handler ended keeps "cancel means
   stop".
2. A lease lost after another stop (or as the first stop) used to end the heartbeat loop,
   and with it the abandonment clock: an agent ignoring its stop ran on, beside the claim's
   next owner, never abandoned and never reported stuck.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from mailbox import DispatchStatus, Mailbox, RunStatus, StoreUnavailableError, TransientError
from mailbox.agents import AgentContext, agent
from mailbox.heartbeat import Heartbeat
from mailbox.model import Termination
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import Runtime
from tests.support.phase_kit import Wakes, claim, load, make_runtime, ops, run_of

WAIT_S = 30  # generous: the CI machine is slow and loaded


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def fresh_agent(handler: Callable[[AgentContext], Any], **options: Any) -> str:
    name = f"test-agent-{uuid.uuid4().hex[:12]}"
    agent(name, "1", **options)(handler)
    return name


class Stuck:
    """Runtime.stuck, recorded with the time of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.at: list[float] = []

    def __call__(self, dispatch_id: str, stuck: bool) -> None:
        self.calls.append((dispatch_id, stuck))
        self.at.append(time.monotonic())


# ================================================================== 1. the end of the handler
def decide_after_the_handler(monkeypatch: pytest.MonkeyPatch, kind: str,
                             trigger: Callable[[Heartbeat], None]) -> list[str | None]:
    """Make execute's `Heartbeat.stop` — reached only once the handler has ended — first
    have the heartbeat decide a stop of `kind` (`trigger`), and wait until it has counted
    that decision; returns the stop kinds seen on the heartbeat at that moment."""
    real_stop = Heartbeat.stop
    seen: list[str | None] = []

    def stop(self: Heartbeat) -> None:
        before = ops("heartbeat_stop", kind)
        trigger(self)
        wait_for(lambda: ops("heartbeat_stop", kind) > before,
                 f"the heartbeat to decide a {kind} stop")
        seen.append(None if self.stop_kind is None else self.stop_kind.value)
        real_stop(self)

    monkeypatch.setattr(Heartbeat, "stop", stop)
    return seen


def answer(ctx: AgentContext) -> str:
    return "the answer"


async def async_answer(ctx: AgentContext) -> str:
    await asyncio.sleep(0)
    return "the answer"


HANDLERS = {"plain": answer, "async": async_answer}


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_a_cancel_decided_after_the_handler_returned_does_not_undo_its_answer(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    name = fresh_agent(HANDLERS[kind])
    rt = make_runtime(mailbox, Wakes(), lease_ms=5000)
    receipt = mailbox.submit(f"t-late-cancel-{kind}", name, "go")
    seen = decide_after_the_handler(monkeypatch, "requested",
                                    lambda hb: mailbox.cancel(receipt.dispatch_id))
    out = run_chain(rt, claim(rt, receipt.thread_id))

    assert seen == [None], "the stop was decided after the handler and must not stand"
    assert out.stop_kind is None and out.settled == "completed", out
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.termination == Termination.natural_end()
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.response == "the answer"
    assert run.termination == Termination.natural_end()
    finish = [e for e in mailbox.events_of(receipt.run_id) if e.type == "run_finish"]
    assert [(e.data["status"], e.data["response"]) for e in finish] == [("acked",
                                                                         "the answer")]


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_a_timeout_decided_after_the_handler_returned_does_not_undo_its_answer(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    name = fresh_agent(HANDLERS[kind], timeout_s=600)
    rt = make_runtime(mailbox, Wakes(), lease_ms=5000)
    receipt = mailbox.submit(f"t-late-timeout-{kind}", name, "go")

    def time_out(heartbeat: Heartbeat) -> None:
        heartbeat.timeout_ms = 0  # its next tick finds the attempt past its time limit

    seen = decide_after_the_handler(monkeypatch, "timeout", time_out)
    out = run_chain(rt, claim(rt, receipt.thread_id))

    assert seen == [None]
    assert out.settled == "completed", out
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.last_error is None
    assert run_of(mailbox, receipt.run_id).response == "the answer"


def test_a_failure_raised_before_a_later_cancel_stands_too(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler's ending is fixed when it happens, whatever it is: a cancel that comes
    after the handler raised finds no running agent, as one during settle does."""
    def fails(ctx: AgentContext) -> str:
        raise TransientError("provider hiccup")

    name = fresh_agent(fails)
    rt = make_runtime(mailbox, Wakes(), lease_ms=5000)
    receipt = mailbox.submit("t-late-cancel-raise", name, "go")
    decide_after_the_handler(monkeypatch, "requested",
                             lambda hb: mailbox.cancel(receipt.dispatch_id))
    out = run_chain(rt, claim(rt, receipt.thread_id))
    assert out.settled == "transient_error", out
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert dispatch.last_error == "provider hiccup"


def heeds_then_answers(box: Mailbox) -> Callable[[AgentContext], Any]:
    def run(ctx: AgentContext) -> str:
        box.cancel(ctx.dispatch_id)
        wait_for(ctx.cancelled, "the cancel to reach the agent")
        return "partial"
    return run


def async_heeds_then_answers(box: Mailbox) -> Callable[[AgentContext], Any]:
    async def run(ctx: AgentContext) -> str:
        box.cancel(ctx.dispatch_id)
        try:
            await asyncio.sleep(WAIT_S)
        except asyncio.CancelledError:
            return "partial"
        raise AssertionError("never cancelled")
    return run


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_a_cancel_decided_before_the_handler_returned_still_means_stop(
        mailbox: Mailbox, kind: str) -> None:
    make = heeds_then_answers if kind == "plain" else async_heeds_then_answers
    name = fresh_agent(make(mailbox))
    rt = make_runtime(mailbox, Wakes(), lease_ms=5000)
    receipt = mailbox.submit(f"t-early-cancel-{kind}", name, "go")
    out = run_chain(rt, claim(rt, receipt.thread_id))
    assert out.stop_kind == "requested" and out.settled == "completed", out
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.termination == Termination.cancelled()
    assert run_of(mailbox, receipt.run_id).response == "partial"


# ================================================================ 2. a lease lost after a stop
class Hold:
    """An agent that ignores every stop until the test releases it (at most WAIT_S)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def __call__(self, ctx: AgentContext) -> str:
        self.started.set()
        self.release.wait(WAIT_S)
        self.returned.set()
        return "late answer"


def run_in_background(rt: Runtime, thread_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    ctx = claim(rt, thread_id)
    results: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: results.update(out=run_chain(rt, ctx)))
    runner.start()
    return runner, results


@pytest.mark.parametrize("first", ["timeout", "requested", "lease_lost"])
def test_a_lease_lost_after_a_stop_keeps_the_abandonment_clock_running(
        mailbox: Mailbox, first: str) -> None:
    """The first stop, then an interrupt fences the claim (the next renewal is refused):
    the agent, still ignoring everything, is abandoned a grace after the first stop and its
    process reported stuck until it returns."""
    hold = Hold()
    name = fresh_agent(hold, timeout_s=0.5 if first == "timeout" else 600)
    stuck, wakes = Stuck(), Wakes()
    rt = replace(make_runtime(mailbox, wakes, lease_ms=900, agent_timeout_grace_s=1),
                 stuck=stuck)
    if first == "lease_lost":
        rt = replace(rt, cancel_check=None)  # the interrupt reaches it by the fence only
    thread = f"t-lost-after-{first}"
    receipt = mailbox.submit(thread, name, "go")
    abandons = ops("heartbeat_abandon", first)
    lost = ops("lease_renewal", "lost")
    runner, results = run_in_background(rt, thread)
    try:
        assert hold.started.wait(WAIT_S)
        if first != "lease_lost":
            stops = ops("heartbeat_stop", first)
            if first == "requested":
                mailbox.cancel(receipt.dispatch_id)
            wait_for(lambda: ops("heartbeat_stop", first) > stops, f"the {first} stop")
        mailbox.interrupt(thread)
        wait_for(lambda: ops("lease_renewal", "lost") > lost, "the lease to be lost")

        wait_for(lambda: stuck.calls, "the agent to be abandoned and reported stuck")
        assert stuck.calls == [(receipt.dispatch_id, True)]
        assert not hold.returned.is_set(), "reported stuck only while the agent runs"
        assert ops("heartbeat_abandon", first) == abandons + 1
        # The abandonment ends the attempt (its writes fenced) and wakes the thread last.
        wait_for(lambda: (thread, 0) in wakes.calls, "the abandonment to wake the thread")
        dispatch = load(mailbox, receipt.dispatch_id)
        assert dispatch.status == DispatchStatus.Superseded  # fenced by the interrupt
        assert run_of(mailbox, receipt.run_id).termination == Termination.cancelled()
    finally:
        hold.release.set()
        runner.join(WAIT_S)
    assert results["out"].reason.startswith("abandoned"), results["out"]
    assert stuck.calls == [(receipt.dispatch_id, True), (receipt.dispatch_id, False)]
    assert load(mailbox, receipt.dispatch_id).run_response is None  # late answer dropped


def test_an_unsafe_stop_then_a_new_owner_abandons_the_old_attempt_beside_the_new_claim(
        make_mailbox: Callable[..., Mailbox], monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewals fail for a lease (unsafe stop); the sweep reclaims the claim and another
    worker claims it; the old heartbeat's next renewal is refused. The old agent, ignoring
    its stop, is abandoned a grace after the stop and reported stuck while the new claim
    runs — which abandonment leaves alone."""
    worker, other = make_mailbox(), make_mailbox()
    hold = Hold()
    name = fresh_agent(hold)
    stuck, wakes = Stuck(), Wakes()
    grace_s = 4
    rt = replace(make_runtime(worker, wakes, lease_ms=600, agent_timeout_grace_s=grace_s),
                 stuck=stuck)
    failing = threading.Event()
    failing.set()
    real_extend = worker.store.extend_lease

    def extend(*args: Any, **kwargs: Any) -> bool:
        if failing.is_set():
            raise StoreUnavailableError("injected: database unreachable during extend_lease")
        return bool(real_extend(*args, **kwargs))

    monkeypatch.setattr(worker.store, "extend_lease", extend)
    receipt = worker.submit("t-unsafe-then-lost", name, "go")
    unsafe = ops("heartbeat_stop", "unsafe")
    lost = ops("lease_renewal", "lost")
    runner, results = run_in_background(rt, "t-unsafe-then-lost")
    try:
        assert hold.started.wait(WAIT_S)
        wait_for(lambda: ops("heartbeat_stop", "unsafe") > unsafe, "the unsafe stop")
        stopped_at = time.monotonic()
        wait_for(lambda: other.sweep().reclaimed, "the sweep to reclaim the claim")
        rt2 = make_runtime(other, Wakes(), consumer="the-new-owner", lease_ms=30_000)
        new = wait_for(lambda: claim_next(rt2, "t-unsafe-then-lost"), "the new claim")
        failing.clear()
        wait_for(lambda: ops("lease_renewal", "lost") > lost, "the old lease to be lost")
        lost_at = time.monotonic()
        assert not stuck.calls, "abandoned before the lease was lost: nothing was proved"

        wait_for(lambda: stuck.calls, "the old attempt to be abandoned and reported stuck")
        assert stuck.calls == [(receipt.dispatch_id, True)]
        assert stopped_at + grace_s - 0.5 <= stuck.at[0], "abandoned before the grace"
        assert lost_at < stuck.at[0]
        assert not hold.returned.is_set()
        wait_for(lambda: ("t-unsafe-then-lost", 0) in wakes.calls,
                 "the abandonment to end the old attempt and wake the thread")
        dispatch = load(worker, receipt.dispatch_id)
        assert dispatch.status == DispatchStatus.Claimed
        assert dispatch.claim_token == new.token and dispatch.claimed_by == "the-new-owner"
        assert dispatch.attempt_count == 1  # the reclaim's; abandonment added nothing
    finally:
        hold.release.set()
        runner.join(WAIT_S)
    assert results["out"].reason.startswith("abandoned"), results["out"]
    assert stuck.calls == [(receipt.dispatch_id, True), (receipt.dispatch_id, False)]
    assert load(worker, receipt.dispatch_id).claim_token == new.token
