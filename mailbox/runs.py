"""Durable run records, the thread message log and pinned agent resolutions.

A submission writes the run record, its input message, the pinned resolution and the
dispatch in ONE transaction of the thread (write-ahead in the strongest form: there is no
window where a run exists without its dispatch or the other way round). Run records change
state only through `RunRecord.moved_to`, so the run lifecycle of reference §1.4 is enforced in
the model, like the dispatch transitions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from mailbox.errors import AlreadyExistsError, NotFoundError, ValidationError
from mailbox.model import (
    REASON_STALE_RESULT,
    REASON_STALE_START,
    DispatchStatus,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    Termination,
)
from mailbox.schema import dispatches, messages, resolutions, runs
from mailbox.store import MailboxStore, _operation, _to_row

MAX_INPUT_BYTES = 256 * 1024


@dataclass(frozen=True)
class Message:
    """One entry of a thread's message log."""

    thread_id: str
    seq: int
    message_id: str
    run_id: str
    role: str
    content: Any
    created_at: int


@dataclass(frozen=True)
class Resolution:
    """The (agent name, version) a run was pinned to at submit."""

    resolution_id: str
    agent_name: str
    agent_version: str


def encode_input(value: Any) -> Any:
    """Check that an input is JSON and within the size limit; return it unchanged."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"input must be JSON-serializable: {exc}") from None
    if len(text.encode()) > MAX_INPUT_BYTES:
        raise ValidationError(
            f"input is {len(text.encode())} bytes of JSON; the limit is {MAX_INPUT_BYTES}"
        )
    return value


def _run_row(run: RunRecord) -> dict[str, Any]:
    row = run.to_json()
    row["status"] = run.status.value
    return row


def _run_from_row(row: sa.Row[Any]) -> RunRecord:
    values = dict(row._mapping)
    if values.get("termination") is not None:
        values["termination"] = Termination.from_json(values["termination"])
    return RunRecord(**values)


class RunStore:
    """SQL for runs, messages and resolutions, sharing the dispatch store's transactions."""

    def __init__(self, store: MailboxStore) -> None:
        self.store = store
        self._resolutions: dict[str, Resolution] = {}

    # ------------------------------------------------------------------------------ submit
    @_operation("submit")
    def submit(self, run: RunRecord, dispatch: RunDispatch, resolution: Resolution,
               message_id: str, content: Any, now: int, *, new_run: bool = True,
               role: str = "user") -> RunDispatch:
        """Write run + input message + resolution + dispatch atomically; return the stored
        dispatch (stamped with the thread epoch). `new_run=False` adds a dispatch to an
        existing run (a resume), moving it back to Queued-able state."""
        run.validate_for_persist()
        dispatch.validate_for_enqueue()
        if run.thread_id != dispatch.thread_id or run.run_id != dispatch.run_id:
            raise ValidationError("run and dispatch must name the same thread and run")
        encode_input(content)
        try:
            with self.store._write() as conn:
                epoch = self.store._lock_thread(conn, dispatch.thread_id, create=True)
                assert epoch is not None
                stored = dispatch.enqueued(epoch)
                conn.execute(sa.insert(dispatches).values(**_to_row(stored)))
                self._ensure_resolution(conn, resolution, now)
                if new_run:
                    conn.execute(sa.insert(runs).values(**_run_row(run)))
                else:
                    result = conn.execute(sa.update(runs).where(
                        runs.c.run_id == run.run_id).values(**_run_row(run)))
                    if result.rowcount != 1:
                        raise NotFoundError(f"run {run.run_id}")
                seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(messages.c.seq), 0))
                                   .where(messages.c.thread_id == run.thread_id)).scalar_one()
                conn.execute(sa.insert(messages).values(
                    thread_id=run.thread_id, seq=int(seq) + 1, message_id=message_id,
                    run_id=run.run_id, role=role, content=content, created_at=now))
        except sa_exc.IntegrityError:
            raise self._submit_conflict(run, dispatch) from None
        return stored

    def _ensure_resolution(self, conn: sa.Connection, resolution: Resolution, now: int) -> None:
        exists = conn.execute(sa.select(resolutions.c.resolution_id).where(
            resolutions.c.resolution_id == resolution.resolution_id)).first()
        if exists is None:
            conn.execute(sa.insert(resolutions).values(
                resolution_id=resolution.resolution_id, agent_name=resolution.agent_name,
                agent_version=resolution.agent_version, created_at=now))

    def _submit_conflict(self, run: RunRecord, dispatch: RunDispatch) -> AlreadyExistsError:
        with self.store._read() as conn:
            if conn.execute(sa.select(dispatches.c.dispatch_id).where(
                    dispatches.c.dispatch_id == dispatch.dispatch_id)).first():
                return AlreadyExistsError(dispatch.dispatch_id)
            if dispatch.dedupe_key is not None and conn.execute(
                    sa.select(dispatches.c.dispatch_id).where(
                        dispatches.c.thread_id == dispatch.thread_id,
                        dispatches.c.dedupe_key == dispatch.dedupe_key,
                        dispatches.c.status.in_(["Queued", "Claimed"]))).first():
                return AlreadyExistsError(f"dedupe_key={dispatch.dedupe_key}")
        return AlreadyExistsError(f"run {run.run_id}")

    # ------------------------------------------------------------------------------- reads
    @_operation("load_run")
    def load_run(self, run_id: str) -> RunRecord | None:
        with self.store._read() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).one_or_none()
        return None if row is None else _run_from_row(row)

    @_operation("thread_messages")
    def thread_messages(self, thread_id: str, limit: int = 1000) -> list[Message]:
        """The thread's log, oldest first (the last `limit` entries)."""
        query = (sa.select(messages).where(messages.c.thread_id == thread_id)
                 .order_by(messages.c.seq.desc()).limit(limit))
        with self.store._read() as conn:
            rows = [Message(**dict(r._mapping)) for r in conn.execute(query)]
        return list(reversed(rows))

    @_operation("run_messages")
    def run_messages(self, run_id: str) -> list[Message]:
        query = (sa.select(messages).where(messages.c.run_id == run_id)
                 .order_by(messages.c.seq))
        with self.store._read() as conn:
            return [Message(**dict(r._mapping)) for r in conn.execute(query)]

    @_operation("load_resolution")
    def load_resolution(self, resolution_id: str) -> Resolution | None:
        """A pinned resolution never changes once written, so each process reads it once."""
        cached = self._resolutions.get(resolution_id)
        if cached is not None:
            return cached
        with self.store._read() as conn:
            row = conn.execute(sa.select(resolutions).where(
                resolutions.c.resolution_id == resolution_id)).one_or_none()
        if row is None:
            return None
        resolution = Resolution(row.resolution_id, row.agent_name, row.agent_version)
        self._resolutions[resolution_id] = resolution
        return resolution

    @_operation("latest_open_run")
    def latest_open_run(self, thread_id: str) -> RunRecord | None:
        """The thread's most recent run that is still waiting for a decision, if any."""
        query = (sa.select(runs).where(runs.c.thread_id == thread_id,
                                       runs.c.status == RunStatus.waiting.value)
                 .order_by(runs.c.updated_at.desc()).limit(1))
        with self.store._read() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _run_from_row(row)

    # ------------------------------------------------------------------------------ writes
    def _update(self, run_id: str, change: Callable[[RunRecord], RunRecord | None]
                ) -> RunRecord | None:
        """Load, apply `change(run) -> RunRecord | None`, write back (guarded by status)."""
        with self.store._write() as conn:
            return self._update_in(conn, run_id, change)

    def _update_in(self, conn: sa.Connection, run_id: str,
                   change: Callable[[RunRecord], RunRecord | None]) -> RunRecord | None:
        row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).one_or_none()
        if row is None:
            return None
        before = _run_from_row(row)
        after = change(before)
        if after is None or after == before:
            return None
        result = conn.execute(sa.update(runs).where(
            runs.c.run_id == run_id, runs.c.status == before.status.value
        ).values(**_run_row(after)))
        if result.rowcount != 1:
            raise ValidationError(f"run {run_id} changed concurrently")
        return after

    # ---------------------------------------------------- fenced writes of the executing attempt
    @_operation("record_dispatch_start")  # reference §5.2 name: T4 + the run, together
    def start_attempt(self, dispatch_id: str, claim_token: str, dispatch_instance_id: str,
                      run_id: str, now: int) -> None:
        """Record the attempt's start on the dispatch (T4) and move the run to running, in
        one transaction fenced by the claim token: a claim that is not ours any more writes
        neither (VersionConflictError / NotFoundError)."""
        def running(run: RunRecord) -> RunRecord | None:
            if run.status == RunStatus.done:
                return None
            return run.moved_to(RunStatus.running, now, dispatch_id=dispatch_id, waiting=None)

        self.store._fenced(
            dispatch_id, claim_token, now, REASON_STALE_START,
            lambda d: d.started(dispatch_instance_id, now),
            also=lambda conn, _: self._update_in(conn, run_id, running))

    @_operation("record_run_result")  # reference §5.2 name: T5 + the run, together
    def record_outcome(self, dispatch_id: str, claim_token: str, result: RunDispatchResult,
                       now: int, waiting: dict[str, Any] | None = None) -> None:
        """The runtime's outcome, written once and fenced: the dispatch projection (T5) and
        the run record (done, or waiting with its ticket) in one transaction. An attempt
        whose claim was reclaimed or superseded cannot decide the run any more."""
        termination = result.termination or Termination.natural_end()

        def finished(run: RunRecord) -> RunRecord | None:
            if run.status == RunStatus.done:
                return None
            if result.status == RunStatus.waiting:
                return run.moved_to(RunStatus.waiting, now, termination=termination,
                                    response=result.response, error=result.error,
                                    waiting=waiting)
            return run.moved_to(RunStatus.done, now, termination=termination,
                                response=result.response, error=result.error, waiting=None,
                                finished_at=now)

        self.store._fenced(
            dispatch_id, claim_token, now, REASON_STALE_RESULT,
            lambda d: d.result_recorded(result, now),
            also=lambda conn, _: self._update_in(conn, result.run_id, finished))

    def reconcile(self, dispatch: RunDispatch, now: int) -> RunRecord | None:
        """Bring the run in line with its terminal dispatch (reference §4.9): Cancelled and
        Superseded → done/cancelled, DeadLetter → done/error. A run that is missing, belongs
        to another thread, is already done, or has moved on to a newer dispatch is left."""
        if dispatch.status == DispatchStatus.DeadLetter:
            reason = dispatch.run_error or dispatch.last_error or "mailbox dispatch dead-lettered"
            termination, error, op = Termination.error(reason), reason, "mark_run_dead_letter"
        elif dispatch.status == DispatchStatus.Cancelled:
            termination, error, op = Termination.cancelled(), None, "mark_run_cancelled"
        elif dispatch.status == DispatchStatus.Superseded:
            termination, error, op = Termination.cancelled(), None, "mark_run_superseded"
        else:
            return None

        def change(run: RunRecord) -> RunRecord | None:
            if (run.thread_id != dispatch.thread_id or run.status == RunStatus.done
                    or (run.dispatch_id not in (None, dispatch.dispatch_id))):
                return None
            return run.moved_to(RunStatus.done, now, termination=termination, error=error,
                                waiting=None, finished_at=now,
                                dispatch_id=dispatch.dispatch_id)

        updated: RunRecord | None = _operation(op)(self._update)(dispatch.run_id, change)
        return updated

    @_operation("unreconciled_terminal_dispatches")
    def unreconciled_terminal_dispatches(self, limit: int = 100) -> list[RunDispatch]:
        """Terminal dispatches (Cancelled, Superseded, DeadLetter) whose run still points at
        them and is not done: what a crash between the two writes leaves behind."""
        from mailbox.store import _from_row

        query = (sa.select(dispatches)
                 .join(runs, sa.and_(runs.c.run_id == dispatches.c.run_id,
                                     runs.c.dispatch_id == dispatches.c.dispatch_id))
                 .where(dispatches.c.status.in_(["Cancelled", "Superseded", "DeadLetter"]),
                        runs.c.status != RunStatus.done.value)
                 .order_by(dispatches.c.updated_at).limit(limit))
        with self.store._read() as conn:
            return [_from_row(r) for r in conn.execute(query)]

    @_operation("due_thread_ids")
    def due_thread_ids(self, now: int, limit: int = 1000) -> list[str]:
        """Threads with a Queued dispatch due now and no Claimed dispatch: those a wake-up
        would start (delayed availability, retries in backoff, lost publishes)."""
        claimed = sa.select(dispatches.c.thread_id).where(
            dispatches.c.status == DispatchStatus.Claimed.value)
        query = (sa.select(dispatches.c.thread_id).distinct()
                 .where(dispatches.c.status == DispatchStatus.Queued.value,
                        dispatches.c.available_at <= now,
                        dispatches.c.thread_id.not_in(claimed))
                 .order_by(dispatches.c.thread_id).limit(limit))
        with self.store._read() as conn:
            return [str(t) for t in conn.execute(query).scalars()]

    @_operation("list_dead_letters")
    def list_dead_letters(self, *, thread_id: str | None = None, agent: str | None = None,
                          error_contains: str | None = None, since: int | None = None,
                          until: int | None = None, limit: int = 100, offset: int = 0
                          ) -> list[RunDispatch]:
        """Dead-lettered dispatches, newest first, filtered by thread, agent name, error text
        and the time they died (`completed_at` within [since, until))."""
        from mailbox.store import _from_row

        query = (sa.select(dispatches)
                 .join(runs, runs.c.run_id == dispatches.c.run_id, isouter=True)
                 .where(dispatches.c.status == DispatchStatus.DeadLetter.value))
        if thread_id is not None:
            query = query.where(dispatches.c.thread_id == thread_id)
        if agent is not None:
            query = query.where(runs.c.agent_id == agent)
        if error_contains:
            query = query.where(dispatches.c.last_error.contains(error_contains,
                                                                  autoescape=True))
        if since is not None:
            query = query.where(dispatches.c.completed_at >= since)
        if until is not None:
            query = query.where(dispatches.c.completed_at < until)
        query = (query.order_by(dispatches.c.completed_at.desc(), dispatches.c.dispatch_id)
                 .limit(limit).offset(offset))
        with self.store._read() as conn:
            return [_from_row(r) for r in conn.execute(query)]

    @_operation("purge_dead_letters")
    def purge_dead_letters(self, dispatch_ids: Sequence[str]) -> int:
        """Delete the given dead letters (and nothing that is not one)."""
        if not dispatch_ids:
            return 0
        with self.store._write() as conn:
            result = conn.execute(sa.delete(dispatches).where(
                dispatches.c.dispatch_id.in_(list(dispatch_ids)),
                dispatches.c.status == DispatchStatus.DeadLetter.value))
            return int(result.rowcount)

    @_operation("runs_by_status")
    def runs_by_status(self, statuses: Sequence[RunStatus]) -> dict[str, int]:
        query = (sa.select(runs.c.status, sa.func.count())
                 .where(runs.c.status.in_([s.value for s in statuses]))
                 .group_by(runs.c.status))
        with self.store._read() as conn:
            return {str(s): int(n) for s, n in conn.execute(query)}
