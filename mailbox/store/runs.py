"""Durable run records, the thread message log and pinned agent resolutions.

A submission writes the run record, its input message, the pinned resolution and the
dispatch in ONE transaction of the thread (write-ahead in the strongest form: there is no
window where a run exists without its dispatch or the other way round). Run records change
state only through `RunRecord.moved_to`, so the run lifecycle of docs/behaviour.md#run-statuses is
enforced in
the model, like the dispatch transitions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
import uuid6
from sqlalchemy import exc as sa_exc

from mailbox import metrics
from mailbox.coordination import LEASE_NOT_OURS, RELEASED, ScriptCall
from mailbox.errors import (
    AlreadyExistsError,
    AlreadyStartedError,
    MailboxError,
    NotFoundError,
    ValidationError,
)
from mailbox.model import (
    REASON_STALE_ACK,
    REASON_STALE_RESULT,
    REASON_STALE_START,
    DispatchStatus,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    Termination,
)
from mailbox.store import statements as q
from mailbox.store.direct import execute
from mailbox.store.dispatches import MAX_LIST_LIMIT, ClaimedReader, MailboxStore, ReclaimPage
from mailbox.store.operations import operation

MAX_INPUT_BYTES = 256 * 1024


@dataclass(frozen=True)
class Message:
    """One entry of a thread's conversation (docs/behaviour.md#conversation): a user's input,
    a human's decision, or an agent's answer and its intermediate turns (tool calls, tool
    results). `seq` orders the thread's log; `turn` is the seq of its run's first message."""

    thread_id: str
    seq: int
    message_id: str
    run_id: str
    role: str
    content: Any
    created_at: int
    turn: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "role": self.role, "content": self.content,
                "run_id": self.run_id, "message_id": self.message_id,
                "created_at": self.created_at, "turn": self.turn}


@dataclass(frozen=True)
class FinishedClaim:
    """An expired claim whose attempt had written the run's outcome, as the claim stood before
    the sweep acked it (T6) or superseded it (T17), and the run it finished: what the sweep
    reports, and counts as the attempt's completion (docs/behaviour.md#sweep)."""

    claim: RunDispatch
    run: RunRecord


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


@dataclass(frozen=True)
class BulkEntry:
    """One item of a bulk submission, built and validated by the caller (the facade)."""

    run: RunRecord
    dispatch: RunDispatch
    resolution: Resolution
    message_id: str
    content: Any


class BulkEntryError(MailboxError):
    """Entry `index` of a bulk chunk was refused (a live dedupe key, a duplicate id): the
    whole chunk was rolled back."""

    prefix = "bulk entry refused"

    def __init__(self, index: int, error: MailboxError) -> None:
        super().__init__(f"entry {index}: {error}")
        self.index = index
        self.error = error


@dataclass(frozen=True)
class Submission:
    """What `submit_input` stored: the dispatch (stamped with the thread epoch) and its run,
    a new one or the waiting run it resumes."""

    dispatch: RunDispatch
    run: RunRecord
    resumed: bool


@dataclass(frozen=True)
class AttemptFacts:
    """What reconstruct checks before an attempt: the run (None when missing) and whether
    its user input is stored."""

    run: RunRecord | None
    has_input: bool


@dataclass(frozen=True)
class AckedNext:
    """What `ack_and_claim_next` did: the acked run, the thread's next dispatch it claimed
    (with its run's facts), and, when it claimed none, whether a submit counted on the
    released lease (claim again)."""

    run: RunRecord | None
    next: tuple[RunDispatch, AttemptFacts] | None
    wake_requested: bool
    hand_over: ScriptCall | None = None
    """With `next`: the lease's put from the acked claim to the new one, NOT yet sent. The
    caller sends it (with its report: `MailboxStore.handed_over` takes the reply; alone:
    `MailboxStore.send_hand_over`) before it starts the new claim's chain."""
    wake_at: int | None = None
    """Without `next`: when the thread's earliest Queued dispatch becomes due (a retry in
    backoff, a delayed submit), read in the ack's transaction; the caller wakes the thread
    then (docs/behaviour.md#future-wakes)."""


@dataclass(frozen=True)
class Acked:
    """What an ack read in its transaction: the run, and whether the thread may have a
    dispatch to claim next (False only when nothing was due and no submit counted on the
    released lease)."""

    run: RunRecord | None
    next_due: bool


def _wake_requested(released: int | None) -> bool:
    """After a release: did a submit count on the lease (it marked it), or could Redis not
    tell (unreachable)? Then the thread needs a claim."""
    return released not in (RELEASED, LEASE_NOT_OURS)


class RunStore:
    """SQL for runs, messages and resolutions, sharing the dispatch store's transactions."""

    def __init__(self, store: MailboxStore) -> None:
        self.store = store
        self._resolutions: dict[str, Resolution] = {}
        self._insert_resolution = q.insert_resolution_if_missing(store.postgres)

    # ------------------------------------------------------------------------------ submit
    @operation("submit")
    def submit(self, run: RunRecord, dispatch: RunDispatch, resolution: Resolution,
               message_id: str, content: Any, now: int, *, new_run: bool = True,
               role: str = "user") -> RunDispatch:
        """Write run + input message + resolution + dispatch atomically; return the stored
        dispatch (stamped with the thread epoch). `new_run=False` adds a dispatch to an
        existing run (a resume), moving it back to Queued-able state."""
        self._check_submission(run, dispatch, content)
        try:
            with self.store.write() as conn:
                stored = self._write_submission(conn, run, dispatch, resolution, message_id,
                                                content, now, new_run=new_run, role=role)
        except sa_exc.IntegrityError:
            raise self._submit_conflict(run, dispatch) from None
        self._resolutions.setdefault(resolution.resolution_id, resolution)  # committed
        return stored

    @operation("submit")
    def submit_input(self, run: RunRecord, dispatch: RunDispatch, resolution: Resolution,
                     message_id: str, content: Any, now: int) -> Submission:
        """A new input on the thread, in one transaction of the thread: a new run, or, when
        the thread's latest run waits for a decision, that run resumed with the input as its
        decision. Deciding under the thread lock, not before it, means the choice cannot go
        stale between the read and the write."""
        self._check_submission(run, dispatch, content)
        try:
            with self.store.write() as conn:
                epoch = self.store.lock_thread(conn, dispatch.thread_id, create=True)
                assert epoch is not None
                last_seq, waiting, turn = q.submit_state_from_row(execute(
                    conn, q.SELECT_SUBMIT_STATE, {"thread_id": run.thread_id}).one())
                if waiting is None:
                    stored = self._write_submission(conn, run, dispatch, resolution,
                                                    message_id, content, now, epoch=epoch,
                                                    seq_and_turn=(last_seq, last_seq + 1))
                    submission = Submission(stored, run, resumed=False)
                else:
                    if waiting.resolution_id is None:
                        raise ValidationError(f"run {waiting.run_id} has no pinned agent")
                    dispatch = replace(dispatch, run_id=waiting.run_id)
                    resumed = replace(waiting, dispatch_id=dispatch.dispatch_id,
                                      updated_at=now)
                    stored = self._write_submission(conn, resumed, dispatch, None, message_id,
                                                    content, now, new_run=False,
                                                    role="decision", epoch=epoch,
                                                    seq_and_turn=(last_seq, turn))
                    submission = Submission(stored, resumed, resumed=True)
        except sa_exc.IntegrityError:
            raise self._submit_conflict(run, dispatch) from None
        if not submission.resumed:
            self._resolutions.setdefault(resolution.resolution_id, resolution)  # committed
        return submission

    @operation("submit_many")
    def submit_many(self, entries: Sequence[BulkEntry], now: int) -> list[Submission]:
        """Many inputs in ONE transaction, all or nothing: each a new run or, like
        `submit_input`, the resume of its thread's waiting run. The threads are locked
        together in thread-id order; inputs on one thread keep their order (their dispatch
        ids and log seqs follow the entries). Rows go in one statement per table. A live
        dedupe key or a duplicate id refuses the chunk with BulkEntryError naming the entry."""
        for entry in entries:
            self._check_submission(entry.run, entry.dispatch, entry.content)
        self._refuse_repeated_keys(entries)
        threads = sorted({e.dispatch.thread_id for e in entries})
        try:
            with self.store.write() as conn:
                epochs = self.store.lock_threads(conn, threads)
                self._refuse_live_keys(conn, entries)
                submissions = self._write_many(conn, entries, epochs, threads, now)
        except sa_exc.IntegrityError:
            raise self._bulk_conflict(entries) from None
        for entry in entries:
            self._resolutions.setdefault(entry.resolution.resolution_id, entry.resolution)
        return submissions

    def _write_many(self, conn: sa.Connection, entries: Sequence[BulkEntry],
                    epochs: dict[str, int], threads: list[str], now: int
                    ) -> list[Submission]:
        waiting: dict[str, RunRecord] = {}
        for row in execute(conn, q.SELECT_WAITING_OF_THREADS, {"thread_ids": threads}):
            waiting.setdefault(str(row.thread_id), q.run_from_row(row))
        last = {str(t): int(n) for t, n in execute(conn, q.SELECT_LAST_SEQS,
                                                         {"thread_ids": threads})}
        dispatches, new_runs, message_rows, submissions = [], [], [], []
        for entry in entries:
            thread = entry.dispatch.thread_id
            seq = last.get(thread, 0) + 1
            last[thread] = seq
            resumed = waiting.get(thread)
            if resumed is None:
                run, dispatch, role, turn = entry.run, entry.dispatch, "user", seq
                new_runs.append(q.run_row(run))
                self._ensure_resolution(conn, entry.resolution, now)
            else:
                if resumed.resolution_id is None:
                    raise ValidationError(f"run {resumed.run_id} has no pinned agent")
                dispatch = replace(entry.dispatch, run_id=resumed.run_id)
                run = replace(resumed, dispatch_id=dispatch.dispatch_id, updated_at=now)
                if execute(conn, q.UPDATE_RUN, {**q.run_row(run), "guard_run_id": run.run_id}
                           ).rowcount != 1:
                    raise NotFoundError(f"run {run.run_id}")
                waiting[thread] = run
                role = "decision"
                turn = int(execute(conn, q.SELECT_RUN_TURN, {"run_id": run.run_id}
                                   ).scalar_one_or_none() or seq)
            stored = dispatch.enqueued(epochs[thread])
            dispatches.append(stored)
            message_rows.append({"thread_id": thread, "seq": seq, "message_id": entry.message_id,
                                 "run_id": run.run_id, "role": role, "content": entry.content,
                                 "created_at": now, "turn": turn})
            submissions.append(Submission(stored, run, resumed=resumed is not None))
        if new_runs:
            execute(conn, q.INSERT_RUN, new_runs)
        self.store.insert_dispatches(conn, dispatches)
        execute(conn, q.INSERT_MESSAGE, message_rows)
        return submissions

    @staticmethod
    def _refuse_repeated_keys(entries: Sequence[BulkEntry]) -> None:
        seen: dict[tuple[str, str], int] = {}
        for index, entry in enumerate(entries):
            key = entry.dispatch.dedupe_key
            if key is None:
                continue
            pair = (entry.dispatch.thread_id, key)
            if pair in seen:
                raise BulkEntryError(index, AlreadyExistsError(
                    f"dedupe_key={key} (entry {seen[pair]} of this chunk holds it)"))
            seen[pair] = index

    def _refuse_live_keys(self, conn: sa.Connection, entries: Sequence[BulkEntry]) -> None:
        pairs = [(e.dispatch.thread_id, e.dispatch.dedupe_key) for e in entries
                 if e.dispatch.dedupe_key is not None]
        held = self.store.live_dedupe_keys(conn, [(t, k) for t, k in pairs if k is not None])
        for index, entry in enumerate(entries):
            if (entry.dispatch.thread_id, entry.dispatch.dedupe_key) in held:
                raise BulkEntryError(index, AlreadyExistsError(
                    f"dedupe_key={entry.dispatch.dedupe_key}"))

    def _bulk_conflict(self, entries: Sequence[BulkEntry]) -> BulkEntryError:
        """After a unique key refused the chunk: which entry (an id that exists already)."""
        for index, entry in enumerate(entries):
            error = self.store.duplicate_error(entry.dispatch)
            if error is not None:
                return BulkEntryError(index, error)
            if self.load_run(entry.run.run_id) is not None:
                return BulkEntryError(index, AlreadyExistsError(f"run {entry.run.run_id}"))
        return BulkEntryError(0, AlreadyExistsError("a unique key of the chunk"))

    @staticmethod
    def _check_submission(run: RunRecord, dispatch: RunDispatch, content: Any) -> None:
        run.validate_for_persist()
        dispatch.validate_for_enqueue()
        if run.thread_id != dispatch.thread_id or run.run_id != dispatch.run_id:
            raise ValidationError("run and dispatch must name the same thread and run")
        encode_input(content)

    def _write_submission(self, conn: sa.Connection, run: RunRecord, dispatch: RunDispatch,
                          resolution: Resolution | None, message_id: str, content: Any,
                          now: int, *, new_run: bool = True, role: str = "user",
                          epoch: int | None = None,
                          seq_and_turn: tuple[int, int | None] | None = None) -> RunDispatch:
        if epoch is None:
            epoch = self.store.lock_thread(conn, dispatch.thread_id, create=True)
            assert epoch is not None
        stored = self.store.insert_dispatch(conn, dispatch, epoch)
        if resolution is not None:
            self._ensure_resolution(conn, resolution, now)
        if new_run:
            execute(conn, q.INSERT_RUN, q.run_row(run))
        else:
            result = execute(conn, q.UPDATE_RUN, {**q.run_row(run), "guard_run_id": run.run_id})
            if result.rowcount != 1:
                raise NotFoundError(f"run {run.run_id}")
        self.append_messages(conn, run.thread_id, run.run_id, [(role, content)], now,
                             message_ids=[message_id], new_run=new_run, known=seq_and_turn)
        return stored

    def append_messages(self, conn: sa.Connection, thread_id: str, run_id: str,
                        entries: Sequence[tuple[str, Any]], now: int, *,
                        message_ids: Sequence[str] | None = None, new_run: bool = False,
                        known: tuple[int, int | None] | None = None) -> None:
        """Append (role, content) entries to the thread's log, in the caller's transaction,
        which holds the thread lock (so the seqs it takes are the next ones). They join their
        run's turn: the seq of the run's first message, or, for a new run, of this one.
        `known`: (the thread's last seq, the run's turn) as the caller read them under the
        same lock (a submit's one read: `SELECT_SUBMIT_STATE`)."""
        if not entries:
            return
        if known is not None:
            seq, turn = known
        elif new_run:
            seq = int(execute(conn, q.SELECT_LAST_SEQ, {"thread_id": thread_id}).scalar_one())
            turn = None
        else:
            last, turn = execute(conn, q.SELECT_LAST_SEQ_AND_TURN,
                                 {"thread_id": thread_id, "run_id": run_id}).one()
            seq = int(last)
        turn = seq + 1 if turn is None else int(turn)
        ids = list(message_ids) if message_ids is not None else \
            [str(uuid6.uuid7()) for _ in entries]
        execute(conn, q.INSERT_MESSAGE, [
            {"thread_id": thread_id, "seq": seq + i, "message_id": ids[i - 1],
             "run_id": run_id, "role": role, "content": content, "created_at": now,
             "turn": turn} for i, (role, content) in enumerate(entries, start=1)])

    def _ensure_resolution(self, conn: sa.Connection, resolution: Resolution, now: int) -> None:
        """Pinned resolutions never change and are never deleted: an existing one is kept,
        and one this store has already seen stored is not written again."""
        if resolution.resolution_id in self._resolutions:
            return
        execute(conn, self._insert_resolution, {
            "resolution_id": resolution.resolution_id, "agent_name": resolution.agent_name,
            "agent_version": resolution.agent_version, "created_at": now})

    def _submit_conflict(self, run: RunRecord, dispatch: RunDispatch) -> AlreadyExistsError:
        return self.store.duplicate_error(dispatch) or AlreadyExistsError(f"run {run.run_id}")

    # ------------------------------------------------------------------------------- reads
    @operation("load_run")
    def load_run(self, run_id: str) -> RunRecord | None:
        with self.store.read() as conn:
            row = execute(conn, q.SELECT_RUN, {"run_id": run_id}).one_or_none()
        return None if row is None else q.run_from_row(row)

    @operation("load_run")
    def load_run_for_attempt(self, run_id: str) -> AttemptFacts:
        """The run and whether its user input is stored, in one read (what reconstruct
        checks before an attempt, when its claim did not read it: `claim_for_attempt`)."""
        with self.store.read() as conn:
            return self._attempt_facts(conn, run_id)

    @staticmethod
    def _attempt_facts(conn: sa.Connection, run_id: str) -> AttemptFacts:
        row = execute(conn, q.SELECT_RUN_WITH_INPUT, {"run_id": run_id}).one_or_none()
        if row is None:
            return AttemptFacts(None, False)
        return AttemptFacts(q.run_from_row(row), bool(row._mapping[q.HAS_INPUT]))

    def _facts_reader(self) -> tuple[list[AttemptFacts], ClaimedReader]:
        """A claim's `inside` reader of the claimed dispatch's run, and where it puts it."""
        facts: list[AttemptFacts] = []

        def read(conn: sa.Connection, claimed: RunDispatch) -> None:
            facts.append(self._attempt_facts(conn, claimed.run_id))

        return facts, read

    def claim_for_attempt(self, thread_id: str, consumer_id: str, lease_ms: int, now: int,
                          *, wake_id: str | None = None, clock: Callable[[], int] | None = None,
                          expect_due: bool = False) -> tuple[RunDispatch, AttemptFacts] | None:
        """`MailboxStore.claim`, reading in the claim's own transaction what reconstruct
        checks (the run, whether its input is stored): the attempt's chain then needs no
        read of its own before its start. Nothing it reads can change before the start
        but through this claim, whose every later write is fenced."""
        facts, read = self._facts_reader()
        claimed = self.store.claim(thread_id, consumer_id, lease_ms, now, wake_id=wake_id,
                                   clock=clock, expect_due=expect_due, inside=read)
        return (claimed[0], facts[-1]) if claimed else None

    @operation("thread_messages")
    def thread_messages(self, thread_id: str, limit: int = 1000) -> list[Message]:
        """The thread's log in the order it was written, oldest first (the last `limit`
        entries, at most `MAX_LIST_LIMIT`); `conversation` pages it in conversation order."""
        self._check_limit(limit)
        with self.store.read() as conn:
            rows = [Message(**dict(r._mapping)) for r in execute(
                conn, q.SELECT_THREAD_TAIL, {"thread_id": thread_id, "limit": limit})]
        return list(reversed(rows))

    @operation("conversation")
    def conversation(self, thread_id: str, *, limit: int = 50, before: int | None = None
                     ) -> list[Message]:
        """A page of the thread's conversation, oldest first: the `limit` messages just
        before the message `before` (its seq; the newest when None), each run's messages
        together, runs in the order their input arrived."""
        self._check_limit(limit)
        with self.store.read() as conn:
            position = None
            if before is not None:
                turn = execute(conn, q.SELECT_TURN_AT, {"thread_id": thread_id,
                                                       "seq": before}).scalar_one_or_none()
                if turn is None:
                    raise NotFoundError(f"no message {before} in thread {thread_id}")
                position = (int(turn), before)
            rows = conn.execute(q.conversation_tail_query(before=position, up_to_turn=None),
                                {"thread_id": thread_id, "limit": limit})
            page = [Message(**dict(r._mapping)) for r in rows]
        return list(reversed(page))

    @operation("history")
    def history(self, thread_id: str, run_id: str, *, limit: int, max_bytes: int
                ) -> list[Message]:
        """What an agent of `run_id` sees as `ctx.messages`: the conversation up to and
        including its own run, oldest first, at most the newest `limit` messages and
        `max_bytes` of JSON content (older ones are left out first; the newest is always
        kept). Runs whose input arrived after this one's are not in it."""
        with self.store.read() as conn:
            turn = execute(conn, q.SELECT_RUN_TURN, {"run_id": run_id}).scalar_one_or_none()
            rows = conn.execute(q.conversation_tail_query(
                before=None, up_to_turn=None if turn is None else int(turn)),
                {"thread_id": thread_id, "limit": limit})
            newest_first = [Message(**dict(r._mapping)) for r in rows]
        kept: list[Message] = []
        size = 0
        for message in newest_first:
            size += len(json.dumps(message.content, default=str))
            if kept and size > max_bytes:
                break
            kept.append(message)
        return list(reversed(kept))

    @staticmethod
    def _check_limit(limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) \
                or not 0 <= limit <= MAX_LIST_LIMIT:
            raise ValidationError(f"limit must be an integer within 0..{MAX_LIST_LIMIT} "
                                  f"(MAX_LIST_LIMIT), got {limit!r}")

    @operation("run_messages")
    def run_messages(self, run_id: str) -> list[Message]:
        with self.store.read() as conn:
            return self._run_messages(conn, run_id)

    @staticmethod
    def _run_messages(conn: sa.Connection, run_id: str) -> list[Message]:
        return [Message(**dict(r._mapping))
                for r in execute(conn, q.SELECT_RUN_MESSAGES, {"run_id": run_id})]

    @operation("load_resolution")
    def load_resolution(self, resolution_id: str) -> Resolution | None:
        """A pinned resolution never changes once written, so each process reads it once."""
        cached = self._resolutions.get(resolution_id)
        if cached is not None:
            return cached
        with self.store.read() as conn:
            row = execute(conn, q.SELECT_RESOLUTION,
                          {"resolution_id": resolution_id}).one_or_none()
        if row is None:
            return None
        resolution = Resolution(row.resolution_id, row.agent_name, row.agent_version)
        self._resolutions[resolution_id] = resolution
        return resolution

    @operation("latest_open_run")
    def latest_open_run(self, thread_id: str) -> RunRecord | None:
        """The thread's most recent run that is still waiting for a decision, if any."""
        with self.store.read() as conn:
            row = execute(conn, q.SELECT_LATEST_WAITING, {"thread_id": thread_id}).one_or_none()
        return None if row is None else q.run_from_row(row)

    # ------------------------------------------------------------------------------ writes
    def _update(self, run_id: str, change: Callable[[RunRecord], RunRecord | None]
                ) -> RunRecord | None:
        """Lock the run, apply `change(run) -> RunRecord | None`, write back (guarded by status)."""
        with self.store.write() as conn:
            return self._update_in(conn, run_id, change)

    def _update_in(self, conn: sa.Connection, run_id: str,
                   change: Callable[[RunRecord], RunRecord | None]) -> RunRecord | None:
        row = execute(conn, q.SELECT_RUN_FOR_UPDATE, {"run_id": run_id}).one_or_none()
        if row is None:
            return None
        before = q.run_from_row(row)
        after = change(before)
        if after is None or after == before:
            return None
        old, new = q.run_row(before), q.run_row(after)
        changed = {key: value for key, value in new.items() if old[key] != value}
        if not changed:
            return None
        result = execute(conn, q.UPDATE_RUN_GUARDED, {
            **changed, "guard_run_id": run_id, "guard_status": before.status.value})
        if result.rowcount != 1:
            raise ValidationError(f"run {run_id} changed concurrently")
        if after.status == RunStatus.done and before.status != RunStatus.done:
            termination = (after.termination or Termination.natural_end()).type
            seconds = max(0, (after.finished_at or after.updated_at) - after.created_at) / 1000
            self.store.on_commit(conn, lambda: metrics.observe_run_end(termination, seconds))
        return after

    # ---------------------------------------------------- fenced writes of the executing attempt
    @operation("record_dispatch_start")  # T4 and the run, together
    def start_attempt(self, dispatch_id: str, claim_token: str, dispatch_instance_id: str,
                      run_id: str, now: int, *, lease_ms: int | None = None,
                      thread_id: str | None = None) -> list[Message]:
        """Record the attempt's start on the dispatch (T4) and move the run to running, in
        one transaction fenced by the claim token: a claim that is not ours any more writes
        neither (VersionConflictError / NotFoundError). An attempt whose start is already
        recorded is refused (AlreadyStartedError): a second delivery of the same execute
        must not run the agent twice. Returns the run's messages (its input), read in the
        same transaction."""
        def begin(d: RunDispatch) -> RunDispatch:
            if d.dispatch_instance_id is not None:
                raise AlreadyStartedError(f"attempt already started as "
                                          f"{d.dispatch_instance_id}")
            started = d.started(dispatch_instance_id, now)
            # The lease runs a whole lease from the start, whatever the hops from the claim
            # took (docs/behaviour.md#heartbeat).
            return started if lease_ms is None else started.lease_extended(lease_ms, now)

        def running(run: RunRecord) -> RunRecord | None:
            if run.status == RunStatus.done:
                return None
            return run.moved_to(RunStatus.running, now, dispatch_id=dispatch_id, waiting=None)

        with self.store.fenced_write(dispatch_id, claim_token, now, REASON_STALE_START, begin,
                                     thread_id=thread_id) as fenced:
            self._update_in(fenced.conn, run_id, running)
            return self._run_messages(fenced.conn, run_id)

    @operation("ack")
    def ack(self, dispatch_id: str, claim_token: str, run_id: str, now: int, *,
            thread_id: str | None = None) -> Acked:
        """Ack (T6), and read in the same transaction the run (settle reports what the run
        record says) and whether the thread has another dispatch due (settle claims it, or
        has nothing to claim): no read of its own for either."""
        with self.store.fenced_write(dispatch_id, claim_token, now, REASON_STALE_ACK,
                                     lambda d: d.acked(now), thread_id=thread_id) as fenced:
            row = execute(fenced.conn, q.SELECT_RUN, {"run_id": run_id}).one_or_none()
            due = execute(fenced.conn, q.SELECT_ANY_DUE, {
                "thread_id": fenced.dispatch.thread_id, "now": now}).first() is not None
        # A submit that committed after that read found our lease standing and left its
        # wake-up to us: the release says so (WAKE_REQUESTED), or could not tell (None).
        return Acked(None if row is None else q.run_from_row(row),
                     next_due=due or _wake_requested(fenced.released))

    @operation("ack")
    def ack_and_claim_next(self, dispatch_id: str, claim_token: str, run_id: str, now: int, *,
                           thread_id: str, consumer_id: str, lease_ms: int) -> AckedNext:
        """Ack (T6), read the run, and claim the thread's next due dispatch (T2) with what
        reconstruct checks of its run, all in ONE transaction under the thread lock the ack
        holds; then the lease goes from the acked claim to the new one in one Redis call,
        which the caller sends (`AckedNext.hand_over`: with its report, in one round trip),
        or is released here when nothing was due. A settle that
        publishes the next chain itself (a worker's) saves the separate claim: its
        transaction, and the release, acquire and bind of the lease. If the answer to the
        commit is lost, ack recovery finds the ack landed and the new claim with
        `claim_of_lost_ack`, hands it the lease and starts it."""
        facts, read = self._facts_reader()
        # A failure inside rolls the ack back too: the claim is still ours, lease and all.
        with self.store.fenced_write(dispatch_id, claim_token, now, REASON_STALE_ACK,
                                     lambda d: d.acked(now), thread_id=thread_id,
                                     keep_lease=True) as fenced:
            row = execute(fenced.conn, q.SELECT_RUN, {"run_id": run_id}).one_or_none()
            claimed = self.store.claim_in(fenced, consumer_id, lease_ms, now, inside=read)
            wake_at = None if claimed is not None else \
                self.store.next_wake_in(fenced.conn, thread_id)
        run = None if row is None else q.run_from_row(row)
        if claimed is None:
            released = self.store.release_kept(fenced)
            return AckedNext(run, None, wake_requested=_wake_requested(released),
                             wake_at=wake_at)
        return AckedNext(run, (claimed, facts[-1]), wake_requested=False,
                         hand_over=self.store.hand_over_call(fenced, claimed, lease_ms, now))

    @operation("claim_of_lost_ack")
    def claim_of_lost_ack(self, thread_id: str, consumer_id: str, lease_ms: int, now: int
                          ) -> tuple[RunDispatch, AttemptFacts] | None:
        """After `ack_and_claim_next` lost its answer but landed (ack recovery `landed`):
        the dispatch its transaction claimed, with what reconstruct checks of its run; None
        when it claimed nothing. That claim is the thread's Claimed dispatch made by this
        consumer at the ack's time and not started: nobody else can have claimed the thread
        since, for the acked claim's lease still names the acked claim's token."""
        query = q.list_dispatches_query(thread_id, [DispatchStatus.Claimed.value], 1, 0)
        with self.store.read() as conn:
            row = conn.execute(query).one_or_none()
            claimed = None if row is None else q.dispatch_from_row(row)
            if claimed is None or claimed.claimed_by != consumer_id \
                    or claimed.updated_at != now or claimed.lease_until != now + lease_ms \
                    or claimed.dispatch_instance_id is not None:
                return None
            return claimed, self._attempt_facts(conn, claimed.run_id)

    @operation("record_run_result")  # T5 and the run, together
    def record_outcome(self, dispatch_id: str, claim_token: str, result: RunDispatchResult,
                       now: int, waiting: dict[str, Any] | None = None, *,
                       thread_id: str | None = None,
                       turns: Sequence[tuple[str, Any]] = ()) -> None:
        """The runtime's outcome, written once and fenced: the dispatch projection (T5), the
        run record (done, or waiting with its ticket) and, for a run the agent finished (not
        cancelled, not waiting), its turns in the conversation — `turns`, then the answer as
        an `assistant` message — in one transaction. An attempt whose claim was reclaimed or
        superseded cannot decide the run, nor write to the conversation; a run already done
        (a replay) gets nothing written twice."""
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

        with self.store.fenced_write(dispatch_id, claim_token, now, REASON_STALE_RESULT,
                                     lambda d: d.result_recorded(result, now),
                                     thread_id=thread_id) as fenced:
            run = self._update_in(fenced.conn, result.run_id, finished)
            if run is not None and run.status == RunStatus.done \
                    and termination.type not in ("cancelled", "suspended"):
                answer = [] if result.response is None else [("assistant", result.response)]
                self.append_messages(fenced.conn, run.thread_id, run.run_id,
                                     [*turns, *answer], now)

    def reconcile(self, dispatch: RunDispatch, now: int) -> RunRecord | None:
        """Bring the run in line with its terminal dispatch (docs/behaviour.md#reconciliation):
        Cancelled and
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

        updated: RunRecord | None = operation(op)(self._update)(dispatch.run_id, change)
        return updated

    @operation("reclaim")
    def reclaim_expired(self, now: int, limit: int
                        ) -> tuple[ReclaimPage, dict[str, FinishedClaim]]:
        """`MailboxStore.reclaim_page`, except that a claim whose attempt already wrote the
        run's outcome is acked, not counted as a failed attempt: only its ack was lost (the
        worker died before settle, the settle message was lost, or it queued longer than
        the lease). Reclaiming it would retry a finished run and, on the last attempt,
        dead-letter a dispatch whose run says done. Decided under the thread lock, per claim,
        so no outcome written before the reclaim's transaction can be missed. Returns the
        page and, for each dispatch it acked — or superseded as stale (T17) after its attempt
        wrote the outcome — the claim as it was and its run (what settle would have
        reported)."""
        finished_claims: dict[str, FinishedClaim] = {}

        def finished(conn: sa.Connection, claim: RunDispatch) -> bool:
            run = self._finished_by(conn, claim)
            if run is not None:
                finished_claims[claim.dispatch_id] = FinishedClaim(claim, run)
            return run is not None

        # Asked under the thread lock, in the transaction that acks or supersedes the claim:
        # each entry belongs to a dispatch the page lists as Acked or as superseded.
        return self.store.reclaim_page(now, limit, finished=finished), finished_claims

    @staticmethod
    def _finished_by(conn: sa.Connection, claim: RunDispatch) -> RunRecord | None:
        """The run, when `claim`'s attempt wrote its outcome: the projection records done or
        waiting, and the run says the same by this dispatch. A waiting run may already be
        resumed by a newer dispatch (its ticket still names this one). A failure recorded
        before its nack leaves the run running, so it does not count."""
        if (claim.completed_at is None
                or claim.run_status not in (RunStatus.done, RunStatus.waiting)):
            return None
        row = execute(conn, q.SELECT_RUN_FOR_UPDATE, {"run_id": claim.run_id}).one_or_none()
        run = None if row is None else q.run_from_row(row)
        if run is None or run.status != claim.run_status:
            return None
        if run.dispatch_id == claim.dispatch_id:
            return run
        if run.status == RunStatus.waiting and run.waiting is not None \
                and run.waiting.get("since_dispatch_id") == claim.dispatch_id:
            return run
        return None

    @operation("runs_by_status")
    def runs_by_status(self, statuses: Sequence[RunStatus]) -> dict[str, int]:
        with self.store.read() as conn:
            return {str(s): int(n) for s, n in execute(
                conn, q.RUNS_BY_STATUS, {"statuses": [s.value for s in statuses]})}
