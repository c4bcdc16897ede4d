"""A heartbeat's thread starts at its first tick, for the attempts still running then
(mailbox/heartbeat.py, `_Launcher`).

Against real SQL and Redis: a quick attempt never has a heartbeat thread and still settles as
before; a long one renews its lease and hears its cancel as before; a heartbeat whose thread
cannot start stops its agent (it would otherwise run on with a lease nobody renews); and a
forked process (a prefork pool child) starts its own launcher.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.agents import AgentContext
from mailbox.heartbeat import CANCEL_CHECK_INTERVAL_S, Heartbeat, StopKind
from mailbox.phases import run_chain
from tests.support.phase_kit import Wakes, claim, load, make_runtime, register


@pytest.fixture
def heartbeats(monkeypatch: pytest.MonkeyPatch) -> list[Heartbeat]:
    """Every Heartbeat the attempts of the test create."""
    made: list[Heartbeat] = []
    real_init = Heartbeat.__init__

    def init(self: Heartbeat, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Heartbeat, "__init__", init)
    return made


def test_an_attempt_over_before_its_first_tick_never_starts_a_heartbeat_thread(
        mailbox: Mailbox, heartbeats: list[Heartbeat]) -> None:
    name, _ = register(lambda ctx: "quick")
    rt = make_runtime(mailbox, Wakes(), lease_ms=3000)
    receipts = [mailbox.submit(f"t-quick-{i}", name, "go") for i in range(5)]
    for receipt in receipts:
        out = run_chain(rt, claim(rt, receipt.thread_id))
        assert out.settled == "completed", out
        assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked
    assert len(heartbeats) == 5
    assert not any(hb.launched or hb.alive for hb in heartbeats)
    time.sleep(3 * CANCEL_CHECK_INTERVAL_S)  # past every first tick: still none started
    assert not any(hb.launched or hb.alive for hb in heartbeats)


def test_an_attempt_past_its_first_tick_renews_its_lease_and_hears_its_cancel(
        mailbox: Mailbox, heartbeats: list[Heartbeat]) -> None:
    seen: dict[str, Any] = {}

    def patient(ctx: AgentContext) -> str:
        deadline = time.monotonic() + 10
        while not ctx.cancelled() and time.monotonic() < deadline:
            if time.monotonic() > seen.setdefault("started", time.monotonic()) + 0.7 \
                    and "cancel" not in seen:
                seen["cancel"] = mailbox.cancel(ctx.dispatch_id)
            time.sleep(0.01)
        return "stopped"

    name, _ = register(patient)
    rt = make_runtime(mailbox, Wakes(), lease_ms=600)  # renewals every 0.2 s
    receipt = mailbox.submit("t-long", name, "go")
    ctx = claim(rt, receipt.thread_id)
    out = run_chain(rt, ctx)
    [hb] = heartbeats
    assert hb.launched and not hb.alive
    assert hb.renewals >= 2, "the lease was renewed while the agent ran"
    assert out.stop_kind == "requested", out
    assert time.monotonic() - seen["started"] < 0.7 + 1.0


def test_a_heartbeat_thread_that_cannot_start_stops_its_agent(
        mailbox: Mailbox, heartbeats: list[Heartbeat],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    real_launch = Heartbeat.launch

    def launch(self: Heartbeat) -> None:
        monkeypatch.setattr(self._thread, "start", refuse.__get__(self._thread))
        real_launch(self)

    monkeypatch.setattr(Heartbeat, "launch", launch)

    def patient(ctx: AgentContext) -> str:
        deadline = time.monotonic() + 10
        while not ctx.cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "stopped"

    name, _ = register(patient)
    rt = make_runtime(mailbox, Wakes(), lease_ms=3000)
    receipt = mailbox.submit("t-no-thread", name, "go")
    started = time.monotonic()
    out = run_chain(rt, claim(rt, receipt.thread_id))
    assert time.monotonic() - started < 2, "the agent was stopped at the first tick"
    [hb] = heartbeats
    assert not hb.launched and hb.stop_kind == StopKind.unsafe
    assert out.settled == "transient_error", out
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert "heartbeat could not start" in (dispatch.last_error or "")


def _child_heartbeat(result: Any) -> None:
    stops: list[str] = []
    hb = Heartbeat(None, dispatch_id="d-child", token="t", lease_ms=60_000,  # type: ignore[arg-type]
                   clock=lambda: 0, on_stop=lambda reason, kind: stops.append(reason),
                   cancel_check=lambda: "cancelled in the child")
    hb.start()
    deadline = time.monotonic() + 5
    while not stops and time.monotonic() < deadline:
        time.sleep(0.01)
    hb.stop()
    result.put((hb.launched, stops))


def test_a_forked_process_starts_its_own_launcher() -> None:
    """A prefork pool child is forked from a process whose launcher thread (if it had one)
    did not come along: its heartbeats still start."""
    parent = Heartbeat(None, dispatch_id="d-parent", token="t",  # type: ignore[arg-type]
                       lease_ms=60_000, clock=lambda: 0, on_stop=lambda reason, kind: None,
                       cancel_check=lambda: None)
    parent.start()
    time.sleep(2 * CANCEL_CHECK_INTERVAL_S)
    parent.stop()
    assert parent.launched, "the parent's launcher runs"
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_child_heartbeat, args=(result,))
    child.start()
    launched, stops = result.get(timeout=10)
    child.join(timeout=10)
    assert launched and stops == ["cancelled in the child"]
