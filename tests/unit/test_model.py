"""Pure unit tests of the data model (reference §1, §2): no database, no Redis.

Every transition T1 to T18 of reference §2.1 is checked field by field: the expected record is
the input with exactly the changes the table lists, so any extra or missing change fails.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbox import (
    DispatchStatus,
    MailboxInterrupt,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    Termination,
    ValidationError,
)

NOW = 5000
CLAIM = {"claim_token": None, "claimed_by": None, "lease_until": None}
PROJECTION = {"dispatch_instance_id": None, "run_status": None, "termination": None,
              "run_response": None, "run_error": None}


def queued(**changes: Any) -> RunDispatch:
    base = RunDispatch.queued("d1", "t1", "r1", 1000, priority=7, dedupe_key="k",
                              available_at=1200, max_attempts=3)
    return base.replace(**changes) if changes else base


def claimed(**changes: Any) -> RunDispatch:
    d = queued(dispatch_epoch=2).claimed("tok-1", "consumer-1", 30_000, 2000)
    return d.replace(**changes) if changes else d


def with_result(d: RunDispatch | None = None) -> RunDispatch:
    d = d or claimed()
    return d.result_recorded(RunDispatchResult(
        "r1", "inst-1", RunStatus.done, Termination.error("boom"), "partial", "boom"), 2500)


def acked() -> RunDispatch:
    return claimed().acked(3000)


def cancelled() -> RunDispatch:
    return queued().cancelled(3000)


def superseded() -> RunDispatch:
    return queued().superseded_by_interrupt(3000)


def dead_letter() -> RunDispatch:
    return claimed().dead_lettered("fatal", 3000)


BY_STATUS = {
    DispatchStatus.Queued: queued,
    DispatchStatus.Claimed: claimed,
    DispatchStatus.Acked: acked,
    DispatchStatus.Cancelled: cancelled,
    DispatchStatus.Superseded: superseded,
    DispatchStatus.DeadLetter: dead_letter,
}


# ======================================================================= building (§1.2)
def test_queued_builder_defaults() -> None:
    d = RunDispatch.queued("d1", "t1", "r1", 1000)

    assert d == RunDispatch(
        dispatch_id="d1", thread_id="t1", run_id="r1", priority=128, dedupe_key=None,
        dispatch_epoch=0, status=DispatchStatus.Queued, available_at=1000, attempt_count=0,
        max_attempts=5, last_error=None, claim_token=None, claimed_by=None, lease_until=None,
        dispatch_instance_id=None, run_status=None, termination=None, run_response=None,
        run_error=None, completed_at=None, created_at=1000, updated_at=1000,
    )
    assert d.validate_for_enqueue() is d


def test_queued_builder_overrides() -> None:
    d = RunDispatch.queued("d1", "t1", "r1", 1000, priority=0, dedupe_key="k",
                           available_at=9000, max_attempts=1, attempt_count=1)

    assert (d.priority, d.dedupe_key, d.available_at, d.max_attempts, d.attempt_count) == (
        0, "k", 9000, 1, 1)
    assert (d.created_at, d.updated_at) == (1000, 1000)


def test_records_are_immutable_and_transitions_return_new_records() -> None:
    q = queued()
    c = q.claimed("tok", "c", 100, 2000)

    assert q.status == DispatchStatus.Queued and q.claim_token is None
    assert c is not q
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.status = DispatchStatus.Claimed  # type: ignore[misc]


# ==================================================================== transitions (§2.1)
def test_t1_enqueued_stamps_epoch_and_clears_claim_and_projection() -> None:
    q = queued(dispatch_epoch=9, attempt_count=2, last_error="earlier", updated_at=1100)

    after = q.enqueued(4)

    assert after == q.replace(dispatch_epoch=4)
    assert after.status == DispatchStatus.Queued


def test_t1_enqueued_rejects_non_queued() -> None:
    with pytest.raises(ValidationError, match="must start as Queued"):
        claimed().enqueued(0)
    with pytest.raises(ValidationError, match="must start as Queued"):
        acked().enqueued(0)


def test_t2_claimed() -> None:
    q = queued(attempt_count=1)

    after = q.claimed("tok-9", "consumer-9", 30_000, NOW)

    assert after == q.replace(status=DispatchStatus.Claimed, claim_token="tok-9",
                              claimed_by="consumer-9", lease_until=NOW + 30_000,
                              updated_at=NOW)


def test_t3_lease_extended_is_relative_to_now() -> None:
    c = claimed()
    assert c.lease_until == 32_000

    after = c.lease_extended(1000, NOW)

    assert after == c.replace(lease_until=NOW + 1000, updated_at=NOW)


def test_t4_started_resets_projection_to_running() -> None:
    c = with_result()

    after = c.started("inst-2", NOW)

    assert after == c.replace(dispatch_instance_id="inst-2", run_status=RunStatus.running,
                              termination=None, run_response=None, run_error=None,
                              completed_at=None, updated_at=NOW)


def test_t4_started_requires_instance_id() -> None:
    with pytest.raises(ValidationError, match="dispatch_instance_id"):
        claimed().started("  ", NOW)


def test_t5_result_recorded_copies_result_and_can_repeat() -> None:
    c = claimed().started("inst-1", 2100)
    result = RunDispatchResult("r1", "inst-1", RunStatus.waiting, Termination.suspended(),
                               "ask", None)

    after = c.result_recorded(result, NOW)

    assert after == c.replace(dispatch_instance_id="inst-1", run_status=RunStatus.waiting,
                              termination=Termination.suspended(), run_response="ask",
                              run_error=None, completed_at=NOW, updated_at=NOW)
    again = after.result_recorded(
        RunDispatchResult("r1", "inst-1", RunStatus.done, Termination.natural_end(), "fin"),
        NOW + 1)
    assert again.status == DispatchStatus.Claimed
    assert (again.run_status, again.run_response, again.completed_at) == (
        RunStatus.done, "fin", NOW + 1)


def test_t5_result_for_another_run_is_rejected() -> None:
    with pytest.raises(ValidationError, match="r-other"):
        claimed().result_recorded(RunDispatchResult("r-other", "i", RunStatus.done), NOW)


def test_t6_acked_keeps_projection() -> None:
    c = with_result()

    after = c.acked(NOW)

    assert after == c.replace(status=DispatchStatus.Acked, completed_at=NOW, updated_at=NOW,
                              **CLAIM)
    assert after.run_status == RunStatus.done and after.run_error == "boom"


def test_t7_nack_with_attempts_left_requeues() -> None:
    c = with_result(claimed(attempt_count=1))

    after = c.nacked(9000, "transient", NOW)

    assert after == c.replace(status=DispatchStatus.Queued, attempt_count=2,
                              last_error="transient", available_at=9000, completed_at=None,
                              updated_at=NOW, **CLAIM, **PROJECTION)


def test_t8_nack_exhausted_dead_letters_keeping_projection_and_available_at() -> None:
    c = with_result(claimed(attempt_count=2))

    after = c.nacked(9000, "final", NOW)

    assert after == c.replace(status=DispatchStatus.DeadLetter, attempt_count=3,
                              last_error="final", completed_at=NOW, updated_at=NOW, **CLAIM)
    assert after.available_at == 1200


def test_t8_nack_at_budget_does_not_count_past_max_attempts() -> None:
    c = claimed(attempt_count=3)

    after = c.nacked(9000, "again", NOW)

    assert after.status == DispatchStatus.DeadLetter
    assert after.attempt_count == 3


def test_t9_dead_lettered_keeps_attempts_and_projection() -> None:
    c = with_result(claimed(attempt_count=1))

    after = c.dead_lettered("permanent", NOW)

    assert after == c.replace(status=DispatchStatus.DeadLetter, last_error="permanent",
                              completed_at=NOW, updated_at=NOW, **CLAIM)


def test_t10_cancelled() -> None:
    q = queued()

    after = q.cancelled(NOW)

    assert after == q.replace(status=DispatchStatus.Cancelled, completed_at=NOW,
                              updated_at=NOW)


def test_t11_superseded_by_interrupt_keeps_epoch() -> None:
    q = queued(dispatch_epoch=3)

    after = q.superseded_by_interrupt(NOW)

    assert after == q.replace(status=DispatchStatus.Superseded,
                              last_error="queued dispatch superseded by interrupt",
                              completed_at=NOW, updated_at=NOW)


def test_t12_superseded_as_stale_takes_thread_epoch() -> None:
    q = queued(dispatch_epoch=1)

    after = q.superseded_as_stale(4, NOW)

    assert after == q.replace(status=DispatchStatus.Superseded, dispatch_epoch=4,
                              last_error="queued dispatch superseded by newer dispatch epoch",
                              completed_at=NOW, updated_at=NOW)


@pytest.mark.parametrize("reason", [
    "claimed dispatch superseded before runtime start",
    "claimed dispatch superseded before run result",
    "claimed dispatch superseded before nack",
    "claimed dispatch superseded before dead letter",
    "claimed dispatch superseded during lease renewal",
    "claimed dispatch superseded before ack",
])
def test_t13_fenced_supersedes_stale_claim(reason: str) -> None:
    c = with_result()

    after = c.fenced(5, reason, NOW)

    assert after == c.replace(status=DispatchStatus.Superseded, dispatch_epoch=5,
                              last_error=reason, completed_at=NOW, updated_at=NOW,
                              **CLAIM, **PROJECTION)


def test_fence_reason_constants_match_the_reference() -> None:
    from mailbox import model

    assert model.REASON_INTERRUPT == "queued dispatch superseded by interrupt"
    assert model.REASON_STALE_QUEUED == "queued dispatch superseded by newer dispatch epoch"
    assert model.REASON_STALE_START == "claimed dispatch superseded before runtime start"
    assert model.REASON_STALE_RESULT == "claimed dispatch superseded before run result"
    assert model.REASON_STALE_NACK == "claimed dispatch superseded before nack"
    assert model.REASON_STALE_DEAD_LETTER == "claimed dispatch superseded before dead letter"
    assert model.REASON_STALE_RENEWAL == "claimed dispatch superseded during lease renewal"
    assert model.REASON_STALE_ACK == "claimed dispatch superseded before ack"
    assert model.REASON_STALE_RECLAIM == "claimed dispatch lease expired after interrupt"
    assert model.REASON_LEASE_EXHAUSTED == "lease expired; max attempts reached"


@pytest.mark.parametrize(("own", "thread", "expected"), [(2, 5, 5), (7, 3, 7), (4, 4, 4)])
def test_t14_superseded_claimed_keeps_highest_epoch(own: int, thread: int,
                                                    expected: int) -> None:
    c = with_result(claimed(dispatch_epoch=own))

    after = c.superseded_claimed(thread, "given up", NOW)

    assert after == c.replace(status=DispatchStatus.Superseded, dispatch_epoch=expected,
                              last_error="given up", completed_at=NOW, updated_at=NOW,
                              **CLAIM, **PROJECTION)


def test_t15_lease_expired_with_attempts_left_requeues_now() -> None:
    c = claimed(last_error="earlier").started("inst-1", 2100)

    after = c.lease_expired(NOW)

    assert after == c.replace(status=DispatchStatus.Queued, attempt_count=1,
                              available_at=NOW, completed_at=None, updated_at=NOW,
                              **CLAIM, **PROJECTION)
    assert after.last_error == "earlier"


def test_t16_lease_expired_exhausted_dead_letters_and_clears_projection() -> None:
    c = claimed(attempt_count=2).started("inst-1", 2100)

    after = c.lease_expired(NOW)

    assert after == c.replace(status=DispatchStatus.DeadLetter, attempt_count=3,
                              last_error="lease expired; max attempts reached",
                              completed_at=NOW, updated_at=NOW, **CLAIM, **PROJECTION)


def test_t16_lease_expired_at_budget_does_not_count_past_max_attempts() -> None:
    after = claimed(attempt_count=3).lease_expired(NOW)

    assert after.status == DispatchStatus.DeadLetter
    assert after.attempt_count == 3


def test_t17_stale_reclaim_is_a_fence_with_the_reclaim_reason() -> None:
    c = claimed().started("inst-1", 2100)

    after = c.fenced(3, "claimed dispatch lease expired after interrupt", NOW)

    assert after == c.replace(status=DispatchStatus.Superseded, dispatch_epoch=3,
                              last_error="claimed dispatch lease expired after interrupt",
                              completed_at=NOW, updated_at=NOW, **CLAIM, **PROJECTION)
    assert after.attempt_count == 0


@pytest.mark.parametrize("status", list(DispatchStatus))
def test_t18_only_terminal_records_older_than_cutoff_are_purgeable(
        status: DispatchStatus) -> None:
    d = BY_STATUS[status]()

    assert d.is_purgeable(d.updated_at) is False
    assert d.is_purgeable(d.updated_at + 1) is status.is_terminal


def test_is_stale() -> None:
    d = queued(dispatch_epoch=2)
    assert d.is_stale(3) is True
    assert d.is_stale(2) is False
    assert d.is_stale(1) is False


# ================================================================ wrong-state transitions
QUEUED_ONLY = {
    "claimed": lambda d: d.claimed("tok", "c", 100, NOW),
    "cancelled": lambda d: d.cancelled(NOW),
    "superseded_by_interrupt": lambda d: d.superseded_by_interrupt(NOW),
    "superseded_as_stale": lambda d: d.superseded_as_stale(9, NOW),
}
CLAIMED_ONLY = {
    "lease_extended": lambda d: d.lease_extended(100, NOW),
    "started": lambda d: d.started("inst", NOW),
    "result_recorded": lambda d: d.result_recorded(
        RunDispatchResult("r1", "inst", RunStatus.done), NOW),
    "acked": lambda d: d.acked(NOW),
    "nacked": lambda d: d.nacked(NOW, "e", NOW),
    "dead_lettered": lambda d: d.dead_lettered("e", NOW),
    "fenced": lambda d: d.fenced(9, "r", NOW),
    "superseded_claimed": lambda d: d.superseded_claimed(9, "r", NOW),
    "lease_expired": lambda d: d.lease_expired(NOW),
}


@pytest.mark.parametrize("op", sorted(QUEUED_ONLY))
@pytest.mark.parametrize("status", [s for s in DispatchStatus if s != DispatchStatus.Queued])
def test_queued_only_transitions_reject_other_states(op: str, status: DispatchStatus) -> None:
    with pytest.raises(ValidationError, match="must be Queued"):
        QUEUED_ONLY[op](BY_STATUS[status]())


@pytest.mark.parametrize("op", sorted(CLAIMED_ONLY))
@pytest.mark.parametrize("status", [s for s in DispatchStatus if s != DispatchStatus.Claimed])
def test_claimed_only_transitions_reject_other_states(op: str, status: DispatchStatus) -> None:
    with pytest.raises(ValidationError, match="must be Claimed"):
        CLAIMED_ONLY[op](BY_STATUS[status]())


def test_transition_api_enforces_lifecycle_shape() -> None:
    d = RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000, dedupe_key="req-xyz")
    c = d.claimed("claim-1", "consumer-1", 900, 1100)
    assert (c.status, c.claimed_by, c.claim_token, c.lease_until) == (
        DispatchStatus.Claimed, "consumer-1", "claim-1", 2000)

    a = c.acked(3000)
    assert a.status == DispatchStatus.Acked
    assert (a.claim_token, a.claimed_by, a.lease_until, a.completed_at) == (
        None, None, None, 3000)


# ================================================================ validate_for_persist
def test_validate_queued_shape() -> None:
    assert queued().validate_for_persist() == queued()
    for field, value in (("claim_token", "t"), ("claimed_by", "c"), ("lease_until", 1)):
        with pytest.raises(ValidationError, match="claim fields"):
            queued(**{field: value}).validate_for_persist()
    with pytest.raises(ValidationError, match="completed_at"):
        queued(completed_at=1).validate_for_persist()
    for field, value in (("dispatch_instance_id", "i"), ("run_status", RunStatus.running),
                         ("termination", Termination.natural_end()),
                         ("run_response", "r"), ("run_error", "e")):
        with pytest.raises(ValidationError, match="runtime result fields"):
            queued(**{field: value}).validate_for_persist()


def test_validate_claimed_shape() -> None:
    c = claimed()
    assert c.validate_for_persist() == c
    for field, value in (("claim_token", None), ("claim_token", "  "),
                         ("claimed_by", None), ("claimed_by", ""), ("lease_until", None)):
        with pytest.raises(ValidationError, match="claim"):
            c.replace(**{field: value}).validate_for_persist()
    assert with_result(c).validate_for_persist().run_status == RunStatus.done
    assert c.replace(completed_at=None).validate_for_persist() == c


@pytest.mark.parametrize("status", [s for s in DispatchStatus if s.is_terminal])
def test_validate_terminal_shape(status: DispatchStatus) -> None:
    d = BY_STATUS[status]()
    assert d.validate_for_persist() == d
    with pytest.raises(ValidationError, match="completed_at"):
        d.replace(completed_at=None).validate_for_persist()
    for field, value in (("claim_token", "t"), ("claimed_by", "c"), ("lease_until", 1)):
        with pytest.raises(ValidationError, match="claim fields"):
            d.replace(**{field: value}).validate_for_persist()
    projected = d.replace(dispatch_instance_id="i", run_status=RunStatus.done,
                          termination=Termination.natural_end(), run_response="ok",
                          run_error=None)
    assert projected.validate_for_persist() == projected


@pytest.mark.parametrize(("changes", "word"), [
    ({"dispatch_id": "  "}, "dispatch_id must not be empty"),
    ({"thread_id": ""}, "thread_id must not be empty"),
    ({"run_id": "\t"}, "run_id must not be empty"),
    ({"priority": -1}, "priority"),
    ({"priority": 256}, "priority"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"attempt_count": 4}, "attempt_count"),
    ({"available_at": -1}, "available_at"),
    ({"created_at": 1.5}, "created_at"),
    ({"dispatch_epoch": True}, "dispatch_epoch"),
])
def test_validate_identity_and_retry_checks(changes: dict[str, Any], word: str) -> None:
    for status in DispatchStatus:
        with pytest.raises(ValidationError, match=word):
            BY_STATUS[status]().replace(**changes).validate_for_persist()


# ============================================================================ statuses
def test_dispatch_status_values_terminality_and_labels() -> None:
    assert [s.value for s in DispatchStatus] == [
        "Queued", "Claimed", "Acked", "Cancelled", "Superseded", "DeadLetter"]
    assert {s for s in DispatchStatus if s.is_terminal} == {
        DispatchStatus.Acked, DispatchStatus.Cancelled, DispatchStatus.Superseded,
        DispatchStatus.DeadLetter}
    assert DispatchStatus.Queued.is_terminal is False
    assert DispatchStatus.Claimed.is_terminal is False
    assert {s: s.label for s in DispatchStatus} == {
        DispatchStatus.Queued: "queued", DispatchStatus.Claimed: "claimed",
        DispatchStatus.Acked: "acked", DispatchStatus.Cancelled: "cancelled",
        DispatchStatus.Superseded: "superseded", DispatchStatus.DeadLetter: "dead_letter"}
    assert str(DispatchStatus.DeadLetter) == "DeadLetter"
    assert DispatchStatus("DeadLetter") is DispatchStatus.DeadLetter


def test_run_status_values() -> None:
    assert [s.value for s in RunStatus] == ["created", "running", "waiting", "done"]
    assert str(RunStatus.done) == "done"


ALLOWED_RUN_TRANSITIONS = {
    ("created", "created"), ("created", "running"), ("created", "done"),
    ("running", "running"), ("running", "waiting"), ("running", "done"),
    ("waiting", "waiting"), ("waiting", "running"), ("waiting", "done"),
    ("done", "done"),
}


@pytest.mark.parametrize("source", list(RunStatus))
@pytest.mark.parametrize("target", list(RunStatus))
def test_run_status_can_transition_to(source: RunStatus, target: RunStatus) -> None:
    expected = (source.value, target.value) in ALLOWED_RUN_TRANSITIONS
    assert source.can_transition_to(target) is expected


# ========================================================================= termination
def test_termination_constructors_and_value_equality() -> None:
    assert Termination.natural_end() == Termination.natural_end()
    assert Termination.error("x") == Termination.error("x")
    assert Termination.error("x") != Termination.error("y")
    assert Termination.blocked("x") != Termination.error("x")
    assert Termination.stopped("c") == Termination.stopped("c")
    assert Termination.stopped("c", "d") != Termination.stopped("c")
    assert Termination.cancelled() != Termination.suspended()
    assert hash(Termination.stopped("c", "d")) == hash(Termination.stopped("c", "d"))
    assert len({Termination.error("x"), Termination.error("x"), Termination.cancelled()}) == 2
    assert Termination.stopped("c").value == {"code": "c"}
    assert Termination.stopped("c", "d").value == {"code": "c", "detail": "d"}


@pytest.mark.parametrize(("termination", "expected"), [
    (Termination.natural_end(), (RunStatus.done, "natural")),
    (Termination.behavior_requested(), (RunStatus.done, "behavior_requested")),
    (Termination.stopped("max_rounds", "hit"), (RunStatus.done, "stopped:max_rounds")),
    (Termination.cancelled(), (RunStatus.done, "cancelled")),
    (Termination.blocked("policy"), (RunStatus.done, "blocked:policy")),
    (Termination.suspended(), (RunStatus.waiting, None)),
    (Termination.error("boom"), (RunStatus.done, "error")),
])
def test_termination_to_run_status(termination: Termination,
                                   expected: tuple[RunStatus, str | None]) -> None:
    assert termination.to_run_status() == expected


@pytest.mark.parametrize(("reason", "expected"), [
    ("natural", Termination.natural_end()),
    ("behavior_requested", Termination.behavior_requested()),
    ("cancelled", Termination.cancelled()),
    ("blocked:policy", Termination.blocked("policy")),
    ("blocked:a:b", Termination.blocked("a:b")),
    ("stopped:max_rounds", Termination.stopped("max_rounds")),
    ("error:boom", Termination.error("boom")),
    ("error:a:b", Termination.error("a:b")),
    ("error", Termination.error("error")),
    ("", Termination.error("")),
    ("something else", Termination.error("something else")),
    ("suspended", Termination.error("suspended")),
])
def test_termination_from_done_reason(reason: str, expected: Termination) -> None:
    assert Termination.from_done_reason(reason) == expected


@pytest.mark.parametrize(("termination", "as_json"), [
    (Termination.natural_end(), {"type": "natural_end"}),
    (Termination.behavior_requested(), {"type": "behavior_requested"}),
    (Termination.cancelled(), {"type": "cancelled"}),
    (Termination.suspended(), {"type": "suspended"}),
    (Termination.error("boom"), {"type": "error", "value": "boom"}),
    (Termination.blocked("why"), {"type": "blocked", "value": "why"}),
    (Termination.stopped("c"), {"type": "stopped", "value": {"code": "c"}}),
    (Termination.stopped("c", "d"), {"type": "stopped", "value": {"code": "c", "detail": "d"}}),
])
def test_termination_json_form(termination: Termination, as_json: dict[str, Any]) -> None:
    assert termination.to_json() == as_json
    assert Termination.from_json(json.loads(json.dumps(as_json))) == termination


def test_termination_from_json_accepts_plugin_requested_alias() -> None:
    assert Termination.from_json({"type": "plugin_requested"}) == Termination.behavior_requested()


@pytest.mark.parametrize("bad", [{"type": "exploded"}, {"value": "x"}, "natural_end", None])
def test_termination_rejects_unknown_shapes(bad: Any) -> None:
    with pytest.raises(ValidationError):
        Termination.from_json(bad)


def test_termination_rejects_unknown_type() -> None:
    with pytest.raises(ValidationError, match="exploded"):
        Termination("exploded")


# ================================================================== JSON round trips
ids = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() != "")
from mailbox.model import MAX_MS  # noqa: E402

ms = st.integers(min_value=0, max_value=MAX_MS)
opt_text = st.none() | st.text(max_size=30)
terminations = st.one_of(
    st.builds(Termination.natural_end),
    st.builds(Termination.behavior_requested),
    st.builds(Termination.cancelled),
    st.builds(Termination.suspended),
    st.builds(Termination.error, st.text(max_size=30)),
    st.builds(Termination.blocked, st.text(max_size=30)),
    st.builds(Termination.stopped, st.text(max_size=10), st.none() | st.text(max_size=10)),
)


@st.composite
def dispatches(draw: st.DrawFn) -> RunDispatch:
    status = draw(st.sampled_from(list(DispatchStatus)))
    max_attempts = draw(st.integers(min_value=1, max_value=50))
    values: dict[str, Any] = {
        "dispatch_id": draw(ids), "thread_id": draw(ids), "run_id": draw(ids),
        "priority": draw(st.integers(min_value=0, max_value=255)),
        "dedupe_key": draw(st.none() | ids),
        "dispatch_epoch": draw(ms), "status": status, "available_at": draw(ms),
        "attempt_count": draw(st.integers(min_value=0, max_value=max_attempts)),
        "max_attempts": max_attempts, "last_error": draw(opt_text),
        "created_at": draw(ms), "updated_at": draw(ms),
    }
    if status == DispatchStatus.Claimed:
        values.update(claim_token=draw(ids), claimed_by=draw(ids), lease_until=draw(ms),
                      completed_at=draw(st.none() | ms))
    elif status.is_terminal:
        values["completed_at"] = draw(ms)
    if status != DispatchStatus.Queued and draw(st.booleans()):
        values.update(
            dispatch_instance_id=draw(st.none() | ids),
            run_status=draw(st.none() | st.sampled_from(list(RunStatus))),
            termination=draw(st.none() | terminations),
            run_response=draw(opt_text), run_error=draw(opt_text),
        )
    return RunDispatch(**values).validate_for_persist()


OMITTED_WHEN_NONE = ("dispatch_instance_id", "run_status", "termination", "run_response",
                     "run_error", "completed_at")
ALWAYS_PRESENT = ("dispatch_id", "thread_id", "run_id", "priority", "dedupe_key",
                  "dispatch_epoch", "status", "available_at", "attempt_count", "max_attempts",
                  "last_error", "claim_token", "claimed_by", "lease_until", "created_at",
                  "updated_at")


@settings(max_examples=300, deadline=None)
@given(dispatches())
def test_run_dispatch_json_round_trip_is_lossless(d: RunDispatch) -> None:
    as_json = d.to_json()
    text = json.dumps(as_json)

    back = RunDispatch.from_json(json.loads(text))

    assert back == d
    assert back.to_json() == as_json
    for name in OMITTED_WHEN_NONE:
        assert (name in as_json) == (getattr(d, name) is not None), name
    for name in ALWAYS_PRESENT:
        assert name in as_json, name
    assert as_json["status"] == d.status.value
    if d.run_status is not None:
        assert as_json["run_status"] == d.run_status.value
    if d.termination is not None:
        assert as_json["termination"] == d.termination.to_json()


def test_run_dispatch_json_with_termination_and_projection() -> None:
    d = with_result().acked(3000)

    as_json = d.to_json()

    assert as_json["status"] == "Acked"
    assert as_json["run_status"] == "done"
    assert as_json["termination"] == {"type": "error", "value": "boom"}
    assert as_json["dispatch_instance_id"] == "inst-1"
    assert as_json["run_response"] == "partial"
    assert as_json["run_error"] == "boom"
    assert as_json["completed_at"] == 3000
    assert as_json["claim_token"] is None
    assert RunDispatch.from_json(json.loads(json.dumps(as_json))) == d


def test_queued_dispatch_json_omits_projection_and_completed_at() -> None:
    as_json = RunDispatch.queued("d1", "t1", "r1", 1000).to_json()

    assert as_json == {
        "dispatch_id": "d1", "thread_id": "t1", "run_id": "r1", "priority": 128,
        "dedupe_key": None, "dispatch_epoch": 0, "status": "Queued", "available_at": 1000,
        "attempt_count": 0, "max_attempts": 5, "last_error": None, "claim_token": None,
        "claimed_by": None, "lease_until": None, "created_at": 1000, "updated_at": 1000,
    }


def test_run_dispatch_from_json_rejects_unknown_fields_and_statuses() -> None:
    base = RunDispatch.queued("d1", "t1", "r1", 1000).to_json()
    with pytest.raises(ValidationError, match="bogus"):
        RunDispatch.from_json({**base, "bogus": 1})
    with pytest.raises(ValidationError):
        RunDispatch.from_json({**base, "status": "Finished"})
    with pytest.raises(ValidationError):
        RunDispatch.from_json({**base, "run_status": "exploded"})
    with pytest.raises(ValidationError):
        RunDispatch.from_json({"dispatch_id": "d1"})


results = st.builds(RunDispatchResult, ids, ids, st.sampled_from(list(RunStatus)),
                    st.none() | terminations, opt_text, opt_text)


@settings(max_examples=200, deadline=None)
@given(results)
def test_run_dispatch_result_json_round_trip(result: RunDispatchResult) -> None:
    as_json = result.to_json()

    back = RunDispatchResult.from_json(json.loads(json.dumps(as_json)))

    assert back == result
    assert as_json["status"] == result.status.value


def test_run_dispatch_result_json_example() -> None:
    result = RunDispatchResult("run-1", "dispatch-1", RunStatus.done,
                               Termination.blocked("needs approval"), None, "needs approval")

    as_json = result.to_json()

    assert as_json == {"run_id": "run-1", "dispatch_instance_id": "dispatch-1",
                       "status": "done",
                       "termination": {"type": "blocked", "value": "needs approval"},
                       "response": None, "error": "needs approval"}
    assert RunDispatchResult.from_json(as_json) == result


def test_run_dispatch_result_defaults_and_status_coercion() -> None:
    result = RunDispatchResult("r", "i", "waiting")  # type: ignore[arg-type]
    assert result.status is RunStatus.waiting
    assert (result.termination, result.response, result.error) == (None, None, None)


# ======================================================================= interrupt result
def test_mailbox_interrupt_counts_superseded() -> None:
    s1, s2 = superseded(), queued(dispatch_id="d2").superseded_by_interrupt(3000)

    result = MailboxInterrupt(3, claimed(), [s1, s2])

    assert result.new_dispatch_epoch == 3
    assert result.active_dispatch is not None
    assert result.active_dispatch.status == DispatchStatus.Claimed
    assert result.superseded_count == 2
    assert MailboxInterrupt(1).superseded_count == 0
    assert MailboxInterrupt(1).superseded == []
    assert MailboxInterrupt(1).active_dispatch is None
