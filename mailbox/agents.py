"""Agents: named, versioned handlers, and the context a run gives them (docs/behaviour.md#execute).

`@agent("name", version="1")` registers `handler(ctx)`, a plain function or an `async def`
one (run on the process's agent loop, mailbox/agent_loop.py). It returns the run's answer: a
string as it is, any other JSON value (object, list, number, bool) stored as its JSON text,
None for no answer, or `AgentResult` for a termination of its own and turns before the
answer (docs/behaviour.md#outcomes); `ctx.suspend(...)` waits for a human instead. At submit
a run is pinned to the agent's current (name, version); the resolve phase loads exactly that
pair, so deploying a new version never changes what an already-queued run meant. An agent
raises `TransientError` to be retried with backoff or `PermanentError` to be dead-lettered;
anything else it raises counts as transient.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailbox.errors import ValidationError
from mailbox.model import Termination

if TYPE_CHECKING:
    from mailbox.store import Message

Handler = Callable[["AgentContext"], Any]
InputCheck = Callable[[Any], None]


MAX_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class AgentSpec:
    name: str
    version: str
    handler: Handler
    check_input: InputCheck | None = None
    timeout_s: float | None = None
    """How long one attempt may run (None: MAILBOX_AGENT_TIMEOUT_S). Past it the agent is
    told to stop (`ctx.cancelled()`), and past a grace period more the attempt is abandoned
    as a transient failure, "timed out after N s" (docs/behaviour.md#time-limits)."""

    def timeout_or(self, default_s: float) -> float:
        return default_s if self.timeout_s is None else self.timeout_s

    @property
    def is_async(self) -> bool:
        """An `async def` handler (or a callable object with an `async def __call__`): it
        runs on the process's agent loop (mailbox/agent_loop.py)."""
        handler = self.handler
        return inspect.iscoroutinefunction(handler) or (
            not inspect.isroutine(handler)
            and inspect.iscoroutinefunction(type(handler).__call__))

    @property
    def resolution_id(self) -> str:
        return f"{self.name}@{self.version}"


AGENT_ROLES = ("assistant", "tool", "system")
"""Roles an agent may write into the conversation (`user` and `decision` come from people)."""


@dataclass(frozen=True)
class AgentResult:
    """What a handler may return instead of a plain string.

    `messages` are the turns the agent took before its answer — tool calls, tool results —
    each `{"role": "assistant" | "tool" | "system", "content": <JSON>}`. They are appended to
    the thread's conversation before the answer, atomically with the run's outcome."""

    response: str | None = None
    termination: Termination = field(default_factory=Termination.natural_end)
    messages: Sequence[Mapping[str, Any]] = ()


class SuspendRequested(Exception):
    """Raised by `ctx.suspend`: ends the attempt with the run waiting for a decision."""

    def __init__(self, ticket: dict[str, Any]) -> None:
        super().__init__(ticket.get("action", "suspend"))
        self.ticket = ticket


_REGISTRY: dict[tuple[str, str], AgentSpec] = {}
_CURRENT: dict[str, str] = {}


def agent(name: str, version: str = "1", *, check_input: InputCheck | None = None,
          timeout_s: float | None = None) -> Callable[[Handler], Handler]:
    """Register the decorated function — plain or `async def` — as agent `name` at
    `version`. The latest registration of a name is its current version, the one new runs
    pin. `check_input(input)` may raise
    ValidationError to refuse a bad input at submit, before anything is written.
    `timeout_s` bounds one attempt (default MAILBOX_AGENT_TIMEOUT_S)."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("agent name must not be empty")
    if not isinstance(version, str) or not version.strip() or "@" in version:
        raise ValidationError("agent version must be a non-empty string without '@'")
    if timeout_s is not None and (isinstance(timeout_s, bool)
                                  or not isinstance(timeout_s, int | float)
                                  or not 0 < timeout_s <= MAX_TIMEOUT_S):
        raise ValidationError(f"agent {name!r}: timeout_s must be a number of seconds within "
                              f"(0, {MAX_TIMEOUT_S}], got {timeout_s!r}")

    def register(handler: Handler) -> Handler:
        if not callable(handler):
            raise ValidationError(f"agent {name!r} handler must be callable")
        _REGISTRY[(name, version)] = AgentSpec(name, version, handler, check_input,
                                               None if timeout_s is None else float(timeout_s))
        _CURRENT[name] = version
        return handler

    return register


def current(name: str) -> AgentSpec:
    """The version new runs of `name` pin to; ValidationError for an unknown agent."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("agent must be a non-empty agent name")
    version = _CURRENT.get(name)
    if version is None:
        known = ", ".join(sorted(_CURRENT)) or "none"
        raise ValidationError(f"unknown agent {name!r} (registered: {known})")
    return _REGISTRY[(name, version)]


def lookup(name: str, version: str) -> AgentSpec | None:
    """Exactly the pinned (name, version), or None when this process does not have it."""
    return _REGISTRY.get((name, version))


def load_agent_modules(modules: str | None) -> list[str]:
    """Import the comma-separated modules that define agents (MAILBOX_AGENT_MODULES), so a
    worker and a submitting client know the same agents. A module that cannot be imported
    is a configuration error, raised with its name."""
    loaded = []
    for name in (m.strip() for m in (modules or "").split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValidationError(f"MAILBOX_AGENT_MODULES: cannot import {name!r}: {exc}"
                                  ) from exc
        loaded.append(name)
    return loaded


def registered() -> list[AgentSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: (s.name, s.version))


class AgentContext:
    """What a handler sees of its run. Built by the execute phase for one attempt."""

    def __init__(self, *, run_id: str, thread_id: str, dispatch_id: str, attempt: int,
                 input: Any, decision: Any, load_messages: Callable[[], Sequence[Message]],
                 emit: Callable[[str, Any], None], cancel_event: threading.Event) -> None:
        self.run_id = run_id
        self.thread_id = thread_id
        self.dispatch_id = dispatch_id
        self.attempt = attempt
        self.input = input
        self.decision = decision
        self._load_messages = load_messages
        self._messages: list[Message] | None = None
        self._emit = emit
        self._cancel = cancel_event

    @property
    def messages(self) -> list[Message]:
        """The conversation so far, oldest first, this run's input included: message objects
        with `role` (user, assistant, decision, tool, system), `content`, `run_id`, `seq`
        and `created_at`; the agent's own earlier answers are there. A window: the newest
        MAILBOX_HISTORY_LIMIT messages within MAILBOX_HISTORY_MAX_BYTES, loaded on first
        use (docs/behaviour.md#conversation)."""
        if self._messages is None:
            self._messages = list(self._load_messages())
        return self._messages

    def emit(self, type: str, data: Any = None) -> None:
        """Publish an `output` event on the run's stream (`type` goes into the data)."""
        self._emit("output", {"kind": type, "data": data})

    def cancelled(self) -> bool:
        """True once the run was interrupted or cancelled, or its lease was lost: stop soon."""
        return self._cancel.is_set()

    def suspend(self, action: str, message: str | None = None,
                parameters: dict[str, Any] | None = None) -> None:
        """End this attempt and wait for a human decision (see `Mailbox.resume`)."""
        raise SuspendRequested({"action": action, "message": message,
                                "parameters": parameters or {}})
