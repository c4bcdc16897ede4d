"""The five phase tasks: thin wrappers of `mailbox.phases` functions.

A bug or an unexpected error inside a phase must not break the chain: the wrapper logs it,
marks the context done and lets `settle` wake the thread. The dispatch stays Claimed and the
sweep reclaims it when its lease runs out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mailbox import phases as phase_functions
from mailbox.phases import Context, Runtime
from tasks.app import app
from tasks.runtime import runtime

log = logging.getLogger(__name__)


def _guarded(name: str, func: Callable[[Runtime, Context], Context], ctx: Context) -> Context:
    try:
        return func(runtime(), ctx)
    except Exception:
        log.exception("phase %s failed for dispatch %s", name, ctx.get("dispatch_id"))
        ctx["done"] = True
        ctx["reason"] = f"phase {name} crashed"
        return ctx


@app.task(name="mailbox.verify")
def verify(ctx: Context) -> Context:
    return _guarded("verify", phase_functions.verify, ctx)


@app.task(name="mailbox.reconstruct")
def reconstruct(ctx: Context) -> Context:
    return _guarded("reconstruct", phase_functions.reconstruct, ctx)


@app.task(name="mailbox.resolve")
def resolve(ctx: Context) -> Context:
    return _guarded("resolve", phase_functions.resolve, ctx)


@app.task(name="mailbox.execute")
def execute(ctx: Context) -> Context:
    return _guarded("execute", phase_functions.execute, ctx)


@app.task(name="mailbox.settle")
def settle(ctx: Context) -> Context:
    try:
        return phase_functions.settle(runtime(), ctx)
    except Exception:
        log.exception("settle failed for dispatch %s", ctx.get("dispatch_id"))
        ctx["done"] = True
        from tasks.runtime import publish_wake

        publish_wake(ctx["thread_id"], 0)
        return ctx


def describe(ctx: Any) -> str:
    """What Flower shows for a phase: ids only, never the payload."""
    if isinstance(ctx, dict):
        return f"dispatch={ctx.get('dispatch_id')} thread={ctx.get('thread_id')}"
    return "?"
