"""The durable mailbox store: SQL is the truth, Redis the hot copy (DESIGN.md §4).

Every operation is one SQL transaction and never reads the clock (`now` is passed in). All
dispatch SQL lives in this module. State changes go through the model: load the row, ask
`RunDispatch` for the next record (which validates the invariants), write back only the
columns that changed, guarded by the status we read.

Concurrency. Writers of one thread are serialized by locking that thread's epoch row
(`SELECT … FOR UPDATE` on PostgreSQL; on SQLite every write transaction is BEGIN IMMEDIATE).
No transaction touches two threads, so threads never wait on each other and the data could be
sharded by thread id. The partial unique indexes ("one Claimed per thread", "one live dedupe
key per thread") hold the invariants even against code that skips the lock.

Redis. A claim first takes the thread's lease with one Lua call, so a busy thread is refused
without SQL. Ack, nack, dead letter, supersede and reclaim release it (compare-and-delete on
the token); extend refreshes it. Redis updates that follow a SQL commit are best effort: the
commit is the truth, and a stale lease only delays the thread until its `lease_until`. After
Redis loses its data, claims rebuild the lease from the Claimed row and epochs are re-read from
SQL, so no invariant depends on Redis.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import redis
import sqlalchemy as sa
import uuid6
from sqlalchemy import exc as sa_exc

from mailbox import metrics
from mailbox.coordination import Coordinator, Lease
from mailbox.database import READ_ONLY, WriteGateTimeoutError, is_postgres, write_gate
from mailbox.errors import (
    AlreadyExistsError,
    MailboxError,
    NotFoundError,
    StoreUnavailableError,
    ValidationError,
    VersionConflictError,
)
from mailbox.model import (
    REASON_STALE_ACK,
    REASON_STALE_DEAD_LETTER,
    REASON_STALE_NACK,
    REASON_STALE_RECLAIM,
    REASON_STALE_RENEWAL,
    REASON_STALE_RESULT,
    REASON_STALE_START,
    TERMINAL_STATUSES,
    DispatchStatus,
    MailboxInterrupt,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    Termination,
    require_id,
    require_ms,
)
from mailbox.schema import dispatches, thread_epochs

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_TERMINAL_VALUES = [s.value for s in TERMINAL_STATUSES]
# Status values rendered into the SQL text: with bound parameters, a prepared statement's
# generic plan cannot use the status indexes and scans the thread's whole history.
_CLAIMED = sa.literal(DispatchStatus.Claimed.value, literal_execute=True)
_QUEUED = sa.literal(DispatchStatus.Queued.value, literal_execute=True)
_NOT_OURS = (0, 1)  # VersionConflict(expected=0, actual=1): "not your claim"

FinishedCheck = Callable[[sa.Connection, RunDispatch], bool]
"""`finished(conn, claim)`: did this expired claim's attempt already write the run's outcome?
Asked by reclaim under the claim's thread lock, in its transaction."""


@dataclass(frozen=True)
class ReclaimPage:
    """What one page of reclaim transitioned (Queued, DeadLetter, or Acked when `finished`
    said so; superseded claims are not listed), and whether another page may follow."""

    transitioned: list[RunDispatch]
    more: bool

# Hot-path statements are built once, with bound parameters: building and cache-keying a
# statement per call cost more than executing it (about 3x on SQLite, measured), and
# SQLAlchemy's compiled cache then serves every call.
_D = dispatches.c
_SELECT_EPOCH_FOR_UPDATE = (sa.select(thread_epochs.c.current_epoch)
                            .where(thread_epochs.c.thread_id == sa.bindparam("thread_id"))
                            .with_for_update())
_SELECT_EPOCH = sa.select(thread_epochs.c.current_epoch).where(
    thread_epochs.c.thread_id == sa.bindparam("thread_id"))
_SELECT_THREAD_OF = sa.select(_D.thread_id).where(_D.dispatch_id == sa.bindparam("dispatch_id"))
_SELECT_DISPATCH = sa.select(dispatches).where(_D.dispatch_id == sa.bindparam("dispatch_id"))
INSERT_DISPATCH = dispatches.insert()
# SET comes from the parameters named after columns; the guard names are not columns.
_UPDATE_DISPATCHES = dispatches.update().where(
    _D.dispatch_id.in_(sa.bindparam("guard_ids", expanding=True)),
    _D.status == sa.bindparam("guard_status"))
_SELECT_BLOCKERS = sa.select(dispatches).where(
    _D.thread_id == sa.bindparam("thread_id"), _D.status.in_([_CLAIMED, _QUEUED]),
    sa.or_(_D.status == _CLAIMED, _D.dispatch_epoch < sa.bindparam("epoch")))
_SELECT_HEAD = (sa.select(dispatches)
                .where(_D.thread_id == sa.bindparam("thread_id"), _D.status == _QUEUED,
                       _D.available_at <= sa.bindparam("now"))
                .order_by(_D.priority, _D.created_at, _D.dispatch_id)
                .limit(1))
_SELECT_ANY_DUE = (sa.select(_D.dispatch_id)
                   .where(_D.thread_id == sa.bindparam("thread_id"), _D.status == _QUEUED,
                          _D.available_at <= sa.bindparam("now"))
                   .limit(1))
_SELECT_QUEUED_BY_ID = sa.select(dispatches).where(
    _D.dispatch_id == sa.bindparam("dispatch_id"), _D.status == _QUEUED)


def new_token() -> str:
    """Claim tokens and generated ids are UUID v7: unique and time-ordered."""
    return str(uuid6.uuid7())


def _operation(name: str, *, empty_result: bool = False
               ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Record the operation's metric and turn driver failures into StoreUnavailableError.

    With `empty_result`, a None or [] return is labelled `empty` (claims that found nothing).
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            result = "error"
            try:
                value = func(*args, **kwargs)
                empty = empty_result and (value is None or value == [])
                result = "empty" if empty else "ok"
                return value
            except MailboxError:
                raise
            except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                    sa_exc.TimeoutError) as exc:
                raise StoreUnavailableError(f"database unreachable during {name}: "
                                            f"{_short(exc)}") from exc
            except sa_exc.DBAPIError as exc:
                if exc.connection_invalidated:
                    raise StoreUnavailableError(f"database connection lost during {name}: "
                                                f"{_short(exc)}") from exc
                raise
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise StoreUnavailableError(f"redis unreachable during {name}: {exc}") from exc
            finally:
                metrics.record_operation(name, result, time.perf_counter() - started)

        return wrapper

    return decorate


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


# ------------------------------------------------------------------------------- row mapping
_COLUMNS = [c.name for c in dispatches.columns]


def _to_row(d: RunDispatch) -> dict[str, Any]:
    row = {name: getattr(d, name) for name in _COLUMNS}
    row["status"] = d.status.value
    row["run_status"] = d.run_status.value if d.run_status is not None else None
    row["termination"] = d.termination.to_json() if d.termination is not None else None
    return row


def _from_row(row: sa.Row[Any]) -> RunDispatch:
    values = dict(row._mapping)
    if values.get("termination") is not None:
        values["termination"] = Termination.from_json(values["termination"])
    if values.get("run_status") is not None:
        values["run_status"] = RunStatus(values["run_status"])
    values["status"] = DispatchStatus(values["status"])
    try:
        return RunDispatch(**values).validate_for_persist()
    except ValidationError as exc:
        raise MailboxError(f"stored dispatch {values.get('dispatch_id')!r} is invalid: "
                           f"{exc.message}") from exc


def _changes(before: RunDispatch, after: RunDispatch) -> dict[str, Any]:
    old, new = _to_row(before), _to_row(after)
    return {k: v for k, v in new.items() if old[k] != v}


class MailboxStore:
    """Dispatch queue authority over one SQL database and one Redis (DESIGN.md §4)."""

    def __init__(self, engine: sa.Engine, coordinator: Coordinator) -> None:
        self.engine = engine
        self.coordinator = coordinator
        self._postgres = is_postgres(engine)
        self._reader = engine.execution_options(**{READ_ONLY: True})
        self._gate = write_gate(engine)
        self._insert_epoch_if_missing = self.insert_ignoring_conflict(thread_epochs)

    # ------------------------------------------------------------------------ transactions
    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        if self._gate is None:
            with self.engine.begin() as conn:
                yield conn
            return
        try:
            with self._gate.held(), self.engine.begin() as conn:
                yield conn
        except WriteGateTimeoutError as exc:
            raise StoreUnavailableError(f"database is locked: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._reader.connect() as conn:
            yield conn

    def _lock_thread(self, conn: sa.Connection, thread_id: str, *, create: bool) -> int | None:
        """Lock the thread's epoch row (serializing the thread's writers); return its epoch.

        With `create`, a missing row is created at epoch 0 first.
        """
        params = {"thread_id": thread_id}
        epoch = conn.execute(_SELECT_EPOCH_FOR_UPDATE, params).scalar_one_or_none()
        if epoch is None and create:
            conn.execute(self._insert_epoch_if_missing, {"thread_id": thread_id,
                                                         "current_epoch": 0})
            epoch = conn.execute(_SELECT_EPOCH_FOR_UPDATE, params).scalar_one()
        return None if epoch is None else int(epoch)

    def insert_ignoring_conflict(self, table: sa.Table) -> sa.Executable:
        """`INSERT … ON CONFLICT DO NOTHING` for this database, values bound at execution."""
        if self._postgres:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()

    def _lock_dispatch(self, conn: sa.Connection, dispatch_id: str,
                       thread_id: str | None = None) -> tuple[RunDispatch, int] | None:
        """Lock the dispatch's thread, then load the dispatch; None if it does not exist.

        A caller that knows the thread (a phase's context) saves the lookup; a wrong thread
        finds nothing, and an unknown one is not created."""
        if thread_id is None:
            thread_id = conn.execute(_SELECT_THREAD_OF,
                                     {"dispatch_id": dispatch_id}).scalar_one_or_none()
            if thread_id is None:
                return None
            epoch = self._lock_thread(conn, thread_id, create=True)
        else:
            epoch = self._lock_thread(conn, thread_id, create=False)
            if epoch is None:
                return None
        assert epoch is not None
        row = conn.execute(_SELECT_DISPATCH, {"dispatch_id": dispatch_id}).one_or_none()
        if row is None or row.thread_id != thread_id:
            return None
        return _from_row(row), epoch

    def _save(self, conn: sa.Connection, pairs: Iterable[tuple[RunDispatch, RunDispatch]]
              ) -> None:
        """Write transitions back: one UPDATE per distinct set of changed columns, guarded by
        the status each row had when read (a mismatch means a writer skipped the lock)."""
        groups: dict[tuple[str, str], tuple[dict[str, Any], list[str]]] = {}
        for before, after in pairs:
            change = _changes(before, after)
            if not change:
                continue
            key = (before.status.value, json.dumps(change, sort_keys=True, default=str))
            groups.setdefault(key, (change, []))[1].append(before.dispatch_id)
        for (old_status, _), (change, ids) in groups.items():
            for chunk in _chunks(ids, 500):
                result = conn.execute(_UPDATE_DISPATCHES, {
                    **change, "guard_ids": chunk, "guard_status": old_status})
                if result.rowcount != len(chunk):
                    raise MailboxError(f"concurrent modification of dispatches {chunk}")

    # ------------------------------------------------------------------- redis, best effort
    def _after_commit(self, what: str, action: Callable[[], object]) -> None:
        """Run a Redis update that follows a SQL commit. The commit is the truth, so a failure
        here is logged and counted, never raised: the caller's operation did happen."""
        try:
            action()
        except redis.RedisError as exc:
            metrics.count_operation("redis_after_commit", "error")
            log.warning("redis update after commit failed (%s): %s", what, exc)

    def _release(self, d: RunDispatch, token: str | None) -> None:
        if token:
            self._after_commit("release", lambda: self.coordinator.release(d.thread_id, token))

    def _cache_epoch(self, thread_id: str, epoch: int, generation: str | None) -> None:
        """Cache an epoch read under the thread lock. Filled only if Redis kept the
        generation taken before the read: a flush in between could otherwise let an older
        value into an empty cache after a newer interrupt already committed."""
        def fill() -> None:
            if generation is None or not self.coordinator.fill_epoch(thread_id, epoch,
                                                                     generation):
                # Redis was flushed meanwhile, and a reader may have cached an epoch it read
                # before our commit: read again now that the commit is visible.
                self._refresh_epoch(thread_id)

        self._after_commit("epoch", fill)

    def _generation(self) -> str | None:
        try:
            return self.coordinator.epoch_generation()
        except redis.RedisError:
            return None

    # =========================================================================== write path
    @_operation("enqueue")
    def enqueue(self, dispatch: RunDispatch) -> None:
        """Store a new Queued dispatch stamped with the thread's current epoch (T1).

        Durable when this returns. A duplicate dispatch id or a dedupe key still held by a
        live dispatch of the thread raises AlreadyExistsError and writes nothing.
        """
        if not isinstance(dispatch, RunDispatch):
            raise ValidationError(f"enqueue takes a RunDispatch, got {type(dispatch).__name__}")
        dispatch.validate_for_enqueue()
        try:
            with self._write() as conn:
                epoch = self._lock_thread(conn, dispatch.thread_id, create=True)
                assert epoch is not None
                conn.execute(INSERT_DISPATCH, _to_row(dispatch.enqueued(epoch)))
        except sa_exc.IntegrityError:
            raise self._duplicate_error(dispatch) from None

    def _duplicate_error(self, dispatch: RunDispatch) -> AlreadyExistsError:
        with self._read() as conn:
            exists = conn.execute(sa.select(dispatches.c.dispatch_id).where(
                dispatches.c.dispatch_id == dispatch.dispatch_id)).first()
        if exists is not None:
            return AlreadyExistsError(dispatch.dispatch_id)
        return AlreadyExistsError(f"dedupe_key={dispatch.dedupe_key}")

    @_operation("claim", empty_result=True)
    def claim(self, thread_id: str, consumer_id: str, lease_ms: int, now: int, limit: int = 1
              ) -> list[RunDispatch]:
        """Claim the thread's next eligible dispatch (T2): at most one per call and per thread.

        Eligible = Queued, `available_at <= now`; order = priority, then created_at. Nothing
        is claimed while the thread has a Claimed dispatch, even one whose lease expired and
        was not reclaimed yet (the sweep reclaims it).
        """
        require_id("thread_id", thread_id)
        require_id("consumer_id", consumer_id)
        require_ms("lease_ms", lease_ms)
        require_ms("now", now)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValidationError(f"limit must be a non-negative integer, got {limit!r}")
        if limit == 0:
            return []
        claimed = self._claim_thread(thread_id, None, consumer_id, lease_ms, now)
        return [] if claimed is None else [claimed]

    @_operation("claim_dispatch", empty_result=True)
    def claim_dispatch(self, dispatch_id: str, consumer_id: str, lease_ms: int, now: int
                       ) -> RunDispatch | None:
        """Claim one dispatch by id, ignoring `available_at` (for an inline claim right after
        submit). None when it is not Queued, stale, or another dispatch holds the thread."""
        require_id("dispatch_id", dispatch_id)
        require_id("consumer_id", consumer_id)
        require_ms("lease_ms", lease_ms)
        require_ms("now", now)
        with self._read() as conn:
            thread_id = conn.execute(_SELECT_THREAD_OF,
                                     {"dispatch_id": dispatch_id}).scalar_one_or_none()
        if thread_id is None:
            return None
        return self._claim_thread(thread_id, dispatch_id, consumer_id, lease_ms, now)

    def _has_due(self, thread_id: str, now: int) -> bool:
        """A plain read before the claim's write transaction: most claims made when an
        attempt settles find the thread empty, and on SQLite a write transaction takes the
        database's one write lock. Skipping on "nothing due" loses nothing: a dispatch
        committed after this read is woken by its own submit (or retry, or the sweep), like
        any dispatch that arrives after a claim. (A Claimed row that Redis forgot is then
        not rebuilt into a lease here; the next claim that finds work does it.)"""
        with self._read() as conn:
            return conn.execute(_SELECT_ANY_DUE, {"thread_id": thread_id, "now": now}
                                ).first() is not None

    def _claim_thread(self, thread_id: str, dispatch_id: str | None, consumer_id: str,
                      lease_ms: int, now: int) -> RunDispatch | None:
        token = new_token()
        try:
            if self.coordinator.acquire(thread_id, token, now + lease_ms, consumer_id, now,
                                        lease_ms) is not None:
                return None  # a live lease: busy, refused without SQL
            if dispatch_id is None and not self._has_due(thread_id, now):
                self._release_pending(thread_id, token)
                return None
            claimed, holder = self._claim_in_sql(thread_id, dispatch_id, token, consumer_id,
                                                 lease_ms, now)
        except BaseException:
            self._release_pending(thread_id, token)
            raise
        if claimed is not None:
            self._after_commit("bind", lambda: self.coordinator.put(
                thread_id, Lease(token, claimed.dispatch_id, now + lease_ms, consumer_id),
                expected_token=token, allow_missing=True, lease_ms=lease_ms))
        elif holder is not None:
            # Redis had forgotten a claim SQL still holds: rebuild the lease from the row.
            assert holder.claim_token and holder.claimed_by and holder.lease_until is not None
            self._after_commit("rebuild", lambda: self._rebuild_lease(thread_id, holder, token,
                                                                      lease_ms))
        else:
            self._release_pending(thread_id, token)
        return claimed

    def _rebuild_lease(self, thread_id: str, holder: RunDispatch, pending_token: str,
                       lease_ms: int) -> None:
        """Put the holder's lease back in place of our pending one, then look at the row
        again. The holder may have acked after our read and released before our put (its
        release then found our pending token and did nothing): the rebuilt lease would stand
        for a finished claim and stall the thread until it ran out. Seeing the row still
        Claimed after the put means the holder's own release is still to come."""
        token = holder.claim_token or ""
        if not self.coordinator.put(thread_id, Lease(token, holder.dispatch_id,
                                                     holder.lease_until or 0,
                                                     holder.claimed_by or ""),
                                    expected_token=pending_token, allow_missing=False,
                                    lease_ms=lease_ms):
            return
        with self._read() as conn:
            row = conn.execute(_SELECT_DISPATCH,
                               {"dispatch_id": holder.dispatch_id}).one_or_none()
        if row is None or row.status != DispatchStatus.Claimed.value or row.claim_token != token:
            self.coordinator.release(thread_id, token)

    def _release_pending(self, thread_id: str, token: str) -> None:
        self._after_commit("release pending", lambda: self.coordinator.release(thread_id, token))

    def _claim_in_sql(self, thread_id: str, dispatch_id: str | None, token: str,
                      consumer_id: str, lease_ms: int, now: int
                      ) -> tuple[RunDispatch | None, RunDispatch | None]:
        """Returns (claimed dispatch, the Claimed dispatch that blocked us)."""
        with self._write() as conn:
            epoch = self._lock_thread(conn, thread_id, create=False)
            if epoch is None:
                return None, None
            blockers = [_from_row(r) for r in conn.execute(
                _SELECT_BLOCKERS, {"thread_id": thread_id, "epoch": epoch})]
            stale = [d for d in blockers if d.status == DispatchStatus.Queued]
            self._save(conn, [(d, d.superseded_as_stale(epoch, now)) for d in stale])
            holder = next((d for d in blockers if d.status == DispatchStatus.Claimed), None)
            if holder is not None:
                return None, holder
            if dispatch_id is None:
                row = conn.execute(_SELECT_HEAD, {"thread_id": thread_id, "now": now}
                                   ).one_or_none()
            else:
                row = conn.execute(_SELECT_QUEUED_BY_ID, {"dispatch_id": dispatch_id}
                                   ).one_or_none()
            if row is None:
                return None, None
            head = _from_row(row)
            if head.is_stale(epoch):  # only reachable by id; thread scans excluded it above
                self._save(conn, [(head, head.superseded_as_stale(epoch, now))])
                return None, None
            claimed = head.claimed(token, consumer_id, lease_ms, now)
            self._save(conn, [(head, claimed)])
            return claimed, None

    # ------------------------------------------------------------------ fenced claimed ops
    def _fenced(self, dispatch_id: str, claim_token: str, now: int, stale_reason: str,
                apply: Callable[[RunDispatch], RunDispatch],
                also: Callable[[sa.Connection, RunDispatch], object] | None = None,
                thread_id: str | None = None) -> RunDispatch:
        """The fenced-claimed-op pattern (reference §3.2): ours, current epoch, then apply.

        A stale epoch supersedes the dispatch (T13) — that change is committed — and then
        raises VersionConflictError(dispatch epoch, thread epoch). `thread_id`, when the
        caller knows it, saves looking the dispatch's thread up.
        """
        require_id("dispatch_id", dispatch_id)
        require_ms("now", now)
        if not isinstance(claim_token, str):
            raise ValidationError("claim_token must be a string")
        conflict: VersionConflictError | None = None
        with self._write() as conn:
            found = self._lock_dispatch(conn, dispatch_id, thread_id)
            if found is None:
                raise NotFoundError(dispatch_id)
            current, epoch = found
            if current.status != DispatchStatus.Claimed or current.claim_token != claim_token:
                raise VersionConflictError(*_NOT_OURS)
            if current.is_stale(epoch):
                after = current.fenced(epoch, stale_reason, now)
                conflict = VersionConflictError(current.dispatch_epoch, epoch)
            else:
                after = apply(current)
            self._save(conn, [(current, after)])
            if conflict is None and also is not None:
                also(conn, after)  # more writes of the same thread, under the same fence
        if after.status != DispatchStatus.Claimed:
            self._release(after, claim_token)
        if conflict is not None:
            # Rare path: re-read under a fresh generation so the cache catches up safely.
            self._after_commit("epoch refresh", lambda: self._refresh_epoch(current.thread_id))
            raise conflict
        return after

    @_operation("record_dispatch_start")
    def record_dispatch_start(self, dispatch_id: str, claim_token: str,
                              dispatch_instance_id: str, now: int) -> None:
        """T4: the runtime invocation `dispatch_instance_id` started on our claim."""
        require_id("dispatch_instance_id", dispatch_instance_id)
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_START,
                     lambda d: d.started(dispatch_instance_id, now))

    @_operation("record_run_result")
    def record_run_result(self, dispatch_id: str, claim_token: str, result: RunDispatchResult,
                          now: int) -> None:
        """T5: record the business outcome; delivery stays open until ack."""
        if not isinstance(result, RunDispatchResult):
            raise ValidationError("result must be a RunDispatchResult")
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_RESULT,
                     lambda d: d.result_recorded(result, now))

    @_operation("ack")
    def ack(self, dispatch_id: str, claim_token: str, now: int) -> None:
        """T6: delivery consumed (not "the agent succeeded": see the projection)."""
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_ACK, lambda d: d.acked(now))

    @_operation("nack")
    def nack(self, dispatch_id: str, claim_token: str, retry_at: int, error: str, now: int
             ) -> None:
        """T7 requeue at `retry_at`, or T8 dead letter when the attempts reach the budget."""
        require_ms("retry_at", retry_at)
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_NACK,
                     lambda d: d.nacked(retry_at, str(error), now))

    @_operation("dead_letter")
    def dead_letter(self, dispatch_id: str, claim_token: str, error: str, now: int) -> None:
        """T9: permanent failure, no more attempts."""
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_DEAD_LETTER,
                     lambda d: d.dead_lettered(str(error), now))

    @_operation("extend_lease")
    def extend_lease(self, dispatch_id: str, claim_token: str, extension_ms: int, now: int
                     ) -> bool:
        """T3: renew our lease to `now + extension_ms`. False when the claim is not ours any
        more (missing, not Claimed, other token) or was fenced by an interrupt (T13)."""
        require_ms("extension_ms", extension_ms)
        try:
            after = self._fenced(dispatch_id, claim_token, now, REASON_STALE_RENEWAL,
                                 lambda d: d.lease_extended(extension_ms, now))
        except (NotFoundError, VersionConflictError):
            return False
        assert after.claim_token and after.claimed_by and after.lease_until is not None
        lease = Lease(after.claim_token, after.dispatch_id, after.lease_until, after.claimed_by)
        self._after_commit("extend", lambda: self.coordinator.put(
            after.thread_id, lease, expected_token=claim_token, allow_missing=True,
            lease_ms=extension_ms))
        return True

    @_operation("supersede_claimed")
    def supersede_claimed(self, dispatch_id: str, claim_token: str, now: int, reason: str
                          ) -> RunDispatch | None:
        """T14: give up a claim found stale before execution. None when missing or not
        Claimed; VersionConflictError(0, 1) when the token is not ours."""
        require_id("dispatch_id", dispatch_id)
        require_ms("now", now)
        with self._write() as conn:
            found = self._lock_dispatch(conn, dispatch_id)
            if found is None:
                return None
            current, epoch = found
            if current.status != DispatchStatus.Claimed:
                return None
            if current.claim_token != claim_token:
                raise VersionConflictError(*_NOT_OURS)
            after = current.superseded_claimed(epoch, str(reason), now)
            self._save(conn, [(current, after)])
        self._release(after, claim_token)
        return after

    @_operation("cancel")
    def cancel(self, dispatch_id: str, now: int) -> RunDispatch | None:
        """T10: withdraw a Queued dispatch. None (no error) when missing or not Queued."""
        require_id("dispatch_id", dispatch_id)
        require_ms("now", now)
        with self._write() as conn:
            found = self._lock_dispatch(conn, dispatch_id)
            if found is None or found[0].status != DispatchStatus.Queued:
                return None
            current = found[0]
            after = current.cancelled(now)
            self._save(conn, [(current, after)])
        return after

    @_operation("interrupt")
    def interrupt(self, thread_id: str, now: int) -> MailboxInterrupt:
        """Bump the thread's epoch and supersede everything Queued (T11), atomically.

        The Claimed dispatch, if any, is returned unchanged (still Claimed, now stale): its
        holder is fenced at its next store call, and the caller should cancel its run.
        """
        require_id("thread_id", thread_id)
        require_ms("now", now)
        generation = self._generation()
        with self._write() as conn:
            old = self._lock_thread(conn, thread_id, create=True)
            assert old is not None
            new_epoch = old + 1
            conn.execute(sa.update(thread_epochs).where(thread_epochs.c.thread_id == thread_id)
                         .values(current_epoch=new_epoch))
            live = [_from_row(r) for r in conn.execute(
                sa.select(dispatches).where(
                    dispatches.c.thread_id == thread_id,
                    dispatches.c.status.in_([DispatchStatus.Queued.value,
                                             DispatchStatus.Claimed.value]))
                .order_by(dispatches.c.priority, dispatches.c.created_at,
                          dispatches.c.dispatch_id))]
            pairs = [(d, d.superseded_by_interrupt(now)) for d in live
                     if d.status == DispatchStatus.Queued and d.dispatch_epoch <= old]
            self._save(conn, pairs)
            active = next((d for d in live if d.status == DispatchStatus.Claimed), None)
        self._cache_epoch(thread_id, new_epoch, generation)
        return MailboxInterrupt(new_epoch, active, [after for _, after in pairs])

    @_operation("current_dispatch_epoch")
    def current_dispatch_epoch(self, thread_id: str) -> int:
        """The thread's epoch (0 for an unknown thread), from Redis when cached.

        The cache only ever rises, and every fenced SQL write re-checks the SQL epoch, so a
        cache that lags an interrupt can delay a stale dispatch's fencing, never let it run.
        """
        require_id("thread_id", thread_id)
        cached = self.coordinator.cached_epoch(thread_id)
        if cached is not None:
            return cached
        generation = self.coordinator.epoch_generation()
        epoch = self._sql_epoch(thread_id)
        self._after_commit("epoch fill", lambda: self.coordinator.fill_epoch(
            thread_id, epoch, generation))
        return epoch

    def _refresh_epoch(self, thread_id: str, attempts: int = 3) -> None:
        """Bring the cache up to the SQL epoch (a writer's duty after its commit). Gives up
        only when Redis keeps being flushed, which leaves the cache empty: also correct."""
        for _ in range(attempts):
            generation = self.coordinator.epoch_generation()
            if self.coordinator.fill_epoch(thread_id, self._sql_epoch(thread_id), generation):
                return

    @_operation("sql_epoch")
    def sql_epoch(self, thread_id: str) -> int:
        return self._sql_epoch(thread_id)

    def _sql_epoch(self, thread_id: str) -> int:
        """The authoritative epoch straight from SQL."""
        with self._read() as conn:
            epoch = conn.execute(_SELECT_EPOCH, {"thread_id": thread_id}).scalar_one_or_none()
        return 0 if epoch is None else int(epoch)

    # ============================================================================ read path
    @_operation("load_dispatch")
    def load_dispatch(self, dispatch_id: str) -> RunDispatch | None:
        require_id("dispatch_id", dispatch_id)
        with self._read() as conn:
            row = conn.execute(_SELECT_DISPATCH, {"dispatch_id": dispatch_id}).one_or_none()
        return None if row is None else _from_row(row)

    @_operation("list_dispatches")
    def list_dispatches(self, thread_id: str, statuses: Sequence[DispatchStatus] | None = None,
                        limit: int = 100, offset: int = 0) -> list[RunDispatch]:
        """The thread's dispatches in claim order (priority, created_at, dispatch_id)."""
        require_id("thread_id", thread_id)
        _require_page(limit, offset)
        query = sa.select(dispatches).where(dispatches.c.thread_id == thread_id)
        if statuses is not None:
            values = [_status(s).value for s in statuses]
            if not values:
                return []
            query = query.where(dispatches.c.status.in_(values))
        query = (query.order_by(dispatches.c.priority, dispatches.c.created_at,
                                dispatches.c.dispatch_id).limit(limit).offset(offset))
        with self._read() as conn:
            return [_from_row(r) for r in conn.execute(query)]

    @_operation("count_dispatches_by_status")
    def count_dispatches_by_status(self, status: DispatchStatus) -> int:
        value = _status(status).value
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(dispatches).where(
                dispatches.c.status == value)).scalar_one())

    @_operation("list_terminal_dispatches")
    def list_terminal_dispatches(self, limit: int, offset: int = 0) -> list[RunDispatch]:
        """Terminal dispatches of every thread, oldest change first."""
        _require_page(limit, offset)
        query = (sa.select(dispatches).where(dispatches.c.status.in_(_TERMINAL_VALUES))
                 .order_by(dispatches.c.updated_at, dispatches.c.created_at,
                           dispatches.c.dispatch_id)
                 .limit(limit).offset(offset))
        with self._read() as conn:
            return [_from_row(r) for r in conn.execute(query)]

    @_operation("queued_thread_ids")
    def queued_thread_ids(self) -> list[str]:
        """Threads with at least one Queued dispatch (due or not), sorted."""
        query = (sa.select(dispatches.c.thread_id).distinct()
                 .where(dispatches.c.status == DispatchStatus.Queued.value)
                 .order_by(dispatches.c.thread_id))
        with self._read() as conn:
            return [str(t) for t in conn.execute(query).scalars()]

    # ========================================================================= maintenance
    @_operation("reclaim")
    def reclaim_expired_leases(self, now: int, limit: int) -> list[RunDispatch]:
        """Take back claims whose lease ended strictly before `now`.

        Each expired claim counts as a failed attempt: back to Queued (T15) or to the dead
        letter when the budget is spent (T16). A stale claim is superseded instead (T17) and
        not returned. Each dispatch is transitioned in its own thread's transaction, so
        concurrent sweeps transition it exactly once.
        """
        return self.reclaim_page(now, limit).transitioned

    def reclaim_page(self, now: int, limit: int, *, finished: FinishedCheck | None = None
                     ) -> ReclaimPage:
        """One page of `reclaim_expired_leases`, saying whether more expired claims may be
        left: the page had `limit` candidates, whatever each of them turned out to be.

        `finished(conn, claim)`, asked under the thread lock, says whether the claim's attempt
        already wrote the run's outcome (the run store knows; see `RunStore.reclaim_expired`):
        such a claim only lost its ack, and is acked (listed Acked) instead of reclaimed."""
        require_ms("now", now)
        _require_page(limit, 0)
        with self._read() as conn:
            candidates = conn.execute(
                sa.select(dispatches.c.dispatch_id)
                .where(dispatches.c.status == DispatchStatus.Claimed.value,
                       dispatches.c.lease_until < now)
                .order_by(dispatches.c.lease_until).limit(limit)).scalars().all()
        transitioned: list[RunDispatch] = []
        for dispatch_id in candidates:
            after = self._reclaim_one(str(dispatch_id), now, finished)
            if after is not None:
                transitioned.append(after)
        return ReclaimPage(transitioned, more=len(candidates) == limit)

    def _reclaim_one(self, dispatch_id: str, now: int, finished: FinishedCheck | None
                     ) -> RunDispatch | None:
        with self._write() as conn:
            found = self._lock_dispatch(conn, dispatch_id)
            if found is None:
                return None
            current, epoch = found
            if (current.status != DispatchStatus.Claimed or current.lease_until is None
                    or current.lease_until >= now):
                return None  # another sweep or the owner got there first
            if current.is_stale(epoch):
                after = current.fenced(epoch, REASON_STALE_RECLAIM, now)
            elif finished is not None and finished(conn, current):
                after = current.acked(now)
            else:
                after = current.lease_expired(now)
            self._save(conn, [(current, after)])
        self._release(after, current.claim_token)
        return None if after.status == DispatchStatus.Superseded else after

    @_operation("purge_terminal")
    def purge_terminal(self, older_than: int) -> int:
        """Delete terminal dispatches last changed before `older_than` (T18). Epochs stay."""
        require_ms("older_than", older_than)
        with self._write() as conn:
            result = conn.execute(sa.delete(dispatches).where(
                dispatches.c.status.in_(_TERMINAL_VALUES), dispatches.c.updated_at < older_than))
            return int(result.rowcount)

    # ---------------------------------------------------------------------- introspection
    @_operation("claimed_per_thread")
    def claimed_per_thread(self) -> dict[str, int]:
        """Threads with more than one Claimed dispatch (an invariant breach; for audits)."""
        query = (sa.select(dispatches.c.thread_id, sa.func.count())
                 .where(dispatches.c.status == DispatchStatus.Claimed.value)
                 .group_by(dispatches.c.thread_id).having(sa.func.count() > 1))
        with self._read() as conn:
            return {str(t): int(n) for t, n in conn.execute(query)}

    @_operation("counts_by_status")
    def counts_by_status(self) -> dict[DispatchStatus, int]:
        query = sa.select(dispatches.c.status, sa.func.count()).group_by(dispatches.c.status)
        counts: dict[DispatchStatus, int] = defaultdict(int)
        with self._read() as conn:
            for status, n in conn.execute(query):
                counts[DispatchStatus(status)] = int(n)
        return {s: counts[s] for s in DispatchStatus}


    @_operation("oldest_due_queued_at")
    def oldest_due_queued_at(self, now: int) -> int | None:
        """`available_at` of the longest-waiting due Queued dispatch (for the age gauge)."""
        query = sa.select(sa.func.min(dispatches.c.available_at)).where(
            dispatches.c.status == DispatchStatus.Queued.value, dispatches.c.available_at <= now)
        with self._read() as conn:
            value = conn.execute(query).scalar_one_or_none()
        return None if value is None else int(value)


def _status(value: object) -> DispatchStatus:
    try:
        return DispatchStatus(value)  # type: ignore[arg-type]
    except ValueError:
        names = ", ".join(s.value for s in DispatchStatus)
        raise ValidationError(f"unknown dispatch status {value!r} (one of {names})") from None


def _require_page(limit: int, offset: int) -> None:
    for name, value in (("limit", limit), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValidationError(f"{name} must be a non-negative integer, got {value!r}")


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
