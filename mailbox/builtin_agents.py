"""The built-in agents the demo and the tests use (docs/behaviour.md#execute), with exact
behaviour."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from mailbox.agents import AgentContext, AgentResult, agent
from mailbox.errors import PermanentError, TransientError, ValidationError
from mailbox.model import Termination

SLEEP_STEP_S = 0.02


def _int_field(value: Any, key: str) -> None:
    if not isinstance(value, dict) or not isinstance(value.get(key), int) \
            or isinstance(value.get(key), bool) or value[key] < 0:
        raise ValidationError(f'input must be {{"{key}": <non-negative integer>}}, got {value!r}')


@agent("echo")
def echo(ctx: AgentContext) -> str:
    return ctx.input if isinstance(ctx.input, str) else json.dumps(ctx.input)


@agent("sleep", check_input=lambda value: _int_field(value, "ms"))
def sleep(ctx: AgentContext) -> AgentResult:
    total_ms = int(ctx.input["ms"])
    deadline = time.monotonic() + total_ms / 1000
    while time.monotonic() < deadline:
        if ctx.cancelled():
            return AgentResult(response=None, termination=Termination.cancelled())
        time.sleep(min(SLEEP_STEP_S, max(0.0, deadline - time.monotonic())))
    return AgentResult(response=f"slept {total_ms}")


@agent("flaky", check_input=lambda value: _int_field(value, "fail_times"))
def flaky(ctx: AgentContext) -> str:
    fail_times = int(ctx.input["fail_times"])
    if ctx.attempt < fail_times:
        raise TransientError(f"flaky failure {ctx.attempt + 1} of {fail_times}")
    return f"ok after {fail_times} failures"


@agent("fail")
def fail(ctx: AgentContext) -> str:
    raise PermanentError("requested failure")


@agent("ask")
def ask(ctx: AgentContext) -> str:
    if ctx.decision is None:
        ctx.suspend("approve", message=ctx.input if isinstance(ctx.input, str)
                    else json.dumps(ctx.input))
    return ctx.decision if isinstance(ctx.decision, str) else json.dumps(ctx.decision)


CHAT_TOKEN_DELAY_S = 0.01


@agent("chat")
async def chat(ctx: AgentContext) -> str:
    """A deterministic multi-turn assistant for the demo and the tests: async, streams its
    answer word by word as `token` outputs, and answers from the conversation so far (the
    user's earlier inputs and its own earlier answers, `ctx.messages`), so a thread of
    several turns shows that each turn sees the ones before it."""
    history = ctx.messages
    earlier = [m.content for m in history if m.role == "user" and m.run_id != ctx.run_id]
    answers = sum(1 for m in history if m.role == "assistant")
    said = ctx.input if isinstance(ctx.input, str) else json.dumps(ctx.input)
    recalled = (f"before that you said {', '.join(repr(e) for e in earlier[-3:])}"
                if earlier else "that is the first thing you told me")
    answer = f"Turn {answers + 1}: you said {said!r}; {recalled}."
    for word in answer.split(" "):
        ctx.emit("token", {"text": word + " "})
        await asyncio.sleep(CHAT_TOKEN_DELAY_S)
    return answer
