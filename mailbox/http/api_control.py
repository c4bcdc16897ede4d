"""`/v1`: thread control (cancel, interrupt, resume) and a run's live events (SSE)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from mailbox.facade import Mailbox
from mailbox.http import actions, sse, state
from mailbox.http.schemas import ResumeRequest

router = APIRouter(prefix="/v1", tags=["thread control"])
Box = Annotated[Mailbox, Depends(state.box)]
CONFLICT: dict[int | str, dict[str, Any]] = {404: {"description": "unknown id"},
            409: {"description": "not possible in the record's current state"}}


@router.post("/dispatches/{dispatch_id}/cancel", responses=CONFLICT)
def cancel(dispatch_id: str, box: Box) -> dict[str, Any]:
    """Cancel a queued dispatch (`action: cancelled`), or ask the worker running it to stop
    (`action: stop_requested`; its run ends cancelled). 409 when it already finished."""
    return actions.cancel(box, dispatch_id)


@router.post("/threads/{thread_id:path}/interrupt", responses=CONFLICT)
def interrupt(thread_id: str, box: Box) -> dict[str, Any]:
    """Latest wins: supersede the queued dispatches, stop the running one."""
    return actions.interrupt(box, thread_id)


@router.post("/runs/{run_id}/resume", responses=CONFLICT)
def resume(run_id: str, body: ResumeRequest, box: Box) -> dict[str, Any]:
    """Answer a run waiting for a decision (409 when it is not waiting)."""
    return actions.resume(box, run_id, body.decision)


@router.get("/runs/{run_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`id:` event id, `event:` type, `data:` event "
                                            "JSON; ends after the run's final run_finish"},
                       404: {"description": "unknown run"},
                       410: {"description": "the cursor is older than what retention kept"}})
def events(run_id: str, services: Annotated[state.Services, Depends(state.services)],
           last_event_id: Annotated[str | None, Header()] = None,
           after: Annotated[str | None, Query(description="Resume after this event id "
                                                          "(Last-Event-ID wins)")] = None
           ) -> StreamingResponse:
    """The run's events as server-sent events, live, resumable."""
    return stream_response(services, run_id, last_event_id or after)


def stream_response(services: state.Services, run_id: str, cursor: str | None
                    ) -> StreamingResponse:
    """Checks first (404, 400, 410, 503 when too many streams), then the stream."""
    box = services.mailbox
    sse.open_stream(box, run_id, cursor)
    services.slots.take()
    chunks = sse.event_chunks(box, run_id, cursor,
                              min(15, services.settings.api_sse_keepalive_s))
    return StreamingResponse(sse.pump(chunks, services.slots), media_type="text/event-stream",
                             headers=sse.SSE_HEADERS)
