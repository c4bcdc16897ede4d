"""What garbage collection deletes, and the dead-letter purge (docs/behaviour.md#gc).

Every method here does a bounded piece of work: a page read on a read-only connection (on
SQLite a plain BEGIN, which never waits for the write lock), then at most `limit` rows deleted
per write transaction. Deleting is safe to repeat and to run from two processes at once: each
DELETE names its rows by key and re-states why they may go, so a row that stopped qualifying
between the read and the write stays. The loops that page through everything live in
`mailbox/maintenance.py`.

What may go, and why it is safe:

- **terminal dispatches** after their retention (dead letters after their own, longer one):
  terminal rows never change again, and nothing reads a deleted one but an operator;
- **finished runs** that no dispatch references any more, after the thread retention, with
  their messages (the thread's conversation, which agents read as `ctx.messages`): a done
  run never changes again and is never resumed; a replay of a dead letter that is still kept
  stays too, or replaying that dead letter again would run the agent a second time;
- **a thread's epoch row** (and any messages left) once the thread has no dispatch and no run
  at all, decided under the thread's lock. Epochs only grow (docs/behaviour.md#epochs) because a
  dispatch stamped with an old epoch must never start; with no dispatch of the thread left
  there is none to start, so a later submit may begin again at epoch 0. The Redis epoch cache
  must not keep the old value above it (`redis_epoch_ahead` in the audit: verify would fence
  the new work as stale), so the thread's cache key is deleted, and the cache generation
  renewed so that a refill which read SQL before the delete cannot put it back
  (`Coordinator.forget_epochs`; on a Redis Cluster the generation is the thread's own).

No transaction touches two threads' invariants: rows of many threads go in one DELETE only
where no invariant links them (terminal dispatches, unreferenced runs and their messages), and
each epoch row goes in a transaction of its own thread.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
import sqlalchemy as sa

from mailbox import metrics
from mailbox.errors import ValidationError
from mailbox.model import DispatchStatus, require_ms
from mailbox.store import statements as q
from mailbox.store.dispatches import MailboxStore
from mailbox.store.operations import operation

log = logging.getLogger(__name__)

GC_BATCH = 500
"""Rows per write transaction: on SQLite a batch holds the one write lock for milliseconds,
so claims and acks of live work slip in between batches."""
MAX_GC_BATCH = 5000
PURGE_BATCH = 100
"""Dead letters per purge transaction (each brings its run and the run's messages along)."""

# Replay run ids are uuid5(REPLAY_NAMESPACE, the dead letter's dispatch id): one replay each
# (docs/behaviour.md#replay). Defined here because garbage collection must recognise them.
REPLAY_NAMESPACE = uuid.UUID("6d1f3c1e-6a43-4f55-9c8e-2b8f0a7d5e11")


def replay_run_id(dead_dispatch_id: str) -> str:
    """The run id a replay of this dead letter gets (the same for every replay of it)."""
    return str(uuid.uuid5(REPLAY_NAMESPACE, dead_dispatch_id))


def _may_be_replay(run_id: str) -> bool:
    """Replay run ids are version-5 UUIDs; submitted runs get version 7."""
    try:
        return uuid.UUID(run_id).version == 5
    except ValueError:
        return False


def check_batch(batch: object, *, name: str = "batch", low: int = 2) -> int:
    """A batch size (rows per transaction) or page size: at least 2 for a batch, because a run
    and its messages go in one transaction."""
    if isinstance(batch, bool) or not isinstance(batch, int) \
            or not low <= batch <= MAX_GC_BATCH:
        raise ValidationError(f"{name} must be an integer within {low}..{MAX_GC_BATCH}, got "
                              f"{batch!r}")
    return batch


def _check_page(limit: object) -> int:
    return check_batch(limit, name="limit", low=1)


@dataclass(frozen=True)
class Cutoffs:
    """Milliseconds: what was last changed strictly before these times may go."""

    dispatches: int
    """Acked, Cancelled and Superseded dispatches (MAILBOX_RETENTION_S)."""
    dead_letters: int
    """Dead letters (MAILBOX_DEAD_LETTER_RETENTION_S)."""
    runs: int
    """Finished, unreferenced runs with their messages (MAILBOX_THREAD_RETENTION_S)."""

    def __post_init__(self) -> None:
        for name in ("dispatches", "dead_letters", "runs"):
            require_ms(name, getattr(self, name))


@dataclass(frozen=True)
class DispatchPage:
    """One page of the terminal-dispatch scan: what went, and where the next page starts."""

    dispatches: int
    dead_letters: int
    cursor: tuple[int, int, str] | None
    more: bool
    transactions: int


@dataclass(frozen=True)
class RunPage:
    """Runs of a page of threads that may go; `more` when the page was full."""

    run_ids: list[str]
    kept_replays: int
    cursor: tuple[str, str]
    more: bool
    threads: dict[str, str] = field(default_factory=dict)
    """run id -> thread id of `run_ids` (a Redis Cluster keeps a run's events in its
    thread's slot: deleting them needs the thread once the run is gone)."""


@dataclass(frozen=True)
class Deleted:
    """What a deletion removed, and in how many write transactions."""

    run_ids: list[str] = field(default_factory=list)
    dispatches: int = 0
    messages: int = 0
    threads: int = 0
    transactions: int = 0
    run_threads: dict[str, str] = field(default_factory=dict)
    """run id -> thread id, where known, of `run_ids` (for their event streams)."""


class Retention:
    """The deletions of garbage collection and of the dead-letter purge, over the dispatch
    store's transactions (docs/behaviour.md#gc)."""

    def __init__(self, store: MailboxStore) -> None:
        self.store = store

    # --------------------------------------------------------------------------- dispatches
    @operation("gc_dispatches")
    def delete_expired_dispatches(self, cutoffs: Cutoffs, after: tuple[int, int, str] | None,
                                  limit: int = GC_BATCH) -> DispatchPage:
        """One page of terminal dispatches past their retention, deleted in one short
        transaction. `after` is the previous page's cursor (None to start)."""
        _check_page(limit)
        before = max(cutoffs.dispatches, cutoffs.dead_letters)
        with self.store.read() as conn:
            rows = conn.execute(q.expired_terminal_page(before, after, limit,
                                                            postgres=self.store.postgres)).all()
        doomed = [r for r in rows if r.updated_at < (
            cutoffs.dead_letters if r.status == DispatchStatus.DeadLetter.value
            else cutoffs.dispatches)]
        cursor = (int(rows[-1].updated_at), int(rows[-1].created_at),
                  str(rows[-1].dispatch_id)) if rows else after
        if not doomed:
            return DispatchPage(0, 0, cursor, len(rows) == limit, 0)
        dead = {r.dispatch_id for r in doomed if r.status == DispatchStatus.DeadLetter.value}
        with self.store.write() as conn:
            gone = conn.execute(q.DELETE_EXPIRED_DISPATCHES, {
                "dispatch_ids": [r.dispatch_id for r in doomed],
                "dead_before": cutoffs.dead_letters, "before": cutoffs.dispatches}).rowcount
        # Terminal rows never change, so what was selected is what went (unless another
        # collector took some first: then count only the share that is certain).
        dead_gone = min(len(dead), int(gone))
        return DispatchPage(int(gone) - dead_gone, dead_gone, cursor, len(rows) == limit, 1)

    # ------------------------------------------------------------------------------ threads
    @operation("gc_threads")
    def thread_page(self, after: str, limit: int = GC_BATCH) -> list[str]:
        """Thread ids (every thread that has anything has an epoch row) after `after`."""
        _check_page(limit)
        with self.store.read() as conn:
            return [str(t) for t in conn.execute(q.SELECT_THREAD_PAGE,
                                                 {"after": after, "limit": limit}).scalars()]

    @operation("gc_runs")
    def expired_runs(self, thread_ids: Sequence[str], before: int,
                     after: tuple[str, str] = ("", ""), limit: int = GC_BATCH // 2
                     ) -> RunPage:
        """Runs of these threads that are done, last changed before `before` and referenced
        by no dispatch, except replays of dead letters still kept (`limit` candidates)."""
        _check_page(limit)
        require_ms("before", before)
        if not thread_ids:
            return RunPage([], 0, after, False)
        with self.store.read() as conn:
            rows = conn.execute(q.SELECT_OLD_DONE_RUNS, {
                "thread_ids": list(thread_ids), "before": before, "after_thread": after[0],
                "after_run": after[1], "limit": limit}).all()
            candidates = [(str(r.run_id), str(r.thread_id)) for r in rows]
            referenced = set(conn.execute(q.SELECT_REFERENCED_RUNS, {
                "thread_ids": sorted({t for _, t in candidates}),
                "run_ids": [r for r, _ in candidates]}).scalars()) if candidates else set()
            free = [(r, t) for r, t in candidates if r not in referenced]
            kept = self._kept_replays(conn, free)
        cursor = (str(rows[-1].thread_id), str(rows[-1].run_id)) if rows else after
        return RunPage([r for r, _ in free if r not in kept], len(kept), cursor,
                       len(rows) == limit, {r: t for r, t in free if r not in kept})

    @staticmethod
    def _kept_replays(conn: sa.Connection, candidates: list[tuple[str, str]]) -> set[str]:
        """The candidates that replay a dead letter still kept: replaying it again must find
        them (`Mailbox.replay` is idempotent by the run's existence)."""
        maybe = [(run, thread) for run, thread in candidates if _may_be_replay(run)]
        if not maybe:
            return set()
        dead = conn.execute(q.SELECT_DEAD_LETTER_IDS_OF_THREADS,
                            {"thread_ids": sorted({t for _, t in maybe})}).scalars()
        replays = {replay_run_id(str(d)) for d in dead}
        return {run for run, _ in maybe if run in replays}

    @operation("gc_runs")
    def delete_runs(self, run_ids: Sequence[str], before: int, limit: int = GC_BATCH
                    ) -> Deleted:
        """Delete these runs (at most half of `limit`) that still qualify — done, last changed
        before `before`, referenced by no dispatch — with their messages: runs and messages
        together at most `limit` rows per transaction. A run with more messages than fit
        loses them over several transactions first; a done run is never resumed and gets no
        new dispatch, so nothing can need those messages meanwhile."""
        check_batch(limit)
        require_ms("before", before)
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return Deleted()
        room = limit - len(ids)  # messages that fit beside the runs
        if room < 1:
            raise ValidationError(f"at most {limit - 1} runs per call with limit {limit}, "
                                  f"got {len(ids)}")
        messages, transactions = 0, 0
        while True:
            with self.store.write() as conn:
                transactions += 1
                params = {"run_ids": ids, "limit": room}
                n = int(conn.execute(q.DELETE_MESSAGES_OF_RUNS, params).rowcount)
                messages += n
                if n < room or conn.execute(q.SELECT_A_MESSAGE_OF_RUNS,
                                            {"run_ids": ids}).first() is None:
                    gone = [str(r) for r in conn.execute(
                        q.DELETE_EXPIRED_RUNS, {"run_ids": ids, "before": before}).scalars()]
                    return Deleted(run_ids=gone, messages=messages,
                                   transactions=transactions)

    @operation("gc_threads")
    def empty_threads(self, thread_ids: Sequence[str]) -> list[str]:
        """Those of these threads with no dispatch and no run left (candidates only: the
        deletion decides again under the thread's lock)."""
        if not thread_ids:
            return []
        with self.store.read() as conn:
            return sorted(str(t) for t in conn.execute(
                q.SELECT_EMPTY_THREADS, {"thread_ids": list(thread_ids)}).scalars())

    @operation("gc_thread")
    def delete_thread(self, thread_id: str, limit: int = GC_BATCH) -> Deleted:
        """Delete an empty thread: its stray messages (`limit` per transaction), then its
        epoch row, each step under the thread's lock and only while the thread still has no
        dispatch and no run. The Redis epoch cache is forgotten inside the last transaction
        (a Redis failure rolls the deletion back: an epoch row must not go while its cached
        value may outlive it) and again after the commit (see the module docstring)."""
        check_batch(limit)
        messages, transactions = 0, 0
        while True:
            with self.store.write() as conn:
                transactions += 1
                if (self.store.lock_thread(conn, thread_id, create=False) is None
                        or self._has_work(conn, thread_id)):
                    return Deleted(messages=messages, transactions=transactions)
                n = int(conn.execute(q.DELETE_MESSAGES_OF_THREAD,
                                     {"thread_id": thread_id, "limit": limit}).rowcount)
                messages += n
                if n < limit:
                    conn.execute(q.DELETE_EPOCH, {"thread_id": thread_id})
                    self._forget_epochs([thread_id])
                    break
        try:
            self._forget_epochs([thread_id])
        except redis.RedisError as exc:
            # Only a refill that read SQL in the instant between the two calls could have
            # cached the old epoch; say so, the audit's redis_epoch_ahead would show it.
            metrics.count_operation("gc_epoch_forget", "error")
            log.warning("thread %s: epoch row deleted, but its Redis epoch cache could not be "
                        "cleared a second time (%s)", thread_id, exc)
        return Deleted(messages=messages, threads=1, transactions=transactions)

    @staticmethod
    def _has_work(conn: sa.Connection, thread_id: str) -> bool:
        params = {"thread_id": thread_id}
        return (conn.execute(q.SELECT_THREAD_HAS_DISPATCH, params).first() is not None
                or conn.execute(q.SELECT_THREAD_HAS_RUN, params).first() is not None)

    def _forget_epochs(self, thread_ids: Sequence[str]) -> None:
        """Delete the threads' cached epochs and renew the cache generation guarding them
        (mailbox/coordination.py, epoch_fill.lua)."""
        self.store.coordinator.forget_epochs(thread_ids)

    # ------------------------------------------------------------------------------- purge
    @operation("purge_dead_letters")
    def purge_dead_letters(self, dispatch_ids: Sequence[str]) -> Deleted:
        """Delete the dead letters among these ids, each with its run and the run's messages
        when no other dispatch references the run (a resumed run's earlier dispatch still
        may). `PURGE_BATCH` dead letters per transaction."""
        ids = list(dict.fromkeys(dispatch_ids))
        dispatches, messages, transactions = 0, 0, 0
        run_ids: list[str] = []
        run_threads: dict[str, str] = {}
        for start in range(0, len(ids), PURGE_BATCH):
            chunk = ids[start:start + PURGE_BATCH]
            with self.store.write() as conn:
                transactions += 1
                dead = conn.execute(q.SELECT_DEAD_LETTERS_OF, {"dispatch_ids": chunk}).all()
                if not dead:
                    continue
                dispatches += int(conn.execute(q.DELETE_DEAD_LETTERS, {
                    "dispatch_ids": [d.dispatch_id for d in dead]}).rowcount)
                runs = sorted({str(d.run_id) for d in dead})
                run_threads.update({str(d.run_id): str(d.thread_id) for d in dead})
                orphans = [str(r) for r in conn.execute(q.SELECT_UNREFERENCED_RUNS,
                                                        {"run_ids": runs}).scalars()]
                if not orphans:
                    continue
                while True:
                    n = int(conn.execute(q.DELETE_MESSAGES_OF_RUNS,
                                         {"run_ids": orphans, "limit": GC_BATCH}).rowcount)
                    messages += n
                    if n < GC_BATCH:
                        break
                run_ids += [str(r) for r in conn.execute(q.DELETE_UNREFERENCED_RUNS,
                                                         {"run_ids": orphans}).scalars()]
        return Deleted(run_ids=run_ids, dispatches=dispatches, messages=messages,
                       transactions=transactions,
                       run_threads={r: run_threads[r] for r in run_ids if r in run_threads})


__all__ = ["GC_BATCH", "MAX_GC_BATCH", "PURGE_BATCH", "REPLAY_NAMESPACE", "Cutoffs",
           "Deleted", "DispatchPage", "Retention", "RunPage", "check_batch", "replay_run_id"]
