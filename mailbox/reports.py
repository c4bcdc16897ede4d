"""What followers of a run hear when an attempt or a run ends (docs/behaviour.md#events).

One function per final report, used by every path that ends something: the settle phase, the
sweep (when a settle never came, a lease ran out, or a crash left a run unreconciled) and the
facade (cancel and interrupt of queued work). Each ends with the `run_finish` that
`events(..., follow=True)` waits for; `run_cancelled` comes before it, never after, and a
retry's `run_rescheduled` after it (a retried attempt's `run_finish` is not the run's last).

Events are advisory (SQL is the truth), so these never raise: a failed emit is logged and
counted by `EventStreams.emit`. The `run_finish` that ends a dispatch is appended once per
dispatch (`final`): a settle and the sweep repairing the same dispatch's run meanwhile both
report its end, and followers hear it once.
"""

from __future__ import annotations

from typing import Any

from mailbox.coordination import ScriptCall
from mailbox.events import EventStreams
from mailbox.model import DispatchStatus, RunDispatch, RunRecord, Termination

RETRY_BACKOFF = "retry_backoff"
EXPIRED_LEASE_RECLAIMED = "expired_lease_reclaimed"


def acked(events: EventStreams, dispatch_id: str, run: RunRecord, ts: int, *,
          along: ScriptCall | None = None) -> Any:
    """The attempt's outcome is acked (by its settle, or by the sweep when the settle never
    came): the run is done, or waiting for a decision (then `suspended` carries the ticket).
    `along`: a script call sent in the round trip of the run_finish (a settle's lease
    hand-over); its reply is returned (None without one)."""
    termination = run.termination or Termination.natural_end()
    if run.waiting is not None:
        events.emit(run.run_id, dispatch_id, "suspended", run.waiting, ts=ts,
                    thread_id=run.thread_id)
    finish = {"termination": termination.to_json(), "response": run.response,
              "status": "acked"}
    if along is not None:
        return events.emit_along(along, run.run_id, dispatch_id, "run_finish", finish, ts=ts,
                                 thread_id=run.thread_id, final=True)
    events.emit(run.run_id, dispatch_id, "run_finish", finish, ts=ts,
                thread_id=run.thread_id, final=True)
    return None


def retrying(events: EventStreams, dispatch: RunDispatch, error: str, ts: int, *,
             reason: str = RETRY_BACKOFF) -> None:
    """The attempt failed and the dispatch went back to the queue (`dispatch` as requeued):
    the attempt's `run_finish`, then when the next one may start."""
    events.emit(dispatch.run_id, dispatch.dispatch_id, "run_finish", {
        "termination": Termination.error(error).to_json(), "error": error,
        "status": "retrying"}, ts=ts, thread_id=dispatch.thread_id)
    events.emit(dispatch.run_id, dispatch.dispatch_id, "run_rescheduled", {
        "reason": reason, "attempt_count": dispatch.attempt_count,
        "available_at": dispatch.available_at}, ts=ts, thread_id=dispatch.thread_id)


def dead_letter(events: EventStreams, run_id: str, dispatch_id: str, error: str,
                ts: int, *, thread_id: str | None = None) -> None:
    """The dispatch is dead-lettered: the run ends with the error."""
    events.emit(run_id, dispatch_id, "run_finish", {
        "termination": Termination.error(error).to_json(), "error": error,
        "status": "dead_letter"}, ts=ts, thread_id=thread_id, final=True)


def cancelled(events: EventStreams, dispatch: RunDispatch, ts: int) -> None:
    """The dispatch ended Cancelled or Superseded and its run was ended cancelled: whether it
    was queued or running, `run_cancelled` says how, and `run_finish` ends the stream."""
    data: dict[str, Any] = {"status": dispatch.status.label}
    if dispatch.status == DispatchStatus.Superseded and dispatch.last_error:
        data["reason"] = dispatch.last_error
    events.emit(dispatch.run_id, dispatch.dispatch_id, "run_cancelled", data, ts=ts,
                thread_id=dispatch.thread_id)
    events.emit(dispatch.run_id, dispatch.dispatch_id, "run_finish", {
        "termination": Termination.cancelled().to_json(), "status": dispatch.status.label},
        ts=ts, thread_id=dispatch.thread_id, final=True)


def ended_after_outcome(events: EventStreams, dispatch: RunDispatch, run: RunRecord,
                        ts: int) -> None:
    """The attempt recorded the run's outcome, then lost its claim before the ack (an
    interrupt fenced it): the run ends with what the attempt recorded, and the dispatch's
    status says why it was not acked."""
    termination = run.termination or Termination.natural_end()
    events.emit(run.run_id, dispatch.dispatch_id, "run_finish", {
        "termination": termination.to_json(), "response": run.response,
        "status": dispatch.status.label}, ts=ts, thread_id=dispatch.thread_id, final=True)


def ended(events: EventStreams, dispatch: RunDispatch, ts: int) -> None:
    """The report of a terminal dispatch whose run this caller just reconciled (Cancelled,
    Superseded or DeadLetter; an Acked dispatch's run is reported by `acked`)."""
    if dispatch.status == DispatchStatus.DeadLetter:
        dead_letter(events, dispatch.run_id, dispatch.dispatch_id,
                    dispatch.run_error or dispatch.last_error or "dead-lettered", ts,
                    thread_id=dispatch.thread_id)
    elif dispatch.status in (DispatchStatus.Cancelled, DispatchStatus.Superseded):
        cancelled(events, dispatch, ts)
