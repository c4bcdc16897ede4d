"""Branch matrix rows decided by a fence, a lost claim or ack recovery
(docs/behaviour.md#branch-matrix): P2.5, P4.4, P4.7, P6.4, P12.5, P12.10, P12.14, R2, R4,
R5, R6, R7 and a deferral that meets a fence.

Phase functions driven by hand against the real SQL database and Redis. What another process
would have done meanwhile is done for real (an interrupt, a sweep, another worker's claim) at
the moment a test needs it: by wrapping ONE store call so that the interleaving happens just
before it (the call itself then runs for real and meets the fence), or by a direct SQL edit
that stages what no API can produce on demand (a claim re-taken under another token, a
dispatch row gone). Every fenced path ends in "after a fence" (docs/behaviour.md#after-a-fence):
the context done, the dispatch as the fence left it, the run reconciled and reported once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from mailbox import (
    DispatchStatus,
    Mailbox,
    PermanentError,
    StoreUnavailableError,
    Termination,
    TransientError,
)
from mailbox.maintenance import sweep
from mailbox.model import (
    REASON_STALE_DEAD_LETTER,
    REASON_STALE_NACK,
    REASON_STALE_RESULT,
    REASON_STALE_START,
    RunStatus,
)
from mailbox.phases import execute, reconstruct, resolve, run_chain, settle, verify
from mailbox.schema import dispatches, messages, thread_epochs
from mailbox.store import Resolution
from tests.support.phase_kit import (
    Clock,
    FailOnce,
    Wakes,
    claim,
    event_types,
    load,
    make_runtime,
    ops,
    phases,
    register,
    run_of,
    sql,
    submit_raw,
)


def finishes(box: Mailbox, run_id: str) -> list[str]:
    return [e.data["status"] for e in box.events_of(run_id) if e.type == "run_finish"]


class Before:
    """Wrap ONE store method: on its `nth` call, do `first()` (what another process does at
    that moment), then make the real call, which meets what `first` left."""

    def __init__(self, real: Callable[..., Any], first: Callable[[], object], *,
                 nth: int = 1) -> None:
        self.real = real
        self.first = first
        self.nth = nth
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.nth:
            self.first()
        return self.real(*args, **kwargs)


def take_over_claim(box: Mailbox, dispatch_id: str, token: str = "another-claim") -> None:
    """The claim is now held under another token (as after a reclaim and a new claim)."""
    sql(box, sa.update(dispatches).where(dispatches.c.dispatch_id == dispatch_id)
        .values(claim_token=token))


def assert_cancelled_by_fence(box: Mailbox, dispatch_id: str, run_id: str, reason: str
                              ) -> None:
    """The fenced write superseded the dispatch (T13) and "after a fence" ended the run
    cancelled, reported with run_cancelled then a final run_finish."""
    dispatch = load(box, dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded and dispatch.last_error == reason
    run = run_of(box, run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    events = list(box.events_of(run_id))
    assert [e.type for e in events][-2:] == ["run_cancelled", "run_finish"]
    assert events[-2].data == {"status": "superseded", "reason": reason}
    assert events[-1].data == {"termination": {"type": "cancelled"}, "status": "superseded"}
    assert events[-1].is_final
    assert finishes(box, run_id) == ["superseded"]


# ===================================================================================== P2.5
def test_p2_5_a_token_conflict_giving_up_a_stale_claim_goes_through_after_a_fence(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify finds the epoch stale; by the time it gives the claim up (T14) the claim is held
    under another token: `supersede_claimed` refuses (VersionConflictError) and verify ends
    "after a fence" — the other claim and the run are left as they are."""
    name, calls = register(lambda ctx: "must not run")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p2-5f", name, "x")
    ctx = claim(rt, "t-p2-5f")
    mailbox.store.interrupt("t-p2-5f", clock())
    fault = Before(mailbox.store.supersede_claimed,
                   lambda: take_over_claim(mailbox, receipt.dispatch_id))
    monkeypatch.setattr(mailbox.store, "supersede_claimed", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1 and calls.count == 0
    assert out.done and out.reason.startswith("fenced"), out.reason
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Claimed
    assert dispatch.claim_token == "another-claim", "the other claim is untouched"
    assert run_of(mailbox, receipt.run_id).status == RunStatus.created
    assert event_types(mailbox, receipt.run_id) == ["run_queued"]


# ===================================================================================== P4.4
def test_p4_4_a_reconstruct_failure_whose_start_record_is_fenced_cancels_the_run(
        mailbox: Mailbox) -> None:
    """The input is missing, and the thread was interrupted after the claim while the Redis
    epoch cache lags: verify passes, reconstruct fails, and its start record is the write that
    meets the new epoch (T13 "before runtime start"). No dead letter: the dispatch ends
    Superseded and the run cancelled, with run_cancelled + run_finish."""
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-p4-4f", "echo", "x")
    sql(mailbox, sa.delete(messages).where(messages.c.run_id == receipt.run_id))
    ctx = claim(rt, "t-p4-4f")
    assert mailbox.store.current_dispatch_epoch("t-p4-4f") == 0  # cached in Redis now
    sql(mailbox, sa.update(thread_epochs).where(thread_epochs.c.thread_id == "t-p4-4f")
        .values(current_epoch=1))
    dead = ops("dead_letter") + ops("dead_letter", "error")

    out = run_chain(rt, ctx)
    assert out.done and out.reason.startswith("fenced"), out.reason
    assert ops("dead_letter") + ops("dead_letter", "error") == dead, "never dead-lettered"
    assert load(mailbox, receipt.dispatch_id).dispatch_instance_id is None
    assert_cancelled_by_fence(mailbox, receipt.dispatch_id, receipt.run_id, REASON_STALE_START)


# ===================================================================================== P4.7
def test_p4_7_a_fenced_dead_letter_in_a_reconstruct_failure_cancels_the_run(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start and result are recorded, then an interrupt lands just before the dead letter,
    which meets it (T13 "before dead letter"): after a fence, the run ends cancelled."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p4-7f", "echo", "x")
    sql(mailbox, sa.delete(messages).where(messages.c.run_id == receipt.run_id))
    ctx = claim(rt, "t-p4-7f")
    fault = Before(mailbox.store.dead_letter,
                   lambda: mailbox.store.interrupt("t-p4-7f", clock()))
    monkeypatch.setattr(mailbox.store, "dead_letter", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("fenced"), out.reason
    assert_cancelled_by_fence(mailbox, receipt.dispatch_id, receipt.run_id,
                              REASON_STALE_DEAD_LETTER)
    assert "dead_letter" not in finishes(mailbox, receipt.run_id)


# ===================================================================================== P6.4
def test_p6_4_an_old_claims_execute_after_the_thread_was_reclaimed_is_a_silent_duplicate(
        mailbox: Mailbox) -> None:
    """The old claim's chain stalled before execute; its lease ran out, the sweep reclaimed
    it and another worker claimed the dispatch again. The old execute finds the thread's
    Redis lease under the new token (`take_executor` → `lost`): refused as a duplicate, no
    write, no event, and its settle wakes nothing. The new claim is untouched and finishes."""
    name, calls = register(lambda ctx: f"attempt {ctx.attempt}")
    clock = Clock()
    old_wakes, new_wakes = Wakes(), Wakes()
    old_rt = make_runtime(mailbox, old_wakes, clock=clock, consumer="old-worker")
    new_rt = make_runtime(mailbox, new_wakes, clock=clock, consumer="new-worker")
    receipt = mailbox.submit("t-p6-4", name, "x")
    old = phases(old_rt, claim(old_rt, "t-p6-4"), verify, reconstruct, resolve)
    report = sweep(new_rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.reclaimed == [receipt.dispatch_id]
    new = claim(new_rt, "t-p6-4")
    assert new.token != old.token and new.attempt == 1
    row, lease = load(mailbox, receipt.dispatch_id), \
        mailbox.store.coordinator.read_lease("t-p6-4")
    events = event_types(mailbox, receipt.run_id)
    starts = ops("record_dispatch_start") + ops("record_dispatch_start", "error")

    out = execute(old_rt, old)
    assert out.done and out.duplicate and out.reason == "execute refused: lost", out.reason
    out = settle(old_rt, out)
    assert out.settled is None and old_wakes.calls == [], "a duplicate wakes nothing"
    assert calls.count == 0
    assert ops("record_dispatch_start") + ops("record_dispatch_start", "error") == starts
    assert load(mailbox, receipt.dispatch_id) == row, "no write"
    assert mailbox.store.coordinator.read_lease("t-p6-4") == lease
    assert event_types(mailbox, receipt.run_id) == events, "no event"

    assert run_chain(new_rt, new).settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert dispatch.run_response == "attempt 1" and calls.count == 1


# ==================================================================================== P12.5
def test_p12_5_a_finished_claim_the_sweep_supersedes_ends_its_run_once(
        mailbox: Mailbox) -> None:
    """The attempt wrote its outcome, then the thread was interrupted and the settle never
    came before the lease ran out. The sweep supersedes the stale claim (T17): the run keeps
    the outcome the attempt wrote, and the sweep reports its end — a final run_finish with
    the run's termination and response, status "superseded" — and lists the claim. Before,
    nothing reported it (the stream ended at run_started). The settle arriving late finds the
    claim gone and reports nothing more."""
    clock = Clock()
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-p12-5", "echo", "answer")
    ctx = phases(rt, claim(rt, "t-p12-5"), verify, reconstruct, resolve, execute)
    assert ctx.outcome is not None and ctx.outcome.recorded
    mailbox.interrupt("t-p12-5")

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.superseded == [receipt.dispatch_id]
    assert report.acked == [] and report.reclaimed == [] and report.reconciled == []
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.natural_end()
    assert run.response == "answer"
    events = list(mailbox.events_of(receipt.run_id))
    assert [e.type for e in events] == ["run_queued", "run_started", "run_finish"]
    assert events[-1].data == {"termination": {"type": "natural_end"}, "response": "answer",
                               "status": "superseded"}
    assert events[-1].is_final

    late = settle(rt, ctx)
    assert late.done and late.reason.startswith("fenced"), late.reason
    assert late.settled is None
    assert sweep(rt, clock.advance(1)).superseded == []
    assert finishes(mailbox, receipt.run_id) == ["superseded"], "reported exactly once"
    assert run_of(mailbox, receipt.run_id).response == "answer"


def test_p12_5_a_suspended_claim_the_sweep_supersedes_ends_its_run_cancelled_once(
        mailbox: Mailbox) -> None:
    """The same with a suspended outcome: the waiting run cannot wait on a superseded
    dispatch, so the sweep's repair reconciles it cancelled (run_cancelled + run_finish), as
    after a fenced ack; nothing else reports it."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p12-5w", "ask", "approve?")
    ctx = phases(rt, claim(rt, "t-p12-5w"), verify, reconstruct, resolve, execute)
    assert run_of(mailbox, receipt.run_id).status == RunStatus.waiting
    mailbox.interrupt("t-p12-5w")

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.superseded == [receipt.dispatch_id]
    assert report.reconciled == [receipt.dispatch_id]
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    settle(rt, ctx)
    assert event_types(mailbox, receipt.run_id)[-2:] == ["run_cancelled", "run_finish"]
    assert finishes(mailbox, receipt.run_id) == ["superseded"]


# =================================================================================== P12.10
def test_p12_10_an_interrupt_before_a_transient_failure_settles_cancels_the_run(
        mailbox: Mailbox) -> None:
    """Interrupted between execute and settle of a transient failure: the first write of
    settle — the result record (T5), before the nack — meets the new epoch ("before run
    result"); no nack, no retry, the run ends cancelled."""
    def failing(ctx: Any) -> str:
        raise TransientError("flaky backend")

    name, calls = register(failing)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-p12-10f", name, "x")
    ctx = phases(rt, claim(rt, "t-p12-10f"), verify, reconstruct, resolve, execute)
    assert ctx.outcome is not None and ctx.outcome.kind == "transient_error"
    mailbox.interrupt("t-p12-10f")
    nacks = ops("nack") + ops("nack", "error")

    out = settle(rt, ctx)
    assert out.done and out.reason.startswith("fenced"), out.reason
    assert out.settled is None
    assert ops("nack") + ops("nack", "error") == nacks, "never nacked"
    assert_cancelled_by_fence(mailbox, receipt.dispatch_id, receipt.run_id,
                              REASON_STALE_RESULT)
    assert load(mailbox, receipt.dispatch_id).attempt_count == 0
    assert calls.count == 1


# =================================================================================== P12.14
def test_p12_14_a_fenced_dead_letter_of_a_permanent_failure_cancels_the_run(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(ctx: Any) -> str:
        raise PermanentError("bad request")

    name, _ = register(failing)
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p12-14", name, "x")
    ctx = phases(rt, claim(rt, "t-p12-14"), verify, reconstruct, resolve, execute)
    fault = Before(mailbox.store.dead_letter,
                   lambda: mailbox.store.interrupt("t-p12-14", clock()))
    monkeypatch.setattr(mailbox.store, "dead_letter", fault)

    out = settle(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("fenced"), out.reason
    assert_cancelled_by_fence(mailbox, receipt.dispatch_id, receipt.run_id,
                              REASON_STALE_DEAD_LETTER)
    assert "dead_letter" not in finishes(mailbox, receipt.run_id)


# ======================================================================= R2, R4, R5: not ours
class AckLost:
    """The ack's answer never comes back (unknown whether it landed: the store says
    unavailable), after `meanwhile()` changed what recovery will find. Counts the acks."""

    def __init__(self, real: Callable[..., Any], meanwhile: Callable[[], object]) -> None:
        self.real = real
        self.meanwhile = meanwhile
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.meanwhile()
            raise StoreUnavailableError("injected: the ack's answer was lost")
        return self.real(*args, **kwargs)


def test_r2_recovery_finding_the_dispatch_missing_goes_through_after_a_fence(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-r2", "echo", "x")
    fault = AckLost(mailbox.runs.ack, lambda: sql(mailbox, sa.delete(dispatches).where(
        dispatches.c.dispatch_id == receipt.dispatch_id)))
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    missing = ops("ack_recovery", "missing")

    out = run_chain(rt, claim(rt, "t-r2"))
    assert fault.calls == 1, "no second ack"
    assert ops("ack_recovery", "missing") == missing + 1
    assert out.done and out.reason.startswith("fenced"), out.reason
    assert out.settled is None
    assert mailbox.store.load_dispatch(receipt.dispatch_id) is None
    assert finishes(mailbox, receipt.run_id) == []


def test_r4_recovery_finding_the_claim_superseded_by_the_sweep_does_not_ack_again(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Meanwhile the thread was interrupted and the sweep superseded the expired claim (T17),
    reporting the run's end. Recovery finds the dispatch not Claimed: `not_ours`, after a
    fence, no second ack, and nothing reported twice."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-r4", "echo", "kept")
    swept: list[Any] = []

    def interrupted_and_swept() -> None:
        mailbox.store.interrupt("t-r4", clock())
        swept.append(sweep(rt, clock.now + mailbox.settings.lease_ms + 1))

    fault = AckLost(mailbox.runs.ack, interrupted_and_swept)
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    not_ours = ops("ack_recovery", "not_ours")

    out = run_chain(rt, claim(rt, "t-r4"))
    assert fault.calls == 1, "no second ack"
    assert ops("ack_recovery", "not_ours") == not_ours + 1
    assert out.done and out.reason.startswith("fenced"), out.reason
    assert swept[0].superseded == [receipt.dispatch_id]
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Superseded
    assert run_of(mailbox, receipt.run_id).response == "kept"
    assert finishes(mailbox, receipt.run_id) == ["superseded"]


def test_r5_recovery_finding_the_claim_under_another_token_does_not_ack_again(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-r5", "echo", "x")
    fault = AckLost(mailbox.runs.ack, lambda: take_over_claim(mailbox, receipt.dispatch_id))
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    not_ours = ops("ack_recovery", "not_ours")

    out = run_chain(rt, claim(rt, "t-r5"))
    assert fault.calls == 1, "no second ack"
    assert ops("ack_recovery", "not_ours") == not_ours + 1
    assert out.done and out.reason.startswith("fenced"), out.reason
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Claimed and dispatch.claim_token == "another-claim"
    assert finishes(mailbox, receipt.run_id) == []


# ======================================================================================= R6
def test_r6_a_suspended_result_whose_ack_did_not_land_is_acked_by_recovery(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Departure D18: the original refuses to force-ack a result that is not done; a waiting
    result is acked here (reclaiming it would run the agent and ask the human again). The
    run keeps waiting; suspended and run_finish are reported once."""
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-r6", "ask", "approve?")
    fault = FailOnce(mailbox.runs.ack, StoreUnavailableError("injected: ack failed"))
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    acked = ops("ack_recovery", "acked")

    out = run_chain(rt, claim(rt, "t-r6"))
    assert fault.calls == 2 and out.settled == "completed"
    assert ops("ack_recovery", "acked") == acked + 1
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.run_status == RunStatus.waiting
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.waiting and run.waiting is not None
    assert run.waiting["since_dispatch_id"] == receipt.dispatch_id
    types = event_types(mailbox, receipt.run_id)
    assert types.count("suspended") == 1 and types.count("run_finish") == 1
    assert types[-2:] == ["suspended", "run_finish"]
    finish = list(mailbox.events_of(receipt.run_id))[-1]
    assert finish.data["status"] == "acked"
    assert finish.data["termination"] == {"type": "suspended"}
    assert wakes.calls == [("t-r6", 0)]


# ======================================================================================= R7
def test_r7_a_fenced_second_ack_in_recovery_goes_through_after_a_fence(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ack's outcome is unknown; an interrupt lands before recovery's second ack,
    which meets it (T13 "before ack"): counted `ack_recovery{result="ack_failed"}`, then
    after a fence the run keeps its outcome and run_finish says "superseded"."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-r7-fence", "echo", "answer")
    second = Before(mailbox.runs.ack, lambda: mailbox.store.interrupt("t-r7-fence", clock()),
                    nth=1)
    fault = FailOnce(second, StoreUnavailableError("injected: ack failed"))
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    failed = ops("ack_recovery", "ack_failed")

    out = run_chain(rt, claim(rt, "t-r7-fence"))
    assert fault.calls == 2 and second.calls == 1
    assert ops("ack_recovery", "ack_failed") == failed + 1
    assert out.done and out.reason.startswith("fenced"), out.reason
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.response == "answer"
    events = list(mailbox.events_of(receipt.run_id))
    assert events[-1].data == {"termination": {"type": "natural_end"}, "response": "answer",
                               "status": "superseded"}
    assert finishes(mailbox, receipt.run_id) == ["superseded"]


# ================================================================================= deferral
def test_a_deferral_that_meets_a_fence_cancels_the_run_without_rescheduling(
        mailbox: Mailbox) -> None:
    """The pinned version is missing here, and the thread is interrupted before settle puts
    the dispatch back: the defer (T19) is fenced like a nack ("before nack"), and after a
    fence the run ends cancelled; nothing is rescheduled or counted as deferred."""
    name, calls = register(lambda ctx: "v1", version="1")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    run_id, dispatch_id = submit_raw(mailbox, "t-defer-fence", agent_id=name,
                                     resolution_id=f"{name}@2",
                                     resolution=Resolution(f"{name}@2", name, "2"))
    ctx = phases(rt, claim(rt, "t-defer-fence"), verify, reconstruct, resolve)
    assert ctx.outcome is not None and ctx.outcome.kind == "deferred"
    mailbox.interrupt("t-defer-fence")
    deferred = ops("agent_missing", "deferred")

    out = settle(rt, ctx)
    assert out.done and out.reason.startswith("fenced"), out.reason
    assert out.settled is None
    assert ops("agent_missing", "deferred") == deferred
    assert_cancelled_by_fence(mailbox, dispatch_id, run_id, REASON_STALE_NACK)
    types = event_types(mailbox, run_id)
    assert "run_rescheduled" not in types and "run_started" not in types
    assert calls.count == 0
