"""Sweep and garbage collection (docs/behaviour.md#maintenance), run by the beat schedule and at
worker
start.

The sweep is what makes a Celery message "only a wake-up": it acks expired claims whose
attempt had already written the run's outcome (only the ack was lost), reclaims the other
expired leases (each a failed attempt, so crash loops reach the dead letter), reconciles
runs whose dispatch ended without them (a crash between two writes), and wakes every thread
that has a due Queued dispatch and nothing Claimed — which delivers retries in backoff,
delayed availability and publishes that were lost.

When the wake-ups are broker messages (the beat task passes `publish`), a thread whose
previous sweep wake-up is still waiting in the queue is not woken again: the sweep marks each
thread it wakes in Redis (`<namespace>:wake-pending:<thread>`, SET NX PX, one pipeline for all
due threads) with the wake-up's id, which is also the message's task id, and the worker that
consumes that very message clears the mark *before* it claims (`consume_sweep_wake`). During
a backlog the queue then holds at most one sweep wake-up per thread instead of one more per
thread at every sweep. Never lost: the mark only suppresses the sweep's own duplicate, so
- a mark set before the consumer clears it was set after the sweep's SQL read, and the
  consumer's claim, which follows the clear, sees at least what that sweep saw due;
- a wake-up that never arrives (dropped, purged, lost with a broker) leaves a mark that
  expires after `wake_pending_ttl_ms`; the next sweep wakes the thread again;
- Redis unreachable for the marks: every due thread is woken, as without marks;
- a publish that fails clears the marks of the wake-ups it did not send.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from mailbox import metrics, reports
from mailbox.coordination import Coordinator
from mailbox.model import DispatchStatus
from mailbox.phases import Runtime
from mailbox.settings import Settings

log = logging.getLogger(__name__)

RECLAIM_BATCH = 100
LEASE_EXPIRED = "lease expired: the attempt's worker stopped renewing it"
DUE_THREADS_PAGE = 1000
# Sweep wake-ups carry task ids with this prefix: the consumer of any other wake-up (submit,
# settle, retry) knows without a Redis call that no mark stands for it, and Flower shows which
# wake-ups came from the sweep.
SWEEP_WAKE_PREFIX = "sweep-wake-"
WAKE_PENDING_SWEEPS = 4

SweepWakePublisher = Callable[[str, str], None]
"""`publish(thread_id, wake_id)`: send a wake-up for the thread whose consumer calls
`consume_sweep_wake(coordinator, thread_id, wake_id)` before it claims."""


@dataclass
class SweepReport:
    acked: list[str] = field(default_factory=list)
    """Expired claims whose attempt had written its outcome: acked, not counted as failed."""
    reclaimed: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    reconciled: list[str] = field(default_factory=list)
    woken: list[str] = field(default_factory=list)
    already_pending: list[str] = field(default_factory=list)
    """Due threads not woken because this sweep found their previous wake-up still pending."""


def wake_pending_ttl_ms(settings: Settings) -> int:
    """How long a sweep's wake-up counts as pending when nobody consumes it.

    This is how late a dropped wake-up is re-sent (plus up to one sweep interval), and how
    often a thread whose wake-up waits behind a backlog gets a duplicate anyway. So: as long
    as we can afford. The lease is the recovery delay the deployment already accepts for a
    crashed attempt (lease + one sweep), so a lost message waits no longer than a lost worker;
    and never less than `WAKE_PENDING_SWEEPS` sweep intervals, or the mark would lapse before
    the sweeps it is meant to quiet (with the defaults, 30 s lease and 30 s sweeps: 120 s,
    a quarter of the duplicates of one wake-up per sweep even when the queue is that slow).
    """
    return max(settings.lease_ms, WAKE_PENDING_SWEEPS * settings.sweep_interval_s * 1000)


def new_sweep_wake_id() -> str:
    return f"{SWEEP_WAKE_PREFIX}{uuid.uuid4().hex}"


def is_sweep_wake_id(wake_id: object) -> bool:
    return (isinstance(wake_id, str) and wake_id.startswith(SWEEP_WAKE_PREFIX)
            and len(wake_id) <= 64)


def consume_sweep_wake(coordinator: Coordinator, thread_id: str, wake_id: object) -> None:
    """Called by the consumer of a wake-up before it claims: if the wake-up is the sweep's,
    clear the thread's mark (only if it still names this wake-up). No Redis call for other
    wake-ups. A Redis error is logged and ignored: the claim goes ahead, and the mark lapses
    after its TTL."""
    if not is_sweep_wake_id(wake_id):
        return
    assert isinstance(wake_id, str)
    try:
        coordinator.consume_wake(thread_id, wake_id)
    except redis.RedisError as exc:
        metrics.count_operation("sweep_wake_consume", "error")
        log.warning("could not clear the pending sweep wake-up of thread %s (%s); it lapses "
                    "on its own", thread_id, exc)


def sweep(rt: Runtime, now: int, *, publish: SweepWakePublisher | None = None,
          pending_ttl_ms: int | None = None) -> SweepReport:
    """One sweep at `now`. Without `publish`, due threads are woken with `rt.wake` every time
    (an in-process waker claims right away: nothing stays pending). With `publish`, a thread
    whose previous sweep wake-up is still pending is skipped (see the module docstring);
    `pending_ttl_ms` overrides `wake_pending_ttl_ms(rt.settings)`."""
    report = SweepReport()
    while True:
        page, finished_runs = rt.runs.reclaim_expired(now, RECLAIM_BATCH)
        for dispatch in page.transitioned:
            if dispatch.status == DispatchStatus.Acked:
                # Its attempt wrote the outcome; only the ack was lost. Report it as settle
                # would have (mailbox_operations_total{operation="sweep_ack"} counts these).
                report.acked.append(dispatch.dispatch_id)
                metrics.count_operation("sweep_ack", "ok")
                reports.acked(rt.events, dispatch.dispatch_id,
                              finished_runs[dispatch.dispatch_id], rt.clock())
            elif dispatch.status == DispatchStatus.Queued:
                # The crashed attempt ended: followers get its run_finish like any other's.
                report.reclaimed.append(dispatch.dispatch_id)
                reports.retrying(rt.events, dispatch, LEASE_EXPIRED, rt.clock(),
                                 reason=reports.EXPIRED_LEASE_RECLAIMED)
            else:
                report.dead_lettered.append(dispatch.dispatch_id)
                rt.runs.reconcile(dispatch, now)
                reports.dead_letter(rt.events, dispatch.run_id, dispatch.dispatch_id,
                                    dispatch.last_error or LEASE_EXPIRED, rt.clock())
        if not page.more:
            break
    for dispatch in rt.store.unreconciled_terminal_dispatches(limit=1000):
        if rt.runs.reconcile(dispatch, now) is not None:
            report.reconciled.append(dispatch.dispatch_id)
            reports.ended(rt.events, dispatch, rt.clock())
    due = _due_threads(rt, now)
    if publish is None:
        for thread_id in due:
            rt.wake(thread_id, 0)
            report.woken.append(thread_id)
    else:
        ttl = wake_pending_ttl_ms(rt.settings) if pending_ttl_ms is None else pending_ttl_ms
        _publish_wakes(rt.store.coordinator, due, publish, ttl, report)
    return report


def _due_threads(rt: Runtime, now: int) -> list[str]:
    """Every due thread, a page at a time: a backlog on more than one page of threads must not
    leave the threads past the first page waiting for the earlier ones to drain."""
    due: list[str] = []
    while True:
        page = rt.store.due_thread_ids(now, DUE_THREADS_PAGE, due[-1] if due else None)
        due.extend(page)
        if len(page) < DUE_THREADS_PAGE:
            return due


def _publish_wakes(coordinator: Coordinator, due: list[str], publish: SweepWakePublisher,
                   ttl_ms: int, report: SweepReport) -> None:
    wakes = [(thread_id, new_sweep_wake_id()) for thread_id in due]
    try:
        fresh = coordinator.mark_wakes_pending(wakes, ttl_ms)
    except redis.RedisError as exc:
        # Never skip a wake-up because of Redis: without marks, wake every due thread.
        metrics.count_operation("sweep_wake_mark", "error")
        log.warning("could not mark pending sweep wake-ups (%s); waking all %d due threads",
                    exc, len(wakes))
        fresh = [True] * len(wakes)
    to_send = [wake for wake, new in zip(wakes, fresh, strict=True) if new]
    report.already_pending.extend(t for (t, _), new in zip(wakes, fresh, strict=True) if not new)
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


def collect_garbage(rt: Runtime, now: int) -> int:
    """Purge terminal dispatches older than the retention (epochs are kept forever)."""
    return rt.store.purge_terminal(max(0, now - rt.settings.retention_s * 1000))


__all__ = ["SWEEP_WAKE_PREFIX", "SweepReport", "SweepWakePublisher", "collect_garbage",
           "consume_sweep_wake", "is_sweep_wake_id", "new_sweep_wake_id", "sweep",
           "wake_pending_ttl_ms"]
