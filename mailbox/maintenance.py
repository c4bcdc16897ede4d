"""Sweep and garbage collection (docs/behaviour.md#maintenance), run by the beat schedule and at
worker start. Both work in bounded pages: every transaction handles at most one page of rows,
and the loops page through everything (garbage collection: docs/behaviour.md#gc).

The sweep is what makes a Celery message "only a wake-up": it acks expired claims whose
attempt had already written the run's outcome (only the ack was lost), reclaims the other
expired leases (each a failed attempt, so crash loops reach the dead letter), reconciles
runs whose dispatch ended without them (a crash between two writes), and wakes every thread
that has a due Queued dispatch and nothing Claimed — which delivers retries in backoff,
delayed availability and publishes that were lost.

When the wake-ups are broker messages (the beat task passes `publish`), a thread whose
previous wake-up is still waiting in the queue is not woken again: the sweep marks each
thread it wakes in Redis (`<namespace>:wake-pending:<thread>`, SET NX PX, one pipeline for all
due threads) with the wake-up's id, which is also the message's task id, and the worker that
consumes that very message clears the mark as its claim begins, before it looks for work
(in the lease script, `lua/lease_acquire.lua`). Submits set and honour the same mark
(docs/behaviour.md#wake-gate): a thread with any wake-up pending is not woken again. During
a backlog the queue then holds at most one wake-up per thread instead of one more per
thread at every sweep, and a mark whose wake-up may still be queued is renewed rather than
left to lapse (`mailbox.wake_marks`, docs/behaviour.md#wake-marks). Never lost: the mark
only suppresses the sweep's own duplicate, so
- a mark set before the consumer clears it was set after the sweep's SQL read, and the
  consumer's claim, which follows the clear, sees at least what that sweep saw due;
- a wake-up that never arrives (dropped, purged, lost with a broker) leaves a mark that
  lapses after `wake_pending_ttl_ms`, or once later wake-ups have come out of the queue, or
  at the latest after `wake_pending_max_ms`; the next sweep wakes the thread again;
- Redis unreachable for the marks: every due thread is woken, as without marks;
- a publish that fails clears the marks of the wake-ups it did not send.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import redis

from mailbox import metrics, reports
from mailbox.context import COMPLETED
from mailbox.coordination import Coordinator
from mailbox.events import EventStreams
from mailbox.model import MAX_MS, DispatchStatus, RunDispatch, RunStatus
from mailbox.runtime import Runtime, uuid7_ms
from mailbox.settings import Settings
from mailbox.store.retention import GC_BATCH, Cutoffs, Retention, check_batch
from mailbox.wake_marks import (
    WAKE_PENDING_MAX_FACTOR,
    new_sweep_wake_id,
    renewal_ms,
    still_queued,
    wake_pending_ttl_ms,
    wake_time_ms,
)

log = logging.getLogger(__name__)

RECLAIM_BATCH = 100
RECONCILE_PAGE = 100
GC_THREADS_PER_PASS = 20_000
"""Threads one garbage collection looks at; the next goes on from there (bounded work per
run of the beat task, whatever the number of threads)."""
GC_CURSOR_TTL_MS = 7 * 24 * 3600 * 1000
LEASE_EXPIRED = "lease expired: the attempt's worker stopped renewing it"
DUE_THREADS_PAGE = 1000
SweepWakePublisher = Callable[[str, str], None]
"""`publish(thread_id, wake_id)`: send a wake-up for the thread whose consumer claims with
`wake_id` (the claim clears the thread's pending mark if it still names it, lease_acquire.lua)."""


@dataclass
class SweepReport:
    acked: list[str] = field(default_factory=list)
    """Expired claims whose attempt had written its outcome: acked, not counted as failed."""
    reclaimed: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    """Expired claims of an interrupted thread, superseded (T17), not reclaimed. Their runs
    are reported here when the attempt had written a done outcome (its end was never
    reported), else reconciled and reported by the repair below (also listed `reconciled`)."""
    reconciled: list[str] = field(default_factory=list)
    woken: list[str] = field(default_factory=list)
    already_pending: list[str] = field(default_factory=list)
    """Due threads not woken because this sweep found their previous wake-up still pending."""
    renewed: list[str] = field(default_factory=list)
    """Of those, the threads whose mark this sweep renewed: their wake-up may still be queued
    behind a backlog (docs/behaviour.md#wake-marks)."""


def sweep(rt: Runtime, now: int, *, publish: SweepWakePublisher | None = None,
          pending_ttl_ms: int | None = None, wake_all: bool = False,
          queued: int | None = None) -> SweepReport:
    """One sweep at `now`. Without `publish`, due threads are woken with `rt.wake` every time
    (an in-process waker claims right away: nothing stays pending). With `publish`, a thread
    whose previous wake-up is still pending is skipped (see the module docstring) unless
    `wake_all` (a worker's start-up sweep: a broker that restarted lost the wake-ups the marks
    stand for, and waiting for them to lapse would hold that work back for minutes);
    `pending_ttl_ms` overrides `wake_pending_ttl_ms(rt.settings)` (and with it the bound of
    renewals, ten of them). `queued`: the messages waiting in the broker's queue as the
    sweep began (None: unknown); while there are some, the marks of wake-ups that may still
    be among them are renewed (`mailbox.wake_marks`)."""
    report = SweepReport()
    while True:
        page, finished = rt.runs.reclaim_expired(now, RECLAIM_BATCH)
        for dispatch in page.transitioned:
            if dispatch.status == DispatchStatus.Acked:
                # Its attempt wrote the outcome; only the ack was lost. Report and count it
                # as settle would have (mailbox_operations_total{operation="sweep_ack"}
                # counts these too).
                report.acked.append(dispatch.dispatch_id)
                metrics.count_operation("sweep_ack", "ok")
                ended = finished[dispatch.dispatch_id]
                _count_completion(ended.claim, now)
                reports.acked(rt.events, dispatch.dispatch_id, ended.run, rt.clock())
            elif dispatch.status == DispatchStatus.Queued:
                # The crashed attempt ended: followers get its run_finish like any other's.
                report.reclaimed.append(dispatch.dispatch_id)
                reports.retrying(rt.events, dispatch, LEASE_EXPIRED, rt.clock(),
                                 reason=reports.EXPIRED_LEASE_RECLAIMED)
            else:
                report.dead_lettered.append(dispatch.dispatch_id)
                rt.runs.reconcile(dispatch, now)
                reports.dead_letter(rt.events, dispatch.run_id, dispatch.dispatch_id,
                                    dispatch.last_error or LEASE_EXPIRED, rt.clock(),
                                    thread_id=dispatch.thread_id)
        for dispatch in page.superseded:
            report.superseded.append(dispatch.dispatch_id)
            wrote = finished.get(dispatch.dispatch_id)
            if wrote is not None and wrote.run.status == RunStatus.done:
                # The attempt wrote the run's outcome, then an interrupt came before its ack
                # and its settle never did: the run keeps the outcome (nothing to reconcile),
                # and nobody else will report its end. A late settle finds the claim gone and
                # reports nothing (docs/behaviour.md#sweep).
                _count_completion(wrote.claim, now)
                reports.ended_after_outcome(rt.events, dispatch, wrote.run, rt.clock())
        if not page.more:
            break
    _reconcile_terminal(rt, now, report)
    ttl = wake_pending_ttl_ms(rt.settings) if pending_ttl_ms is None else pending_ttl_ms
    marks = _MarkPolicy(now, ttl, WAKE_PENDING_MAX_FACTOR * ttl, queued)
    for due in _due_threads(rt, now):
        if publish is None:
            for thread_id in due:
                rt.wake(thread_id, 0)
                report.woken.append(thread_id)
        else:
            _publish_wakes(rt.store.coordinator, due, publish, marks, report, wake_all)
    return report


def _count_completion(claim: RunDispatch, now: int) -> None:
    """The completion metrics of an attempt whose settle never came, counted by the sweep
    that acks or supersedes its claim (docs/behaviour.md#metrics): runtime from the attempt's
    instance id (a UUIDv7 minted in reconstruct, just before the start, which the sweep does
    not know; 0 if it is not one) to its outcome write, and submit to now."""
    ended = now if claim.completed_at is None else claim.completed_at
    started = uuid7_ms(claim.dispatch_instance_id)
    metrics.observe_completion(
        COMPLETED, runtime_s=max(0, ended - (ended if started is None else started)) / 1000,
        enqueue_to_complete_s=max(0, now - claim.created_at) / 1000)


def _reconcile_terminal(rt: Runtime, now: int, report: SweepReport) -> None:
    """Every terminal dispatch whose run a crash left unreconciled, a page at a time (each run
    in its own transaction); the cursor moves past a row that could not be reconciled, so
    one such row cannot hold up the rest, and it is tried again at the next sweep."""
    after: tuple[int, str] | None = None
    while True:
        page = rt.store.unreconciled_terminal_dispatches(RECONCILE_PAGE, after)
        for dispatch in page:
            if rt.runs.reconcile(dispatch, now) is not None:
                report.reconciled.append(dispatch.dispatch_id)
                reports.ended(rt.events, dispatch, rt.clock())
        if len(page) < RECONCILE_PAGE:
            return
        after = (page[-1].updated_at, page[-1].dispatch_id)


def _due_threads(rt: Runtime, now: int) -> Iterator[list[str]]:
    """Every due thread, a page at a time: a backlog on more than one page of threads must not
    leave the threads past the first page waiting for the earlier ones to drain, and each
    page is woken before the next is read, so the sweep holds one page at a time."""
    after: str | None = None
    while True:
        page = rt.store.due_thread_ids(now, DUE_THREADS_PAGE, after)
        if page:
            yield page
        if len(page) < DUE_THREADS_PAGE:
            return
        after = page[-1]


@dataclass
class _MarkPolicy:
    """What one sweep needs to judge the marks it finds standing (`wake_marks.still_queued`);
    the frontier is read once, when the first one is found."""

    now: int
    ttl_ms: int
    max_ms: int
    queued: int | None
    frontier: int | None = None
    frontier_read: bool = False

    def renewal(self, coordinator: Coordinator, wake_id: str) -> int | None:
        """How long to renew the mark naming `wake_id` (its wake-up may still be queued);
        None to let it lapse."""
        published_at = wake_time_ms(wake_id)
        if published_at is None or not self.queued:
            return None
        if not self.frontier_read:
            self.frontier_read = True
            self.frontier = coordinator.wake_frontier()
        if not still_queued(published_at, self.now, queued=self.queued,
                            frontier=self.frontier, ttl_ms=self.ttl_ms, max_ms=self.max_ms):
            return None
        return renewal_ms(published_at, self.now, self.ttl_ms, self.max_ms)


def _publish_wakes(coordinator: Coordinator, due: list[str], publish: SweepWakePublisher,
                   marks: _MarkPolicy, report: SweepReport, wake_all: bool = False) -> None:
    wakes = [(thread_id, new_sweep_wake_id()) for thread_id in due]
    try:
        standing = coordinator.mark_wakes_pending(wakes, marks.ttl_ms, overwrite=wake_all)
    except redis.RedisError as exc:
        # Never skip a wake-up because of Redis: without marks, wake every due thread.
        metrics.count_operation("sweep_wake_mark", "error")
        log.warning("could not mark pending sweep wake-ups (%s); waking all %d due threads",
                    exc, len(wakes))
        standing = [None] * len(wakes)
    to_send = [wake for wake, mark in zip(wakes, standing, strict=True) if mark is None]
    pending = [(thread_id, mark) for thread_id, mark in zip(due, standing, strict=True)
               if mark is not None]
    report.already_pending.extend(thread_id for thread_id, _ in pending)
    sent = 0
    try:
        for thread_id, wake_id in to_send:
            publish(thread_id, wake_id)
            report.woken.append(thread_id)
            sent += 1
    except BaseException:
        # These were marked but not sent: their marks must not hold off the next sweeps.
        with contextlib.suppress(redis.RedisError):
            coordinator.clear_wakes_pending(to_send[sent:])
        raise
    _renew_queued(coordinator, pending, marks, report)


def _renew_queued(coordinator: Coordinator, pending: list[tuple[str, str]],
                  marks: _MarkPolicy, report: SweepReport) -> None:
    """Renew the standing marks whose wake-up may still be queued (`_MarkPolicy`): left to
    lapse, each would make a later sweep queue a duplicate behind the same backlog. After
    the page's wake-ups are out, and nothing it raises stops the sweep: a mark not renewed
    lapses as it would have without renewal."""
    try:
        renew = [(thread_id, wake_id, ms) for thread_id, wake_id in pending
                 if (ms := marks.renewal(coordinator, wake_id)) is not None]
        renewed = coordinator.renew_wakes_pending(renew)
    except Exception as exc:
        metrics.count_operation("sweep_wake_mark", "error")
        log.warning("could not renew pending wake-up marks (%s); they lapse", exc)
        return
    report.renewed.extend(t for (t, _, _), done in zip(renew, renewed, strict=True) if done)
    metrics.count_operation("sweep_wake_mark", "renewed", sum(renewed))


# ======================================================================= garbage collection
@dataclass
class GcReport:
    """What one garbage collection deleted (docs/behaviour.md#gc), and in how many write
    transactions: each deletes at most one batch of rows."""

    dispatches: int = 0
    """Acked, Cancelled and Superseded dispatches past MAILBOX_RETENTION_S."""
    dead_letters: int = 0
    """Dead letters past MAILBOX_DEAD_LETTER_RETENTION_S."""
    runs: int = 0
    messages: int = 0
    threads: int = 0
    """Threads with nothing left whose epoch rows went."""
    event_streams: int = 0
    """Redis keys of deleted runs' event streams (a stream and its meta hash each)."""
    kept_replays: int = 0
    """Finished runs kept because they replay a dead letter still kept."""
    threads_scanned: int = 0
    transactions: int = 0
    scan_complete: bool = False
    """The thread scan reached the last thread (else the next collection goes on from where
    this one stopped)."""


def retention_cutoffs(settings: Settings, now: int) -> Cutoffs:
    """What was last changed strictly before these times may go."""
    def before(retention_s: int) -> int:
        return min(MAX_MS, max(0, now - retention_s * 1000))

    return Cutoffs(dispatches=before(settings.retention_s),
                   dead_letters=before(settings.dead_letter_retention_s),
                   runs=before(settings.thread_retention_s))


def garbage_collection(rt: Runtime, now: int, *, batch: int = GC_BATCH,
                       max_threads: int = GC_THREADS_PER_PASS) -> GcReport:
    """One garbage collection at `now`: every deletion in transactions of at most `batch`
    rows, so that on SQLite the write lock is never held for long and live work's claims and
    acks go on in between.

    1. Terminal dispatches past their retention (dead letters past theirs), paging through the
       terminal index.
    2. Up to `max_threads` threads, in pages of `batch`, from where the previous collection
       stopped (a cursor in Redis; from the start when Redis forgot it): their finished runs
       that no dispatch references, past the thread retention, with their messages and event
       streams; then each thread left with no dispatch and no run loses its stray messages,
       its epoch row and its Redis epoch cache, under its own lock.

    Safe to run twice at once: every delete re-checks what it deletes.
    """
    check_batch(batch)
    cutoffs = retention_cutoffs(rt.settings, now)
    retention = Retention(rt.store)
    report = GcReport()
    after: tuple[int, int, str] | None = None
    while True:
        page = retention.delete_expired_dispatches(cutoffs, after, batch)
        report.dispatches += page.dispatches
        report.dead_letters += page.dead_letters
        report.transactions += page.transactions
        if not page.more:
            break
        after = page.cursor
    _collect_threads(rt, retention, cutoffs, report, batch, max_threads)
    return report


def _collect_threads(rt: Runtime, retention: Retention, cutoffs: Cutoffs, report: GcReport,
                     batch: int, max_threads: int) -> None:
    cursor_key = rt.store.coordinator.keys.gc_cursor()
    client = rt.store.coordinator.client
    try:
        raw = client.get(cursor_key)
    except redis.RedisError:
        raw = None
    after = raw.decode() if isinstance(raw, bytes) else ""
    while report.threads_scanned < max_threads:
        wanted = min(batch, max_threads - report.threads_scanned)
        threads = retention.thread_page(after, wanted)
        report.threads_scanned += len(threads)
        if threads:
            _collect_runs(rt, retention, threads, cutoffs.runs, report, batch)
            for thread_id in retention.empty_threads(threads):
                deleted = retention.delete_thread(thread_id, batch)
                report.threads += deleted.threads
                report.messages += deleted.messages
                report.transactions += deleted.transactions
            after = threads[-1]
        if len(threads) < wanted:
            report.scan_complete = True
            break
    try:
        if report.scan_complete:
            client.delete(cursor_key)
        else:
            client.set(cursor_key, after, px=GC_CURSOR_TTL_MS)
    except redis.RedisError as exc:
        log.warning("could not store the garbage collector's thread cursor (%s); the next "
                    "collection starts from the first thread", exc)


def _collect_runs(rt: Runtime, retention: Retention, threads: list[str], before: int,
                  report: GcReport, batch: int) -> None:
    after = ("", "")
    while True:
        # Half a batch of runs, so that runs and their messages fit in one transaction.
        page = retention.expired_runs(threads, before, after, max(1, batch // 2))
        report.kept_replays += page.kept_replays
        if page.run_ids:
            deleted = retention.delete_runs(page.run_ids, before, batch)
            report.runs += len(deleted.run_ids)
            report.messages += deleted.messages
            report.transactions += deleted.transactions
            report.event_streams += forget_event_streams(rt.events, deleted.run_ids,
                                                         page.threads)
        if not page.more:
            return
        after = page.cursor


def forget_event_streams(events: EventStreams, run_ids: Sequence[str],
                         threads: Mapping[str, str] | None = None) -> int:
    """Delete the event streams of deleted runs (`threads`: their threads, which a Redis
    Cluster needs to find them). Best effort: a stream Redis keeps expires
    MAILBOX_RETENTION_S after its last event anyway."""
    if not run_ids:
        return 0
    try:
        return events.forget(run_ids, threads)
    except redis.RedisError as exc:
        metrics.count_operation("event_forget", "error")
        log.warning("event streams of %d deleted runs not deleted (%s); they expire on their "
                    "own", len(run_ids), exc)
        return 0


def collect_garbage(rt: Runtime, now: int) -> int:
    """`garbage_collection` as the beat task runs it; returns how many dispatches went (the
    rest of the report is logged)."""
    report = garbage_collection(rt, now)
    log.info("garbage collection: %s", report)
    return report.dispatches + report.dead_letters


__all__ = ["GcReport", "SweepReport", "SweepWakePublisher", "collect_garbage",
           "forget_event_streams", "garbage_collection", "retention_cutoffs", "sweep"]
