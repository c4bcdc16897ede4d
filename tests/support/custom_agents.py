"""An application's own agents, loaded by workers through MAILBOX_AGENT_MODULES."""

from __future__ import annotations

import asyncio
import json
import os
import signal
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


@agent("slow_cooperative", timeout_s=1)
def slow_cooperative(ctx: AgentContext) -> str:
    """Works `{"ms": N}`, looking up often: stops at its 1 s time limit when told to."""
    deadline = time.monotonic() + int(ctx.input["ms"]) / 1000
    while time.monotonic() < deadline:
        if ctx.cancelled():
            return "stopped early"
        time.sleep(0.02)
    return "finished"


@agent("hangs", timeout_s=1)
def hangs(ctx: AgentContext) -> str:
    """Hangs where nothing reaches it: it blocks the soft-time-limit signal (SIGUSR1) and
    sleeps, as a C extension stuck in a call would. Only a hard kill ends it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    time.sleep(int(ctx.input["s"]))
    return "woke up"


@agent("async_loop_probe")
async def async_loop_probe(ctx: AgentContext) -> str:
    """Says which process and which event loop ran it, after streaming a few tokens."""
    for i in range(3):
        ctx.emit("token", {"i": i})
        await asyncio.sleep(0.05)
    return f"{os.getpid()}:{id(asyncio.get_running_loop())}"


@agent("slow_tokens")
def slow_tokens(ctx: AgentContext) -> str:
    """Streams `{"tokens": [...]}` as `token` outputs (`ctx.emit("token", {"text": t})`),
    `delay_ms` apart, and answers with their concatenation — a chat model's streamed reply.
    With `gate` (a file path) it waits after the first token until that file exists (at most
    60 s), so a test can watch the run's stream while the run is still running."""
    tokens = [str(t) for t in ctx.input["tokens"]]
    delay_s = int(ctx.input.get("delay_ms", 200)) / 1000
    gate = ctx.input.get("gate")
    for n, token in enumerate(tokens):
        if ctx.cancelled():
            return "".join(tokens[:n])
        ctx.emit("token", {"text": token})
        if n == 0 and gate:
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(delay_s)
    return "".join(tokens)
