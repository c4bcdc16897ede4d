"""Agents that ignore their stops, loaded by workers through MAILBOX_AGENT_MODULES
(tests/e2e/test_abandoned_async_on_workers.py)."""

from __future__ import annotations

import asyncio
import time

from mailbox import agent
from mailbox.agents import AgentContext


@agent("swallows_cancellation", timeout_s=1)
async def swallows_cancellation(ctx: AgentContext) -> str:
    """Runs `{"s": N}` seconds on the process's agent loop and swallows every cancellation
    meanwhile, as a coroutine with a bare `except BaseException: continue` around its awaits
    does: only the end of its process ends it sooner."""
    deadline = time.monotonic() + float(ctx.input["s"])
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            continue
    return "woke up"
