"""The data model of the mailbox and every state transition (docs/behaviour.md#lifecycle,
docs/behaviour.md#transitions).

This module is the only place a dispatch changes state: each transition T1-T17 is one
method of `RunDispatch` that returns a new, validated record (records are
immutable). The store loads a row, asks the model for the next record and writes it back, so
the rules live here once and the SQL stays dumb. Every transition ends with
`validate_for_persist`, which is how the record invariants (docs/behaviour.md#record-invariants)
are checked on every write.

Times are integer Unix milliseconds passed in by the caller; nothing here reads the clock.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mailbox.errors import ValidationError

JsonDict = dict[str, Any]

PRIORITY_MIN = 0
PRIORITY_MAX = 255
DEFAULT_PRIORITY = 128
DEFAULT_MAX_ATTEMPTS = 5
# Upper bound of every millisecond time and duration: far beyond any real clock (about
# 285,000 years), and small enough that `now + lease_ms` can never overflow a SQL BIGINT.
MAX_MS = 2**53 - 1
MAX_ID_CHARS = 255  # the id columns' width (mailbox/schema.py)


class DispatchStatus(enum.StrEnum):
    """Lifecycle of one dispatch. Values are PascalCase names, stored as they are."""

    Queued = "Queued"
    Claimed = "Claimed"
    Acked = "Acked"
    Cancelled = "Cancelled"
    Superseded = "Superseded"
    DeadLetter = "DeadLetter"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def label(self) -> str:
        """Lower snake name used for metric and event labels."""
        return _STATUS_LABELS[self]

    def __str__(self) -> str:
        return self.value


_STATUS_LABELS = {
    DispatchStatus.Queued: "queued",
    DispatchStatus.Claimed: "claimed",
    DispatchStatus.Acked: "acked",
    DispatchStatus.Cancelled: "cancelled",
    DispatchStatus.Superseded: "superseded",
    DispatchStatus.DeadLetter: "dead_letter",
}

TERMINAL_STATUSES: tuple[DispatchStatus, ...] = (
    DispatchStatus.Acked,
    DispatchStatus.Cancelled,
    DispatchStatus.Superseded,
    DispatchStatus.DeadLetter,
)
"""The one definition of "terminal": every check, query and index derives from it."""
LIVE_STATUSES: tuple[DispatchStatus, ...] = (DispatchStatus.Queued, DispatchStatus.Claimed)
RECONCILED_STATUSES: tuple[DispatchStatus, ...] = (
    DispatchStatus.Cancelled,
    DispatchStatus.Superseded,
    DispatchStatus.DeadLetter,
)
"""Terminal statuses that end the run too (done/cancelled or done/error), reconciled from the
dispatch; an Acked dispatch leaves the run's outcome to what the attempt recorded."""


class RunStatus(enum.StrEnum):
    """Lifecycle of a run record. Only `done` is terminal."""

    created = "created"
    running = "running"
    waiting = "waiting"
    done = "done"

    def can_transition_to(self, other: RunStatus) -> bool:
        return other == self or other in _RUN_TRANSITIONS[self]

    def __str__(self) -> str:
        return self.value


_RUN_TRANSITIONS: dict[RunStatus, tuple[RunStatus, ...]] = {
    RunStatus.created: (RunStatus.running, RunStatus.done),
    RunStatus.running: (RunStatus.waiting, RunStatus.done),
    RunStatus.waiting: (RunStatus.running, RunStatus.done),
    RunStatus.done: (),
}


@dataclass(frozen=True)
class Termination:
    """Why a run ended (docs/behaviour.md#run-statuses). Serialized as ``{"type": ..., "value":
    ...}``.

    Build with the class methods; instances compare by value.
    """

    type: str
    value: Any = None

    KINDS = frozenset(
        {"natural_end", "behavior_requested", "stopped", "cancelled", "blocked", "suspended",
         "error"}
    )

    def __post_init__(self) -> None:
        if self.type not in self.KINDS:
            raise ValidationError(f"unknown termination type {self.type!r}")

    @classmethod
    def natural_end(cls) -> Termination:
        return cls("natural_end")

    @classmethod
    def behavior_requested(cls) -> Termination:
        return cls("behavior_requested")

    @classmethod
    def cancelled(cls) -> Termination:
        return cls("cancelled")

    @classmethod
    def suspended(cls) -> Termination:
        return cls("suspended")

    @classmethod
    def error(cls, message: str) -> Termination:
        return cls("error", str(message))

    @classmethod
    def blocked(cls, reason: str) -> Termination:
        return cls("blocked", str(reason))

    @classmethod
    def stopped(cls, code: str, detail: str | None = None) -> Termination:
        payload: JsonDict = {"code": str(code)}
        if detail is not None:
            payload["detail"] = str(detail)
        return cls("stopped", payload)

    def to_run_status(self) -> tuple[RunStatus, str | None]:
        """The run status and done-reason this termination implies
        (docs/behaviour.md#run-statuses)."""
        if self.type == "suspended":
            return RunStatus.waiting, None
        if self.type == "natural_end":
            return RunStatus.done, "natural"
        if self.type == "behavior_requested":
            return RunStatus.done, "behavior_requested"
        if self.type == "cancelled":
            return RunStatus.done, "cancelled"
        if self.type == "blocked":
            return RunStatus.done, f"blocked:{self.value}"
        if self.type == "stopped":
            return RunStatus.done, f"stopped:{self.value['code']}"
        return RunStatus.done, "error"

    @classmethod
    def from_done_reason(cls, reason: str) -> Termination:
        if reason == "natural":
            return cls.natural_end()
        if reason == "behavior_requested":
            return cls.behavior_requested()
        if reason == "cancelled":
            return cls.cancelled()
        for prefix, build in (("blocked:", cls.blocked), ("stopped:", cls.stopped),
                              ("error:", cls.error)):
            if reason.startswith(prefix):
                return build(reason[len(prefix):])
        return cls.error(reason)

    def to_json(self) -> JsonDict:
        out: JsonDict = {"type": self.type}
        if self.value is not None:
            out["value"] = self.value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Termination:
        if not isinstance(data, Mapping) or "type" not in data:
            raise ValidationError(f"termination must be an object with a type, got {data!r}")
        kind = "behavior_requested" if data["type"] == "plugin_requested" else data["type"]
        return cls(kind, data.get("value"))

    def __hash__(self) -> int:
        return hash((self.type, repr(self.value)))


def _blank(value: str | None) -> bool:
    return value is None or not str(value).strip()


def require_id(name: str, value: object) -> str:
    """Validate an identifier argument: a non-blank string."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{name} must not be empty")
    return value


def show_value(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}... ({len(text)} chars)"


def check_text(name: str, value: Any, *, optional: bool = False) -> Any:
    """An id or filter argument: text that every database can compare and store.

    Checked here, before any statement runs, because the drivers refuse such values only
    when they bind them, each with its own raw error (psycopg: "cannot adapt type", "text
    fields cannot contain NUL"; SQLite: "type 'list' is not supported"; both: a lone
    surrogate cannot be encoded), and PostgreSQL refuses a thread id over the column's 255
    characters only when an interrupt inserts its epoch row.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{name} must be a non-empty string, got {show_value(value)}")
    if len(value) > MAX_ID_CHARS:
        raise ValidationError(f"{name} must be at most {MAX_ID_CHARS} characters, got "
                              f"{len(value)}")
    if "\x00" in value:
        raise ValidationError(f"{name} must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValidationError(f"{name} must be valid Unicode text (it holds a lone "
                              f"surrogate): {show_value(value)}") from None
    return value


def require_ms(name: str, value: object) -> int:
    """Validate a millisecond time or duration: an integer within 0..MAX_MS."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MS:
        raise ValidationError(f"{name} must be an integer number of milliseconds within "
                              f"0..{MAX_MS}, got {value!r}")
    return value


@dataclass(frozen=True)
class RunDispatchResult:
    """The runtime outcome recorded on a dispatch by `record_run_result` (docs/behaviour.md#t5)."""

    run_id: str
    dispatch_instance_id: str
    status: RunStatus
    termination: Termination | None = None
    response: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", RunStatus(self.status))

    def to_json(self) -> JsonDict:
        return {
            "run_id": self.run_id,
            "dispatch_instance_id": self.dispatch_instance_id,
            "status": self.status.value,
            "termination": self.termination.to_json() if self.termination else None,
            "response": self.response,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunDispatchResult:
        term = data.get("termination")
        return cls(
            run_id=data["run_id"],
            dispatch_instance_id=data["dispatch_instance_id"],
            status=RunStatus(data["status"]),
            termination=Termination.from_json(term) if term else None,
            response=data.get("response"),
            error=data.get("error"),
        )


# Reasons written to last_error by the fencing transitions (T11-T17, docs/behaviour.md#transitions).
REASON_INTERRUPT = "queued dispatch superseded by interrupt"
REASON_STALE_QUEUED = "queued dispatch superseded by newer dispatch epoch"
REASON_STALE_START = "claimed dispatch superseded before runtime start"
REASON_STALE_RESULT = "claimed dispatch superseded before run result"
REASON_STALE_ACK = "claimed dispatch superseded before ack"
REASON_STALE_NACK = "claimed dispatch superseded before nack"
REASON_STALE_DEAD_LETTER = "claimed dispatch superseded before dead letter"
REASON_STALE_RENEWAL = "claimed dispatch superseded during lease renewal"
REASON_STALE_RECLAIM = "claimed dispatch lease expired after interrupt"
REASON_LEASE_EXHAUSTED = "lease expired; max attempts reached"

_CLAIM_CLEARED: JsonDict = {"claim_token": None, "claimed_by": None, "lease_until": None}
_PROJECTION_CLEARED: JsonDict = {
    "dispatch_instance_id": None,
    "run_status": None,
    "termination": None,
    "run_response": None,
    "run_error": None,
}
_PROJECTION_FIELDS = tuple(_PROJECTION_CLEARED)
_OMITTED_WHEN_NONE = (*_PROJECTION_FIELDS, "completed_at", "deferred_since", "traceparent")


@dataclass(frozen=True)
class RunDispatch:
    """One delivery attempt-chain for one run activation (docs/behaviour.md#dispatch-statuses).

    It holds queue, lease, retry and audit state; the business outcome lives on the run record,
    with a compact projection of it here (`run_status`, `termination`, `run_response`,
    `run_error`).
    """

    dispatch_id: str
    thread_id: str
    run_id: str
    priority: int = DEFAULT_PRIORITY
    dedupe_key: str | None = None
    dispatch_epoch: int = 0
    status: DispatchStatus = DispatchStatus.Queued
    available_at: int = 0
    attempt_count: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    last_error: str | None = None
    claim_token: str | None = None
    claimed_by: str | None = None
    lease_until: int | None = None
    dispatch_instance_id: str | None = None
    run_status: RunStatus | None = None
    termination: Termination | None = None
    run_response: str | None = None
    run_error: str | None = None
    completed_at: int | None = None
    created_at: int = 0
    updated_at: int = 0
    deferred_since: int | None = None
    """When a worker first found this dispatch's pinned agent version missing (a deploy in
    progress, T19); cleared when an attempt starts."""
    traceparent: str | None = None
    """The W3C traceparent of the span that submitted it, when tracing is on: its claim and
    phases join that trace (mailbox/tracing.py)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", DispatchStatus(self.status))
        if self.run_status is not None:
            object.__setattr__(self, "run_status", RunStatus(self.run_status))

    # ----------------------------------------------------------------------------- building
    @classmethod
    def queued(
        cls,
        dispatch_id: str,
        thread_id: str,
        run_id: str,
        created_at: int,
        *,
        priority: int = DEFAULT_PRIORITY,
        dedupe_key: str | None = None,
        available_at: int | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        attempt_count: int = 0,
        traceparent: str | None = None,
    ) -> RunDispatch:
        """A new Queued dispatch; `available_at` and `updated_at` default to `created_at`."""
        return cls(
            dispatch_id=dispatch_id,
            thread_id=thread_id,
            run_id=run_id,
            priority=priority,
            dedupe_key=dedupe_key,
            available_at=created_at if available_at is None else available_at,
            attempt_count=attempt_count,
            max_attempts=max_attempts,
            created_at=created_at,
            updated_at=created_at,
            traceparent=traceparent,
        )

    def replace(self, **changes: Any) -> RunDispatch:
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------------------- predicates
    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    def is_stale(self, thread_epoch: int) -> bool:
        """True when an interrupt moved the thread past this dispatch's epoch."""
        return self.dispatch_epoch < thread_epoch

    # --------------------------------------------------------------------------- invariants
    def _validate_identity(self) -> None:
        for name in ("dispatch_id", "thread_id", "run_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"{name} must not be empty")
        for name in ("priority", "dispatch_epoch", "available_at", "attempt_count",
                     "max_attempts", "created_at", "updated_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MS:
                raise ValidationError(f"{name} must be an integer within 0..{MAX_MS}, got "
                                      f"{value!r}")
        for name in ("lease_until", "completed_at", "deferred_since"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= 2 * MAX_MS):
                raise ValidationError(f"{name} must be an integer within 0..{2 * MAX_MS}, got "
                                      f"{value!r}")
        if not PRIORITY_MIN <= self.priority <= PRIORITY_MAX:
            raise ValidationError(
                f"priority must be within {PRIORITY_MIN}..{PRIORITY_MAX} (0 is highest), "
                f"got {self.priority}"
            )
        if self.max_attempts <= 0:
            raise ValidationError(f"max_attempts must be greater than 0, got {self.max_attempts}")
        if self.attempt_count > self.max_attempts:
            raise ValidationError(
                f"attempt_count {self.attempt_count} exceeds max_attempts {self.max_attempts}"
            )
        if self.dedupe_key is not None and not self.dedupe_key.strip():
            raise ValidationError("dedupe_key must not be blank when given")

    def validate_for_persist(self) -> RunDispatch:
        """Check the record invariants (docs/behaviour.md#record-invariants) for this record's
        status; return self."""
        self._validate_identity()
        has_claim = any(getattr(self, f) is not None for f in _CLAIM_CLEARED)
        if self.status == DispatchStatus.Queued:
            if has_claim:
                raise ValidationError("queued dispatch must not carry claim fields")
            if self.completed_at is not None:
                raise ValidationError("queued dispatch must not carry completed_at")
            if any(getattr(self, f) is not None for f in _PROJECTION_FIELDS):
                raise ValidationError("queued dispatch must not carry runtime result fields")
        elif self.status == DispatchStatus.Claimed:
            if _blank(self.claim_token) or _blank(self.claimed_by):
                raise ValidationError("claimed dispatch requires a claim_token and claimed_by")
            if self.lease_until is None:
                raise ValidationError("claimed dispatch requires lease_until")
        else:
            if has_claim:
                raise ValidationError(f"{self.status} dispatch must not carry claim fields")
            if self.completed_at is None:
                raise ValidationError(f"{self.status} dispatch requires completed_at")
        return self

    def validate_for_enqueue(self) -> RunDispatch:
        if self.status != DispatchStatus.Queued:
            raise ValidationError(f"dispatch {self.dispatch_id} must start as Queued")
        return self.validate_for_persist()

    def _require(self, status: DispatchStatus, action: str) -> None:
        if self.status != status:
            raise ValidationError(
                f"cannot {action} dispatch {self.dispatch_id}: status must be {status.value}, "
                f"is {self.status.value}"
            )

    def _next(self, **changes: Any) -> RunDispatch:
        return dataclasses.replace(self, **changes).validate_for_persist()

    # -------------------------------------------------------------------------- transitions
    def enqueued(self, thread_epoch: int) -> RunDispatch:
        """T1: stamp the thread's epoch; a fresh Queued record without claim or projection."""
        self.validate_for_enqueue()
        return self._next(
            dispatch_epoch=thread_epoch, status=DispatchStatus.Queued, completed_at=None,
            **_CLAIM_CLEARED, **_PROJECTION_CLEARED,
        )

    def claimed(self, token: str, consumer_id: str, lease_ms: int, now: int) -> RunDispatch:
        """T2: Queued → Claimed with a fresh fencing token and a lease."""
        self._require(DispatchStatus.Queued, "claim")
        return self._next(
            status=DispatchStatus.Claimed, claim_token=token, claimed_by=consumer_id,
            lease_until=now + lease_ms, updated_at=now,
        )

    def lease_extended(self, extension_ms: int, now: int) -> RunDispatch:
        """T3: the lease now ends `extension_ms` after `now` (not after the old deadline)."""
        self._require(DispatchStatus.Claimed, "extend the lease of")
        return self._next(lease_until=now + extension_ms, updated_at=now)

    def started(self, dispatch_instance_id: str, now: int) -> RunDispatch:
        """T4: the runtime invocation began; the projection says `running`."""
        self._require(DispatchStatus.Claimed, "record the start of")
        require_id("dispatch_instance_id", dispatch_instance_id)
        return self._next(
            dispatch_instance_id=dispatch_instance_id, run_status=RunStatus.running,
            termination=None, run_response=None, run_error=None, completed_at=None,
            deferred_since=None, updated_at=now,
        )

    def result_recorded(self, result: RunDispatchResult, now: int) -> RunDispatch:
        """T5: the business outcome projection; delivery stays open until ack."""
        self._require(DispatchStatus.Claimed, "record a result for")
        if result.run_id != self.run_id:
            raise ValidationError(
                f"run result is for run {result.run_id!r}, dispatch {self.dispatch_id} "
                f"activates run {self.run_id!r}"
            )
        return self._next(
            dispatch_instance_id=result.dispatch_instance_id, run_status=result.status,
            termination=result.termination, run_response=result.response,
            run_error=result.error, completed_at=now, updated_at=now,
        )

    def acked(self, now: int) -> RunDispatch:
        """T6: delivery consumed. The projection is kept."""
        self._require(DispatchStatus.Claimed, "ack")
        return self._next(status=DispatchStatus.Acked, completed_at=now, updated_at=now,
                          **_CLAIM_CLEARED)

    def nacked(self, retry_at: int, error: str, now: int) -> RunDispatch:
        """T7 (requeue at `retry_at`) or T8 (dead letter once attempts reach the budget).

        A dispatch enqueued already at its budget is dead-lettered without counting past
        `max_attempts` (as in the original: docs/behaviour.md#t8).
        """
        self._require(DispatchStatus.Claimed, "nack")
        attempts = min(self.attempt_count + 1, self.max_attempts)
        if attempts >= self.max_attempts:
            return self._next(
                status=DispatchStatus.DeadLetter, attempt_count=attempts, last_error=error,
                completed_at=now, updated_at=now, **_CLAIM_CLEARED,
            )
        return self._next(
            status=DispatchStatus.Queued, attempt_count=attempts, last_error=error,
            available_at=retry_at, completed_at=None, updated_at=now,
            **_CLAIM_CLEARED, **_PROJECTION_CLEARED,
        )

    def deferred(self, retry_at: int, reason: str, now: int) -> RunDispatch:
        """T19: the pinned agent version is not on the worker that claimed it (a rolling
        deploy in progress): back to the queue at `retry_at` without spending an attempt,
        remembering since when (`deferred_since`) so the deferral can be bounded."""
        self._require(DispatchStatus.Claimed, "defer")
        return self._next(
            status=DispatchStatus.Queued, last_error=reason, available_at=retry_at,
            deferred_since=now if self.deferred_since is None else self.deferred_since,
            completed_at=None, updated_at=now, **_CLAIM_CLEARED, **_PROJECTION_CLEARED,
        )

    def dead_lettered(self, error: str, now: int) -> RunDispatch:
        """T9: permanent failure; attempts unchanged, projection kept."""
        self._require(DispatchStatus.Claimed, "dead-letter")
        return self._next(status=DispatchStatus.DeadLetter, last_error=error, completed_at=now,
                          updated_at=now, **_CLAIM_CLEARED)

    def cancelled(self, now: int) -> RunDispatch:
        """T10: withdrawn while still Queued."""
        self._require(DispatchStatus.Queued, "cancel")
        return self._next(status=DispatchStatus.Cancelled, completed_at=now, updated_at=now,
                          **_CLAIM_CLEARED)

    def superseded_by_interrupt(self, now: int) -> RunDispatch:
        """T11: an interrupt bumped the thread epoch while this dispatch waited."""
        self._require(DispatchStatus.Queued, "supersede")
        return self._next(status=DispatchStatus.Superseded, last_error=REASON_INTERRUPT,
                          completed_at=now, updated_at=now, **_CLAIM_CLEARED,
                          **_PROJECTION_CLEARED)

    def superseded_as_stale(self, thread_epoch: int, now: int) -> RunDispatch:
        """T12: a claim met a Queued dispatch from an older epoch."""
        self._require(DispatchStatus.Queued, "supersede")
        return self._next(status=DispatchStatus.Superseded, dispatch_epoch=thread_epoch,
                          last_error=REASON_STALE_QUEUED, completed_at=now, updated_at=now,
                          **_CLAIM_CLEARED, **_PROJECTION_CLEARED)

    def fenced(self, thread_epoch: int, reason: str, now: int) -> RunDispatch:
        """T13/T17: a stale claim's holder touched it; it ends Superseded."""
        self._require(DispatchStatus.Claimed, "fence")
        return self._next(status=DispatchStatus.Superseded, dispatch_epoch=thread_epoch,
                          last_error=reason, completed_at=now, updated_at=now,
                          **_CLAIM_CLEARED, **_PROJECTION_CLEARED)

    def superseded_claimed(self, thread_epoch: int, reason: str, now: int) -> RunDispatch:
        """T14: the worker found its claim stale before starting and gives it up."""
        self._require(DispatchStatus.Claimed, "supersede")
        return self._next(status=DispatchStatus.Superseded,
                          dispatch_epoch=max(self.dispatch_epoch, thread_epoch),
                          last_error=reason, completed_at=now, updated_at=now,
                          **_CLAIM_CLEARED, **_PROJECTION_CLEARED)

    def lease_expired(self, now: int) -> RunDispatch:
        """T15 (requeue, available now) or T16 (dead letter when attempts are exhausted).

        A crash counts as a failed attempt, so a crash loop ends in the dead letter. Both
        clear the projection: the abandoned attempt must not stay "running".
        """
        self._require(DispatchStatus.Claimed, "reclaim")
        attempts = min(self.attempt_count + 1, self.max_attempts)
        if attempts >= self.max_attempts:
            return self._next(status=DispatchStatus.DeadLetter, attempt_count=attempts,
                              last_error=REASON_LEASE_EXHAUSTED, completed_at=now,
                              updated_at=now, **_CLAIM_CLEARED, **_PROJECTION_CLEARED)
        return self._next(status=DispatchStatus.Queued, attempt_count=attempts,
                          available_at=now, completed_at=None, updated_at=now,
                          **_CLAIM_CLEARED, **_PROJECTION_CLEARED)

    def is_purgeable(self, older_than: int) -> bool:
        """T18: terminal and last changed strictly before `older_than`."""
        return self.is_terminal and self.updated_at < older_than

    # ------------------------------------------------------------------------ serialization
    def to_json(self) -> JsonDict:
        """The JSON form: projection fields and completed_at omitted when None."""
        out: JsonDict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OMITTED_WHEN_NONE:
                continue
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, Termination):
                value = value.to_json()
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunDispatch:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValidationError(f"unknown dispatch fields: {sorted(unknown)}")
        values = dict(data)
        try:
            values["status"] = DispatchStatus(values.get("status", "Queued"))
            if values.get("run_status") is not None:
                values["run_status"] = RunStatus(values["run_status"])
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc
        if values.get("termination") is not None:
            values["termination"] = Termination.from_json(values["termination"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValidationError(f"incomplete dispatch: {exc}") from exc


@dataclass(frozen=True)
class MailboxInterrupt:
    """Result of `interrupt`: the new epoch, the Claimed dispatch left for lazy fencing (still
    Claimed, now stale), and the Queued dispatches this interrupt superseded."""

    new_dispatch_epoch: int
    active_dispatch: RunDispatch | None = None
    superseded: list[RunDispatch] = field(default_factory=list)

    @property
    def superseded_count(self) -> int:
        return len(self.superseded)


@dataclass(frozen=True)
class RunRecord:
    """The durable record of one run: who runs it, where it stands and how it ended.

    The request itself is the run's input messages in the thread message log. Times are
    milliseconds like everything else in the project.
    """

    run_id: str
    thread_id: str
    agent_id: str
    resolution_id: str | None = None
    status: RunStatus = RunStatus.created
    termination: Termination | None = None
    response: str | None = None
    error: str | None = None
    waiting: JsonDict | None = None
    dispatch_id: str | None = None
    created_at: int = 0
    updated_at: int = 0
    finished_at: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", RunStatus(self.status))

    def validate_for_persist(self) -> RunRecord:
        for name in ("run_id", "thread_id", "agent_id"):
            require_id(name, getattr(self, name))
        if self.status in (RunStatus.created, RunStatus.running):
            if self.waiting is not None or self.finished_at is not None:
                raise ValidationError(f"{self.status} run must not carry waiting or finished_at")
        elif self.status == RunStatus.waiting:
            if self.waiting is None:
                raise ValidationError("waiting run requires a waiting ticket")
            if self.finished_at is not None:
                raise ValidationError("waiting run must not carry finished_at")
        else:
            if self.waiting is not None:
                raise ValidationError("done run must not carry a waiting ticket")
            if self.finished_at is None:
                raise ValidationError("done run requires finished_at")
        return self

    def moved_to(self, status: RunStatus, now: int, **changes: Any) -> RunRecord:
        """Change status along the allowed run transitions (docs/behaviour.md#run-statuses)."""
        if not self.status.can_transition_to(status):
            raise ValidationError(f"run {self.run_id} cannot go from {self.status} to {status}")
        return dataclasses.replace(self, status=status, updated_at=now, **changes
                                   ).validate_for_persist()

    def to_json(self) -> JsonDict:
        # Shallow on purpose: asdict deep-copies the waiting ticket, which nobody mutates,
        # and was the costliest line of a run write.
        out = {f.name: getattr(self, f.name) for f in _RUN_FIELDS}
        out["status"] = self.status.value
        out["termination"] = self.termination.to_json() if self.termination else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        values = dict(data)
        if values.get("termination") is not None:
            values["termination"] = Termination.from_json(values["termination"])
        return cls(**values)


_RUN_FIELDS = dataclasses.fields(RunRecord)
