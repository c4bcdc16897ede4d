"""`create_app(mailbox, settings)`: the FastAPI application of `python -m mailbox serve`.

One app serves the JSON API under `/v1`, the dashboard under `/ui`, its static files under
`/static`, `/healthz`, and the OpenAPI description at `/docs` and `/openapi.json`. The app
holds no global state: the Mailbox, settings, auth and publisher live on `app.state`
(`mailbox/http/state.py`), so a process (or a test) can run several.

The routes are plain functions (`def`): the facade blocks on SQL and Redis, and FastAPI runs
such routes on its worker threads, off the event loop. Event streams get threads of their
own (mailbox/http/sse.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbox.facade import Mailbox
from mailbox.http import (
    api_batch,
    api_control,
    api_operations,
    api_runs,
    errors,
    ui_actions,
    ui_login,
    ui_pages,
)
from mailbox.http.auth import Auth
from mailbox.http.middleware import AuthGate, BodyLimit
from mailbox.http.publishing import Publisher
from mailbox.http.state import Services
from mailbox.settings import Settings

HERE = Path(__file__).resolve().parent
DESCRIPTION = """The Dispatch Mailbox over HTTP: submit runs, read dispatches, runs and
threads, steer threads (cancel, interrupt, resume), follow a run's events (server-sent
events), work the dead letter, read statistics.

Every `/v1` route needs `Authorization: Bearer <token>` (a token of `MAILBOX_API_TOKENS`).
Errors are JSON: `{"error": "...what is wrong...", "kind": "..."}`."""

# The dashboard loads nothing from elsewhere and is never framed (clickjacking).
UI_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; "
                                 b"img-src 'self' data:; connect-src 'self'; "
                                 b"frame-ancestors 'none'; form-action 'self'; "
                                 b"base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


# Every route of the app (tests/e2e/test_http_api.py checks each one's authentication).
ROUTERS = (api_runs.router, api_batch.router, api_control.router, api_operations.router,
           api_operations.health_router, ui_login.router, ui_actions.router, ui_pages.router)


class UiHeaders:
    """Security headers on every dashboard answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/ui"):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *[(k, v) for k, v in UI_HEADERS if k not in present]]
            await send(message)

        await self.app(scope, receive, with_headers)


def _iso(ms: Any) -> str:
    if not isinstance(ms, int):
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _age(ms: Any) -> str:
    """Milliseconds as a short duration ("850 ms", "12.5 s", "4 min", "3.2 h")."""
    if not isinstance(ms, int | float):
        return "-"
    if ms < 1000:
        return f"{int(ms)} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.0f} min"
    return f"{ms / 3_600_000:.1f} h"


def _ago(ms: Any) -> str:
    return _age(int(time.time() * 1000) - ms) + " ago" if isinstance(ms, int) else "-"


def templates() -> Jinja2Templates:
    found = Jinja2Templates(directory=str(HERE / "templates"))
    found.env.filters.update(iso=_iso, age=_age, ago=_ago)
    return found


def create_app(mailbox: Mailbox, settings: Settings, *, publisher: Publisher | None = None
               ) -> FastAPI:
    """The app over `mailbox`. `publisher` submits and checks the broker; by default
    `dispatch.delay()` and the Celery app (then `mailbox` should be the process's
    `tasks.runtime.mailbox()`, the one delay writes through). Raises AuthConfigError when no
    token is configured and the insecure setting is not given."""
    auth = Auth.from_settings(settings)
    app = FastAPI(title="Dispatch Mailbox", version="1", description=DESCRIPTION,
                  docs_url="/docs", redoc_url=None)
    app.state.services = Services(mailbox, settings, auth, templates(),
                                  given_publisher=publisher)
    app.state.templates = app.state.services.templates
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    # The last added runs first: authentication, then the body limit, then the headers.
    app.add_middleware(UiHeaders)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(AuthGate, auth=auth)
    _document_bearer(app)
    return app


def _document_bearer(app: FastAPI) -> None:
    """Declare the bearer scheme in the OpenAPI description (the gate enforces it), so
    /docs offers "Authorize" and every /v1 operation shows it needs the token."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "A token of MAILBOX_API_TOKENS"}}
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/v1"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
