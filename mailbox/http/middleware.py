"""The two gates every request passes before any route runs: authentication and the body
size limit (mailbox/http/auth.py says why the auth is shaped as it is).

Both are plain ASGI middleware rather than route dependencies, so that they hold for every
path under `/v1` and `/ui` — unknown ones included (a 404 would tell a caller without a
token which routes exist) — and so that a refused request is answered before its body is
read, let alone parsed or written anywhere.
"""

from __future__ import annotations

import json
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbox.http.auth import SESSION_COOKIE, UI_PATH, Auth

SESSION_SCOPE_KEY = "mailbox.session"
API_PREFIX = "/v1"
LOGIN_PATH = f"{UI_PATH}/login"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def cookie_value(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header is no session, not a server error
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class AuthGate:
    """`/v1`: a bearer token, else 401. `/ui`: a session cookie, else 401 — a browser's
    page navigation (GET asking for HTML) is sent to the login page instead, which answers
    401 with its form. The login page itself is the one `/ui` path open to all."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if _under(path, API_PREFIX):
            if self.auth.bearer_ok(_header(scope, b"authorization")):
                await self.app(scope, receive, send)
                return
            await send_json(send, 401, {
                "error": "missing or wrong bearer token: send `Authorization: Bearer <token>` "
                         "with a token from MAILBOX_API_TOKENS", "kind": "unauthorized"},
                [(b"www-authenticate", b'Bearer realm="mailbox"')])
            return
        if _under(path, UI_PATH) and path != LOGIN_PATH:
            session = self.auth.session(cookie_value(scope, SESSION_COOKIE))
            if session is not None:
                scope.setdefault("state", {})[SESSION_SCOPE_KEY] = session
                await self.app(scope, receive, send)
                return
            accept = _header(scope, b"accept") or ""
            if scope["method"] in ("GET", "HEAD") and "text/html" in accept:
                query = scope.get("query_string", b"").decode("latin-1")
                target = path + (f"?{query}" if query else "")
                location = f"{LOGIN_PATH}?next={quote(target, safe='')}"
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", location.encode("latin-1")),
                                        (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            await send_json(send, 401, {"error": "not logged in to the dashboard: log in at "
                                                 f"{LOGIN_PATH} with an API token",
                                        "kind": "unauthorized"})
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413: at once when Content-Length says so,
    else as soon as the streamed body passes the limit (the route then never sees it)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.max_bytes:
                    state["over"] = True
                    # The route's body read fails here; its answer is replaced below.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await self._refuse(send)
                return
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        await send_json(send, 413, {"error": f"request body too large: at most "
                                             f"{self.max_bytes} bytes "
                                             f"(MAILBOX_API_MAX_BODY_BYTES)",
                                    "kind": "too_large"})
