"""Branch matrix rows decided by a store outage (docs/behaviour.md#branch-matrix): P2.2,
P2.5, P4.3, P4.4, P4.5, P4.7, P6.2, P8.3, P12.10 and R7.

Every test drives the phase functions by hand against the real SQL database and the real
Redis of the fixtures, with ONE store call failing (`FailOnce`: the call raises
`StoreUnavailableError`, as the store's wrapper does when the database or Redis cannot be
reached, and later calls go through). What each row promises is the same: the phase ends
with its context done and a reason naming where the outage hit, nothing half-written, the
dispatch left Claimed under the same token ([left for reclaim](
docs/behaviour.md#left-for-reclaim)); the sweep, once the lease ran out, reclaims it with
attempt_count + 1 (or supersedes it when the thread was interrupted), and the next attempt
finishes the work.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa

from mailbox import (
    DispatchStatus,
    Mailbox,
    MailboxError,
    StoreUnavailableError,
    Termination,
    TransientError,
    ValidationError,
)
from mailbox.maintenance import LEASE_EXPIRED, sweep
from mailbox.model import REASON_STALE_RECLAIM, RunStatus
from mailbox.phases import run_chain
from mailbox.runtime import Runtime
from mailbox.schema import messages
from tests.support.phase_kit import (
    Clock,
    FailOnce,
    Wakes,
    claim,
    event_types,
    forget_lease,
    load,
    make_runtime,
    ops,
    register,
    run_of,
    sql,
)


def outage() -> StoreUnavailableError:
    return StoreUnavailableError("injected: database unreachable")


def expire(rt: Runtime, clock: Clock, box: Mailbox) -> Any:
    """The lease runs out; the sweep comes."""
    return sweep(rt, clock.advance(box.settings.lease_ms + 1))


def finishes(box: Mailbox, run_id: str) -> list[str]:
    return [e.data["status"] for e in box.events_of(run_id) if e.type == "run_finish"]


def left_for_reclaim(box: Mailbox, dispatch_id: str, token: str) -> None:
    dispatch = load(box, dispatch_id)
    assert dispatch.status == DispatchStatus.Claimed and dispatch.claim_token == token
    assert dispatch.attempt_count == 0


def without_input(box: Mailbox, run_id: str) -> None:
    """The run's input message is gone: reconstruct cannot rebuild the request."""
    sql(box, sa.delete(messages).where(messages.c.run_id == run_id))


# ===================================================================================== P2.2
def test_p2_2_epoch_read_outage_in_verify_leaves_the_claim_for_the_sweep(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    name, calls = register(lambda ctx: "ok")
    clock, wakes = Clock(), Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-p2-2", name, "x")
    ctx = claim(rt, "t-p2-2")
    forget_lease(mailbox, "t-p2-2")  # verify reads SQL only when Redis cannot vouch for it
    fault = FailOnce(mailbox.store.current_dispatch_epoch, outage())
    monkeypatch.setattr(mailbox.store, "current_dispatch_epoch", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable in verify"), out.reason
    assert calls.count == 0, "the agent never runs"
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    assert load(mailbox, receipt.dispatch_id).dispatch_instance_id is None
    assert "run_started" not in event_types(mailbox, receipt.run_id)
    assert wakes.calls == [("t-p2-2", 0)], "settle still wakes the thread"

    report = expire(rt, clock, mailbox)
    assert report.reclaimed == [receipt.dispatch_id]
    assert load(mailbox, receipt.dispatch_id).attempt_count == 1
    assert run_chain(rt, claim(rt, "t-p2-2")).settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert calls.count == 1


# ===================================================================================== P2.5
def test_p2_5_supersede_outage_in_verify_is_superseded_by_the_sweep_which_ends_the_run(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch moved on between claim and verify, and the store goes away just when verify
    gives the claim up (T14): the claim stays; the sweep supersedes it (T17) once its lease
    ran out, and its repair ends the run cancelled with run_cancelled + run_finish."""
    name, calls = register(lambda ctx: "must not run")
    clock, wakes = Clock(), Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-p2-5", name, "x")
    ctx = claim(rt, "t-p2-5")
    mailbox.store.interrupt("t-p2-5", clock())
    fault = FailOnce(mailbox.store.supersede_claimed, outage())
    monkeypatch.setattr(mailbox.store, "supersede_claimed", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable in verify"), out.reason
    assert calls.count == 0
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    assert run_of(mailbox, receipt.run_id).status == RunStatus.created
    assert event_types(mailbox, receipt.run_id) == ["run_queued"]

    report = expire(rt, clock, mailbox)
    assert report.reclaimed == [] and report.superseded == [receipt.dispatch_id]
    assert report.reconciled == [receipt.dispatch_id]
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded
    assert dispatch.last_error == REASON_STALE_RECLAIM
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    events = list(mailbox.events_of(receipt.run_id))
    assert [e.type for e in events] == ["run_queued", "run_cancelled", "run_finish"]
    assert events[1].data == {"status": "superseded", "reason": REASON_STALE_RECLAIM}
    assert events[2].data == {"termination": {"type": "cancelled"}, "status": "superseded"}
    assert events[2].is_final
    assert calls.count == 0


# ===================================================================================== P4.3
def test_p4_3_load_outage_in_reconstruct_is_no_dead_letter_and_the_sweep_reclaims(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    name, calls = register(lambda ctx: f"did {ctx.input}")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p4-3", name, "x")
    # The claim read the run in its transaction; a context from a worker that did not (a
    # previous version, mid rolling deploy) is read by reconstruct: that read fails here.
    ctx = replace(claim(rt, "t-p4-3"), run_checked=False)
    fault = FailOnce(mailbox.runs.load_run_for_attempt, outage())
    monkeypatch.setattr(mailbox.runs, "load_run_for_attempt", fault)
    dead = ops("dead_letter") + ops("dead_letter", "error")

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable in reconstruct"), out.reason
    assert calls.count == 0
    assert ops("dead_letter") + ops("dead_letter", "error") == dead, "no dead letter"
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    assert load(mailbox, receipt.dispatch_id).dispatch_instance_id is None
    assert finishes(mailbox, receipt.run_id) == []

    assert expire(rt, clock, mailbox).reclaimed == [receipt.dispatch_id]
    run_chain(rt, claim(rt, "t-p4-3"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert dispatch.run_response == "did x" and calls.count == 1


# ===================================================================================== P4.4
def test_p4_4_start_record_outage_in_a_reconstruct_failure_leaves_the_claim(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    name, calls = register(lambda ctx: "must not run")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p4-4", name, "x")
    without_input(mailbox, receipt.run_id)
    ctx = claim(rt, "t-p4-4")
    fault = FailOnce(mailbox.store.record_dispatch_start, outage())
    monkeypatch.setattr(mailbox.store, "record_dispatch_start", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable dead-lettering"), out.reason
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.dispatch_instance_id is None and dispatch.run_status is None
    assert finishes(mailbox, receipt.run_id) == []

    assert expire(rt, clock, mailbox).reclaimed == [receipt.dispatch_id]
    out = run_chain(rt, claim(rt, "t-p4-4"))
    assert out.reason.startswith("dead letter"), out.reason
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 1
    assert calls.count == 0


# ===================================================================================== P4.5
@pytest.mark.parametrize("error", [
    pytest.param(outage(), id="outage"),
    pytest.param(ValidationError("injected: the store refused the result"), id="refused"),
])
def test_p4_5_a_result_record_that_fails_in_a_reconstruct_failure_is_only_logged(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, error: MailboxError) -> None:
    """Not a fence: the failure is logged, the dead letter still happens, and the run is
    errored from the dead letter's last_error (there is no recorded result to take it from)."""
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-p4-5", "echo", "x")
    without_input(mailbox, receipt.run_id)
    ctx = claim(rt, "t-p4-5")
    fault = FailOnce(mailbox.store.record_run_result, error)
    monkeypatch.setattr(mailbox.store, "record_run_result", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("dead letter"), out.reason
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 0
    assert dispatch.last_error is not None and "not found" in dispatch.last_error
    # The start was recorded (T4), the result was not: no termination on the projection.
    assert dispatch.dispatch_instance_id == out.instance_id
    assert dispatch.run_status == RunStatus.running and dispatch.termination is None
    assert dispatch.run_error is None
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done
    assert run.termination == Termination.error(dispatch.last_error)
    assert run.error == dispatch.last_error
    assert finishes(mailbox, receipt.run_id) == ["dead_letter"]


# ===================================================================================== P4.7
def test_p4_7_dead_letter_outage_in_a_reconstruct_failure_leaves_the_claim_for_reclaim(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p4-7", "echo", "x")
    without_input(mailbox, receipt.run_id)
    ctx = claim(rt, "t-p4-7")
    fault = FailOnce(mailbox.store.dead_letter, outage())
    monkeypatch.setattr(mailbox.store, "dead_letter", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable dead-lettering"), out.reason
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    # Start and result were recorded; the run was not touched, so the sweep must not take
    # the recorded error for a finished attempt.
    assert load(mailbox, receipt.dispatch_id).run_status == RunStatus.done
    assert run_of(mailbox, receipt.run_id).status == RunStatus.created
    assert finishes(mailbox, receipt.run_id) == []

    report = expire(rt, clock, mailbox)
    assert report.reclaimed == [receipt.dispatch_id] and report.acked == []
    assert load(mailbox, receipt.dispatch_id).attempt_count == 1
    run_chain(rt, claim(rt, "t-p4-7"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 1
    assert run_of(mailbox, receipt.run_id).status == RunStatus.done
    assert finishes(mailbox, receipt.run_id) == ["retrying", "dead_letter"]


# ===================================================================================== P6.2
@pytest.mark.parametrize("where", ["take_executor", "start_attempt"])
def test_p6_2_outage_starting_the_attempt_leaves_the_claim_for_reclaim(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    name, calls = register(lambda ctx: "ran")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p6-2", name, "x")
    ctx = claim(rt, "t-p6-2")
    owner = mailbox.store if where == "take_executor" else mailbox.runs
    fault = FailOnce(getattr(owner, where), outage())
    monkeypatch.setattr(owner, where, fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable starting"), out.reason
    assert calls.count == 0
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    assert load(mailbox, receipt.dispatch_id).dispatch_instance_id is None
    assert run_of(mailbox, receipt.run_id).status == RunStatus.created
    assert "run_started" not in event_types(mailbox, receipt.run_id)

    assert expire(rt, clock, mailbox).reclaimed == [receipt.dispatch_id]
    assert run_chain(rt, claim(rt, "t-p6-2")).settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert calls.count == 1
    assert event_types(mailbox, receipt.run_id).count("run_started") == 1


# ===================================================================================== P8.3
def test_p8_3_outage_loading_the_resolution_leaves_the_claim_for_reclaim(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    name, calls = register(lambda ctx: "ran")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p8-3", name, "x")
    ctx = claim(rt, "t-p8-3")
    fault = FailOnce(mailbox.runs.load_resolution, outage())
    monkeypatch.setattr(mailbox.runs, "load_resolution", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable in resolve"), out.reason
    assert calls.count == 0 and out.outcome is None
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    assert "run_started" not in event_types(mailbox, receipt.run_id)

    assert expire(rt, clock, mailbox).reclaimed == [receipt.dispatch_id]
    run_chain(rt, claim(rt, "t-p8-3"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert calls.count == 1


# ==================================================================================== P12.10
def test_p12_10_nack_outage_is_left_for_reclaim_and_the_sweep_counts_the_attempt(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    def flaky(ctx: Any) -> str:
        if ctx.attempt == 0:
            raise TransientError("try again")
        return "second time lucky"

    name, calls = register(flaky)
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-p12-10", name, "x")
    ctx = claim(rt, "t-p12-10")
    fault = FailOnce(mailbox.store.nack, outage())
    monkeypatch.setattr(mailbox.store, "nack", fault)

    out = run_chain(rt, ctx)
    assert fault.calls == 1
    assert out.done and out.reason.startswith("store unavailable settling"), out.reason
    assert out.settled is None
    left_for_reclaim(mailbox, receipt.dispatch_id, ctx.token)
    # T5 committed before the nack failed; the run was not written, so it stays running.
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.run_status == RunStatus.done
    assert dispatch.termination == Termination.error("try again")
    assert run_of(mailbox, receipt.run_id).status == RunStatus.running
    assert finishes(mailbox, receipt.run_id) == [], "run_finish follows the nack it reports"

    report = expire(rt, clock, mailbox)
    assert report.reclaimed == [receipt.dispatch_id] and report.acked == []
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    finish = [e for e in mailbox.events_of(receipt.run_id) if e.type == "run_finish"]
    assert [e.data["status"] for e in finish] == ["retrying"]
    assert finish[0].data["error"] == LEASE_EXPIRED

    run_chain(rt, claim(rt, "t-p12-10"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert dispatch.run_response == "second time lucky" and calls.count == 2


# ======================================================================================= R7
def test_r7_second_ack_outage_in_recovery_is_left_for_the_sweep_which_acks_it(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ack's outcome is unknown; recovery finds the claim ours with a done result and
    acks again, and that ack meets the outage too: "store unavailable settling", counted as
    `ack_recovery{result="ack_failed"}`; the sweep acks the finished claim, reported once."""
    name, calls = register(lambda ctx: "finished")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-r7-outage", name, "x")
    inner = FailOnce(mailbox.runs.ack, outage())
    fault = FailOnce(inner, outage())  # the first two acks fail, a third would go through
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    failed = ops("ack_recovery", "ack_failed")

    out = run_chain(rt, claim(rt, "t-r7-outage"))
    assert fault.calls == 2
    assert out.done and out.reason.startswith("store unavailable settling"), out.reason
    assert out.settled is None
    assert ops("ack_recovery", "ack_failed") == failed + 1
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Claimed
    assert finishes(mailbox, receipt.run_id) == []

    report = expire(rt, clock, mailbox)
    assert report.acked == [receipt.dispatch_id] and report.reclaimed == []
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert finishes(mailbox, receipt.run_id) == ["acked"]
    assert calls.count == 1
