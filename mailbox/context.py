"""The context one claimed dispatch carries through its five phases (docs/architecture.md#pipeline).

Celery chains the phases by passing each one's result to the next in a broker message, so the
context must survive JSON both ways, and anyone who can write to the broker can forge one.
`PhaseContext` is that context with a declared shape: `to_message()` gives the JSON object a
phase returns, `from_message()` checks a received object against the declared fields (types,
ids like `dispatch.delay` checks them, a token as the store issues them) and refuses anything
else with `MalformedContextError`, before any phase runs. Nothing that is not JSON is ever in
it: the agent's full result stays inside the execute phase, which records it.

Unknown keys are ignored, so a worker of the previous version, mid rolling deploy, can finish
a chain started by a newer one (and the other way round, for fields a version adds).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args, get_origin

from mailbox.errors import ValidationError
from mailbox.model import MAX_MS, RunDispatch, check_text

COMPLETED: Final = "completed"
TRANSIENT: Final = "transient_error"
PERMANENT: Final = "permanent_error"
DEFERRED: Final = "deferred"
OutcomeKind = Literal["completed", "transient_error", "permanent_error", "deferred"]
OUTCOME_KINDS: tuple[str, ...] = (COMPLETED, TRANSIENT, PERMANENT, DEFERRED)
MAX_TOKEN_CHARS = 64  # the claim_token column's width (mailbox/schema.py)
MAX_TEXT_CHARS = 64 * 1024  # reasons and errors travelling in a message


class MalformedContextError(ValidationError):
    """A phase message that cannot be a context we sent. Nothing was run or written."""

    prefix = "malformed phase context"


@dataclass
class Outcome:
    """What the attempt came to, as settle needs it.

    `completed`: the agent returned (or suspended) and execute recorded the run's outcome
    (`recorded`), or reconstruct found the run already done by an earlier attempt that died
    before its ack (`replayed`). `transient_error` / `permanent_error`: `error` says why;
    settle records it, then nacks or dead-letters. `deferred`: the pinned agent version is
    not on this worker (`error` names it); nothing ran, settle puts the dispatch back.
    """

    kind: OutcomeKind
    error: str | None = None
    recorded: bool = False
    replayed: bool = False


@dataclass
class PhaseContext:
    """One claimed dispatch on its way through verify → reconstruct → resolve → execute →
    settle. Set by the claim: the ids, the claim token and the claim's times. Added by the
    phases: the rest."""

    dispatch_id: str
    thread_id: str
    run_id: str
    token: str
    attempt: int
    epoch: int
    created_at: int
    available_at: int
    claimed_at: int
    done: bool = False
    """The dispatch needs nothing more from this chain (finished, fenced, refused); later
    phases pass the context on and settle only wakes the thread."""
    reason: str | None = None
    """Why `done` was set (for logs and tests)."""
    instance_id: str | None = None
    """This attempt's runtime invocation id (reconstruct)."""
    started_at: int | None = None
    run_checked: bool = False
    """The claim read the run (`phases.claim_next`): reconstruct has the next three fields
    and `resolution_id` without a read of its own."""
    run_error: str | None = None
    """Why the run cannot be rebuilt (missing, another thread's, no input): a dead letter."""
    run_done: bool = False
    """An earlier attempt finished the run and died before its ack: settle, do not re-run."""
    resolution_id: str | None = None
    resumed: bool = False
    """The run was waiting for a decision and this dispatch resumes it."""
    agent: list[str] | None = None
    """[name, version] of the pinned agent, found on this worker (resolve)."""
    resolve_error: str | None = None
    """Why the pinned agent cannot be run (resolve); execute makes it the attempt's
    permanent failure."""
    outcome: Outcome | None = None
    duplicate: bool = False
    """Another delivery of this same attempt runs it, or settled it: say nothing, wake
    nothing."""
    stop_reason: str | None = None
    stop_kind: str | None = None
    """Why the heartbeat stopped the agent (mailbox.heartbeat.StopKind values)."""
    settled: str | None = None
    """The outcome kind settle wrote (ack, nack or dead letter)."""
    traceparent: str | None = None
    """The dispatch's trace (mailbox/tracing.py), when tracing is on."""

    @classmethod
    def from_claim(cls, dispatch: RunDispatch) -> PhaseContext:
        assert dispatch.claim_token is not None and dispatch.updated_at is not None
        return cls(dispatch.dispatch_id, dispatch.thread_id, dispatch.run_id,
                   dispatch.claim_token, dispatch.attempt_count, dispatch.dispatch_epoch,
                   dispatch.created_at, dispatch.available_at, dispatch.updated_at,
                   traceparent=dispatch.traceparent)

    def finish(self, reason: str) -> PhaseContext:
        """Mark the chain finished for the dispatch; later phases only pass it on."""
        self.done = True
        self.reason = reason
        return self

    def to_message(self) -> dict[str, Any]:
        """The JSON object a phase returns (fields at their defaults are left out)."""
        message: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _REQUIRED or value != f.default:
                message[f.name] = dataclasses.asdict(value) if isinstance(value, Outcome) \
                    else value
        return message

    @classmethod
    def from_message(cls, message: Any) -> PhaseContext:
        """The context in a received message; MalformedContextError names the first field
        that cannot be one we sent."""
        if not isinstance(message, dict):
            raise MalformedContextError(f"phase context must be an object, got "
                                        f"{type(message).__name__}")
        values: dict[str, Any] = {}
        for name, kind in _FIELDS.items():
            if name not in message:
                if name in _REQUIRED:
                    raise MalformedContextError(f"field {name!r} is missing")
                continue
            values[name] = _check(name, kind, message[name])
        return cls(**values)

    def describe(self) -> str:
        """What logs and Flower show for a phase: ids only, never tokens or payloads."""
        return f"dispatch={self.dispatch_id} thread={self.thread_id}"


def _check(name: str, kind: Any, value: Any) -> Any:
    """`value` as field `name` of type `kind`, or MalformedContextError."""
    if get_origin(kind) in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = [k for k in get_args(kind) if k is not type(None)]
        return _check(name, inner, value)
    if kind is Outcome:
        return _outcome(name, value)
    if get_origin(kind) is list:
        if not isinstance(value, list) or len(value) != 2:
            raise MalformedContextError(f"field {name!r} must be a [name, version] pair")
        return [_id(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if kind is bool:
        if not isinstance(value, bool):
            raise MalformedContextError(f"field {name!r} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MS:
            raise MalformedContextError(f"field {name!r} must be an integer within "
                                        f"0..{MAX_MS}")
        return value
    if name in _IDS:
        return _id(name, value)
    if name == "traceparent":
        if not isinstance(value, str) or not _TRACEPARENT.fullmatch(value):
            raise MalformedContextError("field 'traceparent' is not a W3C traceparent")
        return value
    if name == "token":
        value = _id(name, value)
        if len(value) > MAX_TOKEN_CHARS:
            raise MalformedContextError(f"field 'token' is longer than {MAX_TOKEN_CHARS} "
                                        f"characters: not a claim token")
        return value
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
        raise MalformedContextError(f"field {name!r} must be a string of at most "
                                    f"{MAX_TEXT_CHARS} characters")
    return value


def _id(name: str, value: Any) -> str:
    try:
        return str(check_text(f"'{name}'", value))
    except ValidationError as exc:
        raise MalformedContextError(f"field {exc.message}") from None


def _outcome(name: str, value: Any) -> Outcome:
    if not isinstance(value, dict):
        raise MalformedContextError(f"field {name!r} must be an object")
    kind = value.get("kind")
    if kind not in OUTCOME_KINDS:
        raise MalformedContextError(f"field '{name}.kind' must be one of "
                                    f"{', '.join(OUTCOME_KINDS)}")
    error = value.get("error")
    if error is not None and (not isinstance(error, str) or len(error) > MAX_TEXT_CHARS):
        raise MalformedContextError(f"field '{name}.error' must be a string")
    flags = {}
    for flag in ("recorded", "replayed"):
        if not isinstance(value.get(flag, False), bool):
            raise MalformedContextError(f"field '{name}.{flag}' must be true or false")
        flags[flag] = bool(value.get(flag, False))
    return Outcome(kind, error, **flags)


_HINTS = typing.get_type_hints(PhaseContext)
_FIELDS: dict[str, Any] = {f.name: _HINTS[f.name] for f in dataclasses.fields(PhaseContext)}
_REQUIRED = frozenset(f.name for f in dataclasses.fields(PhaseContext)
                      if f.default is dataclasses.MISSING)
_IDS = frozenset({"dispatch_id", "thread_id", "run_id", "instance_id", "resolution_id"})
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

__all__ = ["COMPLETED", "PERMANENT", "TRANSIENT", "MalformedContextError", "Outcome",
           "OutcomeKind", "PhaseContext"]
