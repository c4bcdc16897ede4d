"""Every branch of the five phase functions, called directly (reference §4.3 P0-P13, §4.4,
§4.5, §4.7, §4.8, §4.9; DESIGN.md §5).

Each test builds a `Runtime` from `mailbox.runtime(wake=recorder)` and drives
claim_next → verify → reconstruct → resolve → execute → settle by hand (or `run_chain`), against
the real SQL database and the real Redis of the fixtures. Most tests use a synthetic clock
(`Clock`), so every store time they assert is exact; the heartbeat tests use the wall clock
with 300 ms leases because the heartbeat is a real thread.

Test agents are registered per test under unique names. The only doubles are single-method
fault injections on the store (`FailOnce`) and direct SQL/Redis edits that stage states a
crash or another process would leave behind.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from mailbox import (
    DispatchStatus,
    Mailbox,
    MailboxError,
    PermanentError,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    StoreUnavailableError,
    Termination,
    TransientError,
    ValidationError,
)
from mailbox.agents import AgentContext, AgentResult, agent
from mailbox.context import Outcome, PhaseContext
from mailbox.maintenance import sweep
from mailbox.phases import (
    SUPERSEDED_BEFORE_START,
    claim_next,
    execute,
    reconstruct,
    resolve,
    run_chain,
    settle,
    verify,
)
from mailbox.runtime import Runtime, now_ms
from mailbox.schema import dispatches, messages, thread_epochs
from mailbox.store import Resolution
from tests.support.phase_kit import (
    Clock,
    FailOnce,
    Wakes,
    after_verify,
    assert_no_claim,
    claim,
    count_sql,
    event_types,
    forget_lease,
    load,
    make_runtime,
    ops,
    phases,
    register,
    run_of,
    sql,
    submit_raw,
)
from tests.support.racers import racing


# ================================================================================= claim_next
def test_claim_next_returns_the_context_of_the_claim(mailbox: Mailbox) -> None:
    name, _ = register(lambda ctx: "ok")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock, consumer="consumer-a")
    receipt = mailbox.submit("t-claim", name, "hi")
    ctx = claim(rt, "t-claim")
    dispatch = load(mailbox, receipt.dispatch_id)
    assert ctx.dispatch_id == receipt.dispatch_id and ctx.run_id == receipt.run_id
    assert ctx.token == dispatch.claim_token and dispatch.claimed_by == "consumer-a"
    assert dispatch.lease_until == clock() + mailbox.settings.lease_ms
    assert ctx.attempt == 0 and ctx.epoch == 0 and ctx.done is False


def test_claim_next_is_none_when_busy_or_nothing_is_due(mailbox: Mailbox) -> None:
    name, _ = register(lambda ctx: "ok")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    assert claim_next(rt, "t-empty") is None
    mailbox.submit("t-busy", name, "one")
    mailbox.submit("t-busy", name, "two")
    claim(rt, "t-busy")
    assert claim_next(rt, "t-busy") is None, "a thread with a Claimed dispatch is busy"
    mailbox.submit("t-later", name, "x", delay_ms=10 * 60_000)
    assert claim_next(rt, "t-later") is None, "not due yet"


# ===================================================================================== verify
def test_verify_dispatch_disappeared_finishes_without_running(mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "ok")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-gone", name, "hi")
    ctx = claim(rt, "t-gone")
    sql(mailbox, sa.delete(dispatches).where(dispatches.c.dispatch_id == receipt.dispatch_id))
    forget_lease(mailbox, "t-gone")  # else verify passes on it: see the test below

    ctx = verify(rt, ctx)
    assert ctx.done is True and ctx.reason == "disappeared"
    ctx = after_verify(rt, ctx)
    assert calls.count == 0
    assert ctx.instance_id is None, "later phases must pass a finished context on untouched"
    assert wakes.calls == [("t-gone", 0)], "settle still wakes the thread"
    assert run_of(mailbox, receipt.run_id).status == RunStatus.created


def test_verify_passes_on_the_redis_lease_and_the_start_fences_a_vanished_dispatch(
        mailbox: Mailbox) -> None:
    """Verify reads no SQL while Redis holds the thread's live lease with this claim's token
    and dispatch and the cached epoch is not past the claim's (docs/behaviour.md#verify): a
    row deleted behind Redis's back is then found by the start, whose write is fenced in SQL,
    and the agent still never runs."""
    name, calls = register(lambda ctx: "ok")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-gone2", name, "hi")
    ctx = claim(rt, "t-gone2")
    sql(mailbox, sa.delete(dispatches).where(dispatches.c.dispatch_id == receipt.dispatch_id))

    ctx = verify(rt, ctx)
    assert ctx.done is False, "the lease in Redis says the claim is ours"
    out = phases(rt, ctx, reconstruct, resolve, execute, settle)
    assert out.done is True and out.reason.startswith("fenced"), out.reason
    assert calls.count == 0
    assert "run_started" not in event_types(mailbox, receipt.run_id)


def test_verify_reads_no_sql_while_redis_says_the_claim_is_current(mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-nosql", "echo", "hi")
    ctx = claim(rt, "t-nosql")
    with count_sql(mailbox.store) as statements:
        assert verify(rt, ctx).done is False
    assert statements == []
    forget_lease(mailbox, "t-nosql")
    with count_sql(mailbox.store) as statements:
        assert verify(rt, ctx).done is False, "SQL says it is ours too"
    assert statements, "without the lease in Redis verify asks SQL"


def test_verify_other_token_is_not_ours_and_changes_nothing(mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "ok")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-token", name, "hi")
    ctx = claim(rt, "t-token")
    before = load(mailbox, receipt.dispatch_id)

    forged = run_chain(rt, replace(ctx, token="someone-elses-token"))
    assert forged.done is True and forged.reason == "not ours: Claimed"
    assert calls.count == 0
    assert load(mailbox, receipt.dispatch_id) == before, "a foreign token must change nothing"

    owner = run_chain(rt, ctx)
    assert owner.settled == "completed" and calls.count == 1
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked


def test_verify_replayed_after_ack_is_a_no_op(mailbox: Mailbox) -> None:
    """A duplicated or late verify message for a finished attempt: not ours any more."""
    name, calls = register(lambda ctx: "ok")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-replay", name, "hi")
    ctx = claim(rt, "t-replay")
    duplicate = copy.deepcopy(ctx)
    run_chain(rt, ctx)
    acked = load(mailbox, receipt.dispatch_id)
    assert acked.status == DispatchStatus.Acked

    out = run_chain(rt, duplicate)
    assert out.done is True and out.reason == "not ours: Acked"
    assert calls.count == 1
    assert load(mailbox, receipt.dispatch_id) == acked


def test_verify_superseded_dispatch_reconciles_run_cancelled(mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "ok")
    clock = Clock()
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-sup", name, "hi")
    ctx = claim(rt, "t-sup")
    # An interrupt, then the claim's next fenced write (here a renewal) supersedes it (T13).
    mailbox.store.interrupt("t-sup", clock())
    assert mailbox.store.extend_lease(receipt.dispatch_id, ctx.token, 1000, clock()) is False
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Superseded
    assert run_of(mailbox, receipt.run_id).status == RunStatus.created

    ctx = verify(rt, ctx)
    assert ctx.done is True and ctx.reason == "not ours: Superseded"
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    assert run.dispatch_id == receipt.dispatch_id
    assert event_types(mailbox, receipt.run_id)[-2:] == ["run_cancelled", "run_finish"]
    after_verify(rt, ctx)
    assert calls.count == 0 and wakes.calls == [("t-sup", 0)]


def test_verify_stale_epoch_supersedes_before_the_agent_starts(mailbox: Mailbox) -> None:
    """P2: an interrupt between claim and start. supersede_claimed, run cancelled, the agent
    is never entered, and the thread is woken for what comes next."""
    name, calls = register(lambda ctx: "ok")
    clock = Clock()
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-stale", name, "hi")
    ctx = claim(rt, "t-stale")
    interrupt = mailbox.store.interrupt("t-stale", clock())
    assert interrupt.active_dispatch is not None
    assert interrupt.active_dispatch.dispatch_id == receipt.dispatch_id
    before = ops("supersede_claimed")

    ctx = verify(rt, ctx)
    assert ctx.done is True and ctx.reason == "superseded before start"
    assert ops("supersede_claimed") == before + 1
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded
    assert dispatch.last_error == SUPERSEDED_BEFORE_START
    assert dispatch.dispatch_epoch == interrupt.new_dispatch_epoch
    assert dispatch.dispatch_instance_id is None and dispatch.run_status is None
    assert_no_claim(dispatch)
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    assert run.dispatch_id == receipt.dispatch_id

    after_verify(rt, ctx)
    assert calls.count == 0
    assert "run_started" not in event_types(mailbox, receipt.run_id)
    assert wakes.calls == [("t-stale", 0)]


def test_verify_stale_epoch_whose_claim_was_reclaimed_meanwhile_still_cancels_the_run(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """P2 race: between verify's load and its supersede_claimed, the sweep reclaimed the stale
    claim (T17, Superseded), so supersede_claimed returns None. Reference P2: "If that call
    returned Ok (with or without a record) … reconcile the run as cancelled (using the loaded
    snapshot)". The agent never runs either way."""
    name, calls = register(lambda ctx: "ok")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-race", name, "hi")
    ctx = claim(rt, "t-race")
    mailbox.store.interrupt("t-race", clock())
    real_epoch = mailbox.store.current_dispatch_epoch

    def epoch_then_reclaim(thread_id: str) -> int:
        epoch = real_epoch(thread_id)
        # the sweep of another process runs right here, after the claim's lease expired
        assert mailbox.store.reclaim_expired_leases(
            clock() + mailbox.settings.lease_ms + 1, 10) == []
        return epoch

    monkeypatch.setattr(mailbox.store, "current_dispatch_epoch", epoch_then_reclaim)
    ctx = verify(rt, ctx)
    assert ctx.done is True
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Superseded
    after_verify(rt, ctx)
    assert calls.count == 0
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()


def test_verify_reads_the_epoch_from_sql_when_redis_forgot_it(mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "ok")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-noepoch", name, "hi")
    ctx = claim(rt, "t-noepoch")
    mailbox.store.interrupt("t-noepoch", clock())
    mailbox.store.coordinator.client.delete(mailbox.store.coordinator.epoch_key("t-noepoch"))

    run_chain(rt, ctx)
    assert calls.count == 0
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Superseded


def test_stale_epoch_missed_by_a_lagging_cache_is_fenced_at_start(mailbox: Mailbox) -> None:
    """Redis still says epoch 0 (its update after the interrupt's commit was lost): verify
    passes, but record_dispatch_start is fenced in SQL, so the agent still never runs (P6)."""
    name, calls = register(lambda ctx: "ok")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-lag", name, "hi")
    ctx = claim(rt, "t-lag")
    assert mailbox.store.current_dispatch_epoch("t-lag") == 0  # cached in Redis now
    sql(mailbox, sa.update(thread_epochs).where(thread_epochs.c.thread_id == "t-lag")
        .values(current_epoch=1))

    out = run_chain(rt, ctx)
    assert calls.count == 0
    assert out.done is True and out.reason.startswith("fenced")
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded
    assert dispatch.dispatch_instance_id is None
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()


def test_verify_store_outage_leaves_the_claim_for_the_sweep(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    name, calls = register(lambda ctx: "ok")
    clock = Clock()
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-outage", name, "hi")
    ctx = claim(rt, "t-outage")
    forget_lease(mailbox, "t-outage")  # verify asks SQL only when Redis cannot tell
    monkeypatch.setattr(mailbox.store, "load_dispatch", FailOnce(
        mailbox.store.load_dispatch, StoreUnavailableError("injected: database unreachable")))

    out = run_chain(rt, ctx)
    assert out.done is True and out.reason.startswith("store unavailable in verify")
    assert calls.count == 0
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Claimed and dispatch.claim_token == ctx.token

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.reclaimed == [receipt.dispatch_id]
    run_chain(rt, claim(rt, "t-outage"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert calls.count == 1


# ================================================================================ reconstruct
def test_reconstruct_missing_run_dead_letters_once_and_wakes_the_next(
        mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: f"did {ctx.input}")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    mailbox.store.enqueue(RunDispatch.queued("d-orphan", "t-orphan", "missing-run", now_ms(),
                                             priority=10, max_attempts=3))
    second = mailbox.submit("t-orphan", name, "b", priority=20)
    ctx = claim(rt, "t-orphan")
    assert ctx.dispatch_id == "d-orphan"
    start, result, dead = (ops("record_dispatch_start"), ops("record_run_result"),
                           ops("dead_letter"))

    ctx = phases(rt, verify(rt, ctx), reconstruct)
    assert ctx.done is True and ctx.reason.startswith("dead letter")
    # Exactly one of each, in the only order the fences allow: the projection is on the
    # dead-lettered row, and a fenced write succeeds only while the row is still Claimed.
    assert ops("record_dispatch_start") == start + 1
    assert ops("record_run_result") == result + 1
    assert ops("dead_letter") == dead + 1
    dispatch = load(mailbox, "d-orphan")
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 0
    assert dispatch.last_error is not None and "not found" in dispatch.last_error
    assert "missing-run" in dispatch.last_error
    assert dispatch.dispatch_instance_id == ctx.instance_id
    assert dispatch.run_status == RunStatus.done
    assert dispatch.termination == Termination.error(dispatch.last_error)
    assert dispatch.run_error == dispatch.last_error and dispatch.completed_at is not None
    assert_no_claim(dispatch)

    ctx = phases(rt, ctx, resolve, execute, settle)
    assert calls.count == 0, "the runtime is never entered"
    assert wakes.calls == [("t-orphan", 0)]

    # The wake starts the next dispatch of the thread; the dead letter is never polled again.
    nxt = claim(rt, "t-orphan")
    assert nxt.dispatch_id == second.dispatch_id
    run_chain(rt, nxt)
    assert load(mailbox, second.dispatch_id).status == DispatchStatus.Acked
    assert calls.count == 1
    assert claim_next(rt, "t-orphan") is None
    assert ops("dead_letter") == dead + 1
    assert load(mailbox, "d-orphan").attempt_count == 0


def test_reconstruct_failure_replayed_does_not_dead_letter_twice(mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.store.enqueue(RunDispatch.queued("d-twice", "t-twice", "missing-run", now_ms()))
    ctx = claim(rt, "t-twice")
    duplicate = copy.deepcopy(ctx)
    run_chain(rt, ctx)
    dead = ops("dead_letter") + ops("dead_letter", "error")
    dead_letter_row = load(mailbox, "d-twice")

    out = run_chain(rt, duplicate)
    assert out.done is True and out.reason == "not ours: DeadLetter"
    assert ops("dead_letter") + ops("dead_letter", "error") == dead
    assert load(mailbox, "d-twice") == dead_letter_row


def test_reconstruct_run_of_another_thread_dead_letters_without_touching_it(
        mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "ok")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    foreign = mailbox.submit("t-owner", name, "theirs")
    mailbox.store.enqueue(RunDispatch.queued("d-thief", "t-thief", foreign.run_id, now_ms()))
    ctx = claim(rt, "t-thief")

    out = run_chain(rt, ctx)
    assert out.done is True and calls.count == 0
    dispatch = load(mailbox, "d-thief")
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error is not None and "belongs to thread 't-owner'" in dispatch.last_error
    assert dispatch.run_status == RunStatus.done and dispatch.dispatch_instance_id is not None
    run = run_of(mailbox, foreign.run_id)
    assert run.status == RunStatus.created and run.dispatch_id == foreign.dispatch_id, \
        "reconciliation must skip a run of another thread"
    assert wakes.calls == [("t-thief", 0)]


def test_reconstruct_missing_input_message_dead_letters_and_errors_the_run(
        mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "ok")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-wiped", name, "hi")
    sql(mailbox, sa.delete(messages).where(messages.c.thread_id == "t-wiped"))
    ctx = claim(rt, "t-wiped")

    run_chain(rt, ctx)
    assert calls.count == 0
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error is not None and "not found" in dispatch.last_error
    assert dispatch.run_status == RunStatus.done and dispatch.dispatch_instance_id is not None
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination is not None
    assert run.termination.type == "error" and "not found" in str(run.termination.value)
    assert run.dispatch_id == receipt.dispatch_id and run.finished_at is not None
    assert wakes.calls == [("t-wiped", 0)]


def test_reconstruct_done_run_settles_without_running_the_agent_again(
        mailbox: Mailbox) -> None:
    """An attempt finished the run and died before its ack, and its claim was reclaimed
    anyway, by a reclaim that does not ask the run store (`MailboxStore` alone; the sweep
    acks such a claim instead): the retry acks what the run record says instead of running
    the agent a second time."""
    name, calls = register(lambda ctx: f"answer {ctx.attempt}")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-done", name, "hi")
    first = phases(rt, claim(rt, "t-done"), verify, reconstruct, resolve, execute)
    assert calls.count == 1 and first.outcome.kind == "completed"
    assert run_of(mailbox, receipt.run_id).status == RunStatus.done
    # ... crash before settle. The lease runs out and a reclaim takes the claim back.
    reclaimed = mailbox.store.reclaim_expired_leases(
        clock.advance(mailbox.settings.lease_ms + 1), 10)
    assert [d.dispatch_id for d in reclaimed] == [receipt.dispatch_id]

    retry = phases(rt, claim(rt, "t-done"), verify, reconstruct)
    assert retry.attempt == 1
    assert retry.outcome == Outcome("completed", replayed=True)
    retry = phases(rt, retry, resolve, execute, settle)
    assert calls.count == 1
    assert retry.settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert dispatch.run_response == "answer 0" and dispatch.run_status == RunStatus.done
    assert dispatch.termination == Termination.natural_end()


# ==================================================================================== resolve
@pytest.mark.parametrize("case", ["no-resolution-id", "unknown-resolution"])
def test_resolve_failure_is_permanent_after_one_attempt(mailbox: Mailbox, case: str) -> None:
    name, calls = register(lambda ctx: "must not run")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    if case == "no-resolution-id":
        resolution_id, resolution = None, Resolution(f"{name}@1", name, "1")
        expected = "has no resolution id"
    else:
        resolution_id, resolution = "ghost@1", Resolution(f"{name}@1", name, "1")
        expected = "resolution 'ghost@1' not found"
    run_id, dispatch_id = submit_raw(mailbox, "t-resolve", agent_id=name,
                                     resolution_id=resolution_id, resolution=resolution)
    ctx = phases(rt, claim(rt, "t-resolve"), verify, reconstruct, resolve)
    assert expected in ctx.resolve_error and ctx.agent is None

    ctx = phases(rt, ctx, execute, settle)
    assert calls.count == 0
    assert ctx.settled == "permanent_error"
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.attempt_count == 0 and dispatch.max_attempts == 5
    assert dispatch.last_error is not None and expected in dispatch.last_error
    assert dispatch.run_status == RunStatus.done and dispatch.dispatch_instance_id is not None
    run = run_of(mailbox, run_id)
    assert run.status == RunStatus.done
    assert run.termination == Termination.error(dispatch.last_error)
    assert wakes.calls == [("t-resolve", 0)]
    assert claim_next(rt, "t-resolve") is None


def test_resolve_runs_exactly_the_pinned_version(mailbox: Mailbox) -> None:
    name = f"test-agent-{uuid.uuid4().hex[:12]}"
    register(lambda ctx: "v1", name=name, version="1")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    old = mailbox.submit("t-pin", name, "x")
    register(lambda ctx: "v2", name=name, version="2")  # a deploy after the submit
    new = mailbox.submit("t-pin", name, "y")

    run_chain(rt, claim(rt, "t-pin"))
    run_chain(rt, claim(rt, "t-pin"))
    assert load(mailbox, old.dispatch_id).run_response == "v1"
    assert load(mailbox, new.dispatch_id).run_response == "v2"
    assert run_of(mailbox, old.run_id).resolution_id == f"{name}@1"


# ==================================================================================== execute
def test_execute_twice_with_the_same_context_runs_the_agent_once(mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "once")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-dup", name, "hi")
    ctx = phases(rt, claim(rt, "t-dup"), verify, reconstruct, resolve)
    duplicate = copy.deepcopy(ctx)

    ctx = execute(rt, ctx)
    duplicate = execute(rt, duplicate)
    assert calls.count == 1
    assert duplicate.duplicate is True and duplicate.done is True
    assert duplicate.reason.startswith("execute refused: held:")
    settle(rt, duplicate)
    assert wakes.calls == [], "a refused duplicate neither settles nor wakes"
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Claimed

    settle(rt, ctx)
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.run_response == "once"
    assert wakes.calls == [], "the ack saw nothing else due on the thread: no claim"


def test_execute_duplicate_delivered_while_the_first_runs_is_refused(mailbox: Mailbox) -> None:
    started, release = threading.Event(), threading.Event()

    def blocking(ctx: AgentContext) -> str:
        started.set()
        assert release.wait(10)
        return "first"

    name, calls = register(blocking)
    rt = make_runtime(mailbox, Wakes())
    receipt = mailbox.submit("t-dup2", name, "hi")
    ctx = phases(rt, claim(rt, "t-dup2"), verify, reconstruct, resolve)
    duplicate = copy.deepcopy(ctx)
    results: dict[str, PhaseContext] = {}
    worker = threading.Thread(target=lambda: results.update(first=execute(rt, ctx)))
    worker.start()
    try:
        assert started.wait(10)
        duplicate = execute(rt, duplicate)
        assert duplicate.duplicate is True
    finally:
        release.set()
        worker.join(10)
    settle(rt, results["first"])
    assert calls.count == 1
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked


def test_execute_duplicate_after_redis_forgot_the_executor_is_refused_by_sql(
        mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: "once")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-dup3", name, "hi")
    ctx = phases(rt, claim(rt, "t-dup3"), verify, reconstruct, resolve)
    duplicate = copy.deepcopy(ctx)
    ctx = execute(rt, ctx)
    coordinator = mailbox.store.coordinator
    coordinator.client.delete(coordinator.lease_key("t-dup3"))

    duplicate = execute(rt, duplicate)
    assert duplicate.duplicate is True
    assert duplicate.reason.startswith("execute refused: attempt already started")
    assert calls.count == 1
    settle(rt, ctx)
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked


def test_execute_records_start_and_marks_the_run_running(mailbox: Mailbox) -> None:
    seen: dict[str, Any] = {}

    def observe(ctx: AgentContext) -> str:
        dispatch = mailbox.store.load_dispatch(ctx.dispatch_id)
        run = mailbox.get_run(ctx.run_id)
        seen.update(dispatch=dispatch, run=run, input=ctx.input, attempt=ctx.attempt,
                    decision=ctx.decision, thread=ctx.thread_id, messages=ctx.messages)
        return "ok"

    name, _ = register(observe)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-start", name, {"q": 1})
    ctx = phases(rt, claim(rt, "t-start"), verify, reconstruct, resolve, execute)
    dispatch, run = seen["dispatch"], seen["run"]
    assert dispatch.status == DispatchStatus.Claimed
    assert dispatch.run_status == RunStatus.running
    assert dispatch.dispatch_instance_id == ctx.instance_id
    assert run.status == RunStatus.running and run.dispatch_id == receipt.dispatch_id
    assert seen["input"] == {"q": 1} and seen["attempt"] == 0 and seen["decision"] is None
    assert seen["thread"] == "t-start"
    assert [(m.role, m.content) for m in seen["messages"]] == [("user", {"q": 1})]
    assert event_types(mailbox, receipt.run_id)[:2] == ["run_queued", "run_started"]


def test_heartbeat_renews_the_lease_while_a_slow_agent_runs(mailbox: Mailbox) -> None:
    lease_ms = 450  # renewals every 150 ms; a stall of up to ~300 ms is tolerated
    seen: dict[str, Any] = {}

    def slow(ctx: AgentContext) -> str:
        first = mailbox.store.load_dispatch(ctx.dispatch_id)
        assert first is not None
        time.sleep(3 * lease_ms / 1000)
        now = now_ms()
        last = mailbox.store.load_dispatch(ctx.dispatch_id)
        assert last is not None
        seen.update(first=first.lease_until, last=last.lease_until, now=now,
                    reclaimed=mailbox.store.reclaim_expired_leases(now, 10),
                    cancelled=ctx.cancelled())
        return "slow done"

    name, _ = register(slow)
    rt = make_runtime(mailbox, Wakes(), lease_ms=lease_ms)
    receipt = mailbox.submit("t-hb", name, "hi")
    renewals = ops("lease_renewal")
    run_chain(rt, claim(rt, "t-hb"))

    assert seen["first"] < seen["now"], "without renewal the first lease would have expired"
    assert seen["last"] > seen["first"] and seen["last"] >= seen["now"]
    assert seen["reclaimed"] == [] and seen["cancelled"] is False
    assert ops("lease_renewal") - renewals >= 3
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.run_response == "slow done"


def wait_for_cancel(ctx: AgentContext, seen: dict[str, Any], timeout_s: float = 5.0
                    ) -> AgentResult:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if ctx.cancelled():
            seen["cancelled_after_s"] = time.monotonic() - started
            return AgentResult(termination=Termination.cancelled())
        time.sleep(0.01)
    seen["cancelled_after_s"] = None
    return AgentResult(response="never cancelled")


def test_lost_lease_by_interrupt_cancels_the_agent(mailbox: Mailbox) -> None:
    seen: dict[str, Any] = {}

    def interrupted(ctx: AgentContext) -> AgentResult:
        mailbox.store.interrupt(ctx.thread_id, now_ms())  # a store-level interrupt: no signal
        return wait_for_cancel(ctx, seen)

    name, _ = register(interrupted)
    rt = make_runtime(mailbox, Wakes(), lease_ms=300)
    receipt = mailbox.submit("t-lost", name, "hi")
    out = run_chain(rt, claim(rt, "t-lost"))

    assert seen["cancelled_after_s"] is not None, "ctx.cancelled() never became true"
    assert out.stop_reason == "lease lost"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded
    assert dispatch.last_error == "claimed dispatch superseded during lease renewal"
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()


def test_cancel_signal_reaches_the_running_agent(mailbox: Mailbox) -> None:
    """Mailbox.cancel on a Claimed dispatch signals the worker; the built-in sleep agent stops
    early with termination cancelled, and the attempt is acked with that termination."""
    rt = make_runtime(mailbox, Wakes(), lease_ms=300)
    receipt = mailbox.submit("t-cancel", "sleep", {"ms": 10_000})
    ctx = claim(rt, "t-cancel")
    results: dict[str, PhaseContext] = {}
    worker = threading.Thread(target=lambda: results.update(out=run_chain(rt, ctx)))
    started = time.monotonic()
    worker.start()
    deadline = time.monotonic() + 10
    while load(mailbox, receipt.dispatch_id).run_status != RunStatus.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert mailbox.cancel(receipt.dispatch_id) is True
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - started < 5
    assert results["out"].stop_reason == "cancelled by request"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.termination == Termination.cancelled()
    assert run_of(mailbox, receipt.run_id).termination == Termination.cancelled()


def test_lost_lease_to_another_consumer_cancels_the_agent_and_spares_the_new_claim(
        mailbox: Mailbox) -> None:
    lease_ms = 300
    seen: dict[str, Any] = {}

    def reclaimed(ctx: AgentContext) -> AgentResult:
        # The lease of this attempt expires (a stall) and another worker takes the dispatch.
        later = now_ms() + 10 * lease_ms
        [requeued] = mailbox.store.reclaim_expired_leases(later, 10)
        assert requeued.status == DispatchStatus.Queued and requeued.attempt_count == 1
        [other] = mailbox.store.claim(ctx.thread_id, "other-consumer", 60_000, later)
        seen["other"] = other
        return wait_for_cancel(ctx, seen)

    name, _ = register(reclaimed)
    rt = make_runtime(mailbox, Wakes(), lease_ms=lease_ms)
    receipt = mailbox.submit("t-stolen", name, "hi")
    out = run_chain(rt, claim(rt, "t-stolen"))

    assert seen["cancelled_after_s"] is not None, "ctx.cancelled() never became true"
    assert out.stop_reason == "lease lost"
    assert out.done is True and out.reason.startswith("fenced")
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Claimed
    assert dispatch.claimed_by == "other-consumer"
    assert dispatch.claim_token == seen["other"].claim_token
    assert dispatch.attempt_count == 1 and dispatch.run_status is None


def test_attempt_that_lost_its_lease_does_not_decide_the_new_owners_run(
        mailbox: Mailbox) -> None:
    """Fencing (reference §7 point 1, DESIGN §4.1 invariant 4): a worker whose lease was
    reclaimed cannot record results for the new owner's claim. Here the old attempt is
    cancelled by the lease loss; the new owner must still run the agent and its result must
    be the run's result."""
    lease_ms = 300
    seen: dict[str, Any] = {}
    holder: dict[str, PhaseContext] = {}

    def agent_body(ctx: AgentContext) -> Any:
        if ctx.attempt == 0:
            later = now_ms() + 10 * lease_ms
            mailbox.store.reclaim_expired_leases(later, 10)
            other_rt = make_runtime(mailbox, Wakes(), consumer="new-owner",
                                    clock=lambda: later)
            holder["ctx"] = claim(other_rt, ctx.thread_id)
            return wait_for_cancel(ctx, seen)
        return "done by the new owner"

    name, calls = register(agent_body)
    rt = make_runtime(mailbox, Wakes(), lease_ms=lease_ms)
    receipt = mailbox.submit("t-fence-run", name, "hi")
    run_chain(rt, claim(rt, "t-fence-run"))
    assert seen["cancelled_after_s"] is not None

    new_owner = make_runtime(mailbox, Wakes(), consumer="new-owner", lease_ms=lease_ms)
    run_chain(new_owner, holder["ctx"])
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert calls.count == 2, "the new owner's attempt must run the agent"
    assert dispatch.run_response == "done by the new owner"
    assert dispatch.termination == Termination.natural_end()
    run = run_of(mailbox, receipt.run_id)
    assert run.response == "done by the new owner"
    assert run.termination == Termination.natural_end()


def test_old_owner_finishing_late_does_not_overwrite_the_new_owners_result(
        mailbox: Mailbox) -> None:
    """The same fencing, with both attempts running at once: the old owner (lease lost,
    cancelled) ends while the new owner's agent is still running. The new owner's response
    must be what the dispatch and the run record end with."""
    lease_ms = 300
    seen: dict[str, Any] = {}
    new_owner: dict[str, Any] = {}
    new_started = threading.Event()

    def agent_body(ctx: AgentContext) -> Any:
        if ctx.attempt == 0:
            later = now_ms() + 10 * lease_ms
            mailbox.store.reclaim_expired_leases(later, 10)
            rt2 = make_runtime(mailbox, Wakes(), consumer="new-owner", clock=lambda: later,
                               lease_ms=lease_ms)
            ctx2 = claim(rt2, ctx.thread_id)
            thread = threading.Thread(
                target=lambda: new_owner.update(out=run_chain(rt2, ctx2)))
            new_owner["thread"] = thread
            thread.start()
            assert new_started.wait(5)
            return wait_for_cancel(ctx, seen)
        new_started.set()
        # keep running until the old owner has finished its attempt
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and seen.get("old_done") is None:
            run = mailbox.get_run(ctx.run_id)
            if run is not None and run.status == RunStatus.done:
                break
            time.sleep(0.01)
        return "new owner's result"

    name, calls = register(agent_body)
    rt = make_runtime(mailbox, Wakes(), lease_ms=lease_ms)
    receipt = mailbox.submit("t-late-old", name, "hi")
    run_chain(rt, claim(rt, "t-late-old"))
    seen["old_done"] = True
    new_owner["thread"].join(10)
    assert calls.count == 2 and seen["cancelled_after_s"] is not None

    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.run_response == "new owner's result"
    assert dispatch.termination == Termination.natural_end()
    run = run_of(mailbox, receipt.run_id)
    assert run.response == "new owner's result"


# ===================================================================================== settle
def test_settle_completed_acks_and_keeps_the_projection(mailbox: Mailbox) -> None:
    wakes = Wakes()
    clock = Clock()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-ok", "echo", "hello")
    ctx = run_chain(rt, claim(rt, "t-ok"))

    assert ctx.settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.run_status == RunStatus.done
    assert dispatch.termination == Termination.natural_end()
    assert dispatch.run_response == "hello" and dispatch.run_error is None
    assert dispatch.dispatch_instance_id == ctx.instance_id
    assert dispatch.completed_at == clock() and dispatch.last_error is None
    assert_no_claim(dispatch)
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.response == "hello"
    assert run.termination == Termination.natural_end() and run.finished_at is not None
    assert run.dispatch_id == receipt.dispatch_id
    assert wakes.calls == [], "nothing else due on the thread: the ack said so, no claim"
    assert event_types(mailbox, receipt.run_id) == ["run_queued", "run_started", "run_finish"]
    assert mailbox.store.coordinator.read_lease("t-ok") is None, "settle releases the lease"


HOSTILE = "a\x00b\ud800c\udfffd"  # NUL and lone surrogates: no database stores them as-is
HOSTILE_STORED = "a\ufffdb\ufffdc\ufffdd"


def raise_hostile(kind: type[Exception]) -> Callable[[AgentContext], Any]:
    def behaviour(ctx: AgentContext) -> Any:
        raise kind(HOSTILE)
    return behaviour


def suspend_hostile(ctx: AgentContext) -> Any:
    ctx.suspend("approve", HOSTILE, {"why": [HOSTILE]})


@pytest.mark.parametrize("behaviour, expected", [
    pytest.param(lambda ctx: HOSTILE, ("Acked", HOSTILE_STORED, None), id="response"),
    pytest.param(lambda ctx: AgentResult(termination=Termination.error(HOSTILE)),
                 ("Acked", None, HOSTILE_STORED), id="error-termination"),
    pytest.param(raise_hostile(PermanentError), ("DeadLetter", None, HOSTILE_STORED),
                 id="permanent-error"),
    pytest.param(raise_hostile(TransientError), ("DeadLetter", None, HOSTILE_STORED),
                 id="transient-error"),
    pytest.param(suspend_hostile, ("Acked", None, None), id="suspend-ticket"),
])
def test_agent_text_no_database_can_store_is_kept_with_replacement_characters(
        mailbox: Mailbox, behaviour: Callable[[AgentContext], Any],
        expected: tuple[str, str | None, str | None]) -> None:
    """An odd character in a model's answer must not turn a finished attempt into a driver
    error (the dispatch would stay Claimed until its lease ran out, attempt after attempt)."""
    name, calls = register(behaviour)
    rt = make_runtime(mailbox, Wakes())
    receipt = mailbox.submit("t-hostile", name, "hi", max_attempts=1)
    ctx = run_chain(rt, claim(rt, "t-hostile"))

    assert ctx.settled is not None, ctx
    dispatch = load(mailbox, receipt.dispatch_id)
    status, response, error = expected
    assert dispatch.status.value == status
    run = run_of(mailbox, receipt.run_id)
    assert (run.response, run.error) == (response, error)
    if run.waiting is not None:
        assert run.waiting["message"] == HOSTILE_STORED
        assert run.waiting["parameters"] == {"why": [HOSTILE_STORED]}
    assert calls.count == 1


def test_settle_agent_result_with_error_termination_is_completed(mailbox: Mailbox) -> None:
    """§4.5: a successful return carrying an Error termination is Completed (acked), with the
    error projected, not retried."""
    name, calls = register(lambda ctx: AgentResult(termination=Termination.error("nope")))
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-errterm", name, "x")
    run_chain(rt, claim(rt, "t-errterm"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and calls.count == 1
    assert dispatch.termination == Termination.error("nope") and dispatch.run_error == "nope"


@pytest.mark.parametrize("raise_error", [
    pytest.param(lambda: TransientError("429 rate limited"), id="transient-error"),
    pytest.param(lambda: RuntimeError("unexpected boom"), id="unexpected-exception"),
])
def test_settle_transient_nacks_with_backoff_and_wakes_after_the_delay(
        mailbox: Mailbox, raise_error: Callable[[], Exception]) -> None:
    def failing(ctx: AgentContext) -> str:
        raise raise_error()

    name, calls = register(failing)
    wakes = Wakes()
    clock = Clock()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-retry", name, "x")
    ctx = run_chain(rt, claim(rt, "t-retry"))

    assert ctx.settled == "transient_error" and calls.count == 1
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert dispatch.available_at == clock() + 250
    expected_error = error_message = str(raise_error())
    if not isinstance(raise_error(), TransientError):
        expected_error = f"RuntimeError: {error_message}"
    assert dispatch.last_error == expected_error
    assert dispatch.run_status is None and dispatch.dispatch_instance_id is None
    assert_no_claim(dispatch)
    assert wakes.calls == [("t-retry", 250), ("t-retry", 0)]
    assert run_of(mailbox, receipt.run_id).status != RunStatus.done
    types = event_types(mailbox, receipt.run_id)
    assert types[-2:] == ["run_finish", "run_rescheduled"]
    assert claim_next(rt, "t-retry") is None, "not due before the backoff passed"


def test_settle_backoff_follows_the_table_across_attempts(mailbox: Mailbox) -> None:
    """§4.7/§4.8: with max 5 and only transient failures the agent runs 5 times (attempt
    0..4), backoffs 250, 250, 500, 1000 ms, and the 5th nack dead-letters the dispatch; the
    run is errored right away (no sweep needed)."""
    wakes = Wakes()
    clock = Clock()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-table", "flaky", {"fail_times": 100})
    delays: list[int] = []
    for attempt in range(5):
        ctx = run_chain(rt, claim(rt, "t-table"))
        assert ctx.attempt == attempt
        dispatch = load(mailbox, receipt.dispatch_id)
        if dispatch.status == DispatchStatus.Queued:
            delays.append(dispatch.available_at - clock())
            clock.advance(delays[-1])
    assert delays == [250, 250, 500, 1000]
    assert [d for _, d in wakes.calls if d] == delays
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 5
    assert dispatch.last_error == "flaky failure 5 of 100"
    assert dispatch.run_status == RunStatus.done and dispatch.run_error == dispatch.last_error
    assert_no_claim(dispatch)
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done
    assert run.termination == Termination.error("flaky failure 5 of 100")
    assert claim_next(rt, "t-table") is None


def test_settle_flaky_succeeds_within_the_budget(mailbox: Mailbox) -> None:
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock, retry_base_ms=100, retry_max_ms=150)
    receipt = mailbox.submit("t-flaky", "flaky", {"fail_times": 3})
    delays = []
    for _ in range(4):
        run_chain(rt, claim(rt, "t-flaky"))
        dispatch = load(mailbox, receipt.dispatch_id)
        if dispatch.status == DispatchStatus.Queued:
            delays.append(dispatch.available_at - clock())
            clock.advance(delays[-1])
    assert delays == [100, 100, 150], "custom base and cap come from the runtime settings"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 3
    assert dispatch.run_response == "ok after 3 failures"
    assert dispatch.last_error == "flaky failure 3 of 3", "the last failure stays for audit"


def test_settle_exhausted_dead_letters_and_errors_the_run_immediately(
        mailbox: Mailbox) -> None:
    wakes = Wakes()
    clock = Clock()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-exhaust", "flaky", {"fail_times": 10}, max_attempts=2)
    run_chain(rt, claim(rt, "t-exhaust"))
    clock.advance(250)
    wakes.calls.clear()
    ctx = run_chain(rt, claim(rt, "t-exhaust"))

    assert ctx.settled == "transient_error"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 2
    assert dispatch.last_error == "flaky failure 2 of 10"
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done
    assert run.termination == Termination.error("flaky failure 2 of 10")
    assert wakes.calls == [("t-exhaust", 0)], "no delayed wake for a dead letter"
    # Followers learn it: the first attempt "retrying", the last one "dead_letter" (final,
    # so `follow` ends), and nothing says the spent attempt will be retried.
    finishes = [e.data["status"] for e in mailbox.events_of(receipt.run_id)
                if e.type == "run_finish"]
    assert finishes == ["retrying", "dead_letter"]
    followed = list(mailbox.events_of(receipt.run_id, follow=True, timeout_s=5))
    assert followed[-1].type == "run_finish" and followed[-1].is_final
    assert event_types(mailbox, receipt.run_id).count("run_rescheduled") == 1


def test_settle_permanent_error_dead_letters_after_one_run(mailbox: Mailbox) -> None:
    wakes = Wakes()
    clock = Clock()
    rt = make_runtime(mailbox, wakes, clock=clock)
    receipt = mailbox.submit("t-fail", "fail", "x")
    ctx = run_chain(rt, claim(rt, "t-fail"))

    assert ctx.settled == "permanent_error"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.attempt_count == 0, "permanent errors do not burn the retry budget"
    assert dispatch.last_error == "requested failure"
    assert dispatch.run_status == RunStatus.done and dispatch.run_error == "requested failure"
    assert dispatch.termination == Termination.error("requested failure")
    assert dispatch.dispatch_instance_id == ctx.instance_id
    assert dispatch.completed_at == clock()
    assert_no_claim(dispatch)
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done
    assert run.termination == Termination.error("requested failure")
    assert wakes.calls == [("t-fail", 0)]
    assert claim_next(rt, "t-fail") is None


def test_a_sweep_that_repairs_the_run_between_the_dead_letter_and_its_report_is_heard_once(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by `make load`: settle dead-letters, and before it reports and reconciles, a
    sweep finds the DeadLetter dispatch with its run not yet done, reconciles the run and
    reports its end; then settle reports too. Followers must hear one run_finish."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-fail-race", "fail", "x")
    ctx = phases(rt, claim(rt, "t-fail-race"), verify, reconstruct, resolve, execute)
    real = mailbox.store.dead_letter
    swept: list[Any] = []

    def dead_letter_then_sweep(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        swept.append(sweep(rt, clock()))  # another worker's beat-driven sweep, right here

    monkeypatch.setattr(mailbox.store, "dead_letter", dead_letter_then_sweep)
    assert settle(rt, ctx).settled == "permanent_error"
    assert swept and swept[0].reconciled == [receipt.dispatch_id], "the race happened"
    finishes = [e.data["status"] for e in mailbox.events_of(receipt.run_id)
                if e.type == "run_finish"]
    assert finishes == ["dead_letter"]
    assert run_of(mailbox, receipt.run_id).status == RunStatus.done


def test_settle_custom_permanent_error(mailbox: Mailbox) -> None:
    def forbidden(ctx: AgentContext) -> str:
        raise PermanentError("403 unauthorized")

    name, calls = register(forbidden)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-403", name, "x")
    run_chain(rt, claim(rt, "t-403"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and calls.count == 1
    assert dispatch.last_error == "403 unauthorized"


def test_suspend_then_resume_finishes_the_same_run(mailbox: Mailbox) -> None:
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-ask", "ask", "approve the refund?")
    ctx = run_chain(rt, claim(rt, "t-ask"))

    assert ctx.settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.run_status == RunStatus.waiting
    assert dispatch.termination == Termination.suspended()
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.waiting and run.finished_at is None
    assert run.waiting is not None
    assert run.waiting["action"] == "approve"
    assert run.waiting["message"] == "approve the refund?"
    assert run.waiting["since_dispatch_id"] == receipt.dispatch_id
    assert "suspended" in event_types(mailbox, receipt.run_id)
    assert mailbox.store.coordinator.read_lease("t-ask") is None, \
        "no lease is held while a human decides"

    resumed = mailbox.resume(receipt.run_id, "yes, refund")
    assert resumed.run_id == receipt.run_id and resumed.resumed is True
    assert resumed.dispatch_id != receipt.dispatch_id
    ctx = run_chain(rt, claim(rt, "t-ask"))
    assert ctx.resumed is True
    final = load(mailbox, resumed.dispatch_id)
    assert final.status == DispatchStatus.Acked and final.run_response == "yes, refund"
    assert final.run_status == RunStatus.done
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.response == "yes, refund"
    assert run.waiting is None and run.dispatch_id == resumed.dispatch_id
    with pytest.raises(ValidationError):
        mailbox.resume(receipt.run_id, "again")


def test_resume_with_a_structured_decision_answers_json(mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-ask2", "ask", "ok?")
    run_chain(rt, claim(rt, "t-ask2"))
    mailbox.resume(receipt.run_id, {"approved": True, "by": "ann"})
    run_chain(rt, claim(rt, "t-ask2"))
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done
    assert run.response is not None
    assert json.loads(run.response) == {"approved": True, "by": "ann"}


def test_ack_failing_once_is_recovered_by_a_second_ack(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """§4.4: the result is recorded, the ack fails; recovery finds the claim still ours with a
    done result and acks once more."""
    fault = FailOnce(mailbox.runs.ack, MailboxError("injected ack failure"))
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-ack", "echo", "finished")
    recoveries = ops("ack_recovery", "acked")

    ctx = run_chain(rt, claim(rt, "t-ack"))
    assert fault.calls == 2, "the injected failure was consumed by the recovery's ack"
    assert ops("ack_recovery", "acked") == recoveries + 1
    assert ctx.settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.run_status == RunStatus.done and dispatch.run_response == "finished"
    assert wakes.calls == [("t-ack", 0)]


def test_ack_that_landed_but_lost_its_answer_is_recovered_without_a_second_ack(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = FailOnce(mailbox.runs.ack, MailboxError("response lost"), after_real=True)
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-ack2", "echo", "finished")
    ctx = run_chain(rt, claim(rt, "t-ack2"))
    assert fault.calls == 1 and ctx.settled == "completed"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.run_response == "finished"


def test_ack_whose_answer_was_lost_after_the_sweep_acked_reports_nothing_twice(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ack's answer is lost (unknown whether it landed) and meanwhile the lease ran out
    and the sweep acked the finished claim and reported it: §4.4 recovery finds the dispatch
    Acked by someone else and reports nothing more, and does not wake the thread again."""
    clock = Clock()
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    real_ack = mailbox.runs.ack
    swept: list[Any] = []

    def ack_lost_while_the_sweep_acks(*args: Any, **kwargs: Any) -> Any:
        if not swept:
            swept.append(sweep(rt, clock.now + mailbox.settings.lease_ms + 1))
            raise MailboxError("response lost")
        return real_ack(*args, **kwargs)

    monkeypatch.setattr(mailbox.runs, "ack", ack_lost_while_the_sweep_acks)
    receipt = mailbox.submit("t-ack-swept", "echo", "once")
    ctx = run_chain(rt, claim(rt, "t-ack-swept"))

    assert swept[0].acked == [receipt.dispatch_id]
    assert ctx.duplicate and ctx.settled is None, ctx
    assert finishes(mailbox, receipt.run_id) == ["acked"]
    assert ("t-ack-swept", 0) not in wakes.calls
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked


def test_ack_outage_leaves_the_claim_and_the_retry_acks_without_rerunning(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN §5: an infrastructure failure in a phase leaves the dispatch Claimed; the lease
    expires, and the sweep, finding the run done by this very attempt, acks it: no second
    attempt, no second run of the agent."""
    name, calls = register(lambda ctx: "finished")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-ack3", name, "x")
    ctx = phases(rt, claim(rt, "t-ack3"), verify, reconstruct, resolve, execute)
    monkeypatch.setattr(mailbox.runs, "ack", FailOnce(
        mailbox.runs.ack, StoreUnavailableError("injected: database unreachable")))
    # Still down when ack recovery re-reads the dispatch: nothing to do but leave it.
    monkeypatch.setattr(mailbox.store, "load_dispatch", FailOnce(
        mailbox.store.load_dispatch, StoreUnavailableError("injected: still unreachable")))
    ctx = settle(rt, ctx)
    assert ctx.done is True and ctx.reason.startswith("store unavailable settling")
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Claimed

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.acked == [receipt.dispatch_id] and report.reclaimed == []
    assert claim_next(rt, "t-ack3") is None
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.run_response == "finished" and calls.count == 1


def test_settle_delivered_twice_reports_the_result_once(mailbox: Mailbox) -> None:
    """At-least-once delivery: a second settle of the same attempt finds its ack refused and
    the dispatch Acked by the first; it neither reports the result again nor wakes."""
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-twice", "echo", "once")
    ctx = claim(rt, "t-twice")
    mailbox.submit("t-twice", "echo", "next")  # so that the first settle's ack wakes
    for phase in (verify, reconstruct, resolve, execute):
        ctx = phase(rt, ctx)
    first, second = settle(rt, copy.deepcopy(ctx)), settle(rt, copy.deepcopy(ctx))

    assert first.settled == "completed"
    assert second.duplicate and second.settled is None, second
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked
    finishes = [e.data["status"] for e in mailbox.events_of(receipt.run_id)
                if e.type == "run_finish"]
    assert finishes == ["acked"]
    assert wakes.calls == [("t-twice", 0)]


def test_settle_of_a_finished_context_only_wakes(mailbox: Mailbox) -> None:
    name, _ = register(lambda ctx: "ok")
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=Clock())
    receipt = mailbox.submit("t-noop", name, "x")
    ctx = claim(rt, "t-noop")
    before = load(mailbox, receipt.dispatch_id)
    settle(rt, ctx.finish("test"))
    assert wakes.calls == [("t-noop", 0)]
    assert load(mailbox, receipt.dispatch_id) == before


# ============================================ sweep: an expired claim whose outcome was written
def finish_without_settle(rt: Runtime, thread_id: str) -> PhaseContext:
    """An attempt that wrote its outcome and died before settle (worker killed, settle
    message lost, or settle queued longer than the lease)."""
    ctx = phases(rt, claim(rt, thread_id), verify, reconstruct, resolve, execute)
    assert ctx.outcome.recorded, ctx
    return ctx


def finishes(box: Mailbox, run_id: str) -> list[str]:
    return [e.data["status"] for e in box.events_of(run_id) if e.type == "run_finish"]


def test_sweep_acks_an_expired_claim_whose_run_it_finished_on_the_last_attempt(
        mailbox: Mailbox) -> None:
    """Reclaiming would count the finished attempt as failed and, on the last attempt,
    dead-letter a dispatch whose run says done. The sweep acks it instead, keeps the
    projection, reports the result once, and the thread's next dispatch runs."""
    name, calls = register(lambda ctx: f"answer {ctx.input}")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-late-ack", name, "a", max_attempts=1)
    following = mailbox.submit("t-late-ack", name, "b")
    ctx = finish_without_settle(rt, "t-late-ack")
    expired = load(mailbox, receipt.dispatch_id).lease_until
    assert expired is not None
    acked_before = ops("sweep_ack")

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.acked == [receipt.dispatch_id]
    assert report.reclaimed == [] and report.dead_lettered == []
    assert ops("sweep_ack") == acked_before + 1
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.run_status == RunStatus.done and dispatch.run_response == "answer a"
    assert dispatch.completed_at == clock() and dispatch.claim_token is None
    assert mailbox.store.coordinator.read_lease("t-late-ack") is None
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.response == "answer a"
    assert finishes(mailbox, receipt.run_id) == ["acked"]
    assert "t-late-ack" in report.woken

    # The attempt's settle arrives after all: a duplicate, reported by nobody twice.
    late = settle(rt, ctx)
    assert late.duplicate and late.settled is None, late
    assert finishes(mailbox, receipt.run_id) == ["acked"]
    run_chain(rt, claim(rt, "t-late-ack"))
    assert load(mailbox, following.dispatch_id).status == DispatchStatus.Acked
    assert calls.count == 2


def test_sweep_acks_an_expired_claim_whose_run_waits_for_a_decision(
        mailbox: Mailbox) -> None:
    """A suspended attempt that died before its ack: acked with the run left waiting and its
    ticket kept (re-running it would ask the human again); the decision resumes it."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-late-ask", "ask", "approve?", max_attempts=1)
    finish_without_settle(rt, "t-late-ask")

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.acked == [receipt.dispatch_id] and report.dead_lettered == []
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.run_status == RunStatus.waiting
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.waiting and run.waiting is not None
    assert run.waiting["since_dispatch_id"] == receipt.dispatch_id
    assert event_types(mailbox, receipt.run_id)[-2:] == ["suspended", "run_finish"]

    resumed = mailbox.resume(receipt.run_id, "yes")
    run_chain(rt, claim(rt, "t-late-ask"))
    assert run_of(mailbox, receipt.run_id).response == "yes"
    assert load(mailbox, resumed.dispatch_id).status == DispatchStatus.Acked


def test_sweep_reclaims_an_expired_claim_whose_failure_was_recorded_but_not_nacked(
        mailbox: Mailbox) -> None:
    """A transient failure writes the error to the dispatch's projection before its nack;
    the run is still running. That attempt failed: the sweep reclaims it (T15) and does not
    ack it."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-late-nack", "echo", "x", max_attempts=3)
    ctx = phases(rt, claim(rt, "t-late-nack"), verify, reconstruct, resolve)
    rt.runs.start_attempt(ctx.dispatch_id, ctx.token, ctx.instance_id,
                          ctx.run_id, clock(), thread_id="t-late-nack")
    mailbox.store.record_run_result(ctx.dispatch_id, ctx.token, RunDispatchResult(
        ctx.run_id, ctx.instance_id, RunStatus.done, Termination.error("boom"), None,
        "boom"), clock())
    assert run_of(mailbox, receipt.run_id).status == RunStatus.running

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.acked == [] and report.reclaimed == [receipt.dispatch_id]
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1


def test_sweep_leaves_an_interrupted_finished_claim_to_be_superseded(
        mailbox: Mailbox) -> None:
    """The thread was interrupted after the attempt wrote its outcome: the claim is stale, so
    the sweep does not ack it; reclaim supersedes it (T17), and the run keeps its outcome."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-late-int", "echo", "x")
    finish_without_settle(rt, "t-late-int")
    mailbox.interrupt("t-late-int")

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.acked == [] and report.reclaimed == []
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Superseded
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.natural_end()


def test_sweep_acks_a_finished_claim_whose_waiting_run_was_already_resumed(
        mailbox: Mailbox) -> None:
    """The run says waiting as soon as the outcome is written, before the ack: a decision
    can resume it while the claim is still held. The claim still finished its attempt (the
    ticket names it): acked, not dead-lettered, and the decision's dispatch runs next."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-late-resumed", "ask", "approve?", max_attempts=1)
    finish_without_settle(rt, "t-late-resumed")
    resumed = mailbox.resume(receipt.run_id, "yes")
    assert resumed.dispatch_id != receipt.dispatch_id

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert report.acked == [receipt.dispatch_id] and report.dead_lettered == []
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked
    assert finishes(mailbox, receipt.run_id) == ["acked"]
    run_chain(rt, claim(rt, "t-late-resumed"))
    assert load(mailbox, resumed.dispatch_id).status == DispatchStatus.Acked
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.response == "yes"


def test_sweep_acks_every_finished_claim_across_pages_with_others_among_them(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of two: an interrupted claim (superseded, not listed) and a claim that did not
    finish (reclaimed) among finished ones must not end the sweep's paging early, and no
    finished claim may fall through to the dead letter."""
    from mailbox import maintenance

    monkeypatch.setattr(maintenance, "RECLAIM_BATCH", 2)
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    interrupted = mailbox.submit("t-page-0", "echo", "0", max_attempts=1)
    finish_without_settle(rt, "t-page-0")
    clock.advance(1)  # leases expire in this order: the page boundaries are fixed
    unfinished = mailbox.submit("t-page-1", "echo", "1", max_attempts=1)
    claim(rt, "t-page-1")
    finished = []
    for i in range(2, 6):
        clock.advance(1)
        finished.append(mailbox.submit(f"t-page-{i}", "echo", str(i), max_attempts=1))
        finish_without_settle(rt, f"t-page-{i}")
    mailbox.interrupt("t-page-0")

    report = sweep(rt, clock.advance(mailbox.settings.lease_ms + 1))
    assert sorted(report.acked) == sorted(r.dispatch_id for r in finished)
    assert report.dead_lettered == [unfinished.dispatch_id] and report.reclaimed == []
    assert load(mailbox, interrupted.dispatch_id).status == DispatchStatus.Superseded
    for receipt in finished:
        assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked


def test_sweeps_racing_over_finished_claims_ack_each_once(mailbox: Mailbox) -> None:
    """Four sweeps at once over eight expired finished claims: each is acked by exactly one
    sweep and reported once; none is reclaimed."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipts = [mailbox.submit(f"t-race-ack-{i}", "echo", str(i), max_attempts=1)
                for i in range(8)]
    for receipt in receipts:
        finish_without_settle(rt, receipt.thread_id)
    later = clock.advance(mailbox.settings.lease_ms + 1)
    barrier = threading.Barrier(4)
    reports: list[Any] = []

    def one_sweep() -> None:
        barrier.wait(10)
        reports.append(sweep(rt, later))

    racers = [threading.Thread(target=one_sweep) for _ in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    assert len(reports) == 4
    acked = sorted(d for report in reports for d in report.acked)
    assert acked == sorted(r.dispatch_id for r in receipts)
    assert not [d for report in reports for d in report.reclaimed + report.dead_lettered]
    for receipt in receipts:
        assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked
        assert finishes(mailbox, receipt.run_id) == ["acked"]


# =============================================================== cancel means stop (issue 11)
def _cancel_while_running(mailbox: Mailbox, rt: Runtime, thread: str, agent: str,
                          stop: Callable[[Mailbox, str], Any]) -> tuple[str, PhaseContext]:
    """Submit, run the chain in a thread, stop it with `stop(mailbox, dispatch_id)` once the
    agent runs; returns (dispatch id, the chain's final context)."""
    receipt = mailbox.submit(thread, agent, "go")
    ctx = claim(rt, thread)
    results: dict[str, PhaseContext] = {}
    worker = threading.Thread(target=lambda: results.update(out=run_chain(rt, ctx)))
    worker.start()
    deadline = time.monotonic() + 15
    while load(mailbox, receipt.dispatch_id).run_status != RunStatus.running:
        assert time.monotonic() < deadline, "the agent never started"
        time.sleep(0.01)
    stop(mailbox, receipt.dispatch_id)
    worker.join(30)
    assert not worker.is_alive()
    return receipt.dispatch_id, results["out"]


def _after_cancel(then: Callable[[AgentContext], Any]) -> Callable[[AgentContext], Any]:
    def behaviour(ctx: AgentContext) -> Any:
        deadline = time.monotonic() + 10
        while not ctx.cancelled():
            assert time.monotonic() < deadline, "never cancelled"
            time.sleep(0.01)
        return then(ctx)
    return behaviour


def _raise(error: Exception) -> Callable[[AgentContext], Any]:
    def behaviour(ctx: AgentContext) -> Any:
        raise error
    return behaviour


CANCELLED_THEN = {
    "raises TransientError": _raise(TransientError("stopped mid-request")),
    "raises an unexpected exception": _raise(RuntimeError("socket closed")),
    "raises PermanentError": _raise(PermanentError("gave up")),
    "suspends": lambda ctx: ctx.suspend("approve"),
    "returns an error termination": lambda ctx: AgentResult(
        termination=Termination.error("half done")),
    "returns its partial answer": lambda ctx: "partial answer",
}


@pytest.mark.parametrize("then", list(CANCELLED_THEN))
def test_cancel_means_stop_whatever_the_agent_then_does(mailbox: Mailbox, then: str) -> None:
    """After `cancel()`, the run ends cancelled and the dispatch is acked: never a retry,
    never a dead letter, never a wait for a human (before: a raise after the cancel was
    retried, undoing the cancel)."""
    name, calls = register(_after_cancel(CANCELLED_THEN[then]))
    rt = make_runtime(mailbox, Wakes(), lease_ms=3000)
    dispatch_id, out = _cancel_while_running(
        mailbox, rt, f"t-cancel-{uuid.uuid4().hex[:6]}", name,
        lambda box, d: box.cancel(d))
    assert out.stop_kind == "requested" and out.settled == "completed"
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.termination == Termination.cancelled()
    run = run_of(mailbox, dispatch.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    assert run.response == ("partial answer" if then == "returns its partial answer" else None)
    assert calls.count == 1
    finish = [e for e in mailbox.events_of(dispatch.run_id) if e.type == "run_finish"]
    assert len(finish) == 1 and finish[0].data["termination"] == {"type": "cancelled"}
    assert event_types(mailbox, dispatch.run_id)[-1] == "run_finish"


@pytest.mark.parametrize("then", ["raises TransientError", "returns its partial answer"])
def test_interrupt_means_stop_whatever_the_agent_then_does(mailbox: Mailbox, then: str) -> None:
    name, calls = register(_after_cancel(CANCELLED_THEN[then]))
    rt = make_runtime(mailbox, Wakes(), lease_ms=3000)
    thread = f"t-int-{uuid.uuid4().hex[:6]}"
    dispatch_id, out = _cancel_while_running(mailbox, rt, thread, name,
                                             lambda box, d: box.interrupt(thread))
    assert out.done and out.reason.startswith("fenced")
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded and dispatch.attempt_count == 0
    run = run_of(mailbox, dispatch.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    assert calls.count == 1
    assert event_types(mailbox, dispatch.run_id)[-2:] == ["run_cancelled", "run_finish"]


# ================================================= a bad outcome is a permanent error (issue 11)
class _Opaque:
    pass


BAD_RESULTS: dict[str, tuple[Callable[[AgentContext], Any], str]] = {
    "suspended termination without ctx.suspend": (
        lambda ctx: AgentResult(termination=Termination.suspended()), "use ctx.suspend"),
    "an object that is not JSON": (lambda ctx: _Opaque(), "neither text nor JSON"),
    "AgentResult with a set as response": (
        lambda ctx: AgentResult(response={1, 2}), "neither text nor JSON"),  # type: ignore[arg-type]
    "AgentResult with a string as termination": (
        lambda ctx: AgentResult(termination="done"), "must be a Termination"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", list(BAD_RESULTS))
def test_a_result_that_cannot_be_stored_dead_letters_after_one_attempt(
        mailbox: Mailbox, case: str) -> None:
    """Before: a suspended termination raised out of execute and the claim waited out its
    lease, once per attempt, until the budget was spent. Now: the agent's permanent error,
    saying what to do, after that one attempt."""
    behaviour, hint = BAD_RESULTS[case]
    name, calls = register(behaviour)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit(f"t-bad-{uuid.uuid4().hex[:6]}", name, "x")
    out = run_chain(rt, claim(rt, receipt.thread_id))
    assert out.settled == "permanent_error"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 0
    assert dispatch.last_error is not None and "invalid agent result" in dispatch.last_error
    assert hint in dispatch.last_error
    assert calls.count == 1
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination is not None
    assert run.termination.type == "error"
    assert event_types(mailbox, receipt.run_id)[-1] == "run_finish"


@pytest.mark.parametrize(("value", "stored"), [
    ({"answer": 42, "sources": ["a"]}, '{"answer": 42, "sources": ["a"]}'),
    ([1, 2], "[1, 2]"), (7, "7"), (True, "true"), ("", None)])
def test_a_json_value_is_stored_as_its_json_text(mailbox: Mailbox, value: Any,
                                                 stored: str | None) -> None:
    name, _ = register(lambda ctx: value)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit(f"t-json-{uuid.uuid4().hex[:6]}", name, "x")
    run_chain(rt, claim(rt, receipt.thread_id))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.run_response == stored


def test_a_result_the_store_refuses_is_the_agents_permanent_error(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing but a store outage escapes execute: a ValidationError from the outcome write
    becomes the attempt's permanent error (not a crash left to lease expiry)."""
    name, _ = register(lambda ctx: "fine")
    monkeypatch.setattr(mailbox.runs, "record_outcome", FailOnce(
        mailbox.runs.record_outcome, ValidationError("waiting run requires a waiting ticket")))
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-refused", name, "x")
    out = run_chain(rt, claim(rt, "t-refused"))
    assert out.settled == "permanent_error"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert "the store refused it" in (dispatch.last_error or "")


# ==================================================================== ack answer lost (issue 11)
def test_an_ack_that_committed_but_lost_its_answer_as_an_outage_is_reported_once(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ack committed; the connection dropped before its answer (StoreUnavailableError).
    Before: re-raised before recovery, so nobody ever reported the run's end. Now: recovery
    re-reads, finds its own ack, reports once."""
    fault = FailOnce(mailbox.runs.ack, StoreUnavailableError("server closed the connection"),
                     after_real=True)
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-lost-answer", "echo", "done")
    landed = ops("ack_recovery", "landed")
    out = run_chain(rt, claim(rt, "t-lost-answer"))
    assert fault.calls == 1 and out.settled == "completed"
    assert ops("ack_recovery", "landed") == landed + 1
    finish = [e for e in mailbox.events_of(receipt.run_id) if e.type == "run_finish"]
    assert [e.data["status"] for e in finish] == ["acked"]
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked


def test_ack_recovery_refuses_a_result_that_is_not_done(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery acks only a recorded result that is done (or waiting: the documented
    departure). A projection that says anything else is left for the sweep."""
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-refuse", "echo", "x")
    ctx = phases(rt, claim(rt, "t-refuse"), verify, reconstruct, resolve, execute)
    sql(mailbox, dispatches.update().where(dispatches.c.dispatch_id == receipt.dispatch_id)
        .values(run_status=RunStatus.running.value))
    monkeypatch.setattr(mailbox.runs, "ack", FailOnce(
        mailbox.runs.ack, StoreUnavailableError("injected")))
    out = settle(rt, ctx)
    assert out.done and out.reason.startswith("ack recovery refused")
    assert out.settled is None
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Claimed


# ============================================================ lease covers claim → start (11)
def test_hops_from_claim_to_start_never_cost_an_attempt(mailbox: Mailbox) -> None:
    """Three hops of a quarter lease each before execute: before, the lease ran from the
    claim and the first renewal came a third of a lease after the start, so a racing sweep
    reclaimed the claim under the running agent. Now the start extends the lease. (A lease
    of 2.4 s: the hops leave 0.6 s before the claim's lease runs out, room for a loaded
    machine's late wake-ups; the agent runs past where the first renewal used to come.)"""
    lease_ms = 2400
    name, calls = register(lambda ctx: (time.sleep(1.6), "done")[1])
    rt = make_runtime(mailbox, Wakes(), lease_ms=lease_ms)
    receipt = mailbox.submit("t-hops", name, "x")
    stop = threading.Event()
    sweeps: list[Any] = []

    def sweeping() -> None:
        while not stop.wait(0.02):
            sweeps.append(mailbox.sweep())

    with racing(sweeping, timeout_s=30):
        try:
            ctx = claim(rt, "t-hops")
            for phase in (verify, reconstruct, resolve):
                ctx = phase(rt, ctx)
                time.sleep(lease_ms / 4 / 1000)  # a phase hop behind a backlog
            started = now_ms()
            ctx = execute(rt, ctx)
            lease_after_start = load(mailbox, receipt.dispatch_id).lease_until
            ctx = settle(rt, ctx)
        finally:
            stop.set()
    assert not any(r.reclaimed for r in sweeps), "the claim was reclaimed during the hops"
    assert ctx.settled == "completed" and calls.count == 1
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert lease_after_start is None or lease_after_start >= started + lease_ms - 50


def test_the_start_extends_the_lease_in_sql_and_redis(mailbox: Mailbox) -> None:
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    seen: dict[str, Any] = {}

    def observe(ctx: AgentContext) -> str:
        dispatch = load(mailbox, ctx.dispatch_id)
        seen["sql"] = dispatch.lease_until
        lease = mailbox.store.coordinator.read_lease(ctx.thread_id)
        seen["redis"] = lease.lease_until if lease else None
        return "ok"

    name, _ = register(observe)
    mailbox.submit("t-extend", name, "x")
    ctx = phases(rt, claim(rt, "t-extend"), verify, reconstruct, resolve)
    started = clock.advance(mailbox.settings.lease_ms // 2)
    execute(rt, ctx)
    assert seen == {"sql": started + mailbox.settings.lease_ms,
                    "redis": started + mailbox.settings.lease_ms}


# ======================================================== no lease for an unissued token (11/12)
def test_a_forged_execute_on_an_idle_thread_leaves_no_lease(mailbox: Mailbox) -> None:
    """A phase message with a token SQL never issued, for a thread Redis has no lease of:
    before, execute created a lease for it and the thread stalled until it expired."""
    name, calls = register(lambda ctx: "must not run")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-forged", name, "x")
    forged = PhaseContext(receipt.dispatch_id, "t-forged", receipt.run_id,
                          str(uuid.uuid4()), 0, 0, 1, 1, 1, instance_id=str(uuid.uuid4()),
                          resolution_id=f"{name}@1", agent=[name, "1"])
    out = execute(rt, forged)
    assert out.done and calls.count == 0
    assert mailbox.store.coordinator.read_lease("t-forged") is None
    ctx = claim(rt, "t-forged")  # not stalled: claimable at once
    assert ctx.dispatch_id == receipt.dispatch_id


def test_a_lease_redis_forgot_is_rebuilt_only_after_sql_recorded_the_start(
        mailbox: Mailbox) -> None:
    seen: dict[str, Any] = {}

    def observe(ctx: AgentContext) -> str:
        seen["lease"] = mailbox.store.coordinator.read_lease(ctx.thread_id)
        return "ok"

    name, _ = register(observe)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-rebuilt", name, "x")
    ctx = phases(rt, claim(rt, "t-rebuilt"), verify, reconstruct, resolve)
    mailbox.store.coordinator.client.delete(mailbox.store.coordinator.lease_key("t-rebuilt"))
    out = phases(rt, ctx, execute, settle)
    assert out.settled == "completed"
    assert seen["lease"] is not None and seen["lease"].token == ctx.token
    raw = mailbox.store.coordinator.client.hget(
        mailbox.store.coordinator.lease_key("t-rebuilt"), "executor")
    assert raw is None, "released after the ack"


# ================================================== every run that ends says so last (11)
def test_a_reconstruct_failure_ends_the_stream_with_run_finish(mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.store.enqueue(RunDispatch.queued("d-noinput", "t-noinput", "run-noinput",
                                             now_ms()))
    phases(rt, claim(rt, "t-noinput"), verify, reconstruct)
    events = list(mailbox.events_of("run-noinput"))
    assert [e.type for e in events] == ["run_finish"]
    assert events[0].data["status"] == "dead_letter" and events[0].is_final


def test_an_interrupt_after_the_outcome_before_the_ack_ends_the_stream(
        mailbox: Mailbox) -> None:
    """Interrupted between execute's outcome write and settle's ack: the ack is fenced (the
    dispatch ends Superseded) and the run keeps the attempt's outcome. Before, its stream
    ended at run_started; now run_finish carries the run's termination."""
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-late-int", "echo", "answer")
    ctx = phases(rt, claim(rt, "t-late-int"), verify, reconstruct, resolve, execute)
    mailbox.store.interrupt("t-late-int", now_ms())
    settle(rt, ctx)
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Superseded
    events = list(mailbox.events_of(receipt.run_id))
    assert events[-1].type == "run_finish" and events[-1].is_final
    assert events[-1].data == {"termination": {"type": "natural_end"}, "response": "answer",
                               "status": "superseded"}
    assert run_of(mailbox, receipt.run_id).response == "answer"


def test_the_sweeps_repair_of_a_cancelled_run_ends_the_stream_with_run_finish(
        mailbox: Mailbox) -> None:
    """A crash between a cancel's two writes leaves the run open; the sweep's repair now
    reports run_cancelled and then run_finish (before: run_cancelled only)."""
    receipt = mailbox.submit("t-repair", "echo", "x")
    assert mailbox.store.cancel(receipt.dispatch_id, now_ms()) is not None  # no reconcile
    report = mailbox.sweep()
    assert report.reconciled == [receipt.dispatch_id]
    assert event_types(mailbox, receipt.run_id)[-2:] == ["run_cancelled", "run_finish"]
    assert list(mailbox.events_of(receipt.run_id))[-1].is_final


# ====================================================================== metrics (issue 11)
def terminal(status: str) -> float:
    return REGISTRY.get_sample_value("mailbox_dispatch_terminal_total",
                                     {"status": status}) or 0.0


def test_terminal_transitions_are_counted_by_status_once_committed(mailbox: Mailbox) -> None:
    before = {s: terminal(s) for s in ("acked", "cancelled", "superseded", "dead_letter")}
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-count", "echo", "x")
    run_chain(rt, claim(rt, "t-count"))
    queued = mailbox.submit("t-count2", "echo", "y")
    mailbox.cancel(queued.dispatch_id)
    mailbox.submit("t-count3", "echo", "z")
    mailbox.interrupt("t-count3")
    mailbox.submit("t-count4", "fail", "x")
    run_chain(rt, claim(rt, "t-count4"))
    after = {s: terminal(s) - before[s] for s in before}
    assert after == {"acked": 1, "cancelled": 1, "superseded": 1, "dead_letter": 1}


def test_run_duration_and_start_metrics_on_every_path(mailbox: Mailbox) -> None:
    def count(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    natural = count("mailbox_run_duration_seconds_count", {"termination": "natural_end"})
    errors = count("mailbox_run_duration_seconds_count", {"termination": "error"})
    starts = count("mailbox_dispatch_claim_to_start_seconds_count")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-dur", "echo", "x")
    run_chain(rt, claim(rt, "t-dur"))
    mailbox.store.enqueue(RunDispatch.queued("d-dur", "t-dur2", "run-dur-missing", now_ms()))
    mailbox.runs.submit(
        RunRecord("run-dur", "t-dur3", "echo", "echo@1", RunStatus.created, dispatch_id="d3",
                  created_at=now_ms(), updated_at=now_ms()),
        RunDispatch.queued("d3", "t-dur3", "run-dur", now_ms()),
        Resolution("echo@1", "echo", "1"), "m-dur", "hi", now_ms())
    sql(mailbox, messages.delete().where(messages.c.run_id == "run-dur"))
    run_chain(rt, claim(rt, "t-dur2"))  # reconstruct failure: the run is missing
    run_chain(rt, claim(rt, "t-dur3"))  # reconstruct failure: its input is missing
    assert count("mailbox_run_duration_seconds_count", {"termination": "natural_end"}) \
        == natural + 1
    assert count("mailbox_run_duration_seconds_count", {"termination": "error"}) == errors + 1
    assert count("mailbox_dispatch_claim_to_start_seconds_count") == starts + 3


# ======================================================= a missing version is a deploy (11)
def test_a_pinned_version_this_worker_lacks_is_put_back_without_an_attempt(
        mailbox: Mailbox) -> None:
    clock = Clock()
    wakes = Wakes()
    rt = make_runtime(mailbox, wakes, clock=clock)
    name, calls = register(lambda ctx: f"v7 says {ctx.input}", version="6")
    run_id, dispatch_id = submit_raw(mailbox, "t-deploy", agent_id=name,
                                     resolution_id=f"{name}@7",
                                     resolution=Resolution(f"{name}@7", name, "7"))
    deferred = ops("agent_missing", "deferred")
    out = run_chain(rt, claim(rt, "t-deploy"))
    assert out.settled == "deferred" and calls.count == 0
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 0
    assert dispatch.deferred_since == clock() and dispatch.dispatch_instance_id is None
    assert dispatch.last_error is not None and f"{name}@7 is not deployed" in dispatch.last_error
    assert dispatch.available_at > clock()
    assert ops("agent_missing", "deferred") == deferred + 1
    [event] = [e for e in mailbox.events_of(run_id) if e.type == "run_rescheduled"]
    assert event.data["reason"] == "agent_version_missing"
    assert "run_started" not in event_types(mailbox, run_id)
    assert ("t-deploy", dispatch.available_at - clock()) in wakes.calls

    # The deploy finishes: this worker now has version 7, and runs it.
    agent(name, "7")(lambda ctx: f"v7 says {ctx.input}")
    clock.advance(dispatch.available_at - clock())
    out = run_chain(rt, claim(rt, "t-deploy"))
    assert out.settled == "completed"
    done = load(mailbox, dispatch_id)
    assert done.status == DispatchStatus.Acked and done.attempt_count == 0
    assert done.run_response == "v7 says input" and done.deferred_since is None


def test_a_pinned_version_missing_past_the_grace_dead_letters_naming_it(
        mailbox: Mailbox) -> None:
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock, missing_agent_grace_s=60)
    name, _ = register(lambda ctx: "v1", version="1")
    _, dispatch_id = submit_raw(mailbox, "t-gone", agent_id=name, resolution_id=f"{name}@3",
                                resolution=Resolution(f"{name}@3", name, "3"))
    first = clock()
    for _ in range(50):
        ctx = claim_next(rt, "t-gone")
        if ctx is None:
            clock.advance(max(1, load(mailbox, dispatch_id).available_at - clock()))
            continue
        run_chain(rt, ctx)
        if load(mailbox, dispatch_id).status != DispatchStatus.Queued:
            break
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter and dispatch.attempt_count == 0
    assert clock() - first >= 60_000
    assert dispatch.last_error is not None and f"{name}@3" in dispatch.last_error
    assert "MAILBOX_MISSING_AGENT_GRACE_S=60" in dispatch.last_error


def test_a_version_resolve_found_but_the_executing_worker_lacks_is_deferred_too(
        mailbox: Mailbox) -> None:
    """The chain's phases go to any worker: resolve may run where the version is deployed and
    execute where it is not yet. Before, execute crashed on it (the claim waited out its
    lease, an attempt spent); now it is deferred like a miss in resolve."""
    name, calls = register(lambda ctx: "ran", version="1")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-split-deploy", name, "x")
    ctx = phases(rt, claim(rt, "t-split-deploy"), verify, reconstruct, resolve)
    assert ctx.agent == [name, "1"]
    ctx.agent = [name, "2"]  # what a resolve on a worker with version 2 would have found
    out = phases(rt, ctx, execute, settle)
    assert out.settled == "deferred" and calls.count == 0
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 0
    assert dispatch.dispatch_instance_id is None and dispatch.deferred_since is not None
