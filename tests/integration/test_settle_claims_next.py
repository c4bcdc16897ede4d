"""A worker's settle claims the thread's next dispatch in its ack's own transaction
(docs/behaviour.md#settle, `Runtime.start`): one transaction for the ack and the claim, the
lease handed from the acked claim to the new one in one Redis call, and the new claim's chain
started by the runtime. Real Redis and SQL; the runtime's `start` records what it was given
and the test runs those chains, as the worker's messages would."""

from __future__ import annotations

from dataclasses import replace

import pytest
import sqlalchemy as sa

from mailbox import DispatchStatus, Mailbox
from mailbox.context import PhaseContext
from mailbox.coordination import WAKE_HELD, ScriptCall
from mailbox.errors import StoreUnavailableError
from mailbox.phases import PHASES, run_chain, settle
from mailbox.runtime import Runtime, now_ms
from tests.support.phase_kit import FailOnce, Wakes, claim, load, make_runtime, ops, register


def worker_runtime(box: Mailbox, wakes: Wakes) -> tuple[Runtime, list[PhaseContext]]:
    started: list[PhaseContext] = []
    return replace(make_runtime(box, wakes), start=started.append), started


def test_the_ack_claims_the_next_dispatch_and_hands_it_the_lease(mailbox: Mailbox) -> None:
    name, calls = register(lambda ctx: f"did {ctx.input}")
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    first = mailbox.submit("s-next", name, "one")
    second = mailbox.submit("s-next", name, "two")
    ctx = claim(rt, "s-next")
    assert ctx.dispatch_id == first.dispatch_id

    out = run_chain(rt, ctx)
    assert out.settled == "completed"
    assert [c.dispatch_id for c in started] == [second.dispatch_id]
    assert wakes.calls == [], "the ack claimed: nothing to wake"
    nxt = started[0]
    assert nxt.run_checked and nxt.run_error is None, "the claim read the run as well"
    claimed = load(mailbox, second.dispatch_id)
    assert claimed.status == DispatchStatus.Claimed and claimed.claim_token == nxt.token
    assert claimed.claim_token != ctx.token
    lease = mailbox.store.coordinator.read_lease("s-next")
    assert lease is not None and (lease.token, lease.dispatch_id) == (nxt.token,
                                                                      second.dispatch_id)
    executor = mailbox.store.coordinator.client.hget(
        mailbox.store.coordinator.lease_key("s-next"), "executor")
    assert executor in (None, b""), "the acked attempt's executor does not stay on the lease"

    assert run_chain(rt, nxt).settled == "completed", "the handed-over claim runs"
    assert calls.count == 2 and load(mailbox, second.dispatch_id).status == DispatchStatus.Acked
    assert len(started) == 1 and mailbox.store.coordinator.read_lease("s-next") is None


def ready_to_settle(box: Mailbox, thread: str
                    ) -> tuple[Runtime, list[PhaseContext], PhaseContext, str]:
    """Two dispatches on `thread`, the first run up to its settle: (the worker runtime,
    what it started, the first's context, the second's dispatch id)."""
    rt, started = worker_runtime(box, Wakes())
    box.submit(thread, "echo", "one")
    second = box.submit(thread, "echo", "two")
    ctx = claim(rt, thread)
    for phase in PHASES[:-1]:
        ctx = phase(rt, ctx)
    return rt, started, ctx, second.dispatch_id


def test_the_ack_and_the_next_claim_are_one_transaction(mailbox: Mailbox) -> None:
    rt, started, ctx, _ = ready_to_settle(mailbox, "s-one-tx")
    begins: list[int] = []

    def on_begin(_conn: object) -> None:
        begins.append(1)

    claims = ops("claim")
    sa.event.listen(mailbox.store.engine, "begin", on_begin)
    try:
        settle(rt, ctx)
    finally:
        sa.event.remove(mailbox.store.engine, "begin", on_begin)
    assert len(started) == 1 and len(begins) == 1
    assert ops("claim") == claims + 1, "the claim in the ack is counted like any claim"


def test_the_hand_over_goes_in_the_round_trip_of_the_run_finish(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settle's report and its lease hand-over share one pipeline, and the lease is the
    new claim's before the new chain is started."""
    from mailbox import events as events_module

    rt, started, ctx, second = ready_to_settle(mailbox, "s-trip")
    batches: list[list[str]] = []
    send = events_module.run_calls

    def recording(client: object, calls: list[ScriptCall]) -> list[object]:
        batches.append([name_of(mailbox, c) for c in calls])
        return send(client, calls)  # type: ignore[arg-type]

    leases_at_start: list[object] = []
    monkeypatch.setattr(events_module, "run_calls", recording)
    rt = replace(rt, start=lambda nxt: (leases_at_start.append(
        mailbox.store.coordinator.read_lease("s-trip")), started.append(nxt)))
    settle(rt, ctx)
    assert batches == [["events_append", "lease_put"]]
    [nxt] = started
    [lease] = leases_at_start
    assert lease is not None and (lease.token, lease.dispatch_id) == (nxt.token, second)
    types = [e.type for e in mailbox.events(ctx.run_id)]
    assert types[-1] == "run_finish" and types.count("run_finish") == 1


def test_a_hand_over_whose_report_failed_early_is_still_sent(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """If anything between the ack and its report raises, the lease still goes to the new
    claim (the finally in the settle): its chain would otherwise be refused as not holding
    the lease."""
    from mailbox import reports

    rt, _, ctx, second = ready_to_settle(mailbox, "s-trip-fail")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("report failed")

    monkeypatch.setattr(reports, "acked", broken)
    with pytest.raises(RuntimeError):
        settle(rt, ctx)
    lease = mailbox.store.coordinator.read_lease("s-trip-fail")
    assert lease is not None and lease.dispatch_id == second
    assert load(mailbox, second).claim_token == lease.token


def name_of(box: Mailbox, call: ScriptCall) -> str:
    if call.script is box.events.append_script:
        return "events_append"
    return next(name for name, script in box.store.coordinator.scripts.items()
                if script is call.script)


def test_nothing_due_releases_the_lease_and_claims_nothing(mailbox: Mailbox) -> None:
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    mailbox.submit("s-last", "echo", "only")
    assert run_chain(rt, claim(rt, "s-last")).settled == "completed"
    assert started == [] and wakes.calls == []
    assert mailbox.store.coordinator.read_lease("s-last") is None


def test_a_submit_that_counted_on_the_released_lease_is_woken(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ack's transaction found nothing due; a submit committed after it and, finding the
    lease standing, left its wake-up to the holder (the gate marked the lease). The release
    says so and the settle wakes the thread, whose claim takes the submit's dispatch."""
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    coordinator = mailbox.store.coordinator
    real_release = coordinator.release
    late: list[str] = []

    def submit_then_release(thread_id: str, token: str) -> int:
        if not late:
            late.append(mailbox.submit(thread_id, "echo", "late", wake=False).dispatch_id)
            assert coordinator.gate_wake(thread_id, "w-late", now_ms(), 60_000) == WAKE_HELD
        return real_release(thread_id, token)

    mailbox.submit("s-late", "echo", "first")
    ctx = claim(rt, "s-late")
    monkeypatch.setattr(coordinator, "release", submit_then_release)
    assert run_chain(rt, ctx).settled == "completed"
    assert started == [] and wakes.calls == [("s-late", 0)]
    assert claim(rt, "s-late").dispatch_id == late[0]


def test_a_failed_ack_and_claim_rolls_back_whole_and_ack_recovery_acks(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim inside the ack's transaction fails: the transaction rolls back whole, the
    ack with it, and nothing is started. Ack recovery finds the claim still ours with its
    outcome recorded and acks it (a plain ack, which gives the lease back); the thread is
    woken for the dispatch that was not claimed."""
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    mailbox.submit("s-fail", "echo", "one")
    second = mailbox.submit("s-fail", "echo", "two")
    ctx = claim(rt, "s-fail")

    def broken(*_: object, **__: object) -> None:
        raise StoreUnavailableError("injected: connection lost inside the ack")

    monkeypatch.setattr(mailbox.store, "claim_in", broken)
    assert run_chain(rt, ctx).settled == "completed"
    assert started == [] and wakes.calls == [("s-fail", 0)]
    assert load(mailbox, ctx.dispatch_id).status == DispatchStatus.Acked
    assert load(mailbox, second.dispatch_id).status == DispatchStatus.Queued
    assert mailbox.store.coordinator.read_lease("s-fail") is None
    monkeypatch.undo()
    assert claim(rt, "s-fail").dispatch_id == second.dispatch_id


def test_a_handed_over_lease_drops_the_submits_mark_and_the_next_ack_still_claims_its_work(
        mailbox: Mailbox) -> None:
    """A submit that found the lease standing marked it (the gate). The ack that hands the
    lease to the next claim clears the mark: the new holder's own ack looks for due work,
    which finds the submit's dispatch; the last ack, with nothing due, wakes nobody."""
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    coordinator = mailbox.store.coordinator
    mailbox.submit("s-mark", "echo", "one")
    second = mailbox.submit("s-mark", "echo", "two")
    ctx = claim(rt, "s-mark")
    third = mailbox.submit("s-mark", "echo", "three", wake=False)
    assert coordinator.gate_wake("s-mark", "w-3", now_ms(), 60_000) == WAKE_HELD

    run_chain(rt, ctx)
    assert [c.dispatch_id for c in started] == [second.dispatch_id]
    mark = coordinator.client.hget(coordinator.lease_key("s-mark"), "wake")
    assert mark in (None, b""), "the hand-over cleared the mark"
    run_chain(rt, started[-1])
    assert [c.dispatch_id for c in started] == [second.dispatch_id, third.dispatch_id]
    assert run_chain(rt, started[-1]).settled == "completed"
    assert wakes.calls == [], "no claim for a mark the hand-over made moot"
    assert coordinator.read_lease("s-mark") is None
    statuses = {d.dispatch_id: d.status for d in mailbox.store.list_dispatches("s-mark")}
    assert set(statuses.values()) == {DispatchStatus.Acked}


def test_a_broker_that_refuses_the_next_chain_leaves_the_ack_standing(
        mailbox: Mailbox) -> None:
    """The ack claimed the next dispatch, and publishing its chain fails: the ack and its
    report stand (the settle completes), and the new claim is left to run out its lease and
    be reclaimed by the sweep, as when a wake-up's publish fails after its claim."""
    rt, _ = worker_runtime(mailbox, Wakes())

    def broker_down(ctx: PhaseContext) -> None:
        raise ConnectionError("broker unreachable")

    rt = replace(rt, start=broker_down)
    first = mailbox.submit("s-down", "echo", "one")
    second = mailbox.submit("s-down", "echo", "two")
    assert run_chain(rt, claim(rt, "s-down")).settled == "completed"
    assert load(mailbox, first.dispatch_id).status == DispatchStatus.Acked
    assert load(mailbox, second.dispatch_id).status == DispatchStatus.Claimed
    finishes = [e.data["status"] for e in mailbox.events_of(first.run_id)
                if e.type == "run_finish"]
    assert finishes == ["acked"]


# ============================================================ the ack's answer lost, landed
def test_an_ack_whose_answer_was_lost_still_starts_the_claim_it_made(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ack and the next claim committed together; the answer never came back (a
    connection dropped after COMMIT). Ack recovery finds its own ack, and the claim the same
    transaction made is handed the lease and started, its attempt unspent — not left to run
    out its lease and be reclaimed as a failed attempt."""
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    first = mailbox.submit("s-lost", "echo", "one")
    second = mailbox.submit("s-lost", "echo", "two")
    ctx = claim(rt, "s-lost")
    fault = FailOnce(mailbox.runs.ack_and_claim_next,
                     StoreUnavailableError("server closed the connection"), after_real=True)
    monkeypatch.setattr(mailbox.runs, "ack_and_claim_next", fault)
    landed, resumed = ops("ack_recovery", "landed"), ops("ack_recovery", "claim_resumed")

    assert run_chain(rt, ctx).settled == "completed" and fault.calls == 1
    assert (ops("ack_recovery", "landed"), ops("ack_recovery", "claim_resumed")) == (
        landed + 1, resumed + 1)
    assert [c.dispatch_id for c in started] == [second.dispatch_id]
    assert wakes.calls == [], "the claim was started: nothing to wake"
    nxt = started[0]
    assert nxt.run_checked and nxt.run_error is None
    claimed = load(mailbox, second.dispatch_id)
    assert claimed.status == DispatchStatus.Claimed and claimed.claim_token == nxt.token
    assert claimed.attempt_count == 0
    lease = mailbox.store.coordinator.read_lease("s-lost")
    assert lease is not None and (lease.token, lease.dispatch_id) == (nxt.token,
                                                                      second.dispatch_id)
    finishes = [e.data["status"] for e in mailbox.events_of(first.run_id)
                if e.type == "run_finish"]
    assert finishes == ["acked"], "the landed ack is reported once"
    assert run_chain(rt, nxt).settled == "completed"
    assert load(mailbox, second.dispatch_id).status == DispatchStatus.Acked


def test_an_ack_whose_answer_was_lost_gives_its_lease_back_when_it_claimed_nothing(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing was due: the committed ack never gave the lease back (its answer was lost
    before the release). Recovery gives it back, so that settle's wake-up — and a submit
    that comes now — find the thread free, not busy until the lease runs out."""
    wakes = Wakes()
    rt, started = worker_runtime(mailbox, wakes)
    mailbox.submit("s-lost-idle", "echo", "only")
    ctx = claim(rt, "s-lost-idle")
    monkeypatch.setattr(mailbox.store, "release_kept", lambda fenced: None)  # never ran
    monkeypatch.setattr(mailbox.runs, "ack_and_claim_next", FailOnce(
        mailbox.runs.ack_and_claim_next, StoreUnavailableError("server closed the connection"),
        after_real=True))
    assert mailbox.store.coordinator.read_lease("s-lost-idle") is not None

    assert run_chain(rt, ctx).settled == "completed"
    assert started == [] and wakes.calls == [("s-lost-idle", 0)]
    assert mailbox.store.coordinator.read_lease("s-lost-idle") is None
    later = mailbox.submit("s-lost-idle", "echo", "later", wake=False)
    assert claim(rt, "s-lost-idle").dispatch_id == later.dispatch_id
