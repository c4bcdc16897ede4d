"""An application's own agents, loaded by workers through MAILBOX_AGENT_MODULES."""

from __future__ import annotations

import json
import os
import time

from mailbox import Termination, agent
from mailbox.agents import AgentContext, AgentResult


@agent("shout", version="3")
def shout(ctx: AgentContext) -> str:
    return str(ctx.input).upper()


@agent("probe")
def probe(ctx: AgentContext) -> str | AgentResult:
    """Sleeps `{"ms": N}` and writes when each execution started and ended to the file named
    by PROBE_FILE (one JSON line each, appended: small appends are atomic), so a test can tell
    whether two executions of one run ever overlapped. Stops early when cancelled."""
    path = os.environ["PROBE_FILE"]

    def note(what: str) -> None:
        with open(path, "a") as out:
            out.write(json.dumps({"event": what, "run_id": ctx.run_id, "attempt": ctx.attempt,
                                  "pid": os.getpid(), "at": time.time()}) + "\n")

    note("start")
    deadline = time.monotonic() + int(ctx.input["ms"]) / 1000
    try:
        while time.monotonic() < deadline:
            if ctx.cancelled():
                return AgentResult(termination=Termination.cancelled())
            time.sleep(0.02)
    finally:
        note("end")
    return f"probed {ctx.input['ms']}"


@agent("raise_when_cancelled")
def raise_when_cancelled(ctx: AgentContext) -> str:
    """Works `{"ms": N}`; once cancelled, gives up by raising, as a client library whose
    request was aborted would."""
    deadline = time.monotonic() + int(ctx.input["ms"]) / 1000
    while time.monotonic() < deadline:
        if ctx.cancelled():
            raise ConnectionError("request aborted")
        time.sleep(0.02)
    return "finished"


@agent("returns_suspended")
def returns_suspended(ctx: AgentContext) -> AgentResult:
    """Wrongly returns a suspended termination instead of calling ctx.suspend(...)."""
    return AgentResult(termination=Termination.suspended())


@agent("versioned", version="1")
def versioned_v1(ctx: AgentContext) -> str:
    return f"v1: {ctx.input}"
