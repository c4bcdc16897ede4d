"""The dashboard's forms and the run page's event stream.

Every form is a POST carrying the session's CSRF token; one without it, with another, or
with an `Origin` that is not this server is refused with 403 before anything changes
(the session cookie is SameSite=Strict as well, so another site's page cannot send it at
all). A done action redirects (303) back to the page it came from with a notice; a refused
one (unknown id, a state that does not allow it) shows the error page with its status.
Purging asks first: the first post shows what would go, the second (`confirm`) deletes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Header, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from mailbox.facade import MAX_LIST_LIMIT
from mailbox.http import actions, state
from mailbox.http.api_control import stream_response
from mailbox.http.auth import same_origin
from mailbox.http.errors import ApiError
from mailbox.http.ui_login import logout_response

router = APIRouter(prefix="/ui", include_in_schema=False)
Services = Annotated[state.Services, Depends(state.services)]
Csrf = Annotated[str, Form()]


def checked(request: Request, services: Annotated[state.Services, Depends(state.services)],
            csrf_token: Csrf = "") -> state.Services:
    """The dependency of every form: same origin and the session's CSRF token."""
    if not same_origin(request.headers.get("origin"), request.headers.get("host"),
                       request.url.scheme):
        raise ApiError(403, "cross-site form post refused (Origin is not this server)",
                       "csrf")
    if not services.auth.csrf_ok(state.session(request), csrf_token):
        raise ApiError(403, "missing or wrong CSRF token: reload the page and submit the "
                            "form again", "csrf")
    return services


Checked = Annotated[state.Services, Depends(checked)]


def back(path: str, notice: str, ref: str | None = None, n: int | None = None) -> Response:
    params: dict[str, Any] = {"notice": notice}
    if ref is not None:
        params["ref"] = ref
    if n is not None:
        params["n"] = n
    return RedirectResponse(f"{path}?{urlencode(params)}", status_code=303)


def _run_page(run_id: str) -> str:
    return f"/ui/runs/{quote(run_id, safe='')}"


def _thread_page(thread_id: str) -> str:
    return f"/ui/threads/{quote(thread_id, safe='')}"


@router.post("/dispatches/{dispatch_id}/cancel")
def cancel(dispatch_id: str, services: Checked) -> Response:
    out = actions.cancel(services.mailbox, dispatch_id)
    return back(_run_page(out["run_id"]), out["action"], dispatch_id)


@router.post("/threads/{thread_id:path}/interrupt")
def interrupt(thread_id: str, services: Checked,
              return_to: Annotated[str, Form()] = "") -> Response:
    out = actions.interrupt(services.mailbox, thread_id)
    target = return_to if return_to.startswith("/ui/runs/") else _thread_page(thread_id)
    return back(target, "interrupted", thread_id, len(out["superseded"]))


@router.post("/runs/{run_id}/resume")
def resume(run_id: str, services: Checked, decision: Annotated[str, Form()] = "") -> Response:
    if not decision.strip():
        raise ApiError(400, "the decision is empty: type what the run should go on with",
                       "validation")
    try:
        value: Any = json.loads(decision)  # JSON when it parses, else the text as typed
    except json.JSONDecodeError:
        value = decision
    actions.resume(services.mailbox, run_id, value)
    return back(_run_page(run_id), "resumed", run_id)


@router.post("/dead-letters/{dispatch_id}/replay")
def replay(dispatch_id: str, services: Checked,
           force: Annotated[bool, Form()] = False) -> Response:
    out = actions.replay(services.mailbox, dispatch_id, force)
    notice = "already_replayed" if out["already_replayed"] else "replayed"
    return back("/ui/dead-letters", notice, out["run_id"])


@router.post("/dead-letters/purge")
def purge(request: Request, services: Checked,
          ids: Annotated[list[str] | None, Form()] = None,
          confirm: Annotated[str, Form()] = "") -> Response:
    chosen = list(dict.fromkeys(ids or []))
    if not chosen:
        raise ApiError(400, "no dead letter selected: tick the ones to purge", "validation")
    if len(chosen) > MAX_LIST_LIMIT:
        raise ApiError(400, f"at most {MAX_LIST_LIMIT} dead letters per purge", "validation")
    if confirm != "yes":
        rows = [d for d in (services.mailbox.get_dispatch(i) for i in chosen) if d is not None]
        return services.templates.TemplateResponse(request, "purge_confirm.html", {
            "rows": rows, "csrf": state.session(request).csrf,
            "flower": services.settings.api_flower_url, "notice": None})
    out = services.mailbox.purge_dead_letters(chosen)
    return back("/ui/dead-letters", "purged", None, out)


@router.post("/logout")
def logout(request: Request, _services: Checked) -> Response:
    return logout_response(request)


@router.get("/runs/{run_id}/events")
def events(run_id: str, services: Services,
           last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """The run page's live events (EventSource resends Last-Event-ID on reconnect)."""
    return stream_response(services, run_id, last_event_id)
