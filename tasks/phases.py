"""The five phase tasks: thin wrappers of `mailbox.phases` functions.

Each takes the context as the previous phase returned it (a JSON object), checks it against
the declared shape (`PhaseContext.from_message`: anyone can put bytes on a queue), runs the
phase and returns the context as JSON for the next link. A bug or an unexpected error inside a
phase must not break the chain: the wrapper logs it, marks the context done and lets `settle`
wake the thread. The dispatch stays Claimed and the sweep reclaims it when its lease runs out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mailbox import phases as phase_functions
from mailbox.context import MalformedContextError, PhaseContext
from mailbox.phases import Runtime
from tasks.app import app
from tasks.publishing import publish_wake
from tasks.runtime import runtime

log = logging.getLogger(__name__)
Phase = Callable[[Runtime, PhaseContext], PhaseContext]


def received(name: str, message: Any) -> PhaseContext | None:
    """The context in a phase message; None (refused with a log line, nothing run or
    written) when it cannot be one we sent."""
    try:
        return PhaseContext.from_message(message)
    except MalformedContextError as exc:
        log.error("mailbox.%s refused a malformed message: %s", name, exc.message)
        return None


def _guarded(name: str, func: Phase, message: Any) -> dict[str, Any] | None:
    ctx = received(name, message)
    if ctx is None:
        return None
    try:
        return func(runtime(), ctx).to_message()
    except Exception:
        log.exception("phase %s failed for %s", name, ctx.describe())
        return ctx.finish(f"phase {name} crashed").to_message()


@app.task(name="mailbox.verify")
def verify(ctx: Any) -> dict[str, Any] | None:
    return _guarded("verify", phase_functions.verify, ctx)


@app.task(name="mailbox.reconstruct")
def reconstruct(ctx: Any) -> dict[str, Any] | None:
    return _guarded("reconstruct", phase_functions.reconstruct, ctx)


@app.task(name="mailbox.resolve")
def resolve(ctx: Any) -> dict[str, Any] | None:
    return _guarded("resolve", phase_functions.resolve, ctx)


@app.task(name="mailbox.execute")
def execute(ctx: Any) -> dict[str, Any] | None:
    return _guarded("execute", phase_functions.execute, ctx)


@app.task(name="mailbox.settle")
def settle(message: Any) -> dict[str, Any] | None:
    ctx = received("settle", message)
    if ctx is None:
        return None
    try:
        return phase_functions.settle(runtime(), ctx).to_message()
    except Exception:
        log.exception("settle failed for %s", ctx.describe())
        publish_wake(runtime().settings.namespace, ctx.thread_id, 0)
        return ctx.finish("phase settle crashed").to_message()
