"""The thread is the conversation (docs/behaviour.md#conversation): a completed attempt
appends the agent's turn to the thread's message log in the same fenced transaction that
records its outcome, and `ctx.messages` gives an agent the conversation so far as message
objects, its own earlier answers included, in a bounded window.

Phase functions driven by hand against real SQL and Redis (tests/support/phase_kit.py); the
CLI's `thread` command and a multi-turn run through real workers are in their own suites.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from mailbox import DispatchStatus, Mailbox, NotFoundError, RunStatus, ValidationError
from mailbox.agents import AgentContext, AgentResult
from mailbox.phases import claim_next, execute, reconstruct, resolve, run_chain, verify
from mailbox.runtime import now_ms
from mailbox.schema import messages
from tests.support.phase_kit import (
    Clock,
    Wakes,
    claim,
    load,
    make_runtime,
    phases,
    register,
    run_of,
)


def said(box: Mailbox, thread: str) -> list[tuple[str, Any]]:
    return [(m.role, m.content) for m in box.thread_messages(thread, limit=1000)]


def chat(seen: list[list[tuple[str, Any]]]) -> Any:
    """An agent that answers 'you said X (turn N)' and records what it saw."""
    def handler(ctx: AgentContext) -> str:
        history = [(m.role, m.content) for m in ctx.messages]
        seen.append(history)
        return f"you said {ctx.input} (turn {sum(1 for r, _ in history if r == 'user')})"
    return handler


def drain(box: Mailbox, thread: str, rt: Any) -> None:
    while (ctx := claim_next(rt, thread)) is not None:
        run_chain(rt, ctx)


def test_the_agent_sees_the_whole_conversation_its_own_answers_included(
        mailbox: Mailbox) -> None:
    seen: list[list[tuple[str, Any]]] = []
    name, _ = register(chat(seen))
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    for text in ("hello", "how are you?", "bye"):
        mailbox.submit("t-chat", name, text)
        drain(mailbox, "t-chat", rt)
    assert seen[2] == [("user", "hello"), ("assistant", "you said hello (turn 1)"),
                       ("user", "how are you?"),
                       ("assistant", "you said how are you? (turn 2)"), ("user", "bye")]
    assert said(mailbox, "t-chat")[-1] == ("assistant", "you said bye (turn 3)")
    page = mailbox.thread_messages("t-chat")
    assert [m.seq for m in page] == sorted(m.seq for m in page)
    assert {m.run_id for m in page if m.role == "assistant"} == {
        m.run_id for m in page if m.role == "user"}
    assert all(m.created_at > 0 for m in page)


def test_inputs_queued_behind_a_run_are_not_in_its_conversation(mailbox: Mailbox) -> None:
    """Three inputs submitted before any runs: the first run sees only its own; the second
    sees the first exchange and its own input, not the third (which arrived after it)."""
    seen: list[list[tuple[str, Any]]] = []
    name, _ = register(chat(seen))
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    for text in ("one", "two", "three"):
        mailbox.submit("t-queued", name, text)
    drain(mailbox, "t-queued", rt)
    assert seen[0] == [("user", "one")]
    assert seen[1] == [("user", "one"), ("assistant", "you said one (turn 1)"),
                       ("user", "two")]
    assert said(mailbox, "t-queued") == [
        ("user", "one"), ("assistant", "you said one (turn 1)"),
        ("user", "two"), ("assistant", "you said two (turn 2)"),
        ("user", "three"), ("assistant", "you said three (turn 3)")]


def test_intermediate_turns_come_before_the_answer_atomically(mailbox: Mailbox) -> None:
    def tool_user(ctx: AgentContext) -> AgentResult:
        return AgentResult(response="it is 21°C in Paris", messages=[
            {"role": "assistant", "content": {"tool_call": "weather", "args": {"city": "Paris"}}},
            {"role": "tool", "content": {"weather": {"temp_c": 21}}},
        ])

    name, _ = register(tool_user)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    mailbox.submit("t-tools", name, "weather in Paris?")
    drain(mailbox, "t-tools", rt)
    assert said(mailbox, "t-tools") == [
        ("user", "weather in Paris?"),
        ("assistant", {"tool_call": "weather", "args": {"city": "Paris"}}),
        ("tool", {"weather": {"temp_c": 21}}),
        ("assistant", "it is 21°C in Paris")]


def test_an_outcome_write_that_fails_writes_no_turn(mailbox: Mailbox,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing half-written: the turns go in the outcome's transaction, or not at all."""
    def tool_user(ctx: AgentContext) -> AgentResult:
        return AgentResult(response="answer", messages=[{"role": "tool", "content": "x"}])

    name, _ = register(tool_user)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit("t-atomic", name, "q")
    ctx = phases(rt, claim(rt, "t-atomic"), verify, reconstruct, resolve)
    real = mailbox.runs.append_messages

    def append_then_fail(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(mailbox.runs, "append_messages", append_then_fail)
    ctx = execute(rt, ctx)
    assert ctx.done and ctx.reason.startswith("store unavailable recording the outcome")
    assert said(mailbox, "t-atomic") == [("user", "q")]
    assert run_of(mailbox, receipt.run_id).status == RunStatus.running


@pytest.mark.parametrize("ending", ["cancelled", "transient", "permanent", "suspended"])
def test_a_run_that_does_not_complete_leaves_only_its_input(mailbox: Mailbox,
                                                            ending: str) -> None:
    from mailbox import PermanentError, Termination, TransientError

    def behaviour(ctx: AgentContext) -> Any:
        if ending == "cancelled":
            return AgentResult(response="partial", termination=Termination.cancelled())
        if ending == "transient":
            raise TransientError("rate limited")
        if ending == "permanent":
            raise PermanentError("bad request")
        ctx.suspend("approve", "may I?")
        return None

    name, _ = register(behaviour)
    rt = make_runtime(mailbox, Wakes(), clock=Clock(), max_attempts=1)
    mailbox.submit(f"t-{ending}", name, "go", max_attempts=1)
    drain(mailbox, f"t-{ending}", rt)
    assert said(mailbox, f"t-{ending}") == [("user", "go")]


def test_a_resumed_run_keeps_its_turn_decision_then_answer(mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    first = mailbox.submit("t-ask", "ask", "deploy?")
    drain(mailbox, "t-ask", rt)
    mailbox.resume(first.run_id, "approved")
    drain(mailbox, "t-ask", rt)
    mailbox.submit("t-ask", "echo", "thanks")
    drain(mailbox, "t-ask", rt)
    assert said(mailbox, "t-ask") == [("user", "deploy?"), ("decision", "approved"),
                                      ("assistant", "approved"), ("user", "thanks"),
                                      ("assistant", "thanks")]


def test_a_replayed_completion_writes_the_answer_once(mailbox: Mailbox) -> None:
    """An attempt finished the run and died before its ack; the retry settles from the run
    record: the conversation gets the answer once."""
    name, calls = register(lambda ctx: "the answer")
    clock = Clock()
    rt = make_runtime(mailbox, Wakes(), clock=clock)
    receipt = mailbox.submit("t-once", name, "q")
    phases(rt, claim(rt, "t-once"), verify, reconstruct, resolve, execute)
    mailbox.store.reclaim_expired_leases(clock.advance(mailbox.settings.lease_ms + 1), 10)
    run_chain(rt, claim(rt, "t-once"))
    assert calls.count == 1
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked
    assert said(mailbox, "t-once") == [("user", "q"), ("assistant", "the answer")]


@pytest.mark.parametrize("bad", [
    {"role": "user", "content": "forged"},
    {"content": "no role"},
    "a bare string",
    {"role": "tool", "content": {1, 2}},
])
def test_invalid_turns_are_the_agents_permanent_error(mailbox: Mailbox, bad: Any) -> None:
    name, _ = register(lambda ctx: AgentResult(response="x", messages=[bad]))
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    receipt = mailbox.submit(f"t-bad-{uuid.uuid4().hex[:6]}", name, "q")
    drain(mailbox, receipt.thread_id, rt)
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error is not None and "AgentResult.messages[0]" in dispatch.last_error
    assert said(mailbox, receipt.thread_id) == [("user", "q")]


def test_the_window_is_bounded_in_messages_and_bytes(mailbox: Mailbox) -> None:
    """A thread of 10,000 messages: an attempt reads the newest `history_limit` (one bounded
    query), never the whole log; and no more than `history_max_bytes` of content."""
    now = now_ms()
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    with mailbox.store.engine.begin() as conn:
        conn.execute(messages.insert(), [
            {"thread_id": "t-long", "seq": i, "message_id": f"m-{run_id}-{i}",
             "run_id": f"{run_id}-{i // 2}", "role": "user" if i % 2 else "assistant",
             "content": f"message {i}", "created_at": now, "turn": i - (1 - i % 2)}
            for i in range(1, 10_001)])
    seen: dict[str, Any] = {}

    def reader(ctx: AgentContext) -> str:
        seen["n"] = len(ctx.messages)
        seen["last"] = ctx.messages[-1].content
        return "ok"

    name, _ = register(reader)
    statements: list[str] = []
    sa.event.listen(mailbox.store.engine, "before_cursor_execute",
                    lambda *args: statements.append(args[2]))
    rt = make_runtime(mailbox, Wakes(), clock=Clock(), history_limit=40)
    mailbox.submit("t-long", name, "newest")
    drain(mailbox, "t-long", rt)
    assert seen == {"n": 40, "last": "newest"}
    window = [s for s in statements if "thread_messages.turn <=" in s]
    assert window and all("LIMIT" in s for s in window)

    rt = make_runtime(mailbox, Wakes(), clock=Clock(), history_limit=1000,
                      history_max_bytes=1024)
    mailbox.submit("t-long", name, "x" * 2000)
    drain(mailbox, "t-long", rt)
    assert seen["n"] == 1 and seen["last"] == "x" * 2000  # the newest is always kept


def test_pages_of_the_conversation_go_back_with_before(mailbox: Mailbox) -> None:
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    for i in range(5):
        mailbox.submit("t-pages", "echo", f"m{i}")
        drain(mailbox, "t-pages", rt)
    newest = mailbox.thread_messages("t-pages", limit=4)
    assert [m.content for m in newest] == ["m3", "m3", "m4", "m4"]
    older = mailbox.thread_messages("t-pages", limit=4, before=newest[0].seq)
    everything = mailbox.thread_messages("t-pages", limit=100)
    assert older + newest == everything[-8:]
    assert [m.content for m in everything] == [x for i in range(5) for x in (f"m{i}", f"m{i}")]
    with pytest.raises(NotFoundError):
        mailbox.thread_messages("t-pages", before=999)
    with pytest.raises(ValidationError):
        mailbox.thread_messages("t-pages", limit=100_000)
