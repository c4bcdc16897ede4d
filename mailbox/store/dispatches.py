"""The durable mailbox store: SQL is the truth, Redis the hot copy (docs/architecture.md#store).

Every operation is one SQL transaction and never reads the clock (`now` is passed in). Every
statement on the dispatch table is executed here (the statements themselves are in
`statements.py`). State changes go through the model: load the row, ask `RunDispatch` for the
next record (which validates the invariants), write back only the columns that changed,
guarded by the status we read.

Other stores write in the same transactions through the public transaction API: `write()`,
`read()`, `lock_thread()`, `lock_dispatch()`, `insert_dispatch()` and `fenced_write()`, the
fenced-claimed-op pattern whose block runs the caller's writes of the same thread under the
same fence (the run store records a run's start and outcome that way).

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

import contextlib
import functools
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
import uuid6
from sqlalchemy import exc as sa_exc

from mailbox import metrics
from mailbox.coordination import WAKE_REQUESTED, Coordinator, Lease, ScriptCall, run_calls
from mailbox.database import READ_ONLY, is_postgres
from mailbox.errors import (
    AlreadyExistsError,
    MailboxError,
    NotFoundError,
    StaleEpochError,
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
    DispatchStatus,
    MailboxInterrupt,
    RunDispatch,
    RunDispatchResult,
    require_id,
    require_ms,
    show_value,
)
from mailbox.store import statements as q
from mailbox.store.direct import execute
from mailbox.store.operations import operation
from mailbox.write_gate import WriteGateError, write_gate

log = logging.getLogger(__name__)
CLAIM_RETRIES = 5
"""Claims of one call when submits keep marking the pending lease (each retry sees what the
mark stood for: one is enough unless submits keep arriving)."""

NOT_OURS = (0, 1)
_ON_COMMIT = "mailbox_on_commit"  # VersionConflict(expected=0, actual=1): "not your claim"

MAX_OFFSET = 2**63 - 1
"""The largest offset a list call takes (SQL's 64-bit integers)."""
MAX_LIST_LIMIT = 1000
"""The most rows one list call returns (list_dispatches, list_terminal_dispatches,
list_dead_letters, thread_messages, ...): page with offsets or cursors beyond it, so that no
call's work, memory or transaction grows with the data (docs/behaviour.md#gc)."""

ClaimedReader = Callable[[sa.Connection, RunDispatch], None]
"""`inside(conn, claimed)`: a caller's reads of the dispatch it just claimed, in the claim's
transaction (`MailboxStore.claim`)."""
FinishedCheck = Callable[[sa.Connection, RunDispatch], bool]
"""`finished(conn, claim)`: did this expired claim's attempt already write the run's outcome?
Asked by reclaim under the claim's thread lock, in its transaction: for a current claim (True:
ack it instead of reclaiming it) and for a stale one, which is superseded either way (the
answer tells the caller that the run holds an outcome nobody has reported yet)."""


@dataclass(frozen=True)
class ReclaimPage:
    """What one page of reclaim transitioned (Queued, DeadLetter, or Acked when `finished`
    said so), the stale claims it superseded instead (T17, listed apart: they were not
    reclaimed), and whether another page may follow."""

    transitioned: list[RunDispatch]
    more: bool
    superseded: list[RunDispatch] = field(default_factory=list)


@dataclass
class FencedWrite:
    """Inside `fenced_write`: the open transaction and the dispatch as it now stands. Once
    the block is done, `released` says what giving the lease back answered (when the write
    ended the claim): `coordinator.release`'s answer, None when Redis could not be asked."""

    conn: sa.Connection
    dispatch: RunDispatch
    token: str
    epoch: int
    released: int | None = None


def new_token() -> str:
    """Claim tokens and generated ids are UUID v7: unique and time-ordered."""
    return str(uuid6.uuid7())


class MailboxStore:
    """Dispatch queue authority over one SQL database and one Redis
    (docs/architecture.md#store)."""

    def __init__(self, engine: sa.Engine, coordinator: Coordinator) -> None:
        self.engine = engine
        self.coordinator = coordinator
        self.postgres = is_postgres(engine)
        self._reader = engine.execution_options(**{READ_ONLY: True})
        self._gate = write_gate(engine)
        self._insert_epoch_if_missing = q.insert_epoch_if_missing(self.postgres)

    # ------------------------------------------------------------------------ transactions
    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises. On
        SQLite it waits its turn on the writers' gate (docs/architecture.md#sqlite)."""
        committed: list[Callable[[], None]] = []  # see on_commit
        gate = self._gate.held() if self._gate is not None else contextlib.nullcontext()
        try:
            with gate, self.engine.begin() as conn:
                conn.info[_ON_COMMIT] = committed
                try:
                    yield conn
                finally:  # the info dict outlives the checkout: leave nothing behind
                    # (a connection the failure invalidated refuses even this: its info
                    # goes with the DBAPI connection, and the original error must surface)
                    with contextlib.suppress(sa.exc.SQLAlchemyError):
                        conn.info.pop(_ON_COMMIT, None)
        except WriteGateError as exc:
            raise StoreUnavailableError(f"database is locked: {exc}") from exc
        for action in committed:
            action()

    @staticmethod
    def on_commit(conn: sa.Connection, action: Callable[[], None]) -> None:
        """Run `action` once the `write()` transaction of `conn` has committed (never if it
        rolls back): metrics of what the transaction did count only what happened. Outside
        a `write()` (a caller's own transaction) it runs at once."""
        pending = conn.info.get(_ON_COMMIT)
        if pending is None:
            action()
        else:
            pending.append(action)

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only connection (a deferred BEGIN on SQLite: never the write lock)."""
        with self._reader.connect() as conn:
            yield conn

    def lock_thread(self, conn: sa.Connection, thread_id: str, *, create: bool) -> int | None:
        """Lock the thread's epoch row (serializing the thread's writers); return its epoch.

        With `create`, a missing row is created at epoch 0 first. A row this transaction
        inserted is already locked by it (PostgreSQL holds an inserted row until commit: a
        concurrent insert of the same thread waits for it; SQLite's writer holds the whole
        database), so its epoch is 0 with no read back: a thread's first submit runs one
        statement less. A row another transaction inserted since the first read (the insert
        did nothing) is locked and read as any other.
        """
        params = {"thread_id": thread_id}
        epoch = execute(conn, q.SELECT_EPOCH_FOR_UPDATE, params).scalar_one_or_none()
        if epoch is None and create:
            inserted = execute(conn, self._insert_epoch_if_missing, {
                "thread_id": thread_id, "current_epoch": 0}).rowcount
            if inserted == 1:
                return 0
            epoch = execute(conn, q.SELECT_EPOCH_FOR_UPDATE, params).scalar_one()
        return None if epoch is None else int(epoch)

    def lock_threads(self, conn: sa.Connection, thread_ids: Iterable[str]) -> dict[str, int]:
        """Lock several threads' epoch rows (created at epoch 0 where missing), in thread-id
        order, so that two transactions locking several threads never wait on each other in
        a cycle; return their epochs. For bulk submission: per-thread invariants hold as
        with one thread, the transaction just holds more than one thread's lock."""
        ids = sorted(set(thread_ids))
        if not ids:
            return {}
        execute(conn, self._insert_epoch_if_missing,
                [{"thread_id": t, "current_epoch": 0} for t in ids])
        return {str(t): int(e) for t, e in execute(conn, q.SELECT_EPOCHS_FOR_UPDATE,
                                                         {"thread_ids": ids})}

    def live_dedupe_keys(self, conn: sa.Connection, pairs: Iterable[tuple[str, str]]
                         ) -> set[tuple[str, str]]:
        """Which of these (thread, dedupe key) pairs a live dispatch holds."""
        wanted = set(pairs)
        if not wanted:
            return set()
        rows = execute(conn, q.SELECT_LIVE_DEDUPE_KEYS, {
            "thread_ids": sorted({t for t, _ in wanted}),
            "dedupe_keys": sorted({k for _, k in wanted})})
        return {(str(t), str(k)) for t, k in rows} & wanted

    def insert_dispatches(self, conn: sa.Connection, stored: Sequence[RunDispatch]) -> None:
        """T1 for many dispatches already stamped with their threads' epochs (`enqueued`),
        in one statement, inside the caller's transaction holding their threads' locks."""
        if stored:
            execute(conn, q.INSERT_DISPATCH, [q.dispatch_row(d) for d in stored])

    def lock_dispatch(self, conn: sa.Connection, dispatch_id: str,
                      thread_id: str | None = None) -> tuple[RunDispatch, int] | None:
        """Lock the dispatch's thread, then load the dispatch; None if it does not exist.

        A caller that knows the thread (a phase's context) saves the lookup; a wrong thread
        finds nothing, and an unknown one is not created."""
        if thread_id is None:
            thread_id = execute(conn, q.SELECT_THREAD_OF,
                                {"dispatch_id": dispatch_id}).scalar_one_or_none()
            if thread_id is None:
                return None
            epoch = self.lock_thread(conn, thread_id, create=True)
        else:
            epoch = self.lock_thread(conn, thread_id, create=False)
            if epoch is None:
                return None
        assert epoch is not None
        row = execute(conn, q.SELECT_DISPATCH, {"dispatch_id": dispatch_id}).one_or_none()
        if row is None or row.thread_id != thread_id:
            return None
        return q.dispatch_from_row(row), epoch

    def insert_dispatch(self, conn: sa.Connection, dispatch: RunDispatch, epoch: int
                        ) -> RunDispatch:
        """T1 inside the caller's transaction, which holds the thread lock (`lock_thread`):
        store `dispatch` Queued, stamped with `epoch`; return what was stored. A duplicate
        raises IntegrityError out of the transaction (see `duplicate_error`)."""
        stored = dispatch.enqueued(epoch)
        execute(conn, q.INSERT_DISPATCH, q.dispatch_row(stored))
        return stored

    def duplicate_error(self, dispatch: RunDispatch) -> AlreadyExistsError | None:
        """After an insert of `dispatch` failed on a unique key: which one it hit (its id, or
        its thread's live dedupe key); None when neither explains it."""
        with self.read() as conn:
            if execute(conn, q.SELECT_DISPATCH_ID,
                       {"dispatch_id": dispatch.dispatch_id}).first() is not None:
                return AlreadyExistsError(dispatch.dispatch_id)
            if dispatch.dedupe_key is not None and execute(conn, q.SELECT_LIVE_DEDUPE, {
                    "thread_id": dispatch.thread_id,
                    "dedupe_key": dispatch.dedupe_key}).first() is not None:
                return AlreadyExistsError(f"dedupe_key={dispatch.dedupe_key}")
        return None

    def _save(self, conn: sa.Connection, pairs: Iterable[tuple[RunDispatch, RunDispatch]]
              ) -> None:
        """Write transitions back: one UPDATE per distinct set of changed columns, guarded by
        the status each row had when read (a mismatch means a writer skipped the lock). One
        transition (every fenced write) is one UPDATE of that row: no grouping, no IN list,
        which cost a third of the statement's time."""
        changes: list[tuple[RunDispatch, dict[str, Any]]] = []
        for before, after in pairs:
            if after.is_terminal and not before.is_terminal:
                self.on_commit(conn, functools.partial(metrics.count_terminal,
                                                       after.status.label))
            change = q.dispatch_changes(before, after)
            if change:
                changes.append((before, change))
        if len(changes) == 1:
            before, change = changes[0]
            result = execute(conn, q.UPDATE_DISPATCH, {
                **change, "guard_id": before.dispatch_id, "guard_status": before.status.value})
            if result.rowcount != 1:
                raise MailboxError(f"concurrent modification of dispatch {before.dispatch_id}")
            return
        groups: dict[tuple[str, str], tuple[dict[str, Any], list[str]]] = {}
        for before, change in changes:
            key = (before.status.value, json.dumps(change, sort_keys=True, default=str))
            groups.setdefault(key, (change, []))[1].append(before.dispatch_id)
        for (old_status, _), (change, ids) in groups.items():
            for chunk in _chunks(ids, 500):
                result = execute(conn, q.UPDATE_DISPATCHES, {
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

    def _release(self, d: RunDispatch, token: str | None) -> int | None:
        """Give the lease back after the claim ended; what Redis answered (None: not asked,
        or unreachable)."""
        return self._release_thread(d.thread_id, token)

    def _release_thread(self, thread_id: str, token: str | None) -> int | None:
        answer: list[int] = []
        if token:
            self._after_commit("release", lambda: answer.append(
                self.coordinator.release(thread_id, token)))
        return answer[0] if answer else None

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

    def _generation(self, thread_id: str) -> str | None:
        try:
            return self.coordinator.epoch_generation(thread_id)
        except redis.RedisError:
            return None

    # =========================================================================== write path
    @operation("enqueue")
    def enqueue(self, dispatch: RunDispatch) -> None:
        """Store a new Queued dispatch stamped with the thread's current epoch (T1).

        Durable when this returns. A duplicate dispatch id or a dedupe key still held by a
        live dispatch of the thread raises AlreadyExistsError and writes nothing.
        """
        if not isinstance(dispatch, RunDispatch):
            raise ValidationError(f"enqueue takes a RunDispatch, got {type(dispatch).__name__}")
        dispatch.validate_for_enqueue()
        try:
            with self.write() as conn:
                epoch = self.lock_thread(conn, dispatch.thread_id, create=True)
                assert epoch is not None
                self.insert_dispatch(conn, dispatch, epoch)
        except sa_exc.IntegrityError:
            raise (self.duplicate_error(dispatch)
                   or AlreadyExistsError(f"dedupe_key={dispatch.dedupe_key}")) from None

    @operation("claim", empty_result=True)
    def claim(self, thread_id: str, consumer_id: str, lease_ms: int, now: int, limit: int = 1,
              *, wake_id: str | None = None, clock: Callable[[], int] | None = None,
              expect_due: bool = False, inside: ClaimedReader | None = None
              ) -> list[RunDispatch]:
        """Claim the thread's next eligible dispatch (T2): at most one per call and per thread.

        Eligible = Queued, `available_at <= now`; order = priority, then created_at. Nothing
        is claimed while the thread has a Claimed dispatch, even one whose lease expired and
        was not reclaimed yet (the sweep reclaims it). A wake-up's claim passes its id, which
        clears the thread's pending-wake mark (docs/behaviour.md#wake-gate); `clock` gives
        a claim that looks again a fresh `now` (what it looks for was submitted after `now`).
        Without `expect_due`, a plain read first asks whether anything is due (`_has_due`);
        a caller that knows something is (a settle whose ack saw it, a submit's wake-up)
        passes `expect_due` and saves that read. `inside(conn, claimed)` reads what the
        caller needs of the claimed dispatch in the claim's own transaction (the run store:
        what reconstruct checks, one round trip less).
        """
        require_id("thread_id", thread_id)
        require_id("consumer_id", consumer_id)
        require_ms("lease_ms", lease_ms)
        require_ms("now", now)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValidationError(f"limit must be a non-negative integer, got {limit!r}")
        if limit == 0:
            return []
        claimed = self._claim_thread(thread_id, None, consumer_id, lease_ms, now,
                                     wake_id=wake_id, clock=clock, expect_due=expect_due,
                                     inside=inside)
        return [] if claimed is None else [claimed]

    @operation("claim_dispatch", empty_result=True)
    def claim_dispatch(self, dispatch_id: str, consumer_id: str, lease_ms: int, now: int
                       ) -> RunDispatch | None:
        """Claim one dispatch by id, ignoring `available_at` (for an inline claim right after
        submit). None when it is not Queued, stale, or another dispatch holds the thread."""
        require_id("dispatch_id", dispatch_id)
        require_id("consumer_id", consumer_id)
        require_ms("lease_ms", lease_ms)
        require_ms("now", now)
        with self.read() as conn:
            thread_id = execute(conn, q.SELECT_THREAD_OF,
                                {"dispatch_id": dispatch_id}).scalar_one_or_none()
        if thread_id is None:
            return None
        return self._claim_thread(thread_id, dispatch_id, consumer_id, lease_ms, now)

    def _has_due(self, thread_id: str, now: int) -> bool:
        """A plain read before the claim's write transaction: on SQLite a write transaction
        takes the database's one write lock, and a claim that does not know whether its
        thread has work (the sweep's wake-ups, a test's claim) often finds it empty.
        Skipping on "nothing due" loses nothing: a dispatch committed after this read is
        woken by its own submit (or retry, or the sweep), like any dispatch that arrives
        after a claim. (A Claimed row that Redis forgot is then not rebuilt into a lease
        here; the next claim that finds work does it.)"""
        with self.read() as conn:
            return execute(conn, q.SELECT_ANY_DUE, {"thread_id": thread_id, "now": now}
                           ).first() is not None

    def _claim_thread(self, thread_id: str, dispatch_id: str | None, consumer_id: str,
                      lease_ms: int, now: int, *, wake_id: str | None = None,
                      clock: Callable[[], int] | None = None, expect_due: bool = False,
                      inside: ClaimedReader | None = None) -> RunDispatch | None:
        """Claim under a pending lease. When the claim comes away empty and a submit marked
        the pending lease meanwhile (it skipped its wake-up, counting on us), claim again:
        its dispatch committed before the mark, so the next look sees it."""
        for _ in range(CLAIM_RETRIES):
            claimed, requested = self._claim_once(thread_id, dispatch_id, consumer_id,
                                                  lease_ms, now, wake_id,
                                                  expect_due=expect_due, inside=inside)
            if claimed is not None or not requested:
                return claimed
            wake_id, dispatch_id, expect_due = None, None, True  # a submit counted on us
            now = max(now, clock()) if clock is not None else now
        return None

    def _claim_once(self, thread_id: str, dispatch_id: str | None, consumer_id: str,
                    lease_ms: int, now: int, wake_id: str | None, *, expect_due: bool = False,
                    inside: ClaimedReader | None = None) -> tuple[RunDispatch | None, bool]:
        """(claimed, whether a submit asked for another claim while our pending lease stood)."""
        token = new_token()
        try:
            if self.coordinator.acquire(thread_id, token, now + lease_ms, consumer_id, now,
                                        lease_ms, wake_id=wake_id) is not None:
                return None, False  # a live lease: busy, refused without SQL
            if dispatch_id is None and not expect_due and not self._has_due(thread_id, now):
                return None, self._release_pending(thread_id, token)
            claimed, holder = self._claim_in_sql(thread_id, dispatch_id, token, consumer_id,
                                                 lease_ms, now, inside)
        except BaseException:
            self._release_pending(thread_id, token)
            raise
        if claimed is not None:
            self._after_commit("bind", lambda: self.coordinator.put(
                thread_id, Lease(token, claimed.dispatch_id, now + lease_ms, consumer_id),
                expected_token=token, allow_missing=True, lease_ms=lease_ms, now=now))
        elif holder is not None:
            # Redis had forgotten a claim SQL still holds: rebuild the lease from the row.
            assert holder.claim_token and holder.claimed_by and holder.lease_until is not None
            requested: list[bool] = []
            self._after_commit("rebuild", lambda: requested.append(self._rebuild_lease(
                thread_id, holder, token, lease_ms, now)))
            return None, bool(requested) and requested[0]
        else:
            return None, self._release_pending(thread_id, token)
        return claimed, False

    def _rebuild_lease(self, thread_id: str, holder: RunDispatch, pending_token: str,
                       lease_ms: int, now: int) -> bool:
        """Put the holder's lease back in place of our pending one, then look at the row
        again. The holder may have acked after our read and released before our put (its
        release then found our pending token and did nothing): the rebuilt lease would stand
        for a finished claim and stall the thread until it ran out. Seeing the row still
        Claimed after the put means the holder's own release is still to come. True when we
        released it and a submit had marked it meanwhile (claim again)."""
        token = holder.claim_token or ""
        if not self.coordinator.put(thread_id, Lease(token, holder.dispatch_id,
                                                     holder.lease_until or 0,
                                                     holder.claimed_by or ""),
                                    expected_token=pending_token, allow_missing=False,
                                    lease_ms=lease_ms, now=now):
            return False
        with self.read() as conn:
            row = execute(conn, q.SELECT_DISPATCH,
                          {"dispatch_id": holder.dispatch_id}).one_or_none()
        if row is None or row.status != DispatchStatus.Claimed.value or row.claim_token != token:
            return self.coordinator.release(thread_id, token) == WAKE_REQUESTED
        return False

    def _release_pending(self, thread_id: str, token: str) -> bool:
        """Release a pending lease; True when a submit marked it meanwhile (claim again)."""
        released: list[int] = []
        self._after_commit("release pending", lambda: released.append(
            self.coordinator.release(thread_id, token)))
        return bool(released) and released[0] == WAKE_REQUESTED

    def _claim_in_sql(self, thread_id: str, dispatch_id: str | None, token: str,
                      consumer_id: str, lease_ms: int, now: int,
                      inside: ClaimedReader | None = None
                      ) -> tuple[RunDispatch | None, RunDispatch | None]:
        """Returns (claimed dispatch, the Claimed dispatch that blocked us)."""
        with self.write() as conn:
            epoch = self.lock_thread(conn, thread_id, create=False)
            if epoch is None:
                return None, None
            return self._claim_locked(conn, thread_id, epoch, dispatch_id, token, consumer_id,
                                      lease_ms, now, inside)

    def _claim_locked(self, conn: sa.Connection, thread_id: str, epoch: int,
                      dispatch_id: str | None, token: str, consumer_id: str, lease_ms: int,
                      now: int, inside: ClaimedReader | None
                      ) -> tuple[RunDispatch | None, RunDispatch | None]:
        """T2 in a transaction that holds the thread's lock at `epoch`."""
        blockers = [q.dispatch_from_row(r) for r in execute(
            conn, q.SELECT_BLOCKERS, {"thread_id": thread_id, "epoch": epoch})]
        stale = [d for d in blockers if d.status == DispatchStatus.Queued]
        self._save(conn, [(d, d.superseded_as_stale(epoch, now)) for d in stale])
        holder = next((d for d in blockers if d.status == DispatchStatus.Claimed), None)
        if holder is not None:
            return None, holder
        if dispatch_id is None:
            row = execute(conn, q.SELECT_HEAD, {"thread_id": thread_id, "now": now}
                          ).one_or_none()
        else:
            row = execute(conn, q.SELECT_QUEUED_BY_ID, {"dispatch_id": dispatch_id}
                          ).one_or_none()
        if row is None:
            return None, None
        head = q.dispatch_from_row(row)
        if head.is_stale(epoch):  # only reachable by id; thread scans excluded it above
            self._save(conn, [(head, head.superseded_as_stale(epoch, now))])
            return None, None
        claimed = head.claimed(token, consumer_id, lease_ms, now)
        self._save(conn, [(head, claimed)])
        if inside is not None:
            inside(conn, claimed)
        return claimed, None

    @operation("claim", empty_result=True)  # counted like every claim
    def claim_in(self, fenced: FencedWrite, consumer_id: str, lease_ms: int, now: int, *,
                 inside: ClaimedReader | None = None) -> RunDispatch | None:
        """Claim the thread's next eligible dispatch (T2) in a `fenced_write` that ended its
        claim and kept the lease (`keep_lease`): a settle's ack claims the next dispatch in
        its own transaction, under the thread lock it already holds, and the lease it still
        holds keeps other claims away meanwhile. Give the lease on with `hand_over_call` (or
        back with `release_kept`) once the block is done. None when nothing is due."""
        claimed, _ = self._claim_locked(fenced.conn, fenced.dispatch.thread_id, fenced.epoch,
                                        None, new_token(), consumer_id, lease_ms, now, inside)
        return claimed

    def release_kept(self, fenced: FencedWrite) -> int | None:
        """After a `fenced_write` with `keep_lease` committed and nothing claimed in it: give
        the lease back. The release's answer (None: Redis unreachable); WAKE_REQUESTED means a
        submit counted on the lease: claim again."""
        return self._release(fenced.dispatch, fenced.token)

    def hand_over_call(self, fenced: FencedWrite, claimed: RunDispatch, lease_ms: int,
                       now: int) -> ScriptCall:
        """After a `fenced_write` with `keep_lease` committed with `claimed` in it: the lease
        put from the old token to `claimed` (compare-and-set; put back if Redis lost it), not
        yet sent. A settle sends it in the round trip of its report (`handed_over` takes the
        reply), and always before the new claim's chain starts: until then the lease still
        names the old token."""
        return self._put_call(fenced.dispatch.thread_id, fenced.token, claimed, lease_ms, now)

    def _put_call(self, thread_id: str, old_token: str, claimed: RunDispatch, lease_ms: int,
                  now: int) -> ScriptCall:
        """The lease put from `old_token` to `claimed` (put back if Redis lost it)."""
        assert claimed.claim_token and claimed.claimed_by and claimed.lease_until is not None
        lease = Lease(claimed.claim_token, claimed.dispatch_id, claimed.lease_until,
                      claimed.claimed_by)
        return self.coordinator.put_call(thread_id, lease, expected_token=old_token,
                                         allow_missing=True, lease_ms=lease_ms, now=now)

    def release_lost(self, thread_id: str, token: str) -> int | None:
        """Give back the lease of a claim that a transaction whose answer was lost ended
        (ack recovery `landed`: the ack committed, its release never ran); what Redis
        answered, None when unreachable. Never raises."""
        return self._release_thread(thread_id, token)

    def hand_over_lost(self, thread_id: str, old_token: str, claimed: RunDispatch,
                       lease_ms: int, now: int) -> None:
        """`hand_over_call` and `send_hand_over` for a claim whose transaction's answer was
        lost (`RunStore.claim_of_lost_ack`): the lease goes from `old_token` to `claimed`;
        never raises."""
        self.send_hand_over(self._put_call(thread_id, old_token, claimed, lease_ms, now))

    def send_hand_over(self, call: ScriptCall) -> None:
        """Send a `hand_over_call` on its own (when no report went with it); never raises."""
        self.coordinator.round_trips += 1
        try:
            reply = run_calls(self.coordinator.client, [call])[0]
        except redis.RedisError as exc:
            reply = exc
        self.handed_over(reply)

    def handed_over(self, reply: Any) -> None:
        """The reply to a hand-over: a failure is logged and counted like every Redis update
        after a commit (the commit is the truth; the new claim's execute rebuilds a lease
        Redis lost, and the sweep reclaims one it could not hand over)."""
        if isinstance(reply, Exception):
            metrics.count_operation("redis_after_commit", "error")
            log.warning("redis update after commit failed (hand over): %s", reply)

    # ------------------------------------------------------------------ fenced claimed ops
    @contextmanager
    def fenced_write(self, dispatch_id: str, claim_token: str, now: int, stale_reason: str,
                     apply: Callable[[RunDispatch], RunDispatch], *,
                     thread_id: str | None = None, keep_lease: bool = False
                     ) -> Iterator[FencedWrite]:
        """The fenced-claimed-op pattern (docs/behaviour.md#fencing): the claim is ours and
        its epoch current, then `apply` makes the dispatch's transition, and the block runs
        the caller's other writes of the same thread in the same transaction, under the same
        fence. All of it commits together, or none of it.

        Refused before anything is written: NotFoundError (no such dispatch), or
        VersionConflictError(0, 1) when the claim is not ours. A stale epoch supersedes the
        dispatch (T13) — that change is committed, the block does not run — and raises
        VersionConflictError(dispatch epoch, thread epoch). `thread_id`, when the caller
        knows it, saves looking the dispatch's thread up. A write that ends the claim gives
        the lease back after its commit, unless `keep_lease`: then the caller passes it on
        (`claim_in`, `hand_over_call`, `release_kept`).
        """
        require_id("dispatch_id", dispatch_id)
        require_ms("now", now)
        if not isinstance(claim_token, str):
            raise ValidationError("claim_token must be a string")
        conflict: VersionConflictError | None = None
        fenced: FencedWrite | None = None
        with self.write() as conn:
            found = self.lock_dispatch(conn, dispatch_id, thread_id)
            if found is None:
                raise NotFoundError(dispatch_id)
            current, epoch = found
            if current.status != DispatchStatus.Claimed or current.claim_token != claim_token:
                raise VersionConflictError(*NOT_OURS)
            if current.is_stale(epoch):
                after = current.fenced(epoch, stale_reason, now)
                conflict = StaleEpochError(current.dispatch_epoch, epoch)
            else:
                after = apply(current)
            self._save(conn, [(current, after)])
            if conflict is None:
                fenced = FencedWrite(conn, after, claim_token, epoch)
                yield fenced
        if after.status != DispatchStatus.Claimed and not (keep_lease and conflict is None):
            released = self._release(after, claim_token)
            if fenced is not None:
                fenced.released = released
        if conflict is not None:
            # Rare path: re-read under a fresh generation so the cache catches up safely.
            self._after_commit("epoch refresh", lambda: self._refresh_epoch(current.thread_id))
            raise conflict

    def _fenced(self, dispatch_id: str, claim_token: str, now: int, stale_reason: str,
                apply: Callable[[RunDispatch], RunDispatch]) -> RunDispatch:
        """`fenced_write` with nothing else to write; returns the dispatch after."""
        with self.fenced_write(dispatch_id, claim_token, now, stale_reason, apply) as fenced:
            return fenced.dispatch

    @operation("take_executor")
    def take_executor(self, thread_id: str, claim_token: str, executor: str, dispatch_id: str,
                      lease_until: int, lease_ms: int, *, create: bool = False,
                      now: int | None = None) -> str:
        """Redis: make `executor` the one process running this claim's attempt and extend the
        lease to `lease_until` (`Coordinator.take_executor`); StoreUnavailableError when
        Redis cannot be reached, like every store operation. `now` (the clock `lease_until`
        was computed with) spares the lease key's PEXPIRE while its TTL still covers it."""
        return self.coordinator.take_executor(thread_id, claim_token, executor, dispatch_id,
                                              lease_until, lease_ms, create=create, now=now)

    @operation("record_dispatch_start")
    def record_dispatch_start(self, dispatch_id: str, claim_token: str,
                              dispatch_instance_id: str, now: int) -> None:
        """T4: the runtime invocation `dispatch_instance_id` started on our claim."""
        require_id("dispatch_instance_id", dispatch_instance_id)
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_START,
                     lambda d: d.started(dispatch_instance_id, now))

    @operation("record_run_result")
    def record_run_result(self, dispatch_id: str, claim_token: str, result: RunDispatchResult,
                          now: int) -> None:
        """T5: record the business outcome; delivery stays open until ack."""
        if not isinstance(result, RunDispatchResult):
            raise ValidationError("result must be a RunDispatchResult")
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_RESULT,
                     lambda d: d.result_recorded(result, now))

    @operation("ack")
    def ack(self, dispatch_id: str, claim_token: str, now: int) -> None:
        """T6: delivery consumed (not "the agent succeeded": see the projection)."""
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_ACK, lambda d: d.acked(now))

    @operation("nack")
    def nack(self, dispatch_id: str, claim_token: str, retry_at: int, error: str, now: int
             ) -> None:
        """T7 requeue at `retry_at`, or T8 dead letter when the attempts reach the budget."""
        require_ms("retry_at", retry_at)
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_NACK,
                     lambda d: d.nacked(retry_at, str(error), now))

    @operation("defer")
    def defer(self, dispatch_id: str, claim_token: str, retry_at: int, reason: str, now: int
              ) -> RunDispatch:
        """T19: the pinned agent version is not deployed on this worker; back to the queue
        at `retry_at` without spending an attempt. Returns the dispatch as requeued."""
        require_ms("retry_at", retry_at)
        return self._fenced(dispatch_id, claim_token, now, REASON_STALE_NACK,
                            lambda d: d.deferred(retry_at, str(reason), now))

    @operation("dead_letter")
    def dead_letter(self, dispatch_id: str, claim_token: str, error: str, now: int) -> None:
        """T9: permanent failure, no more attempts."""
        self._fenced(dispatch_id, claim_token, now, REASON_STALE_DEAD_LETTER,
                     lambda d: d.dead_lettered(str(error), now))

    @operation("extend_lease")
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
            lease_ms=extension_ms, now=now))
        return True

    @operation("supersede_claimed")
    def supersede_claimed(self, dispatch_id: str, claim_token: str, now: int, reason: str
                          ) -> RunDispatch | None:
        """T14: give up a claim found stale before execution. None when missing or not
        Claimed; VersionConflictError(0, 1) when the token is not ours."""
        require_id("dispatch_id", dispatch_id)
        require_ms("now", now)
        with self.write() as conn:
            found = self.lock_dispatch(conn, dispatch_id)
            if found is None:
                return None
            current, epoch = found
            if current.status != DispatchStatus.Claimed:
                return None
            if current.claim_token != claim_token:
                raise VersionConflictError(*NOT_OURS)
            after = current.superseded_claimed(epoch, str(reason), now)
            self._save(conn, [(current, after)])
        self._release(after, claim_token)
        return after

    @operation("cancel")
    def cancel(self, dispatch_id: str, now: int) -> RunDispatch | None:
        """T10: withdraw a Queued dispatch. None (no error) when missing or not Queued."""
        require_id("dispatch_id", dispatch_id)
        require_ms("now", now)
        with self.write() as conn:
            found = self.lock_dispatch(conn, dispatch_id)
            if found is None or found[0].status != DispatchStatus.Queued:
                return None
            current = found[0]
            after = current.cancelled(now)
            self._save(conn, [(current, after)])
        return after

    @operation("interrupt")
    def interrupt(self, thread_id: str, now: int) -> MailboxInterrupt:
        """Bump the thread's epoch and supersede everything Queued (T11), atomically.

        The Claimed dispatch, if any, is returned unchanged (still Claimed, now stale): its
        holder is fenced at its next store call, and the caller should cancel its run.
        """
        require_id("thread_id", thread_id)
        require_ms("now", now)
        generation = self._generation(thread_id)
        with self.write() as conn:
            old = self.lock_thread(conn, thread_id, create=True)
            assert old is not None
            new_epoch = old + 1
            execute(conn, q.UPDATE_EPOCH, {"guard_thread_id": thread_id,
                                          "current_epoch": new_epoch})
            live = [q.dispatch_from_row(r) for r in execute(
                conn, q.SELECT_LIVE_OF_THREAD, {"thread_id": thread_id})]
            pairs = [(d, d.superseded_by_interrupt(now)) for d in live
                     if d.status == DispatchStatus.Queued and d.dispatch_epoch <= old]
            self._save(conn, pairs)
            active = next((d for d in live if d.status == DispatchStatus.Claimed), None)
        self._cache_epoch(thread_id, new_epoch, generation)
        return MailboxInterrupt(new_epoch, active, [after for _, after in pairs])

    @operation("current_dispatch_epoch")
    def current_dispatch_epoch(self, thread_id: str) -> int:
        """The thread's epoch (0 for an unknown thread), from Redis when cached.

        The cache only ever rises, and every fenced SQL write re-checks the SQL epoch, so a
        cache that lags an interrupt can delay a stale dispatch's fencing, never let it run.
        """
        require_id("thread_id", thread_id)
        cached = self.coordinator.cached_epoch(thread_id)
        if cached is not None:
            return cached
        generation = self.coordinator.epoch_generation(thread_id)
        epoch = self._sql_epoch(thread_id)
        self._after_commit("epoch fill", lambda: self.coordinator.fill_epoch(
            thread_id, epoch, generation))
        return epoch

    def claim_current_in_redis(self, thread_id: str, dispatch_id: str, claim_token: str,
                               dispatch_epoch: int, now: int) -> bool:
        """Does Redis say this claim is ours and current: the thread's live lease carries
        our token and dispatch, and the cached epoch (when cached) is not past the
        dispatch's? One round trip, no SQL. True lets verify pass without reading the
        dispatch (docs/behaviour.md#verify); it decides nothing: the attempt's start is
        fenced in SQL by token and epoch, so a claim that is not ours or is stale still never
        starts. False (or Redis unreachable) sends verify to SQL."""
        try:
            lease, epoch = self.coordinator.lease_and_epoch(thread_id)
        except redis.RedisError:
            return False
        return (lease is not None and lease.token == claim_token
                and lease.dispatch_id == dispatch_id and lease.lease_until >= now
                and (epoch is None or dispatch_epoch >= epoch))

    def _refresh_epoch(self, thread_id: str, attempts: int = 3) -> None:
        """Bring the cache up to the SQL epoch (a writer's duty after its commit). Gives up
        only when Redis keeps being flushed, which leaves the cache empty: also correct."""
        for _ in range(attempts):
            generation = self.coordinator.epoch_generation(thread_id)
            if self.coordinator.fill_epoch(thread_id, self._sql_epoch(thread_id), generation):
                return

    @operation("sql_epoch")
    def sql_epoch(self, thread_id: str) -> int:
        return self._sql_epoch(thread_id)

    def _sql_epoch(self, thread_id: str) -> int:
        """The authoritative epoch straight from SQL."""
        with self.read() as conn:
            epoch = execute(conn, q.SELECT_EPOCH, {"thread_id": thread_id}).scalar_one_or_none()
        return 0 if epoch is None else int(epoch)

    # ============================================================================ read path
    @operation("load_dispatch")
    def load_dispatch(self, dispatch_id: str) -> RunDispatch | None:
        require_id("dispatch_id", dispatch_id)
        with self.read() as conn:
            row = execute(conn, q.SELECT_DISPATCH, {"dispatch_id": dispatch_id}).one_or_none()
        return None if row is None else q.dispatch_from_row(row)

    @operation("list_dispatches")
    def list_dispatches(self, thread_id: str, statuses: Sequence[DispatchStatus] | None = None,
                        limit: int = 100, offset: int = 0) -> list[RunDispatch]:
        """The thread's dispatches in claim order (priority, created_at, dispatch_id)."""
        require_id("thread_id", thread_id)
        _require_page(limit, offset)
        values = None if statuses is None else [_status(s).value for s in statuses]
        if values == []:
            return []
        query = q.list_dispatches_query(thread_id, values, limit, offset)
        with self.read() as conn:
            return [q.dispatch_from_row(r) for r in conn.execute(query)]

    @operation("count_dispatches_by_status")
    def count_dispatches_by_status(self, status: DispatchStatus) -> int:
        value = _status(status).value
        with self.read() as conn:
            return int(execute(conn, q.COUNT_WITH_STATUS, {"status": value}).scalar_one())

    @operation("list_terminal_dispatches")
    def list_terminal_dispatches(self, limit: int, offset: int = 0) -> list[RunDispatch]:
        """Terminal dispatches of every thread, oldest change first."""
        _require_page(limit, offset)
        with self.read() as conn:
            return [q.dispatch_from_row(r)
                    for r in conn.execute(q.list_terminal_query(limit, offset))]

    @operation("queued_thread_ids")
    def queued_thread_ids(self) -> list[str]:
        """Threads with at least one Queued dispatch (due or not), sorted."""
        with self.read() as conn:
            return [str(t) for t in execute(conn, q.QUEUED_THREAD_IDS).scalars()]

    # ========================================================================= maintenance
    @operation("reclaim")
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
        such a claim only lost its ack, and is acked (listed Acked) instead of reclaimed. A
        stale claim is superseded (T17) whatever the answer, and listed in `superseded`;
        `finished` is asked about it too, so that the caller learns of an outcome the
        attempt wrote that nobody reported (docs/behaviour.md#sweep)."""
        require_ms("now", now)
        _require_page(limit, 0)
        with self.read() as conn:
            candidates = execute(conn, q.SELECT_EXPIRED_CLAIMS,
                                 {"now": now, "limit": limit}).scalars().all()
        transitioned: list[RunDispatch] = []
        superseded: list[RunDispatch] = []
        for dispatch_id in candidates:
            after = self._reclaim_one(str(dispatch_id), now, finished)
            if after is None:
                continue
            if after.status == DispatchStatus.Superseded:
                superseded.append(after)
            else:
                transitioned.append(after)
        return ReclaimPage(transitioned, more=len(candidates) == limit, superseded=superseded)

    def _reclaim_one(self, dispatch_id: str, now: int, finished: FinishedCheck | None
                     ) -> RunDispatch | None:
        with self.write() as conn:
            found = self.lock_dispatch(conn, dispatch_id)
            if found is None:
                return None
            current, epoch = found
            if (current.status != DispatchStatus.Claimed or current.lease_until is None
                    or current.lease_until >= now):
                return None  # another sweep or the owner got there first
            if current.is_stale(epoch):
                after = current.fenced(epoch, REASON_STALE_RECLAIM, now)
                if finished is not None:
                    finished(conn, current)  # superseded all the same; the caller reports
            elif finished is not None and finished(conn, current):
                after = current.acked(now)
            else:
                after = current.lease_expired(now)
            self._save(conn, [(current, after)])
        self._release(after, current.claim_token)
        return after

    @operation("purge_terminal")
    def purge_terminal(self, older_than: int) -> int:
        """Delete terminal dispatches last changed before `older_than` (T18). Epochs stay."""
        require_ms("older_than", older_than)
        with self.write() as conn:
            result = execute(conn, q.DELETE_TERMINAL_BEFORE, {"older_than": older_than})
            return int(result.rowcount)

    # ---------------------------------------------------------------------- introspection
    @operation("claimed_per_thread")
    def claimed_per_thread(self) -> dict[str, int]:
        """Threads with more than one Claimed dispatch (an invariant breach; for audits)."""
        with self.read() as conn:
            return {str(t): int(n) for t, n in execute(conn, q.CLAIMED_BY_THREAD) if n > 1}

    @operation("counts_by_status")
    def counts_by_status(self) -> dict[DispatchStatus, int]:
        counts: dict[DispatchStatus, int] = defaultdict(int)
        with self.read() as conn:
            for status, n in execute(conn, q.COUNTS_BY_STATUS):
                counts[DispatchStatus(status)] = int(n)
        return {s: counts[s] for s in DispatchStatus}


    @operation("oldest_due_queued_at")
    def oldest_due_queued_at(self, now: int) -> int | None:
        """`available_at` of the longest-waiting due Queued dispatch (for the age gauge)."""
        with self.read() as conn:
            value = execute(conn, q.SELECT_OLDEST_DUE_QUEUED_AT, {"now": now}).scalar_one_or_none()
        return None if value is None else int(value)


    @operation("unreconciled_terminal_dispatches")
    def unreconciled_terminal_dispatches(self, limit: int = 100,
                                         after: tuple[int, str] | None = None
                                         ) -> list[RunDispatch]:
        """Terminal dispatches (Cancelled, Superseded, DeadLetter) whose run still points at
        them and is not done: what a crash between the two writes leaves behind. Ordered by
        (updated_at, dispatch_id); `after` pages on from the last of the previous page."""
        _require_page(limit, 0)
        with self.read() as conn:
            return [q.dispatch_from_row(r)
                    for r in conn.execute(q.unreconciled_terminal_page(limit, after))]

    @staticmethod
    def next_wake_in(conn: sa.Connection, thread_id: str) -> int | None:
        """When the thread next needs a wake-up (docs/behaviour.md#future-wakes): the
        earliest `available_at` of its Queued dispatches; None when it has none, or while one
        of its dispatches is Claimed (that claim's holder looks again when it lets go)."""
        row = execute(conn, q.SELECT_THREAD_WAKE_STATE, {"thread_id": thread_id}).one()
        if row.claimed_now or row.next_queued_at is None:
            return None
        return int(row.next_queued_at)

    @operation("next_wake_at")
    def next_wake_at(self, thread_id: str) -> int | None:
        """`next_wake_in`, read on its own."""
        with self.read() as conn:
            return self.next_wake_in(conn, thread_id)

    @operation("due_thread_ids")
    def due_thread_ids(self, now: int, limit: int = 1000, after: str | None = None
                       ) -> list[str]:
        """Threads with a Queued dispatch due now and no Claimed dispatch: those a wake-up
        would start (delayed availability, retries in backoff, lost publishes). Ordered by
        thread id; `after` pages on from the last id of the previous page."""
        _require_page(limit, 0)
        with self.read() as conn:
            return [str(t) for t in conn.execute(
                q.due_thread_ids_query(now, limit, after)).scalars()]

    @operation("list_dead_letters")
    def list_dead_letters(self, *, thread_id: str | None = None, agent: str | None = None,
                          error_contains: str | None = None, since: int | None = None,
                          until: int | None = None, limit: int = 100, offset: int = 0
                          ) -> list[RunDispatch]:
        """Dead-lettered dispatches, newest first, filtered by thread, agent name, error text
        and the time they died (`completed_at` within [since, until))."""
        _require_page(limit, offset)
        query = q.dead_letters_query(thread_id=thread_id, agent=agent,
                                     error_contains=error_contains, since=since, until=until,
                                     limit=limit, offset=offset)
        with self.read() as conn:
            return [q.dispatch_from_row(r) for r in conn.execute(query)]

    @operation("purge_dead_letters")
    def purge_dead_letters(self, dispatch_ids: Sequence[str]) -> int:
        """Delete the given dead letters (and nothing that is not one)."""
        if not dispatch_ids:
            return 0
        with self.write() as conn:
            result = execute(conn, q.DELETE_DEAD_LETTERS, {"dispatch_ids": list(dispatch_ids)})
            return int(result.rowcount)


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
    if limit > MAX_LIST_LIMIT:
        raise ValidationError(f"limit must be at most {MAX_LIST_LIMIT} (MAX_LIST_LIMIT), got "
                              f"{limit}; page with offset or a cursor")
    if offset > MAX_OFFSET:  # SQL integers are 64-bit: a larger offset is a driver error
        raise ValidationError(f"offset must be at most {MAX_OFFSET}, got {show_value(offset)}")


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
