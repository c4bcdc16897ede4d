"""Sweep and garbage collection (reference §4.13), run by the beat schedule and at worker
start.

The sweep is what makes a Celery message "only a wake-up": it reclaims expired leases (each
a failed attempt, so crash loops reach the dead letter), reconciles runs whose dispatch ended
without them (a crash between two writes), and wakes every thread that has a due Queued
dispatch and nothing Claimed — which delivers retries in backoff, delayed availability and
publishes that were lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailbox.model import DispatchStatus
from mailbox.phases import Runtime, _emit

RECLAIM_BATCH = 100


@dataclass
class SweepReport:
    reclaimed: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    reconciled: list[str] = field(default_factory=list)
    woken: list[str] = field(default_factory=list)


def sweep(rt: Runtime, now: int) -> SweepReport:
    report = SweepReport()
    while True:
        batch = rt.store.reclaim_expired_leases(now, RECLAIM_BATCH)
        for dispatch in batch:
            ctx = {"run_id": dispatch.run_id, "dispatch_id": dispatch.dispatch_id}
            # The crashed attempt ended: followers get its run_finish like any other's.
            error = "lease expired: the attempt's worker stopped renewing it"
            if dispatch.status == DispatchStatus.Queued:
                report.reclaimed.append(dispatch.dispatch_id)
                _emit(rt, ctx, "run_finish", {"termination": {"type": "error", "value": error},
                                              "error": error, "status": "retrying"})
                _emit(rt, ctx, "run_rescheduled", {"reason": "expired_lease_reclaimed",
                                                   "attempt_count": dispatch.attempt_count})
            else:
                report.dead_lettered.append(dispatch.dispatch_id)
                rt.runs.reconcile(dispatch, now)
                reason = dispatch.last_error or error
                _emit(rt, ctx, "run_finish", {"termination": {"type": "error", "value": reason},
                                              "error": reason, "status": "dead_letter"})
        if len(batch) < RECLAIM_BATCH:
            break
    for dispatch in rt.runs.unreconciled_terminal_dispatches(limit=1000):
        if rt.runs.reconcile(dispatch, now) is not None:
            report.reconciled.append(dispatch.dispatch_id)
            if dispatch.status != DispatchStatus.DeadLetter:
                _emit(rt, {"run_id": dispatch.run_id, "dispatch_id": dispatch.dispatch_id},
                      "run_cancelled", {"status": dispatch.status.label})
    for thread_id in rt.runs.due_thread_ids(now):
        rt.wake(thread_id, 0)
        report.woken.append(thread_id)
    return report


def collect_garbage(rt: Runtime, now: int) -> int:
    """Purge terminal dispatches older than the retention (epochs are kept forever)."""
    return rt.store.purge_terminal(max(0, now - rt.settings.retention_s * 1000))


__all__ = ["SweepReport", "collect_garbage", "sweep"]
