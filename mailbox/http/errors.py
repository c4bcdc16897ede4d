"""Every failure as a JSON answer that names the problem, with the status a client acts on.

The facade's errors carry the message (it names the argument and the value); this module
only picks the status: bad input 400, unknown id 404, a state that does not allow the
operation 409 (a live dedupe key, a run that is not waiting), an expired event cursor 410,
an unreachable database, Redis or broker 503. Anything unexpected is a 500 whose details go
to the log, not to the caller. Dashboard pages get the same message on an HTML page.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailbox.errors import (
    AlreadyExistsError,
    MailboxError,
    NotFoundError,
    StoreUnavailableError,
    ValidationError,
    VersionConflictError,
)
from mailbox.events import CursorExpiredError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than success, decided by a route: status, message, kind and any
    extra fields (the ids of a dispatch stored although its wake-up was not published)."""

    def __init__(self, status: int, message: str, kind: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.extra = extra


def conflict(message: str) -> ApiError:
    return ApiError(409, message, "conflict")


def not_found(message: str) -> ApiError:
    return ApiError(404, message, "not_found")


def from_mailbox_error(exc: MailboxError) -> ApiError:
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc), "not_found")
    if isinstance(exc, AlreadyExistsError | VersionConflictError):
        return ApiError(409, str(exc), "conflict")
    if isinstance(exc, CursorExpiredError):
        return ApiError(410, str(exc), "cursor_expired")
    if isinstance(exc, StoreUnavailableError):
        return ApiError(503, str(exc), "store_unavailable", written=False)
    if isinstance(exc, ValidationError):
        return ApiError(400, str(exc), "validation")
    return ApiError(400, str(exc), "invalid")


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def describe_validation(exc: RequestValidationError) -> str:
    """Pydantic's errors as one line: `body.priority: Input should be a valid integer`."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error.get("loc", ()))
        msg = str(error.get("msg", "invalid"))
        ctx = error.get("ctx") or {}
        if error.get("type") == "json_invalid":
            where = error.get("loc", ("body", "?"))[-1]
            parts.append(f"request body is not valid JSON ({ctx.get('error', 'invalid')} at "
                         f"character {where})")
            continue
        if loc == "body" and error.get("type") in ("model_attributes_type", "dict_type"):
            msg = ("the request body must be a JSON object, sent with Content-Type: "
                   "application/json")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def _wants_html(request: Request) -> bool:
    return request.url.path.startswith("/ui") and \
        "text/html" in request.headers.get("accept", "")


def render(request: Request, error: ApiError) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="mailbox"'} if error.status == 401 else None
    if _wants_html(request):
        templates = getattr(request.app.state, "templates", None)
        if templates is not None:
            return templates.TemplateResponse(  # type: ignore[no-any-return]
                request, "error.html", {"status": error.status, "message": error.message},
                status_code=error.status)
        return HTMLResponse(f"<p>{error.status}: {error.message}</p>", error.status)
    body = {"error": error.message, "kind": error.kind, **error.extra}
    return JSONResponse(body, status_code=error.status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into its answer."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return render(request, exc)

    async def mailbox_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MailboxError)
        return render(request, from_mailbox_error(exc))

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return render(request, ApiError(400, describe_validation(exc), "validation"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            message = ("request body could not be parsed as JSON (invalid UTF-8, or nested "
                       "too deeply)")
        elif exc.status_code == 404 and exc.detail == "Not Found":
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        kind = {400: "validation", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http")
        return render(request, ApiError(exc.status_code, message, kind))

    async def redis_error(request: Request, exc: Exception) -> Response:
        return render(request, ApiError(503, f"redis unreachable: {_first_line(exc)}",
                                        "store_unavailable"))

    async def database_error(request: Request, exc: Exception) -> Response:
        message = _first_line(exc)
        if "no such table" in message or "does not exist" in message:
            message += " (is the schema created? run `python -m mailbox db upgrade`)"
        return render(request, ApiError(503, f"database: {message}", "store_unavailable"))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return render(request, ApiError(500, f"internal error ({type(exc).__name__}); the "
                                             f"server log has the details", "internal"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(MailboxError, mailbox_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(redis.RedisError, redis_error)
    app.add_exception_handler(sa_exc.SQLAlchemyError, database_error)
    app.add_exception_handler(Exception, unexpected)
