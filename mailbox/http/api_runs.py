"""`/v1`: submitting runs and reading dispatches, runs and threads.

A submit is `dispatch.delay()`: the facade validates every argument before writing (400,
nothing written), writes the run, its input and its dispatch in one transaction, then the
wake-up is published. The answer says which of the two failures happened when one did:
503 `store_unavailable` with `written: false` (the database or Redis refused; nothing was
written), or 503 `wake_not_published` with `stored: true` and the ids (the dispatch is
durable and a worker's sweep delivers it; do not submit it again).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from mailbox.errors import StoreUnavailableError
from mailbox.facade import MAX_LIST_LIMIT, Mailbox
from mailbox.http import state
from mailbox.http.errors import ApiError, not_found
from mailbox.http.publishing import StoredNotPublishedError
from mailbox.http.schemas import MAX_OFFSET, DispatchRequest, Receipt, dispatch_json, run_json
from mailbox.model import DispatchStatus, check_text

router = APIRouter(prefix="/v1", tags=["runs"])
Box = Annotated[Mailbox, Depends(state.box)]
STATUSES = [s.value for s in DispatchStatus]


@router.post("/threads/{thread_id:path}/dispatches", status_code=202,
             response_model=Receipt,
             responses={400: {"description": "bad input; nothing written"},
                        409: {"description": "the dedupe key is held by a live dispatch"},
                        503: {"description": "store down (nothing written), or stored but "
                                             "the wake-up not published (ids given)"}})
def submit(thread_id: str, body: DispatchRequest,
           services: Annotated[state.Services, Depends(state.services)]) -> JSONResponse:
    """Queue a run of `agent` on the thread (what `dispatch.delay()` does)."""
    box = services.mailbox
    try:
        dispatch_id = services.publisher().submit(
            thread_id, body.agent, body.input, priority=body.priority,
            dedupe_key=body.dedupe_key, delay_ms=body.delay_ms,
            max_attempts=body.max_attempts, interrupt=body.interrupt)
    except StoredNotPublishedError as exc:
        stored = _ids(box, exc.dispatch_id, thread_id)
        raise ApiError(503, str(exc), "wake_not_published", stored=True, **stored) from exc
    except StoreUnavailableError as exc:
        raise ApiError(503, str(exc), "store_unavailable", written=False) from exc
    return JSONResponse(_ids(box, dispatch_id, thread_id), status_code=202)


def _ids(box: Mailbox, dispatch_id: str, thread_id: str) -> dict[str, Any]:
    try:
        dispatch = box.get_dispatch(dispatch_id)
    except StoreUnavailableError:
        dispatch = None
    return {"dispatch_id": dispatch_id, "run_id": dispatch.run_id if dispatch else None,
            "thread_id": thread_id}


@router.get("/dispatches/{dispatch_id}")
def get_dispatch(dispatch_id: str, box: Box) -> dict[str, Any]:
    """A dispatch: its status, attempts, lease and the projection of its run's outcome."""
    dispatch = box.get_dispatch(dispatch_id)
    if dispatch is None:
        raise not_found(f"no dispatch with id {dispatch_id!r}")
    return dispatch_json(dispatch)


@router.get("/runs/{run_id}")
def get_run(run_id: str, box: Box) -> dict[str, Any]:
    """A run: status, termination, response or error, and its current dispatch."""
    run = box.get_run(run_id)
    if run is None:
        raise not_found(f"no run with id {run_id!r}")
    return run_json(run)


@router.get("/threads/{thread_id:path}/dispatches")
def thread_dispatches(
        thread_id: str, box: Box,
        status: Annotated[list[str] | None, Query(
            description=f"Only these statuses (repeat, or comma-separate): "
                        f"{', '.join(STATUSES)}")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> list[dict[str, Any]]:
    """The thread's dispatches in claim order (priority, then first in first out)."""
    wanted = _statuses(status)
    rows = box.store.list_dispatches(_thread(thread_id), wanted, limit=limit, offset=offset)
    return [dispatch_json(d) for d in rows]


@router.get("/threads/{thread_id:path}/messages")
def thread_messages(
        thread_id: str, box: Box,
        limit: Annotated[int, Query(ge=0, le=MAX_LIST_LIMIT)] = 50,
        before: Annotated[int | None, Query(ge=1, description="Page back: the messages "
                                                               "before this seq")] = None
) -> list[dict[str, Any]]:
    """The conversation, oldest first (each run's messages together)."""
    return [m.to_json() for m in box.thread_messages(thread_id, limit=limit, before=before)]


def _thread(thread_id: str) -> str:
    return str(check_text("thread_id", thread_id))


def _statuses(raw: list[str] | None) -> list[DispatchStatus] | None:
    if not raw:
        return None
    names = [part.strip() for item in raw for part in item.split(",") if part.strip()]
    by_lower = {s.lower(): s for s in STATUSES}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise ApiError(400, f"unknown status {unknown[0]!r}; one of {', '.join(STATUSES)}",
                       "validation")
    return [DispatchStatus(by_lower[n.lower()]) for n in names] or None
