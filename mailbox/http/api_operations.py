"""`/v1`: dead-letter tooling and statistics; `/healthz` (open: a load balancer or compose
probes it without a token, and it tells nothing but which service is unreachable)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import JSONResponse

from mailbox.audit import collect_stats
from mailbox.cli.dead_letters import parse_time
from mailbox.facade import MAX_LIST_LIMIT, Mailbox
from mailbox.http import actions, health, state
from mailbox.http.errors import ApiError
from mailbox.http.schemas import MAX_OFFSET, ReplayRequest, dispatch_json
from mailbox.store import Inspection

router = APIRouter(prefix="/v1", tags=["dead letters and statistics"])
health_router = APIRouter(tags=["health"])
Box = Annotated[Mailbox, Depends(state.box)]
TIME_HELP = "Unix ms, ISO 8601, or an age such as 90s, 15m, 2h, 3d"


def filter_time(name: str, raw: str | None) -> int | None:
    """A time filter as the CLI takes it (400 naming the parameter otherwise)."""
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse_time(raw)
    except ValueError as exc:
        raise ApiError(400, f"{name}: {exc} (give {TIME_HELP})", "validation") from None


@router.get("/dead-letters")
def dead_letters(
        box: Box,
        thread_id: str | None = None,
        agent: str | None = None,
        error: Annotated[str | None, Query(description="Text the last error contains")] = None,
        since: Annotated[str | None, Query(description=TIME_HELP)] = None,
        until: Annotated[str | None, Query(description=TIME_HELP)] = None,
        limit: Annotated[int, Query(ge=0, le=MAX_LIST_LIMIT)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> list[dict[str, Any]]:
    """Dead letters, newest first, with their reason, attempts and last error."""
    rows = box.dead_letters(thread_id=thread_id or None, agent=agent or None,
                            error_contains=error or None, since=filter_time("since", since),
                            until=filter_time("until", until), limit=limit, offset=offset)
    return [dispatch_json(d) for d in rows]


@router.post("/dead-letters/{dispatch_id}/replay", status_code=202,
             responses={200: {"description": "replayed before: that replay's ids "
                                             "(`already_replayed`)"},
                        404: {"description": "unknown id"},
                        409: {"description": "not a dead letter, or the thread moved on "
                                             "(replay with force)"}})
def replay(dispatch_id: str, box: Box,
           body: Annotated[ReplayRequest | None, Body()] = None) -> JSONResponse:
    """Run a dead letter's work again as a new run on the same thread (202), once."""
    out = actions.replay(box, dispatch_id, body.force if body else False)
    return JSONResponse(out, status_code=200 if out["already_replayed"] else 202)


@router.delete("/dead-letters/{dispatch_id}",
               responses={404: {"description": "unknown id"},
                          409: {"description": "not a dead letter"}})
def purge(dispatch_id: str, box: Box) -> dict[str, Any]:
    """Delete a dead letter with its run, input and event stream."""
    return actions.purge(box, [dispatch_id])


@router.get("/stats")
def stats(box: Box) -> dict[str, Any]:
    """Counts by status, oldest queued age, runs waiting, dispatches settled lately, and the
    API host's clock offset from Redis's (docs/behaviour.md#clocks)."""
    out = collect_stats(box).to_json()
    with Inspection.open(box.store) as inspect:
        settled = inspect.throughput(out["at"])
    out["settled"] = {f"last_{window}s": counts for window, counts in settled.items()}
    return out


@health_router.get("/healthz", responses={503: {"description": "names what is down"}})
def healthz(services: Annotated[state.Services, Depends(state.services)]) -> JSONResponse:
    """Reachability of the database, Redis and the broker: 200, or 503 naming what is down."""
    ok, checks = health.check(services.mailbox, lambda: services.publisher().broker_ok())
    down = [name for name, result in checks.items() if not result["ok"]]
    body: dict[str, Any] = {"ok": ok, "checks": checks}
    if down:
        body["error"] = f"unreachable: {', '.join(down)}"
    return JSONResponse(body, status_code=200 if ok else 503)
