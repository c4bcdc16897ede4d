"""The phase context's declared shape (mailbox/context.py): what a phase returns survives the
broker's JSON both ways, and a received object that cannot be one we sent is refused with the
field it gets wrong, before any phase runs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbox.context import MalformedContextError, Outcome, PhaseContext
from mailbox.model import MAX_MS

ids = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
              min_size=1, max_size=40).filter(lambda s: s.strip() != "")
times = st.integers(0, MAX_MS)
outcomes = st.builds(Outcome, st.sampled_from(["completed", "transient_error",
                                               "permanent_error"]),
                     st.none() | st.text(max_size=50), st.booleans(), st.booleans())


@st.composite
def contexts(draw: st.DrawFn) -> PhaseContext:
    ctx = PhaseContext(draw(ids), draw(ids), draw(ids), draw(ids.filter(lambda s: len(s) <= 64)),
                       draw(st.integers(0, 1000)), draw(st.integers(0, 10**6)), draw(times),
                       draw(times), draw(times))
    ctx.done = draw(st.booleans())
    ctx.reason = draw(st.none() | st.text(max_size=80))
    ctx.instance_id = draw(st.none() | ids)
    ctx.started_at = draw(st.none() | times)
    ctx.run_checked = draw(st.booleans())
    ctx.run_error = draw(st.none() | st.text(max_size=80))
    ctx.run_done = draw(st.booleans())
    ctx.resolution_id = draw(st.none() | ids)
    ctx.resumed = draw(st.booleans())
    ctx.agent = draw(st.none() | st.lists(ids, min_size=2, max_size=2))
    ctx.resolve_error = draw(st.none() | st.text(max_size=80))
    ctx.outcome = draw(st.none() | outcomes)
    ctx.duplicate = draw(st.booleans())
    ctx.stop_reason = draw(st.none() | st.text(max_size=80))
    ctx.stop_kind = draw(st.none() | st.sampled_from(["requested", "lease_lost", "unsafe"]))
    ctx.settled = draw(st.none() | st.sampled_from(["completed", "transient_error"]))
    return ctx


@given(contexts())
def test_a_context_survives_json_both_ways(ctx: PhaseContext) -> None:
    wire = json.loads(json.dumps(ctx.to_message()))
    assert PhaseContext.from_message(wire) == ctx


def test_defaults_are_left_out_of_the_message() -> None:
    ctx = PhaseContext("d", "t", "r", "tok", 0, 0, 1, 2, 3)
    assert ctx.to_message() == {"dispatch_id": "d", "thread_id": "t", "run_id": "r",
                                "token": "tok", "attempt": 0, "epoch": 0, "created_at": 1,
                                "available_at": 2, "claimed_at": 3}


def test_unknown_keys_are_ignored_for_rolling_deploys() -> None:
    wire = dict(PhaseContext("d", "t", "r", "tok", 0, 0, 1, 2, 3).to_message(),
                added_by_a_newer_version={"x": 1})
    assert PhaseContext.from_message(wire).dispatch_id == "d"


GOOD: dict[str, Any] = PhaseContext("d", "t", "r", "tok", 0, 0, 1, 2, 3).to_message()


@pytest.mark.parametrize(("change", "names"), [
    ({"dispatch_id": None}, "dispatch_id"),
    ({"thread_id": ""}, "thread_id"),
    ({"thread_id": "   "}, "thread_id"),
    ({"run_id": 7}, "run_id"),
    ({"run_id": "x" * 256}, "run_id"),
    ({"thread_id": "a\x00b"}, "thread_id"),
    ({"thread_id": "\ud800"}, "thread_id"),
    ({"token": "t" * 65}, "token"),
    ({"token": ["tok"]}, "token"),
    ({"attempt": "zero"}, "attempt"),
    ({"attempt": True}, "attempt"),
    ({"attempt": -1}, "attempt"),
    ({"created_at": MAX_MS + 1}, "created_at"),
    ({"created_at": 1.5}, "created_at"),
    ({"done": "yes"}, "done"),
    ({"agent": ["echo"]}, "agent"),
    ({"agent": "echo@1"}, "agent"),
    ({"agent": ["echo", 1]}, "agent[1]"),
    ({"outcome": "completed"}, "outcome"),
    ({"outcome": {"kind": "won"}}, "outcome.kind"),
    ({"outcome": {"kind": "completed", "recorded": "yes"}}, "outcome.recorded"),
    ({"outcome": {"kind": "completed", "error": 5}}, "outcome.error"),
    ({"reason": "r" * 70_000}, "reason"),
    ({"run_checked": "yes"}, "run_checked"),
    ({"run_done": 1}, "run_done"),
    ({"run_error": ["missing"]}, "run_error"),
])
def test_a_field_that_cannot_be_ours_is_named(change: dict[str, Any], names: str) -> None:
    with pytest.raises(MalformedContextError) as caught:
        PhaseContext.from_message({**GOOD, **change})
    assert f"'{names}'" in str(caught.value)


@pytest.mark.parametrize("missing", ["dispatch_id", "thread_id", "run_id", "token", "attempt",
                                     "epoch", "created_at", "available_at", "claimed_at"])
def test_a_missing_required_field_is_named(missing: str) -> None:
    wire = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(MalformedContextError, match=f"field '{missing}' is missing"):
        PhaseContext.from_message(wire)


@pytest.mark.parametrize("message", [None, "ctx", 42, [GOOD], b"{}"])
def test_a_message_that_is_not_an_object_is_refused(message: Any) -> None:
    with pytest.raises(MalformedContextError, match="must be an object"):
        PhaseContext.from_message(message)


def test_describe_shows_ids_never_the_token() -> None:
    ctx = PhaseContext("d-1", "t-1", "r-1", "secret-token", 0, 0, 1, 2, 3)
    assert ctx.describe() == "dispatch=d-1 thread=t-1"
