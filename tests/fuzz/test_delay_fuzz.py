"""Hypothesis over `tasks.dispatch.delay(...)`, the call applications make.

Every keyword it accepts gets hostile values: wrong types, huge and malformed strings, NaN and
infinities, inputs nested past the recursion limit, objects JSON cannot encode. The property:
either `delay` returns a result whose dispatch is stored whole — run, input message and
dispatch, each with the values asked for — and exactly one wake-up naming that dispatch went
to the namespace's broker queue (none for a delay beyond the countdown limit: the sweep
delivers those; none for a due dispatch on a thread whose earlier wake-up still waits, which
will find it: the wake gate), or it raises ValidationError / AlreadyExistsError with a message, and
nothing at all changed: no row, no Redis key of the namespace, no broker message. No worker
runs: the broker's lists are read directly, so every message published stays visible.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailbox import AlreadyExistsError, Mailbox, ValidationError
from tasks import dispatch
from tasks.priorities import MAX_COUNTDOWN_MS
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.fuzz.support import (
    bad_inputs,
    bad_text,
    broker_depth,
    deep,
    json_values,
    junk,
    row_counts,
    snapshot,
)
from tests.support.e2e_helpers import queue_keys

AGENTS = ["echo", "sleep", "flaky", "fail", "ask"]
AGENT_INPUTS = {"sleep": st.fixed_dictionaries({"ms": st.integers(0, 5)}),
                "flaky": st.fixed_dictionaries({"fail_times": st.integers(0, 3)})}
# Each keyword: (values delay must accept, values it must refuse or survive).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "thread": st.one_of(st.sampled_from(["fz-1", "fz-2", "fz-3"]),
                        st.text(min_size=1, max_size=40).filter(str.strip)),
    "priority": st.integers(min_value=0, max_value=255),
    "delay_ms": st.one_of(st.integers(min_value=0, max_value=10),
                          st.sampled_from([MAX_COUNTDOWN_MS, MAX_COUNTDOWN_MS + 1])),
    "max_attempts": st.one_of(st.none(), st.integers(min_value=1, max_value=1000)),
    "dedupe_key": st.one_of(st.none(), st.sampled_from(["k1", "k2"])),
    "interrupt": st.booleans(),
}
HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "thread": st.one_of(bad_text, junk),
    "agent": st.one_of(st.sampled_from(["nope", "ECHO", "echo ", "echo@1"]), bad_text, junk),
    "input": st.one_of(bad_inputs, junk, json_values),
    "priority": st.one_of(st.integers(min_value=-2, max_value=258), st.sampled_from(
        [2**63, True, 1.0, 128.5, math.nan, "1", None]), junk),
    "delay_ms": st.one_of(st.integers(min_value=-5, max_value=-1), st.sampled_from(
        [365 * 24 * 3600 * 1000 + 1, 2**64, 1.5, math.inf, False, "10", None]), junk),
    "max_attempts": st.one_of(st.sampled_from([0, -1, 1001, 2.0, True]), junk),
    "dedupe_key": st.one_of(bad_text, junk),
    "interrupt": st.sampled_from(["no", 0, 1, None, "yes", [], 0.0]),
}


def draw_call(data: st.DataObject) -> dict[str, Any]:
    """A valid call with up to two keywords made hostile (most examples corrupt one or two,
    some none): a refusal is then about that keyword, and accepted calls are common enough
    to check what they stored."""
    hostile = data.draw(st.sets(st.sampled_from(sorted(HOSTILE)), max_size=2), label="hostile")
    agent = data.draw(HOSTILE["agent"] if "agent" in hostile else st.sampled_from(AGENTS),
                      label="agent")
    call = {"agent": agent}
    for name in ("thread", "priority", "delay_ms", "max_attempts", "dedupe_key", "interrupt"):
        call[name] = data.draw(HOSTILE[name] if name in hostile else VALID[name], label=name)
    valid_input = AGENT_INPUTS.get(agent, json_values) if isinstance(agent, str) else \
        json_values
    call["input"] = data.draw(HOSTILE["input"] if "input" in hostile else valid_input,
                              label="input")
    return call


def newest_message(client: redis.Redis[bytes], namespace: str, task_id: str
                   ) -> dict[str, Any]:
    """The envelope of `task_id`, which kombu pushed last (LPUSH: the head) on one of the
    queue's priority lists (wake-ups ride the lowest, tasks.runtime.WAKE_PRIORITY)."""
    heads = [client.lindex(key, 0) for key in queue_keys(namespace)]
    found = [json.loads(raw) for raw in heads if raw is not None]
    mine = [m for m in found if m.get("headers", {}).get("id") == task_id]
    assert len(mine) == 1, f"no message {task_id} at the head of the queue's lists: {found}"
    return mine[0]  # type: ignore[no-any-return]


def check_delay(box: Mailbox, call: dict[str, Any], *, must_refuse: bool = False) -> str:
    """Call dispatch.delay with `call`; assert the property of the module docstring.
    Returns "refused" or "accepted"."""
    namespace = box.settings.namespace
    client = box.store.coordinator.client
    before, counts, depth = snapshot(box), row_counts(box), broker_depth(client, namespace)
    # Nothing consumes here: a thread's earlier wake-up still waits, and a due dispatch on
    # it publishes none (docs/behaviour.md#wake-gate).
    try:
        pending = bool(client.exists(box.store.coordinator.wake_pending_key(call["thread"])))
    except (TypeError, ValueError):  # a hostile thread id names no key (UnicodeError too)
        pending = False
    thread, payload, priority, delay_ms, max_attempts, dedupe_key = (
        call["thread"], call["input"], call["priority"], call["delay_ms"],
        call["max_attempts"], call["dedupe_key"])
    try:
        result = dispatch.delay(thread, call["agent"], payload, priority=priority,
                                dedupe_key=dedupe_key, delay_ms=delay_ms,
                                max_attempts=max_attempts, interrupt=call["interrupt"])
    except (ValidationError, AlreadyExistsError) as exc:
        assert str(exc).startswith(f"{exc.prefix}: ") and exc.message.strip(), repr(exc)
        assert snapshot(box) == before, f"refused ({exc}) but something was written"
        return "refused"
    assert not must_refuse, f"accepted {call!r:.300}"
    assert isinstance(call["interrupt"], bool), "a non-boolean interrupt was acted on"
    stored = box.get_dispatch(result.id)
    assert stored is not None, "delay returned an id that names no dispatch"
    run = box.get_run(stored.run_id)
    assert run is not None and run.dispatch_id == stored.dispatch_id
    assert stored.thread_id == run.thread_id == thread
    assert (stored.priority, stored.dedupe_key) == (priority, dedupe_key)
    assert stored.available_at - stored.created_at == delay_ms
    assert max_attempts is None or stored.max_attempts == max_attempts
    inputs_of_run = box.runs.run_messages(run.run_id)
    assert inputs_of_run and inputs_of_run[-1].content == json.loads(json.dumps(payload))
    after = row_counts(box)
    assert after[0] == counts[0] + 1 and after[2] == counts[2] + 1, (counts, after)
    assert after[1] in (counts[1], counts[1] + 1)  # a resume adds no run
    published = broker_depth(client, namespace) - depth
    if delay_ms > MAX_COUNTDOWN_MS:
        assert published == 0, "a delay past the countdown limit is the sweep's to deliver"
        return "accepted"
    if delay_ms == 0 and pending:
        assert published == 0, f"{published} wake-ups while the thread's wake-up still waits"
        return "accepted"
    assert published == 1, f"{published} wake-up messages for one dispatch"
    envelope = newest_message(client, namespace, stored.dispatch_id)
    assert envelope["headers"]["task"] == "mailbox.dispatch"
    args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    assert args == [thread] and kwargs == {"dispatch_id": stored.dispatch_id}
    return "accepted"


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_delay_stores_whole_and_wakes_once_or_refuses_without_trace(
        publisher: Mailbox, data: st.DataObject) -> None:  # noqa: F811
    event(check_delay(publisher, draw_call(data)))


# Every keyword's known-bad values, each alone in an otherwise valid call: random draws may
# miss one, this table never does.
MUST_REFUSE: dict[str, list[Any]] = {
    "thread": [None, 7, "", "   ", "\x00", "t\x00", "a\udcff", "x" * 256, b"t", ["t"]],
    "agent": ["nope", "", None, 5, "ECHO", "echo\x00", "\udcff"],
    "input": [math.nan, math.inf, [1, -math.inf], object(), {1, 2}, b"x",
              {(1, 2): "tuple key"}, "x" * (256 * 1024), ["y" * 1000] * 300,
              deep(100_000)],
    "priority": [-1, 256, True, 1.0, math.nan, "1", None, 2**63],
    "delay_ms": [-1, 1.5, math.inf, "10", None, True, 365 * 24 * 3600 * 1000 + 1],
    "max_attempts": [0, -1, 1001, 2.0, True, "3"],
    "dedupe_key": ["", " ", "\x00", "a\udcff", "x" * 256, 5, b"k"],
    "interrupt": ["no", 1, None, "yes", 0.0],
}


def test_each_known_bad_value_is_refused_without_trace(publisher: Mailbox  # noqa: F811
                                                      ) -> None:
    base = {"thread": "fz-table", "agent": "echo", "input": "x", "priority": 128,
            "delay_ms": 0, "max_attempts": None, "dedupe_key": None, "interrupt": False}
    assert check_delay(publisher, base) == "accepted"
    for name, values in MUST_REFUSE.items():
        for value in values:
            check_delay(publisher, {**base, name: value}, must_refuse=True)
