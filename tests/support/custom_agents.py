"""An application's own agents, loaded by workers through MAILBOX_AGENT_MODULES."""

from __future__ import annotations

from mailbox import agent
from mailbox.agents import AgentContext


@agent("shout", version="3")
def shout(ctx: AgentContext) -> str:
    return str(ctx.input).upper()
