"""Thread control and dead-letter actions, shared by the API and the dashboard's forms.

Each returns what happened as JSON and refuses what cannot happen with the status a client
acts on: 404 for an unknown id, 409 when the record's state does not allow it (cancel of a
finished dispatch, resume of a run that is not waiting, replay of what is not a dead letter
or of a thread that moved on). Wake-ups go out through the Mailbox's waker; a failed publish
is logged there and repaired by the sweep (the facade's contract).
"""

from __future__ import annotations

from typing import Any

from mailbox.errors import ValidationError
from mailbox.facade import Mailbox
from mailbox.http.errors import conflict, not_found
from mailbox.model import DispatchStatus, RunStatus, check_text


def cancel(box: Mailbox, dispatch_id: str) -> dict[str, Any]:
    """A Queued dispatch ends Cancelled; a Claimed one's worker is asked to stop (its run
    ends cancelled)."""
    before = box.get_dispatch(dispatch_id)
    if before is None:
        raise not_found(f"no dispatch with id {dispatch_id!r}")
    if not box.cancel(dispatch_id):
        now = box.get_dispatch(dispatch_id)
        status = now.status.value if now else "purged"
        raise conflict(f"dispatch {dispatch_id} is {status}: nothing to cancel")
    after = box.get_dispatch(dispatch_id)
    action = "cancelled" if after is not None and after.status == DispatchStatus.Cancelled \
        else "stop_requested"
    return {"dispatch_id": dispatch_id, "run_id": before.run_id, "thread_id": before.thread_id,
            "action": action, "status_before": before.status.value,
            "status": after.status.value if after else None}


def interrupt(box: Mailbox, thread_id: str) -> dict[str, Any]:
    """Latest wins: supersede the thread's queued dispatches, stop the running one."""
    check_text("thread_id", thread_id)
    if not box.store.list_dispatches(thread_id, limit=1):
        raise not_found(f"no thread {thread_id!r} (it has no dispatches)")
    result = box.interrupt(thread_id)
    active = result.active_dispatch.dispatch_id if result.active_dispatch else None
    return {"thread_id": thread_id, "new_dispatch_epoch": result.new_dispatch_epoch,
            "superseded": [d.dispatch_id for d in result.superseded],
            "active_dispatch": active, "stop_requested": active is not None}


def resume(box: Mailbox, run_id: str, decision: Any) -> dict[str, Any]:
    """Queue the waiting run's next dispatch, carrying the decision."""
    run = box.get_run(run_id)
    if run is None:
        raise not_found(f"no run with id {run_id!r}")
    if run.status != RunStatus.waiting:
        raise conflict(f"run {run_id} is {run.status.value}, not waiting for a decision")
    try:
        receipt = box.resume(run_id, decision)
    except ValidationError:
        latest = box.get_run(run_id)
        if latest is not None and latest.status != RunStatus.waiting:
            # Another caller resumed it between our read and our write.
            raise conflict(f"run {run_id} is {latest.status.value}, not waiting for a "
                           f"decision") from None
        raise
    return {"dispatch_id": receipt.dispatch_id, "run_id": receipt.run_id,
            "thread_id": receipt.thread_id, "resumed": True}


def replay(box: Mailbox, dispatch_id: str, force: bool) -> dict[str, Any]:
    """A dead letter's work again, as a new run (idempotent: `already_replayed`)."""
    dead = box.get_dispatch(dispatch_id)
    if dead is None:
        raise not_found(f"no dispatch with id {dispatch_id!r}")
    if dead.status != DispatchStatus.DeadLetter:
        raise conflict(f"dispatch {dispatch_id} is {dead.status.value}, not a dead letter")
    try:
        receipt = box.replay(dispatch_id, force=force)
    except ValidationError as exc:
        raise conflict(str(exc)) from None  # the thread moved on, or the run is gone
    return {"dispatch_id": receipt.dispatch_id, "run_id": receipt.run_id,
            "thread_id": receipt.thread_id, "replay_of": dispatch_id,
            "already_replayed": receipt.already_replayed}


def purge(box: Mailbox, dispatch_ids: list[str]) -> dict[str, Any]:
    """Delete dead letters (with their runs, inputs and event streams)."""
    for dispatch_id in dispatch_ids:
        check_text("dispatch id", dispatch_id)
    if len(dispatch_ids) == 1:
        found = box.get_dispatch(dispatch_ids[0])
        if found is None:
            raise not_found(f"no dispatch with id {dispatch_ids[0]!r}")
        if found.status != DispatchStatus.DeadLetter:
            raise conflict(f"dispatch {dispatch_ids[0]} is {found.status.value}, not a dead "
                           f"letter")
    return {"purged": box.purge_dead_letters(list(dispatch_ids)),
            "dispatch_ids": list(dispatch_ids)}
