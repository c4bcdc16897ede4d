"""The dashboard's pages (`/ui`), rendered on the server from the same facade as the API.

overview      counts by status, oldest queued age, waiting runs, recent throughput
threads       the most recently active first, with queued / claimed counts
thread        its conversation and its dispatches; interrupt
run           the run, its dispatch, its input; its events live (SSE); cancel, interrupt,
              resume
dead letters  filters; replay, purge (after a confirmation page)

Every page is a plain GET that reads; the actions are forms posted to `ui_actions` with the
session's CSRF token. Lists are bounded (MAX_LIST_LIMIT) and paged.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from mailbox.audit import collect_stats
from mailbox.http import state
from mailbox.http.api_operations import TIME_HELP, filter_time
from mailbox.http.errors import not_found
from mailbox.http.schemas import MAX_OFFSET
from mailbox.model import DispatchStatus, RunStatus
from mailbox.store import Inspection

router = APIRouter(prefix="/ui", include_in_schema=False)
Services = Annotated[state.Services, Depends(state.services)]
PAGE = 50
WAITING_SHOWN = 20
LIVE = (DispatchStatus.Queued, DispatchStatus.Claimed)


def page(request: Request, services: state.Services, template: str,
         context: dict[str, Any], status: int = 200) -> Response:
    """Render with what every page needs: the CSRF token, Flower's address, the notice."""
    base = {"csrf": state.session(request).csrf, "flower": services.settings.api_flower_url,
            "notice": request.query_params.get("notice"),
            "ref": request.query_params.get("ref"), "n": request.query_params.get("n")}
    return services.templates.TemplateResponse(request, template, {**base, **context},
                                               status_code=status)


@router.get("")
def overview(request: Request, services: Services) -> Response:
    box = services.mailbox
    stats = collect_stats(box)
    with Inspection.open(box.store) as inspect:
        throughput = inspect.throughput(stats.at)
        waiting = inspect.waiting_runs(WAITING_SHOWN)
    return page(request, services, "overview.html", {
        "stats": stats, "throughput": throughput, "waiting": waiting,
        "statuses": [s.value for s in DispatchStatus]})


@router.get("/threads")
def threads(request: Request, services: Services,
            q: Annotated[str | None, Query(max_length=255)] = None,
            offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Response:
    with Inspection.open(services.mailbox.store) as inspect:
        rows = inspect.thread_summaries(limit=PAGE + 1, offset=offset, prefix=q or None)
    return page(request, services, "threads.html", {
        "rows": rows[:PAGE], "more": len(rows) > PAGE, "q": q or "", "offset": offset,
        "page": PAGE})


@router.get("/threads/{thread_id:path}")
def thread(request: Request, thread_id: str, services: Services,
           before: Annotated[int | None, Query(ge=1)] = None,
           offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Response:
    box = services.mailbox
    messages = box.thread_messages(thread_id, limit=PAGE, before=before)
    dispatches = box.store.list_dispatches(thread_id, limit=PAGE + 1, offset=offset)
    if not messages and not dispatches and before is None and offset == 0:
        raise not_found(f"no thread {thread_id!r} (no messages, no dispatches)")
    return page(request, services, "thread.html", {
        "thread_id": thread_id, "messages": messages, "dispatches": dispatches[:PAGE],
        "more": len(dispatches) > PAGE, "offset": offset, "before": before, "page": PAGE,
        "older": messages[0].seq if len(messages) == PAGE else None})


@router.get("/runs/{run_id}")
def run(request: Request, run_id: str, services: Services) -> Response:
    box = services.mailbox
    record = box.get_run(run_id)
    if record is None:
        raise not_found(f"no run with id {run_id!r}")
    dispatch = box.get_dispatch(record.dispatch_id) if record.dispatch_id else None
    return page(request, services, "run.html", {
        "run": record, "dispatch": dispatch, "inputs": box.runs.run_messages(run_id),
        "waiting": record.status == RunStatus.waiting,
        "cancellable": dispatch is not None and dispatch.status in LIVE})


@router.get("/dead-letters")
def dead_letters(request: Request, services: Services,
                 thread_id: str | None = None, agent: str | None = None,
                 error: str | None = None,
                 since: Annotated[str | None, Query(description=TIME_HELP)] = None,
                 until: Annotated[str | None, Query(description=TIME_HELP)] = None,
                 offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Response:
    filters = {"thread_id": thread_id or "", "agent": agent or "", "error": error or "",
               "since": since or "", "until": until or ""}
    rows = services.mailbox.dead_letters(
        thread_id=thread_id or None, agent=agent or None, error_contains=error or None,
        since=filter_time("since", since), until=filter_time("until", until), limit=PAGE + 1,
        offset=offset)
    return page(request, services, "dead_letters.html", {
        "rows": rows[:PAGE], "more": len(rows) > PAGE, "filters": filters, "offset": offset,
        "page": PAGE})
