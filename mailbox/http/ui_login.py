"""The dashboard's login and logout (mailbox/http/auth.py has the design).

GET /ui/login answers 401 with the form: every dashboard page a browser opens without a
session is redirected here, so "not logged in" is a 401 whichever way it is reached. The form
posts the token with a nonce bound to a pre-session cookie (no other site can log a browser
in); a right token gets the session cookie and a redirect to where the browser was going.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from mailbox.http import state
from mailbox.http.auth import (
    LOGIN_COOKIE,
    LOGIN_MAX_AGE_S,
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    UI_PATH,
    safe_next,
    same_origin,
)
from mailbox.http.errors import ApiError
from mailbox.http.middleware import LOGIN_PATH

router = APIRouter(include_in_schema=False)
Services = Annotated[state.Services, Depends(state.services)]


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _login_page(request: Request, services: state.Services, next_url: str,
                error: str | None, status: int) -> Response:
    cookie, form_value = services.auth.new_login_nonce()
    response = services.templates.TemplateResponse(
        request, "login.html", {"next": safe_next(next_url), "nonce": form_value,
                                "error": error, "insecure": not services.auth.required},
        status_code=status)
    response.set_cookie(LOGIN_COOKIE, cookie, max_age=LOGIN_MAX_AGE_S, path=LOGIN_PATH,
                        httponly=True, samesite="strict", secure=_secure(request))
    return response


@router.get(LOGIN_PATH)
def login_form(request: Request, services: Services, next: str = UI_PATH) -> Response:
    return _login_page(request, services, next, None, 401)


@router.post(LOGIN_PATH)
def login(request: Request, services: Services, token: Annotated[str, Form()] = "",
          nonce: Annotated[str, Form()] = "", next: Annotated[str, Form()] = UI_PATH
          ) -> Response:
    auth = services.auth
    if not same_origin(request.headers.get("origin"), request.headers.get("host"),
                       request.url.scheme) or \
            not auth.login_nonce_ok(request.cookies.get(LOGIN_COOKIE), nonce):
        raise ApiError(403, "login form expired or posted from another site: reload the "
                            "login page and try again", "csrf")
    cookie = auth.new_session(token)
    if cookie is None:
        return _login_page(request, services, next, "That token is not one of "
                                                    "MAILBOX_API_TOKENS.", 401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_MAX_AGE_S, path=UI_PATH,
                        httponly=True, samesite="strict", secure=_secure(request))
    response.delete_cookie(LOGIN_COOKIE, path=LOGIN_PATH)
    return response


def logout_response(request: Request) -> Response:
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=UI_PATH, httponly=True, samesite="strict",
                           secure=_secure(request))
    return response
