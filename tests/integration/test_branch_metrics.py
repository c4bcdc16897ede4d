"""Branch matrix rows about metrics (docs/behaviour.md#branch-matrix, #metrics): P0, P4.2,
P11, P12.17, R8, the deferral's counters and completion metrics, and completions counted
once whoever settles the attempt (settle, a duplicate settle, the sweep).

Read through the real prometheus registry of this process (what a worker's /metrics
exposes), as deltas around what each test does; the gauges of P0 through the registry the
worker builds (`tasks.monitoring.build_registry`) over this test's store.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mailbox import (
    DispatchStatus,
    Mailbox,
    PermanentError,
    RunDispatch,
    StoreUnavailableError,
    TransientError,
)
from mailbox.coordination import Coordinator
from mailbox.database import create_engine
from mailbox.dev.embedded_redis import free_port
from mailbox.maintenance import sweep
from mailbox.phases import claim_next, execute, reconstruct, resolve, run_chain, settle, verify
from mailbox.runtime import Runtime, now_ms
from mailbox.store import MailboxStore, Resolution
from tasks import monitoring
from tasks import runtime as task_runtime
from tests.support.phase_kit import (
    Clock,
    FailOnce,
    Wakes,
    claim,
    load,
    make_runtime,
    ops,
    phases,
    register,
    submit_raw,
)

OUTCOMES = ("completed", "transient_error", "permanent_error")


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def completions() -> dict[str, tuple[float, float, float]]:
    """Per outcome: (mailbox_runs_total, runtime histogram count, enqueue→complete count)."""
    return {o: (sample("mailbox_runs_total", {"outcome": o}),
                sample("mailbox_dispatch_runtime_seconds_count", {"outcome": o}),
                sample("mailbox_dispatch_enqueue_to_complete_seconds_count", {"outcome": o}))
            for o in OUTCOMES}


def counted_since(before: dict[str, tuple[float, float, float]]) -> dict[str, int]:
    """How many completions each outcome gained; the three families always move together."""
    now = completions()
    gained: dict[str, int] = {}
    for outcome in OUTCOMES:
        deltas = {round(a - b) for a, b in zip(now[outcome], before[outcome], strict=True)}
        assert len(deltas) == 1, f"{outcome}: runs, runtime and enqueue→complete disagree"
        if (delta := deltas.pop()):
            gained[outcome] = delta
    return gained


# ======================================================================================= P0
@pytest.fixture
def scrape(mailbox: Mailbox) -> Iterator[Any]:
    """The worker's registry (tasks.monitoring) over this test's Mailbox."""
    previous = task_runtime.install(mailbox, mailbox.runtime())
    try:
        yield monitoring.build_registry()
    finally:
        if previous is None:
            task_runtime.reset(close=False)
        else:
            task_runtime.install(*previous)


def down_store(box: Mailbox, tmp_path: Path) -> Mailbox:
    """A Mailbox whose database does not answer: a closed port for PostgreSQL, a directory
    where the SQLite file should be."""
    url = box.settings.database_url or ""
    dead = (f"sqlite:///{tmp_path}" if url.startswith("sqlite")
            else f"postgresql://postgres@127.0.0.1:{free_port()}/gone")
    store = MailboxStore(create_engine(dead), Coordinator(box.store.coordinator.client,
                                                          box.settings.namespace))
    return Mailbox(store, box.settings)


def test_p0_active_runs_are_the_claimed_dispatches_at_scrape_and_store_up_says_down(
        mailbox: Mailbox, scrape: Any, tmp_path: Path) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-p0-a", "echo", "x")
    mailbox.submit("t-p0-b", "echo", "y")
    assert scrape.get_sample_value("mailbox_active_runs") == 0
    assert scrape.get_sample_value("mailbox_queue_depth") == 2
    assert scrape.get_sample_value("mailbox_store_up") == 1

    first, second = claim(rt, "t-p0-a"), claim(rt, "t-p0-b")
    assert scrape.get_sample_value("mailbox_active_runs") == 2
    assert scrape.get_sample_value("mailbox_dispatch_depth", {"status": "claimed"}) == 2
    run_chain(rt, first)
    assert scrape.get_sample_value("mailbox_active_runs") == 1
    run_chain(rt, second)
    assert scrape.get_sample_value("mailbox_active_runs") == 0
    assert scrape.get_sample_value("mailbox_dispatch_depth", {"status": "acked"}) == 2

    broken = down_store(mailbox, tmp_path)
    try:
        task_runtime.install(broken, broken.runtime())
        assert scrape.get_sample_value("mailbox_store_up") == 0
        assert scrape.get_sample_value("mailbox_active_runs") is None, \
            "no gauge is made up when the store does not answer"
    finally:
        broken.store.engine.dispose()


# ===================================================================================== P4.2
def test_p4_2_a_reconstruct_failure_counts_one_permanent_error_completion(
        mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.store.enqueue(RunDispatch.queued("d-p4-2", "t-p4-2", "missing-run", now_ms()))
    runtime_sum = sample("mailbox_dispatch_runtime_seconds_sum",
                         {"outcome": "permanent_error"})
    before = completions()

    out = run_chain(rt, claim(rt, "t-p4-2"))
    assert out.reason.startswith("dead letter"), out.reason
    assert counted_since(before) == {"permanent_error": 1}
    assert sample("mailbox_dispatch_runtime_seconds_sum",
                  {"outcome": "permanent_error"}) == runtime_sum, "no start yet: runtime 0"


# ====================================================================================== P11
def test_p11_completion_metrics_are_labelled_by_outcome(mailbox: Mailbox) -> None:
    def transient(ctx: Any) -> str:
        raise TransientError("busy")

    def permanent(ctx: Any) -> str:
        raise PermanentError("no")

    flaky, _ = register(transient)
    broken, _ = register(permanent)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-p11-ok", "echo", "x")
    mailbox.submit("t-p11-transient", flaky, "x")
    mailbox.submit("t-p11-permanent", broken, "x")

    before = completions()
    assert run_chain(rt, claim(rt, "t-p11-ok")).settled == "completed"
    assert counted_since(before) == {"completed": 1}
    before = completions()
    assert run_chain(rt, claim(rt, "t-p11-transient")).settled == "transient_error"
    assert counted_since(before) == {"transient_error": 1}
    before = completions()
    assert run_chain(rt, claim(rt, "t-p11-permanent")).settled == "permanent_error"
    assert counted_since(before) == {"permanent_error": 1}


# ==================================================================================== P12.17
def test_p12_17_nack_ack_and_dead_letter_operations_are_counted(mailbox: Mailbox) -> None:
    def transient(ctx: Any) -> str:
        raise TransientError("busy")

    flaky, _ = register(transient)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-p12-17-n", flaky, "x", max_attempts=1)
    mailbox.submit("t-p12-17-a", "echo", "x")
    nack, ack, dead = ops("nack"), ops("ack"), ops("dead_letter")

    run_chain(rt, claim(rt, "t-p12-17-n"))
    assert ops("nack") == nack + 1
    assert ops("dead_letter") == dead, "a nack that spends the budget is a nack"
    run_chain(rt, claim(rt, "t-p12-17-a"))
    assert ops("ack") == ack + 1


# ======================================================================================= R8
@pytest.mark.parametrize("label,landed", [("acked", False), ("landed", True)])
def test_r8_ack_recovery_is_counted_and_timed_by_outcome(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, label: str, landed: bool) -> None:
    monkeypatch.setattr(mailbox.runs, "ack", FailOnce(
        mailbox.runs.ack, StoreUnavailableError("injected: answer lost"), after_real=landed))
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-r8", "echo", "x")
    count = ops("ack_recovery", label)
    timed = sample("mailbox_ack_recovery_seconds_count", {"outcome": label})
    before = completions()

    assert run_chain(rt, claim(rt, "t-r8")).settled == "completed"
    assert ops("ack_recovery", label) == count + 1
    assert sample("mailbox_ack_recovery_seconds_count", {"outcome": label}) == timed + 1
    assert counted_since(before) == {"completed": 1}


# ================================================================================= deferral
def test_deferrals_and_the_dead_letter_after_the_grace_are_counted(mailbox: Mailbox) -> None:
    """Each deferral counts `agent_missing{deferred}` and no completion (nothing ran); the
    dead letter past the grace counts `agent_missing{dead_letter}` and one permanent_error
    completion, like any dead letter (before, it recorded none)."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock, missing_agent_grace_s=1)
    name, calls = register(lambda ctx: "v1", version="1")
    _, dispatch_id = submit_raw(mailbox, "t-defer-metrics", agent_id=name,
                                resolution_id=f"{name}@9",
                                resolution=Resolution(f"{name}@9", name, "9"))
    deferred, dead = ops("agent_missing", "deferred"), ops("agent_missing", "dead_letter")
    before = completions()

    assert run_chain(rt, claim(rt, "t-defer-metrics")).settled == "deferred"
    assert ops("agent_missing", "deferred") == deferred + 1
    assert counted_since(before) == {}

    clock.advance(1000)
    out = run_chain(rt, claim(rt, "t-defer-metrics"))
    assert out.settled == "permanent_error"
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 0
    assert ops("agent_missing", "dead_letter") == dead + 1
    assert ops("agent_missing", "deferred") == deferred + 1
    assert counted_since(before) == {"permanent_error": 1}
    assert calls.count == 0


# ============================================== completions counted once, whoever settles
def finish_without_settle(rt: Runtime, thread_id: str) -> Any:
    ctx = phases(rt, claim(rt, thread_id), verify, reconstruct, resolve, execute)
    assert ctx.outcome is not None and ctx.outcome.recorded
    return ctx


def test_a_sweep_acked_attempt_counts_one_completion_and_its_late_settle_none(
        mailbox: Mailbox) -> None:
    """The attempt wrote its outcome and its settle did not come before the lease ran out:
    the sweep acks it (T6) and counts its completion (before: none); the settle arriving
    after is a duplicate and counts nothing. The run's duration was counted once, when the
    attempt wrote it done."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-sweep-ack-metrics", "echo", "x")
    natural = sample("mailbox_run_duration_seconds_count", {"termination": "natural_end"})
    before = completions()
    ctx = finish_without_settle(rt, "t-sweep-ack-metrics")
    assert counted_since(before) == {}

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.acked == [receipt.dispatch_id]
    assert counted_since(before) == {"completed": 1}
    late = settle(rt, ctx)
    assert late.duplicate and late.settled is None
    assert counted_since(before) == {"completed": 1}
    assert sample("mailbox_run_duration_seconds_count",
                  {"termination": "natural_end"}) == natural + 1


def test_an_ack_outage_left_for_the_sweep_is_counted_once_by_the_sweep(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-ack-outage-metrics", "echo", "x")
    ctx = finish_without_settle(rt, "t-ack-outage-metrics")
    monkeypatch.setattr(mailbox.runs, "ack", FailOnce(
        mailbox.runs.ack, StoreUnavailableError("injected: database unreachable")))
    # Still down when ack recovery re-reads the dispatch: nothing to do but leave it.
    monkeypatch.setattr(mailbox.store, "load_dispatch", FailOnce(
        mailbox.store.load_dispatch, StoreUnavailableError("injected: still unreachable")))
    before = completions()

    out = settle(rt, ctx)
    assert out.done and out.reason.startswith("store unavailable settling"), out.reason
    assert counted_since(before) == {}, "left for the sweep, which counts it"
    assert sweep(rt, clock.advance(mailbox.settings.lease_ms + 1)).acked == \
        [receipt.dispatch_id]
    assert counted_since(before) == {"completed": 1}


def test_a_settle_delivered_twice_counts_one_completion(mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-twice-metrics", "echo", "x")
    ctx = finish_without_settle(rt, "t-twice-metrics")
    before = completions()
    first, second = settle(rt, copy.deepcopy(ctx)), settle(rt, copy.deepcopy(ctx))
    assert first.settled == "completed" and second.duplicate
    assert counted_since(before) == {"completed": 1}


def test_a_finished_claim_the_sweep_supersedes_counts_one_completion(
        mailbox: Mailbox) -> None:
    """P12.5's metrics: the sweep that ends the run (T17 after the outcome) counts the
    attempt's completion; the late settle, fenced, counts nothing."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    mailbox.submit("t-t17-metrics", "echo", "x")
    ctx = finish_without_settle(rt, "t-t17-metrics")
    mailbox.interrupt("t-t17-metrics")
    before = completions()

    assert sweep(rt, clock.advance(mailbox.settings.lease_ms + 1)).superseded
    assert counted_since(before) == {"completed": 1}
    assert settle(rt, ctx).settled is None
    assert counted_since(before) == {"completed": 1}
    assert claim_next(rt, "t-t17-metrics") is None


def test_an_ack_fenced_by_an_interrupt_counts_one_completion(mailbox: Mailbox) -> None:
    """The settle's own ack meets the interrupt (T13): the settle ended the attempt (it
    reports it "superseded"), so it counts it."""
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-fenced-ack-metrics", "echo", "x")
    ctx = finish_without_settle(rt, "t-fenced-ack-metrics")
    mailbox.interrupt("t-fenced-ack-metrics")
    before = completions()
    out = settle(rt, ctx)
    assert out.reason.startswith("fenced"), out.reason
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Superseded
    assert counted_since(before) == {"completed": 1}
