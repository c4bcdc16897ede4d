"""`Mailbox`: the one object applications and operators hold (docs/architecture.md#facade).

It validates and submits runs, reads them back, waits for them, and drives thread control
(cancel, interrupt, resume). It knows nothing of Celery: whoever runs workers (see `tasks/`)
gives it a `waker` that publishes wake-ups; without one, submitted work is still durable and
the sweep of a running worker delivers it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis
import uuid6

from mailbox import agents, maintenance, metrics, reports, tracing, wake_marks
from mailbox import builtin_agents as _builtin_agents  # noqa: F401  (registers them)
from mailbox.coordination import WAKE_PUBLISH, Coordinator, connect_redis
from mailbox.database import create_engine
from mailbox.errors import (
    AlreadyExistsError,
    MailboxError,
    NotFoundError,
    StoreUnavailableError,
    ValidationError,
)
from mailbox.events import Event, EventStreams
from mailbox.maintenance import SweepReport
from mailbox.model import (
    MAX_MS,
    PRIORITY_MAX,
    PRIORITY_MIN,
    DispatchStatus,
    MailboxInterrupt,
    RunDispatch,
    RunRecord,
    RunStatus,
    check_text,
    show_value,
)
from mailbox.runtime import Runtime, now_ms
from mailbox.schema import upgrade
from mailbox.settings import Settings, validate_namespace
from mailbox.store import (
    BulkEntry,
    BulkEntryError,
    MailboxStore,
    Message,
    Resolution,
    RunStore,
    Submission,
    encode_input,
)
from mailbox.store.dispatches import MAX_LIST_LIMIT as MAX_LIST_LIMIT
from mailbox.store.retention import Retention, replay_run_id

log = logging.getLogger(__name__)
Waker = Callable[[str, int], None]
MAX_DELAY_MS = 365 * 24 * 3600 * 1000


BULK_FIELDS = frozenset({"thread_id", "agent", "input", "priority", "dedupe_key", "delay_ms",
                         "max_attempts"})


class BulkSubmitError(MailboxError):
    """Item `index` of a bulk submission was refused (`error` says why). Nothing of its chunk
    was written; `submitted` are the receipts of the chunks written before it (nothing when
    an item failed validation: every item is checked before any write)."""

    prefix = "bulk submission refused"

    def __init__(self, index: int, error: MailboxError, submitted: list[Receipt], *,
                 whole_chunk: bool = False) -> None:
        where = f"the chunk starting at item {index}" if whole_chunk else f"item {index}"
        super().__init__(f"{where}: {error}")
        self.index = index
        self.error = error
        self.submitted = list(submitted)


@dataclass(frozen=True)
class BulkWake:
    """One wake-up of a bulk submission: per thread, not per item."""

    thread_id: str
    delay_ms: int
    dispatch_id: str  # the thread's first dispatch of the batch: the wake-up's task id


def wakes_for(items: Sequence[Mapping[str, Any]], receipts: Sequence[Receipt]
              ) -> list[BulkWake]:
    """The wake-ups of the submitted items (`receipts[i]` is `items[i]`'s): one per thread,
    after the shortest delay of its items, in the order threads first appear."""
    wakes: dict[str, BulkWake] = {}
    for item, receipt in zip(items, receipts, strict=False):
        delay = int(item.get("delay_ms", 0) or 0)
        known = wakes.get(receipt.thread_id)
        if known is None:
            wakes[receipt.thread_id] = BulkWake(receipt.thread_id, delay, receipt.dispatch_id)
        elif delay < known.delay_ms:
            wakes[receipt.thread_id] = replace(known, delay_ms=delay)
    return list(wakes.values())


class WaitTimeoutError(MailboxError, TimeoutError):
    """`wait` gave up before the dispatch reached a terminal state."""

    prefix = "timed out"


@dataclass(frozen=True)
class Receipt:
    """What a submit returns: the ids to watch. `resumed` when the input resumed the thread's
    waiting run instead of starting a new one; `already_replayed` when a replay found the
    dead letter replayed before and returned that replay instead of running it again."""

    dispatch_id: str
    run_id: str
    thread_id: str
    resumed: bool = False
    already_replayed: bool = False
    """For `replay`: the dead letter had been replayed before; this is that replay's run."""


def _new_id() -> str:
    return str(uuid6.uuid7())


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{name} must be an integer within {low}..{high}, got {value!r}")
    return value


def _check_input(value: Any) -> None:
    """`encode_input`, plus the one way JSON encoding fails that it lets through: a value
    nested deeper than the interpreter's recursion limit raises RecursionError."""
    try:
        encode_input(value)
    except RecursionError:
        raise ValidationError("input must be JSON-serializable: it is nested too deeply"
                              ) from None


class Mailbox:
    """The store, the run records and the event streams behind one connect call."""

    def __init__(self, store: MailboxStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.runs = RunStore(store)
        self.events = EventStreams(store.coordinator.client, settings.namespace,
                                   settings.retention_s,
                                   max_bytes=settings.event_stream_max_bytes,
                                   thread_of=self._thread_of_run)
        self.retention = Retention(store)
        self.waker: Waker | None = None

    @classmethod
    def connect(cls, database_url: str | None = None, redis_url: str | None = None, *,
                namespace: str | None = None, settings: Settings | None = None) -> Mailbox:
        """Connect to SQL and Redis. Missing arguments come from the environment
        (MAILBOX_DATABASE_URL, MAILBOX_REDIS_URL, MAILBOX_NAMESPACE); nothing is created until
        `create_schema`."""
        base = settings or Settings.from_env()
        ns = validate_namespace(namespace or base.namespace)
        db = database_url or base.database_url
        rurl = redis_url or base.redis_url
        if not rurl:
            raise ValidationError(
                "no Redis URL: pass redis_url, set MAILBOX_REDIS_URL, or start the dev stack "
                "with `make demo` / `python -m mailbox up`")
        agents.load_agent_modules(base.agent_modules)
        engine = create_engine(db)
        coordinator = Coordinator(connect_redis(rurl), ns)
        return cls(MailboxStore(engine, coordinator),
                   replace(base, database_url=db, redis_url=rurl, namespace=ns))

    def create_schema(self) -> None:
        """Run the Alembic migrations up to head (safe to call on a current database)."""
        upgrade(self.store.engine)

    def close(self) -> None:
        self.store.engine.dispose()
        self.store.coordinator.client.close()

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def runtime(self, consumer_id: str | None = None, wake: Waker | None = None) -> Runtime:
        """The phase runtime for a worker process (consumer ids are unique per process start,
        so a restarted worker never mistakes an old claim for its own)."""
        consumer = consumer_id or f"{socket.gethostname()}:{os.getpid()}:{_new_id()[-8:]}"
        return Runtime(self.store, self.runs, self.events, self.settings, consumer,
                       wake=wake or self._wake, cancel_check=self._cancel_signal)

    def _wake(self, thread_id: str, delay_ms: int) -> None:
        """Publish a wake-up after a durable write. Its failure must not lose the caller's
        receipt: the work is stored, and a worker's sweep delivers it."""
        if self.waker is None:
            return
        try:
            self.waker(thread_id, delay_ms)
        except Exception as exc:
            metrics.count_operation("wake_publish", "error")
            log.warning("wake-up for thread %s not published (%s); the sweep will deliver it",
                        thread_id, exc)

    # ------------------------------------------------------------------------------ submit
    def submit(self, thread_id: str, agent: str, input: Any, *, priority: int = 128,
               dedupe_key: str | None = None, delay_ms: int = 0, max_attempts: int | None = None,
               interrupt: bool = False, wake: bool = True) -> Receipt:
        """Validate, then write the run, its input and its dispatch in one transaction.

        Bad arguments raise ValidationError before anything is written; a dedupe key still
        held by a live dispatch of the thread raises AlreadyExistsError. `interrupt=True` is
        "latest wins": the thread is interrupted first (queued work superseded, the running
        one cancelled). A plain input on a thread whose latest run waits for a decision
        resumes that run with the input as the decision. `wake=False` leaves publishing the
        wake-up to the caller (dispatch.delay publishes its own, under the dispatch id).
        """
        receipt, _ = self._submit(thread_id, agent, input, priority=priority,
                                  dedupe_key=dedupe_key, delay_ms=delay_ms,
                                  max_attempts=max_attempts, interrupt=interrupt, gate=False)
        if wake:
            self._wake(thread_id, delay_ms)
        return receipt

    def submit_gated(self, thread_id: str, agent: str, input: Any, *, priority: int = 128,
                     dedupe_key: str | None = None, delay_ms: int = 0,
                     max_attempts: int | None = None, interrupt: bool = False
                     ) -> tuple[Receipt, int]:
        """`submit(wake=False)` for a caller that publishes the wake-up itself, named by the
        dispatch id (`dispatch.delay`): the wake gate (docs/behaviour.md#wake-gate) is asked
        in the same Redis round trip as the run_queued event. Returns the receipt and the
        gate's answer: WAKE_PUBLISH (publish; also when Redis could not answer, or for a
        delayed dispatch, which the gate does not hold back), WAKE_HELD or WAKE_PENDING
        (publish nothing)."""
        return self._submit(thread_id, agent, input, priority=priority, dedupe_key=dedupe_key,
                            delay_ms=delay_ms, max_attempts=max_attempts, interrupt=interrupt,
                            gate=True)

    def _submit(self, thread_id: str, agent: str, input: Any, *, priority: int,
                dedupe_key: str | None, delay_ms: int, max_attempts: int | None,
                interrupt: bool, gate: bool) -> tuple[Receipt, int]:
        spec, attempts = self._check_submit(thread_id, agent, input, priority, dedupe_key,
                                            delay_ms, max_attempts)
        if not isinstance(interrupt, bool):
            # Any truthy value would interrupt the thread: "no" must not supersede its work.
            raise ValidationError(f"interrupt must be True or False, got {show_value(interrupt)}")
        if interrupt:
            self.interrupt(thread_id)
        with tracing.span("mailbox.submit", attributes={
                "mailbox.thread_id": thread_id, "mailbox.agent": spec.resolution_id}) as trace:
            now = now_ms()
            dispatch_id = _new_id()
            dispatch = RunDispatch.queued(
                dispatch_id, thread_id, _new_id(), now, priority=priority, dedupe_key=dedupe_key,
                available_at=now + delay_ms, max_attempts=attempts,
                traceparent=tracing.traceparent_of(trace))
            run = RunRecord(dispatch.run_id, thread_id, spec.name, spec.resolution_id,
                            RunStatus.created, dispatch_id=dispatch_id, created_at=now,
                            updated_at=now)
            resolution = Resolution(spec.resolution_id, spec.name, spec.version)
            if interrupt:  # latest wins: the input starts a new run, it never resumes one
                self.runs.submit(run, dispatch, resolution, _new_id(), input, now)
                stored = Submission(dispatch, run, resumed=False)
            else:
                stored = self.runs.submit_input(run, dispatch, resolution, _new_id(), input,
                                                now)
            tracing.set_attributes(trace, **{"mailbox.dispatch_id": dispatch_id,
                                             "mailbox.run_id": stored.run.run_id,
                                             "mailbox.resumed": stored.resumed})
        data: dict[str, Any] = {"agent": stored.run.resolution_id}
        data.update({"resume": True} if stored.resumed else {"priority": priority})
        receipt = Receipt(dispatch_id, stored.run.run_id, thread_id, resumed=stored.resumed)
        if not gate or delay_ms:
            self.events.emit(stored.run.run_id, dispatch_id, "run_queued", data, ts=now,
                             thread_id=thread_id, new_run=not stored.resumed)
            return receipt, WAKE_PUBLISH
        return receipt, self._report_and_gate(receipt, data, now)

    def _report_and_gate(self, receipt: Receipt, data: dict[str, Any], now: int) -> int:
        """The run_queued event and the wake gate in one round trip. The event is advisory
        (a failure is logged and counted); a gate that did not answer says publish."""
        gate = self.store.coordinator.gate_call(receipt.thread_id, receipt.dispatch_id, now,
                                                wake_marks.wake_pending_ttl_ms(self.settings))
        self.store.coordinator.round_trips += 1
        answer = self.events.emit_along(gate, receipt.run_id, receipt.dispatch_id, "run_queued",
                                        data, ts=now, thread_id=receipt.thread_id,
                                        new_run=not receipt.resumed)
        return WAKE_PUBLISH if isinstance(answer, Exception) else int(answer)

    def _check_submit(self, thread_id: Any, agent: Any, input: Any, priority: Any,
                      dedupe_key: Any, delay_ms: Any, max_attempts: Any
                      ) -> tuple[agents.AgentSpec, int]:
        """Every check of a submit, before anything is written: the agent's current spec
        and the attempt budget."""
        check_text("thread_id", thread_id)
        spec = agents.current(agent)
        _check_input(input)
        if spec.check_input is not None:
            spec.check_input(input)
        _check_int("priority", priority, PRIORITY_MIN, PRIORITY_MAX)
        _check_int("delay_ms", delay_ms, 0, MAX_DELAY_MS)
        attempts = self.settings.max_attempts if max_attempts is None else max_attempts
        _check_int("max_attempts", attempts, 1, 1000)
        check_text("dedupe_key", dedupe_key, optional=True)
        return spec, attempts

    def submit_many(self, items: Sequence[Mapping[str, Any]], *, chunk_size: int = 500,
                    wake: bool = True, progress: Callable[[int], None] | None = None
                    ) -> list[Receipt]:
        """Submit many inputs at once (batch evaluations, back-fills, fan-out to many
        threads): one receipt per item, in order.

        Each item is a mapping of `submit`'s arguments by name: `thread_id`, `agent`, `input`,
        optional `priority`, `dedupe_key`, `delay_ms`, `max_attempts` (no `interrupt`). Every
        item is validated before anything is written (BulkSubmitError naming the first bad
        one, nothing written). Then each chunk of `chunk_size` items is written in one
        transaction, all or nothing: a refused item (a live dedupe key) fails the call with
        BulkSubmitError naming it, and `submitted` holds the receipts of the chunks written
        before. Items on one thread keep their order. One wake-up per thread, not per item
        (`wake=False` leaves publishing to the caller: `dispatch.delay_many`). `progress`
        is called with the number of items written so far after each chunk."""
        _check_int("chunk_size", chunk_size, 1, MAX_LIST_LIMIT)
        if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
            raise ValidationError(f"items must be a list of submissions, got "
                                  f"{show_value(items)}")
        now = now_ms()
        entries = [self._bulk_entry(index, item, now) for index, item in enumerate(items)]
        receipts: list[Receipt] = []
        try:
            for start in range(0, len(entries), chunk_size):
                receipts += self._submit_chunk(entries[start:start + chunk_size], start,
                                               receipts, now)
                if progress is not None:
                    progress(len(receipts))
        finally:  # the chunks written before a refused one still get their wake-ups
            if wake:
                for wake_up in wakes_for(items, receipts):
                    self._wake(wake_up.thread_id, wake_up.delay_ms)
        return receipts

    def _submit_chunk(self, chunk: Sequence[BulkEntry], start: int,
                      submitted: list[Receipt], now: int) -> list[Receipt]:
        try:
            stored = self.runs.submit_many(chunk, now)
        except BulkEntryError as exc:
            raise BulkSubmitError(start + exc.index, exc.error, submitted) from None
        except MailboxError as exc:
            raise BulkSubmitError(start, exc, submitted, whole_chunk=True) from exc
        self.events.emit_batch([(s.run.run_id, s.dispatch.dispatch_id, "run_queued", {
            "agent": s.run.resolution_id,
            **({"resume": True} if s.resumed else {"priority": s.dispatch.priority})},
            now) for s in stored], threads={s.run.run_id: s.dispatch.thread_id for s in stored},
            new_runs={s.run.run_id for s in stored if not s.resumed})
        return [Receipt(s.dispatch.dispatch_id, s.run.run_id, s.dispatch.thread_id,
                        resumed=s.resumed) for s in stored]

    def _bulk_entry(self, index: int, item: Any, now: int) -> BulkEntry:
        try:
            if not isinstance(item, Mapping):
                raise ValidationError(f"an item must be an object of submit's arguments, got "
                                      f"{show_value(item)}")
            unknown = set(item) - BULK_FIELDS
            if unknown:
                raise ValidationError(f"unknown fields {sorted(map(str, unknown))} (known: "
                                      f"{', '.join(sorted(BULK_FIELDS))})")
            for required in ("thread_id", "agent", "input"):
                if required not in item:
                    raise ValidationError(f"{required} is missing")
            priority, delay_ms = item.get("priority", 128), item.get("delay_ms", 0)
            spec, attempts = self._check_submit(
                item["thread_id"], item["agent"], item["input"], priority,
                item.get("dedupe_key"), delay_ms, item.get("max_attempts"))
        except MailboxError as exc:
            raise BulkSubmitError(index, exc, []) from None
        # One trace per dispatch here too: each item's submit span is its trace's root.
        with tracing.span("mailbox.submit", attributes={
                "mailbox.thread_id": item["thread_id"], "mailbox.agent": spec.resolution_id,
                "mailbox.bulk": True}) as trace:
            dispatch = RunDispatch.queued(
                _new_id(), item["thread_id"], _new_id(), now, priority=priority,
                dedupe_key=item.get("dedupe_key"), available_at=now + delay_ms,
                max_attempts=attempts, traceparent=tracing.traceparent_of(trace))
            tracing.set_attributes(trace, **{"mailbox.dispatch_id": dispatch.dispatch_id,
                                             "mailbox.run_id": dispatch.run_id})
        run = RunRecord(dispatch.run_id, dispatch.thread_id, spec.name, spec.resolution_id,
                        RunStatus.created, dispatch_id=dispatch.dispatch_id, created_at=now,
                        updated_at=now)
        return BulkEntry(run, dispatch, Resolution(spec.resolution_id, spec.name,
                                                   spec.version), _new_id(), item["input"])

    def resume(self, run_id: str, decision: Any) -> Receipt:
        """Queue a new dispatch for a waiting run, carrying the human decision."""
        check_text("run_id", run_id)
        _check_input(decision)
        run = self.runs.load_run(run_id)
        if run is None:
            raise NotFoundError(f"run {run_id}")
        if run.status != RunStatus.waiting:
            raise ValidationError(f"run {run_id} is {run.status.value}, not waiting for a "
                                  f"decision")
        with tracing.span("mailbox.resume", attributes={
                "mailbox.thread_id": run.thread_id, "mailbox.run_id": run.run_id,
                "mailbox.agent": run.resolution_id}) as trace:
            now = now_ms()
            dispatch = RunDispatch.queued(_new_id(), run.thread_id, run.run_id, now,
                                          max_attempts=self.settings.max_attempts,
                                          traceparent=tracing.traceparent_of(trace))
            tracing.set_attributes(trace, **{"mailbox.dispatch_id": dispatch.dispatch_id})
            return self._resume(run, dispatch, decision, now, 0)

    def _resume(self, run: RunRecord, dispatch: RunDispatch, decision: Any, now: int,
                delay_ms: int, *, wake: bool = True) -> Receipt:
        if run.resolution_id is None:
            raise ValidationError(f"run {run.run_id} has no pinned agent")
        name, _, version = run.resolution_id.partition("@")
        updated = replace(run, dispatch_id=dispatch.dispatch_id, updated_at=now)
        self.runs.submit(updated, dispatch, Resolution(run.resolution_id, name, version),
                         _new_id(), decision, now, new_run=False, role="decision")
        self.events.emit(run.run_id, dispatch.dispatch_id, "run_queued",
                         {"agent": run.resolution_id, "resume": True}, ts=now,
                         thread_id=run.thread_id)
        if wake:
            self._wake(run.thread_id, delay_ms)
        return Receipt(dispatch.dispatch_id, run.run_id, run.thread_id, resumed=True)

    # ------------------------------------------------------------------------------- reads
    def get_dispatch(self, dispatch_id: str) -> RunDispatch | None:
        return self.store.load_dispatch(check_text("dispatch_id", dispatch_id))

    def get_run(self, run_id: str) -> RunRecord | None:
        return self.runs.load_run(check_text("run_id", run_id))

    def wait(self, dispatch_id: str, timeout_s: float = 30.0) -> RunDispatch:
        """Block until the dispatch is terminal and its run reflects that; returns the
        dispatch. WaitTimeoutError otherwise.

        A dispatch that ends Cancelled, Superseded or DeadLetter has its run reconciled in the
        next transaction of the worker (or by the sweep after a crash), so `wait` also waits,
        briefly, for that run to be done: callers read a consistent pair."""
        check_text("dispatch_id", dispatch_id)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) \
                or not math.isfinite(timeout_s) or timeout_s < 0:
            # NaN would never compare past the deadline: the loop would spin forever.
            raise ValidationError(f"timeout_s must be a finite number of seconds >= 0, got "
                                  f"{show_value(timeout_s)}")
        deadline = time.monotonic() + timeout_s
        pause = 0.01
        while True:
            dispatch = self.store.load_dispatch(dispatch_id)
            if dispatch is None:
                raise NotFoundError(dispatch_id)
            if dispatch.is_terminal and self._run_settled(dispatch):
                return dispatch
            if time.monotonic() >= deadline:
                if dispatch.is_terminal:
                    return dispatch  # the sweep will reconcile the run
                raise WaitTimeoutError(f"dispatch {dispatch_id} still {dispatch.status.value} "
                                       f"after {timeout_s}s")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.2)

    def _run_settled(self, dispatch: RunDispatch) -> bool:
        if dispatch.status == DispatchStatus.Acked:
            return True
        run = self.runs.load_run(dispatch.run_id)
        return (run is None or run.status == RunStatus.done
                or run.dispatch_id not in (None, dispatch.dispatch_id))

    def thread_messages(self, thread_id: str, *, limit: int = 50, before: int | None = None
                        ) -> list[Message]:
        """A page of the thread's conversation, oldest first: the `limit` messages before
        the message whose seq is `before` (the newest when None). Page back with the first
        message's seq. Each run's messages together, runs in the order their input arrived
        (docs/behaviour.md#conversation)."""
        check_text("thread_id", thread_id)
        _check_int("limit", limit, 0, MAX_LIST_LIMIT)
        if before is not None:
            _check_int("before", before, 1, MAX_MS)
        return self.runs.conversation(thread_id, limit=limit, before=before)

    def events_of(self, run_id: str, after: str | None = None, follow: bool = False,
                  timeout_s: float | None = None) -> Iterator[Event]:
        """Same as `mailbox.events(run_id, ...)` (the stream object is callable)."""
        return self.events(run_id, after, follow, timeout_s)

    # ---------------------------------------------------------------------- thread control
    def cancel(self, dispatch_id: str) -> bool:
        """Cancel a queued dispatch (it ends Cancelled) or ask the worker running it to stop
        (it ends with termination cancelled). False, with no effect, for an unknown or
        finished dispatch."""
        check_text("dispatch_id", dispatch_id)
        now = now_ms()
        cancelled = self.store.cancel(dispatch_id, now)
        if cancelled is not None:
            if self.runs.reconcile(cancelled, now) is not None:
                reports.cancelled(self.events, cancelled, now)
            return True
        current = self.store.load_dispatch(dispatch_id)
        if current is None or current.status != DispatchStatus.Claimed:
            return False
        assert current.claim_token is not None
        self._signal_cancel(current.thread_id, current.claim_token, "cancelled by request")
        return True

    def interrupt(self, thread_id: str) -> MailboxInterrupt:
        """"Latest wins": bump the thread's epoch, supersede its queued dispatches (their runs
        end cancelled) and tell the worker running the active one to stop."""
        check_text("thread_id", thread_id)
        now = now_ms()
        result = self.store.interrupt(thread_id, now)
        for dispatch in result.superseded:
            if self.runs.reconcile(dispatch, now) is not None:
                reports.cancelled(self.events, dispatch, now)
        if result.active_dispatch is not None and result.active_dispatch.claim_token:
            try:
                self._signal_cancel(thread_id, result.active_dispatch.claim_token,
                                    "interrupted")
            except StoreUnavailableError as exc:
                # The interrupt is committed: the running attempt's next lease renewal (within
                # a third of a lease) is fenced by the new epoch and stops the agent anyway.
                metrics.count_operation("cancel_signal", "error")
                log.warning("thread %s interrupted, but its worker could not be signalled "
                            "(%s); it stops at its next lease renewal", thread_id, exc)
        return result

    # ------------------------------------------------------------------------ dead letters
    def dead_letters(self, *, thread_id: str | None = None, agent: str | None = None,
                     error_contains: str | None = None, since: int | None = None,
                     until: int | None = None, limit: int = 100, offset: int = 0
                     ) -> list[RunDispatch]:
        """Dead letters, newest first, filtered by thread, agent name, error text and the
        time they died (`since` <= completed_at < `until`, Unix milliseconds)."""
        for name, value in (("thread_id", thread_id), ("agent", agent)):
            check_text(name, value, optional=True)
        if error_contains is not None and error_contains != "":
            check_text("error_contains", error_contains)
        for name, moment in (("since", since), ("until", until)):
            if moment is not None:
                _check_int(name, moment, 0, MAX_MS)
        _check_int("limit", limit, 0, MAX_LIST_LIMIT)
        _check_int("offset", offset, 0, MAX_MS)
        return self.store.list_dead_letters(thread_id=thread_id, agent=agent,
                                           error_contains=error_contains, since=since,
                                           until=until, limit=limit, offset=offset)

    def replay(self, dispatch_id: str, *, force: bool = False) -> Receipt:
        """Run a dead letter's work again: a new run with the same pinned agent and input, on
        the same thread, with a fresh dispatch and attempt budget.

        Refused (ValidationError) when the thread was interrupted after the dispatch was
        queued — the conversation moved on, and replaying would resurrect stale work —
        unless `force`. Idempotent: the replay's run id is derived from the dead letter's
        dispatch id, so a second replay (a retried click, two operators, a bulk replay run
        twice) returns the first replay's receipt with `already_replayed`, and the agent
        runs once. To try again after a replay failed too, replay the replay's dead letter.
        """
        check_text("dispatch_id", dispatch_id)
        if not isinstance(force, bool):
            raise ValidationError(f"force must be True or False, got {show_value(force)}")
        dead = self.store.load_dispatch(dispatch_id)
        if dead is None:
            raise NotFoundError(dispatch_id)
        if dead.status != DispatchStatus.DeadLetter:
            raise ValidationError(f"dispatch {dispatch_id} is {dead.status.value}, not a dead "
                                  f"letter")
        epoch = self.store.sql_epoch(dead.thread_id)
        if dead.dispatch_epoch < epoch and not force:
            raise ValidationError(
                f"thread {dead.thread_id} moved on (epoch {epoch} > {dead.dispatch_epoch}: it "
                f"was interrupted after this dispatch was queued); replay with force to run it "
                f"anyway")
        run = self.runs.load_run(dead.run_id)
        inputs = self.runs.run_messages(dead.run_id)
        user = [m for m in inputs if m.role == "user"]
        if run is None or run.resolution_id is None or not user:
            raise ValidationError(f"run {dead.run_id} of dispatch {dispatch_id} cannot be "
                                  f"rebuilt (missing run, agent pin or input)")
        replay_id = replay_run_id(dispatch_id)
        earlier = self._earlier_replay(replay_id)
        if earlier is not None:
            return earlier
        name, _, version = run.resolution_id.partition("@")
        now = now_ms()
        with tracing.span("mailbox.replay", attributes={
                "mailbox.thread_id": dead.thread_id, "mailbox.agent": run.resolution_id,
                "mailbox.replay_of": dispatch_id}) as trace:
            dispatch = RunDispatch.queued(_new_id(), dead.thread_id, replay_id, now,
                                          priority=dead.priority,
                                          max_attempts=dead.max_attempts,
                                          traceparent=tracing.traceparent_of(trace))
            tracing.set_attributes(trace, **{"mailbox.dispatch_id": dispatch.dispatch_id,
                                             "mailbox.run_id": replay_id})
        replayed = RunRecord(dispatch.run_id, dead.thread_id, run.agent_id, run.resolution_id,
                             RunStatus.created, dispatch_id=dispatch.dispatch_id,
                             created_at=now, updated_at=now)
        try:
            self.runs.submit(replayed, dispatch, Resolution(run.resolution_id, name, version),
                             _new_id(), user[0].content, now)
        except AlreadyExistsError:
            earlier = self._earlier_replay(replay_id)  # a concurrent replay won
            if earlier is None:
                raise
            return earlier
        self.events.emit(replayed.run_id, dispatch.dispatch_id, "run_queued",
                         {"agent": run.resolution_id, "replay_of": dispatch_id}, ts=now,
                         thread_id=dead.thread_id, new_run=True)
        self._wake(dead.thread_id, 0)
        return Receipt(dispatch.dispatch_id, replayed.run_id, dead.thread_id)

    def _earlier_replay(self, replay_run_id: str) -> Receipt | None:
        run = self.runs.load_run(replay_run_id)
        if run is None or run.dispatch_id is None:
            return None
        return Receipt(run.dispatch_id, run.run_id, run.thread_id, already_replayed=True)

    def purge_dead_letters(self, dispatch_ids: list[str]) -> int:
        """Delete these dead letters (ids of anything else are ignored); how many went. Each
        takes its run, the run's messages (its input) and its event stream along, unless
        another dispatch still references the run (docs/behaviour.md#gc). At most
        `MAX_LIST_LIMIT` ids per call."""
        if isinstance(dispatch_ids, str | bytes) or not isinstance(
                dispatch_ids, list | tuple | set | frozenset):
            # A lone string would otherwise be taken as a sequence of one-letter ids.
            raise ValidationError(f"dispatch_ids must be a list of dispatch ids, got "
                                  f"{show_value(dispatch_ids)}")
        if len(dispatch_ids) > MAX_LIST_LIMIT:
            raise ValidationError(f"at most {MAX_LIST_LIMIT} dispatch ids per purge, got "
                                  f"{len(dispatch_ids)}")
        ids = [check_text("dispatch_ids item", d) for d in dispatch_ids]
        purged = self.retention.purge_dead_letters(ids)
        maintenance.forget_event_streams(self.events, purged.run_ids, purged.run_threads)
        return purged.dispatches

    # ------------------------------------------------------------------------- maintenance
    def sweep(self, now: int | None = None) -> SweepReport:
        """Reclaim expired leases, reconcile runs, wake due threads (what beat runs)."""
        return maintenance.sweep(self.runtime(), now_ms() if now is None else now)

    def recover(self) -> SweepReport:
        """What a worker does when it starts: one sweep at the current time."""
        return self.sweep()

    def collect_garbage(self, now: int | None = None) -> int:
        return maintenance.collect_garbage(self.runtime(), now_ms() if now is None else now)

    def _thread_of_run(self, run_id: str) -> str | None:
        """For the event streams on a Redis Cluster: the run's thread, from SQL."""
        run = self.runs.load_run(run_id)
        return None if run is None else run.thread_id

    def _cancel_key(self, thread_id: str, token: str) -> str:
        return self.store.coordinator.keys.cancel(thread_id, token)

    def _signal_cancel(self, thread_id: str, token: str, reason: str) -> None:
        """Tell the worker holding this claim to stop its agent (read by its heartbeat every
        100 ms). StoreUnavailableError when Redis cannot take the signal."""
        payload = json.dumps({"reason": reason, "at": now_ms()})
        try:
            self.store.coordinator.client.set(self._cancel_key(thread_id, token), payload,
                                              px=max(60_000, 3 * self.settings.lease_ms))
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"redis unreachable signalling the worker to stop: "
                                        f"{exc}") from exc

    def _cancel_signal(self, thread_id: str, token: str) -> str | None:
        """Read by the heartbeat every 100 ms: a cancel signal for this claim. A Redis error
        propagates: the heartbeat counts it, and stops the agent when it lasts a lease."""
        raw = self.store.coordinator.client.get(self._cancel_key(thread_id, token))
        if raw is None:
            return None
        try:
            signal = json.loads(raw)
            reason, at = str(signal.get("reason") or "cancelled"), int(signal["at"])
        except (ValueError, TypeError, KeyError, AttributeError):
            # The key exists, so somebody asked this claim to stop; only its payload is odd.
            return "cancelled"
        metrics.CANCEL_LATENCY.observe(max(0, now_ms() - at) / 1000)
        return reason
