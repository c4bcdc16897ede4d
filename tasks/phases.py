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


REQUIRED = {"dispatch_id": str, "thread_id": str, "run_id": str, "token": str, "attempt": int,
            "created_at": int, "available_at": int, "claimed_at": int}


def malformed(ctx: Any) -> str | None:
    """Why a phase message cannot be a context we sent (anyone can put bytes on a queue)."""
    if not isinstance(ctx, dict):
        return f"phase context must be an object, got {type(ctx).__name__}"
    for key, kind in REQUIRED.items():
        if not isinstance(ctx.get(key), kind) or isinstance(ctx.get(key), bool):
            return f"phase context field {key!r} must be {kind.__name__}"
    return None


def _guarded(name: str, func: Callable[[Runtime, Context], Context], ctx: Context
             ) -> Context | None:
    problem = malformed(ctx)
    if problem is not None:
        # Nothing to fence with, nothing to write: refuse loudly, keep the worker alive.
        log.error("mailbox.%s refused a malformed message: %s", name, problem)
        return None
    try:
        return func(runtime(), ctx)
    except Exception:
        log.exception("phase %s failed for dispatch %s", name, ctx.get("dispatch_id"))
        ctx["done"] = True
        ctx["reason"] = f"phase {name} crashed"
        return ctx


@app.task(name="mailbox.verify")
def verify(ctx: Context) -> Context | None:
    return _guarded("verify", phase_functions.verify, ctx)


@app.task(name="mailbox.reconstruct")
def reconstruct(ctx: Context) -> Context | None:
    return _guarded("reconstruct", phase_functions.reconstruct, ctx)


@app.task(name="mailbox.resolve")
def resolve(ctx: Context) -> Context | None:
    return _guarded("resolve", phase_functions.resolve, ctx)


@app.task(name="mailbox.execute")
def execute(ctx: Context) -> Context | None:
    return _guarded("execute", phase_functions.execute, ctx)


@app.task(name="mailbox.settle")
def settle(ctx: Context) -> Context | None:
    problem = malformed(ctx)
    if problem is not None:
        log.error("mailbox.settle refused a malformed message: %s", problem)
        return None
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
