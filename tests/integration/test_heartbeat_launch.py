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
from tests.support.phase_kit import Wakes, claim, load, make_runtime, ops, register


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


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> list[Heartbeat]:
    """Every heartbeat thread fails to start, as in a process out of threads; lists the
    heartbeats whose start was attempted (each retry too)."""
    tried: list[Heartbeat] = []
    real_launch = Heartbeat.launch

    def refuse(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    def launch(self: Heartbeat) -> None:
        tried.append(self)
        monkeypatch.setattr(self._thread, "start", refuse.__get__(self._thread))
        real_launch(self)

    monkeypatch.setattr(Heartbeat, "launch", launch)
    return tried


def test_a_heartbeat_thread_that_cannot_start_stops_its_agent(
        mailbox: Mailbox, heartbeats: list[Heartbeat], no_threads: list[Heartbeat]) -> None:
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
    assert ops("heartbeat_stop", "unsafe") >= 1


def test_an_agent_that_ignores_that_stop_is_abandoned_after_the_grace(
        mailbox: Mailbox, heartbeats: list[Heartbeat], no_threads: list[Heartbeat]) -> None:
    """Without a heartbeat thread nothing renews the lease: an agent that ignores the stop
    must not run on as if it still held the attempt. The launcher tries again every tick
    and, a grace after the stop, ends the attempt for it, as the heartbeat would."""
    name, _ = register(lambda ctx: time.sleep(2.5) or "late")
    rt = make_runtime(mailbox, Wakes(), lease_ms=3000, agent_timeout_grace_s=1)
    receipt = mailbox.submit("t-no-thread-stubborn", name, "go")
    ctx = claim(rt, receipt.thread_id)
    ended_at: dict[str, float] = {}
    started = time.monotonic()

    def watch() -> None:
        while time.monotonic() - started < 5:
            if load(mailbox, receipt.dispatch_id).status == DispatchStatus.Queued:
                ended_at["t"] = time.monotonic() - started
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    out = run_chain(rt, ctx)
    watcher.join()
    [hb] = heartbeats
    assert hb.abandoned and not hb.launched
    assert len(no_threads) >= 5, "the launcher retried every tick"
    assert 1.0 <= ended_at["t"] < 2.0, "ended a grace after the stop, before the agent"
    assert out.done and "abandoned" in (out.reason or ""), out
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert "heartbeat could not start" in (dispatch.last_error or "")
    assert "abandoned" in (dispatch.last_error or "")


def test_an_attempt_over_early_takes_only_its_own_heartbeat_off_the_queue() -> None:
    """Two attempts' heartbeats waiting for their first tick; the later one ends first: the
    earlier one must still start."""
    first, second = (Heartbeat(None, dispatch_id=f"d-{k}", token="t",  # type: ignore[arg-type]
                               lease_ms=60_000, clock=lambda: 0,
                               on_stop=lambda reason, kind: None, cancel_check=lambda: None)
                     for k in ("first", "second"))
    first.start()
    second.start()
    second.stop()
    time.sleep(3 * CANCEL_CHECK_INTERVAL_S)
    try:
        assert first.launched and first.alive
        assert not second.launched
    finally:
        first.stop()
    assert not first.alive


def test_a_heartbeat_whose_start_raises_anything_does_not_stop_the_launcher(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_launch = Heartbeat.launch

    def launch(self: Heartbeat) -> None:
        if self.dispatch_id == "d-bad":
            raise SystemExit("a callback that should not have")
        real_launch(self)

    monkeypatch.setattr(Heartbeat, "launch", launch)
    bad, good = (Heartbeat(None, dispatch_id=f"d-{k}", token="t",  # type: ignore[arg-type]
                           lease_ms=60_000, clock=lambda: 0,
                           on_stop=lambda reason, kind: None, cancel_check=lambda: None)
                 for k in ("bad", "good"))
    bad.start()
    time.sleep(2 * CANCEL_CHECK_INTERVAL_S)
    good.start()
    time.sleep(3 * CANCEL_CHECK_INTERVAL_S)
    try:
        assert good.launched and good.alive
    finally:
        good.stop()
        bad.stop()


def _child_heartbeat(result: Any) -> None:
    from mailbox import heartbeat as module

    stops: list[str] = []
    inherited = len(module._launcher._due)  # the parent's pending launches: none here
    acquired = module._launcher._cond.acquire(timeout=1)
    if acquired:
        module._launcher._cond.release()
    hb = Heartbeat(None, dispatch_id="d-child", token="t", lease_ms=60_000,  # type: ignore[arg-type]
                   clock=lambda: 0, on_stop=lambda reason, kind: stops.append(reason),
                   cancel_check=lambda: "cancelled in the child")
    hb.start()
    deadline = time.monotonic() + 5
    while not stops and time.monotonic() < deadline:
        time.sleep(0.01)
    hb.stop()
    result.put((inherited, acquired, hb.launched, stops))


def test_a_forked_process_starts_its_own_launcher_and_none_of_the_parents_heartbeats() -> None:
    """A prefork pool child is forked from a process whose launcher thread did not come
    along, and whose queue may hold heartbeats of its own attempts: the child must start
    its own heartbeats, and never one of the parent's (it would renew, cancel-check and
    abandon the parent's attempt from the wrong process)."""
    running = Heartbeat(None, dispatch_id="d-parent", token="t",  # type: ignore[arg-type]
                        lease_ms=60_000, clock=lambda: 0, on_stop=lambda reason, kind: None,
                        cancel_check=lambda: None)
    running.start()
    time.sleep(2 * CANCEL_CHECK_INTERVAL_S)
    assert running.launched, "the parent's launcher runs"
    pending = Heartbeat(None, dispatch_id="d-parent-pending", token="t",  # type: ignore[arg-type]
                        lease_ms=60_000, clock=lambda: 0, on_stop=lambda reason, kind: None)
    pending.start()  # no cancel check: its first tick is 20 s away, still queued at the fork
    try:
        context = multiprocessing.get_context("fork")
        result = context.Queue()
        child = context.Process(target=_child_heartbeat, args=(result,))
        child.start()
        inherited, acquired, launched, stops = result.get(timeout=10)
        child.join(timeout=10)
    finally:
        running.stop()
        pending.stop()
    assert inherited == 0 and acquired
    assert launched and stops == ["cancelled in the child"]
