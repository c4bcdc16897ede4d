"""The five phase tasks: thin wrappers of `mailbox.phases` functions.

Each takes the context as the previous phase returned it (a JSON object), checks it against
the declared shape (`PhaseContext.from_message`: anyone can put bytes on a queue), runs the
phase and returns the context as JSON for the next link. A bug or an unexpected error inside a
phase must not break the chain: the wrapper logs it, marks the context done and lets `settle`
wake the thread. The dispatch stays Claimed and the sweep reclaims it when its lease runs out.
What a phase returns shows only its ids (`PhaseMessage`): the context carries the claim token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery.signals import worker_init

from mailbox import agents, tracing
from mailbox import phases as phase_functions
from mailbox.context import MalformedContextError, PhaseContext
from mailbox.runtime import Runtime
from mailbox.settings import Settings
from tasks.app import app
from tasks.publishing import publish_wake
from tasks.runtime import runtime

log = logging.getLogger(__name__)
Phase = Callable[[Runtime, PhaseContext], PhaseContext]


class PhaseMessage(Mapping[str, Any]):
    """The context a phase hands to the next link: the JSON object on the wire, its ids in
    every repr.

    With worker events on (`-E`), Celery puts the repr of a task's return value into the
    task-succeeded event (Flower's "result") and the INFO "succeeded" log line, and the
    context holds the claim token, which must stay between the phases. Celery's saferepr
    walks a dict, or a dict subclass, item by item whatever its __repr__, so this is a
    Mapping and not a dict: saferepr calls its __repr__. kombu's JSON encoder serializes it
    through `__json__`, so the next phase receives the plain object `to_message` made.
    """

    __slots__ = ("_label", "_message")

    def __init__(self, ctx: PhaseContext) -> None:
        self._message = ctx.to_message()
        self._label = ctx.describe()

    def __getitem__(self, key: str) -> Any:
        return self._message[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._message)

    def __len__(self) -> int:
        return len(self._message)

    def __repr__(self) -> str:
        return self._label

    __str__ = __repr__

    def __json__(self) -> dict[str, Any]:
        """What kombu's JSON encoder puts on the wire (kombu.utils.json.JSONEncoder)."""
        return dict(self._message)


def received(name: str, message: Any) -> PhaseContext | None:
    """The context in a phase message; None (refused with a log line, nothing run or
    written) when it cannot be one we sent."""
    try:
        return PhaseContext.from_message(message)
    except MalformedContextError as exc:
        log.error("mailbox.%s refused a malformed message: %s", name, exc.message)
        return None


def _guarded(name: str, func: Phase, message: Any) -> PhaseMessage | None:
    ctx = received(name, message)
    if ctx is None:
        return None
    with tracing.span(f"mailbox.{name}", traceparent=ctx.traceparent,
                      attributes=tracing.phase_attributes(ctx)) as span:
        try:
            ctx = func(runtime(), ctx)
        except Exception:
            log.exception("phase %s failed for %s", name, ctx.describe())
            ctx.finish(f"phase {name} crashed")
        tracing.end_attributes(span, ctx)
        return PhaseMessage(ctx)


@app.task(name="mailbox.verify")
def verify(ctx: Any) -> PhaseMessage | None:
    return _guarded("verify", phase_functions.verify, ctx)


@app.task(name="mailbox.reconstruct")
def reconstruct(ctx: Any) -> PhaseMessage | None:
    return _guarded("reconstruct", phase_functions.reconstruct, ctx)


@app.task(name="mailbox.resolve")
def resolve(ctx: Any) -> PhaseMessage | None:
    return _guarded("resolve", phase_functions.resolve, ctx)


@app.task(name="mailbox.execute")
def execute(ctx: Any) -> PhaseMessage | None:
    return _guarded("execute", phase_functions.execute, ctx)


@app.task(name="mailbox.settle")
def settle(message: Any) -> PhaseMessage | None:
    ctx = received("settle", message)
    if ctx is None:
        return None
    with tracing.span("mailbox.settle", traceparent=ctx.traceparent,
                      attributes=tracing.phase_attributes(ctx)) as span:
        try:
            ctx = phase_functions.settle(runtime(), ctx)
        except Exception:
            log.exception("settle failed for %s", ctx.describe())
            publish_wake(runtime().settings.namespace, ctx.thread_id, 0)
            ctx.finish("phase settle crashed")
        tracing.end_attributes(span, ctx)
        return PhaseMessage(ctx)


@worker_init.connect
def limit_execute(**_: Any) -> None:
    """Celery's time limits for `mailbox.execute`, the hard stop behind an agent's own
    (docs/behaviour.md#time-limits): past an agent's `timeout_s` its heartbeat tells it to
    stop, past a grace more it abandons the attempt; the soft limit (the longest timeout of
    the agents this worker has, plus 1.5 graces) then raises SoftTimeLimitExceeded in the
    agent, and the hard one (plus 2 graces) kills the pool child, which Celery replaces.
    Set in the worker's main process, which enforces them (prefork; the threads pool has
    no time limits)."""
    settings = Settings.from_env()
    agents.load_agent_modules(settings.agent_modules)
    longest = max((spec.timeout_or(settings.agent_timeout_s) for spec in agents.registered()),
                  default=float(settings.agent_timeout_s))
    grace = settings.agent_timeout_grace_s
    execute.soft_time_limit = longest + 1.5 * grace
    execute.time_limit = longest + 2 * grace
    log.info("mailbox.execute time limits: soft %.0f s, hard %.0f s", execute.soft_time_limit,
             execute.time_limit)
