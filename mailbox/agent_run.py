"""One attempt of an agent: run it with a heartbeat beside it, and judge what it did
(docs/behaviour.md#outcomes).

Sync handlers run in the execute phase's thread; `async def` handlers run on the process's
long-lived agent loop (mailbox/agent_loop.py), the execute thread waiting for them, so both
kinds share the heartbeat, the stops and the judging. What an agent's ending means:

- a returned value or `AgentResult` → completed (text as it is, other JSON as its JSON text);
- `TransientError` or any unexpected exception → a transient failure (retried);
- `PermanentError`, or a result that cannot be stored as given → a permanent failure, with
  an error that says what to do;
- after a stop (`mailbox.heartbeat.StopKind`): cancel means stop, a timeout or an unsafe
  stop is a transient failure, whatever the agent then did. A stop decided after the handler
  ended changes nothing: what it returned (or raised) stands.

An agent that ignores a stop past the grace is abandoned: the heartbeat ends the attempt for
it and the process is reported stuck (`Runtime.stuck`) until the agent's code has really
ended. A plain agent holds the execute thread until then (Celery's hard time limit is the
bound). An async agent's coroutine is let go on the shared loop and watched: still running a
grace after its abandonment, it has poisoned the loop, and the process is recycled
(`Runtime.recycle`; docs/behaviour.md#abandonment).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailbox import agents, metrics
from mailbox.agent_loop import AGENT_LOOP, AgentTask, BufferedEmitter
from mailbox.agents import AGENT_ROLES, AgentContext, AgentResult, SuspendRequested
from mailbox.context import COMPLETED, PERMANENT, TRANSIENT, OutcomeKind, PhaseContext
from mailbox.errors import PermanentError, TransientError, ValidationError
from mailbox.heartbeat import CancelCheck, Heartbeat, StopKind
from mailbox.model import Termination, show_value
from mailbox.runtime import Runtime
from mailbox.store import encode_input

log = logging.getLogger(__name__)


def classify(error: BaseException) -> OutcomeKind:
    """PermanentError is permanent, everything else transient (an unexpected exception is
    presumed to be a hiccup worth a bounded retry)."""
    return PERMANENT if isinstance(error, PermanentError) else TRANSIENT


def error_text(error: BaseException) -> str:
    if isinstance(error, TransientError | PermanentError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """An agent's text as every database can keep it: NUL (refused by PostgreSQL's text and
    jsonb) and lone surrogates (not UTF-8, refused by both drivers) become U+FFFD, in strings
    nested in lists and dicts too. Without this, one odd character in a model's answer makes
    the outcome write fail with a driver error, and the attempt waits out its lease."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


@dataclass
class AgentOutcome:
    """What one run of the agent came to, inside execute (never in a message)."""

    kind: OutcomeKind
    error: str | None = None
    termination: Termination | None = None
    response: str | None = None
    waiting: dict[str, Any] | None = None
    turns: list[tuple[str, Any]] = field(default_factory=list)
    """(role, content) the agent took before its answer (AgentResult.messages)."""
    abandoned: bool = False
    """The heartbeat already ended the attempt for an agent that did not stop in time."""


def run_agent(rt: Runtime, ctx: PhaseContext, spec: agents.AgentSpec, input_: Any,
              decision: Any, on_abandon: Callable[[AgentOutcome], None]) -> AgentOutcome:
    """Run the agent with a heartbeat beside it; what it came to. `on_abandon(outcome)` is
    called on the heartbeat's thread when the agent ignored a stop past the grace: the
    caller ends the attempt with that outcome there (the agent may never return)."""
    cancel = threading.Event()
    rt.active[ctx.dispatch_id] = cancel
    running: list[AgentTask] = []  # an async agent's task, to cancel

    def on_stop(reason: str, kind: StopKind) -> None:
        ctx.stop_reason = reason
        ctx.stop_kind = kind.value
        cancel.set()
        for task in running:
            task.cancel()  # the coroutine sees asyncio.CancelledError at its next await

    check: CancelCheck | None = None
    if rt.cancel_check is not None:
        signal = rt.cancel_check

        def check() -> str | None:
            return signal(ctx.thread_id, ctx.token)

    emitter = BufferedEmitter(rt.events, ctx.run_id, ctx.dispatch_id, rt.clock,
                              thread_id=ctx.thread_id)
    on_loop = threading.Event()  # set while a coroutine runs: emits must not wait on Redis

    def emit(type_: str, data: Any) -> None:
        if heartbeat.abandoned:  # the attempt was ended and reported: nothing may follow
            return
        if on_loop.is_set():
            emitter.emit(type_, data)
        else:
            rt.events.emit(ctx.run_id, ctx.dispatch_id, type_, data, ts=rt.clock(),
                           thread_id=ctx.thread_id)

    agent_ctx = AgentContext(
        run_id=ctx.run_id, thread_id=ctx.thread_id, dispatch_id=ctx.dispatch_id,
        attempt=ctx.attempt, input=input_, decision=decision,
        load_messages=lambda: rt.runs.history(
            ctx.thread_id, ctx.run_id, limit=rt.settings.history_limit,
            max_bytes=rt.settings.history_max_bytes),
        emit=emit, cancel_event=cancel)
    timeout_s = spec.timeout_or(rt.settings.agent_timeout_s)
    grace_s = rt.settings.agent_timeout_grace_s
    stuck = _StuckReport(rt, ctx.dispatch_id)

    def abandon(reason: str, kind: StopKind) -> None:
        stuck.mark()
        on_abandon(stopped(kind, reason, None, grace_s))

    heartbeat = Heartbeat(rt.store, dispatch_id=ctx.dispatch_id, token=ctx.token,
                          lease_ms=rt.settings.lease_ms, clock=rt.clock, on_stop=on_stop,
                          cancel_check=check, timeout_ms=int(timeout_s * 1000),
                          grace_ms=grace_s * 1000, on_abandon=abandon)
    value: Any = None
    failure: BaseException | None = None
    still_running: AgentTask | None = None
    try:
        with heartbeat:
            try:
                value = spec.handler(agent_ctx)
                if inspect.isawaitable(value):  # async def, or a callable returning one
                    on_loop.set()
                    value = _await(value, running, cancel, heartbeat)
            finally:
                # The handler's ending, fixed now (an async one's at the coroutine's end, on
                # the loop): a stop the heartbeat decides from here on changes nothing.
                heartbeat.end()
    except SuspendRequested as suspend:
        value = suspend
    except _Abandoned as abandoned:
        still_running = abandoned.task
    except (Exception, asyncio.CancelledError) as exc:  # the agent's failure is data here
        failure = exc
    finally:
        rt.active.pop(ctx.dispatch_id, None)
        emitter.close()  # its output goes out before whatever ends the run
    if heartbeat.abandoned:
        if still_running is None:
            stuck.clear()  # a plain agent: it has returned now
        else:
            _let_go(rt, ctx, spec, still_running, grace_s, stuck)
        return AgentOutcome(COMPLETED, abandoned=True)
    if heartbeat.stop_kind is not None:  # decided before the handler ended
        return stopped(heartbeat.stop_kind, heartbeat.stop_reason or "", value, None)
    if failure is not None:
        if isinstance(failure, asyncio.CancelledError):  # cancelled, but not by us
            return AgentOutcome(TRANSIENT, "the agent's coroutine was cancelled")
        return AgentOutcome(classify(failure), storable(error_text(failure)))
    if isinstance(value, SuspendRequested):
        ticket = storable(dict(value.ticket, since_dispatch_id=ctx.dispatch_id))
        return AgentOutcome(COMPLETED, termination=Termination.suspended(), waiting=ticket)
    try:
        termination, response = result_of(value)
        turns = turns_of(value)
    except InvalidAgentResultError as exc:
        return AgentOutcome(PERMANENT, storable(f"invalid agent result: {exc}"))
    error = termination.value if termination.type == "error" else None
    return AgentOutcome(COMPLETED, error, termination, response, turns=turns)


class _StuckReport:
    """`Runtime.stuck` for one attempt: marked when the attempt is abandoned, cleared once
    the agent's code has really ended. The two come from different threads (the heartbeat's;
    the execute thread or the watchdog of a let-go coroutine) and race when the agent ends
    just as it is abandoned: a clear that comes first leaves nothing to mark, so no marker
    is left behind for an agent that no longer runs."""

    def __init__(self, rt: Runtime, dispatch_id: str) -> None:
        self._report = rt.stuck
        self._dispatch_id = dispatch_id
        self._lock = threading.Lock()
        self._marked = False
        self._over = False

    def mark(self) -> None:
        with self._lock:
            if not self._over and not self._marked:
                self._marked = True
                self._report(self._dispatch_id, True)

    def clear(self) -> None:
        with self._lock:
            self._over = True
            if self._marked:
                self._marked = False
                self._report(self._dispatch_id, False)


def _let_go(rt: Runtime, ctx: PhaseContext, spec: agents.AgentSpec, task: AgentTask,
            grace_s: float, stuck: _StuckReport) -> None:
    """An abandoned coroutine still runs on the shared loop, where nothing outside it can
    end it. The execute thread does not wait for it (the worker slot is free), but the
    process stays reported stuck until it ends; still running a grace later — the point
    where Celery's hard limit would have ended a plain agent's process — it has poisoned
    the loop, and the process is recycled."""
    described = f"the coroutine of agent {spec.name}@{spec.version} (dispatch " \
                f"{ctx.dispatch_id}, {ctx.stop_reason})"

    def overdue() -> None:
        metrics.count_operation("abandoned_coroutine", "overdue")
        reason = f"{described} still runs {grace_s:g} s after its attempt was abandoned: " \
                 f"the agent loop is poisoned"
        log.error("%s; recycling this process", reason)
        try:
            rt.recycle(reason)
        except Exception:  # the runtime's hook; the watchdog goes on watching
            log.exception("recycling the process failed")

    def ended() -> None:
        metrics.count_operation("abandoned_coroutine", "ended")
        log.warning("%s ended after its attempt was abandoned; its result is discarded",
                    described)
        stuck.clear()

    AGENT_LOOP.let_go(task, grace_s, name=ctx.dispatch_id, on_end=ended, on_overdue=overdue)


class _Abandoned(Exception):
    """The heartbeat ended the attempt of an async agent that ignored its stop; `task` is
    its coroutine, still running."""

    def __init__(self, task: AgentTask) -> None:
        super().__init__()
        self.task = task


def _await(awaitable: Any, running: list[AgentTask], cancel: threading.Event,
           heartbeat: Heartbeat) -> Any:
    """Run the coroutine on the process's agent loop and wait, from this thread, until it
    has ended. A stop cancels it (on_stop cancels `running`), and the wait lasts through its
    clean-up; one that swallows the cancellation is let go once the heartbeat abandons the
    attempt: it goes on on the loop, this worker slot does not wait for it. The handler's
    ending is marked on the loop the moment the coroutine ends (`Heartbeat.end`), not when
    this thread next looks."""
    task = AGENT_LOOP.start(_as_coroutine(awaitable), on_end=heartbeat.end)
    running.append(task)
    if cancel.is_set():
        task.cancel()  # stopped before the coroutine was handed over
    while not task.wait(0.05):
        if heartbeat.abandoned:
            raise _Abandoned(task)
    return task.result()


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


class InvalidAgentResultError(Exception):
    """What an agent returned cannot be stored as its result (not a cancellation, not a
    retryable failure: the same code returns the same thing)."""


def turns_of(value: Any) -> list[tuple[str, Any]]:
    """AgentResult.messages as (role, content), checked: each an object with a role an agent
    may write and JSON content within the input size limit."""
    if not isinstance(value, AgentResult):
        return []
    if isinstance(value.messages, str | bytes | Mapping) or not isinstance(
            value.messages, Sequence):
        raise InvalidAgentResultError(f"AgentResult.messages must be a list of messages, got "
                                      f"{type(value.messages).__name__}")
    turns = []
    for i, message in enumerate(value.messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in AGENT_ROLES:
            raise InvalidAgentResultError(
                f"AgentResult.messages[{i}] must be {{'role': one of {', '.join(AGENT_ROLES)}"
                f", 'content': ...}}, got {show_value(message)}")
        content = storable(message.get("content"))
        try:
            encode_input(content)
        except ValidationError as exc:
            raise InvalidAgentResultError(f"AgentResult.messages[{i}].content: "
                                          f"{exc.message}") from None
        turns.append((str(role), content))
    return turns


def result_of(value: Any) -> tuple[Termination, str | None]:
    """An agent's return value as (termination, response), or InvalidAgentResultError that
    says what was wrong and what to return instead."""
    if isinstance(value, AgentResult):
        termination = value.termination
        if not isinstance(termination, Termination):
            raise InvalidAgentResultError(
                f"AgentResult.termination must be a Termination, got "
                f"{type(termination).__name__}")
        if termination.type == "suspended":
            raise InvalidAgentResultError(
                "a suspended termination cannot be returned: use ctx.suspend(action, "
                "message, parameters) to wait for a decision")
        if termination.value is not None:
            termination = Termination(termination.type, storable(termination.value))
        return termination, response_text(value.response, "AgentResult.response")
    return Termination.natural_end(), response_text(value, "the agent's return value")


def response_text(value: Any, what: str) -> str | None:
    """Text as it is; any other JSON value as its JSON text (None and "" as no response)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return str(storable(value))
    try:
        return str(storable(json.dumps(value, allow_nan=False)))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidAgentResultError(
            f"{what} is a {type(value).__name__}, which is neither text nor JSON ({exc}): "
            f"return a string, a JSON value or AgentResult(response=...)") from None


def partial_response(value: Any) -> str | None:
    """What a stopped agent returned, kept when it is text (an answer cut short)."""
    if isinstance(value, AgentResult):
        value = value.response
    try:
        return response_text(value, "the response") if isinstance(value, str) else None
    except InvalidAgentResultError:
        return None


def stopped(kind: StopKind, reason: str, value: Any, abandoned_after_s: int | None
             ) -> AgentOutcome:
    """What an attempt the heartbeat stopped comes to, whatever the agent did once told to
    stop (returned, raised, suspended): `value` is what it returned, if anything.

    - cancel, interrupt, lost lease: cancel means stop, the run ends cancelled (a lost
      lease's write is fenced off anyway); text it returned is kept as its partial answer;
    - timeout: a transient failure, "timed out after N s" (a hanging agent dead-letters once
      its attempts are spent);
    - unsafe (renewals or cancel checks failing for a lease): nobody asked the run to stop,
      so not a cancellation: a transient failure, retried.
    `abandoned_after_s`: the agent did not return within that grace; the heartbeat ends the
    attempt for it."""
    late = "" if abandoned_after_s is None else \
        f"; the agent did not stop within {abandoned_after_s} s and was abandoned"
    if kind == StopKind.timeout:
        return AgentOutcome(TRANSIENT, f"{reason}{late}")
    if kind == StopKind.unsafe:
        return AgentOutcome(TRANSIENT, f"attempt stopped: {reason}{late}")
    return AgentOutcome(COMPLETED, termination=Termination.cancelled(),
                        response=partial_response(value))


