"""Version 2 of `versioned` (tests.support.custom_agents has version 1): the new deploy of an
application's agent, for the rolling-deploy test."""

from __future__ import annotations

import tests.support.custom_agents  # noqa: F401  (version 1 first: version 2 is current)
from mailbox import agent
from mailbox.agents import AgentContext


@agent("versioned", version="2")
def versioned_v2(ctx: AgentContext) -> str:
    return f"v2: {ctx.input}"
