"""The HTTP layer's authentication pieces without a server (mailbox/http/auth.py): token
checks, bearer headers, signed sessions that end with their token, the login form's nonce,
CSRF, same-origin and where a login may redirect; the settings that configure them."""

from __future__ import annotations

import pytest

from mailbox.errors import ValidationError
from mailbox.http.auth import Auth, AuthConfigError, is_loopback, safe_next, same_origin
from mailbox.settings import Settings

TOKEN = "a" * 16 + "-first"
OTHER = "b" * 16 + "-second"


def test_tokens_are_required_long_and_header_safe() -> None:
    with pytest.raises(AuthConfigError, match="MAILBOX_API_TOKENS"):
        Auth(())
    with pytest.raises(AuthConfigError, match="at least 16"):
        Auth(("short",))
    with pytest.raises(AuthConfigError, match="printable ASCII"):
        Auth(("x" * 16 + " space",))
    with pytest.raises(AuthConfigError, match="printable ASCII"):
        Auth(("x" * 16 + "é",))
    assert not Auth((), insecure=True).required
    assert Auth((), insecure=True).bearer_ok(None)


def test_bearer_header() -> None:
    auth = Auth((TOKEN, OTHER))
    assert auth.bearer_ok(f"Bearer {TOKEN}") and auth.bearer_ok(f"bearer {OTHER}")
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                   "Bearer ", f"Token {TOKEN}", "Bearer \udcff"):
        assert not auth.bearer_ok(header), header


def test_sessions_are_signed_and_end_with_their_token() -> None:
    auth = Auth((TOKEN, OTHER))
    assert auth.new_session("wrong-token-000000") is None
    cookie = auth.new_session(TOKEN)
    assert cookie is not None
    session = auth.session(cookie)
    assert session is not None and auth.csrf_ok(session, session.csrf)
    assert not auth.csrf_ok(session, "") and not auth.csrf_ok(session, session.csrf + "x")
    fingerprint, _, signed = cookie.partition(".")
    assert auth.session(f"{fingerprint}.{signed[:-2]}xx") is None, "tampered"
    assert auth.session("forged." + signed) is None
    assert auth.session(None) is None and auth.session("") is None
    # Another token's cookie is not this one's; adding a token keeps sessions alive;
    # removing the token that logged in ends them.
    assert Auth((TOKEN, OTHER, "c" * 20)).session(cookie) is not None
    assert Auth((OTHER,)).session(cookie) is None
    assert Auth((TOKEN,)).session(Auth((OTHER,)).new_session(OTHER)) is None


def test_the_login_nonce_is_bound_to_its_cookie() -> None:
    auth = Auth((TOKEN,))
    cookie, form = auth.new_login_nonce()
    assert auth.login_nonce_ok(cookie, form)
    other_cookie, other_form = auth.new_login_nonce()
    assert not auth.login_nonce_ok(other_cookie, form)
    assert not auth.login_nonce_ok(cookie, other_form)
    assert not auth.login_nonce_ok(None, form) and not auth.login_nonce_ok(cookie, cookie)


def test_same_origin_and_safe_redirects() -> None:
    assert same_origin(None, "h:1", "http")
    assert same_origin("http://h:1", "h:1", "http")
    for origin in ("https://h:1", "http://evil:1", "null", "http://h:2"):
        assert not same_origin(origin, "h:1", "http"), origin
    assert safe_next("/ui/runs/x?y=1") == "/ui/runs/x?y=1"
    assert safe_next("/ui") == "/ui" and safe_next("/ui?x") == "/ui?x"
    for target in ("//evil.example", "https://evil.example/ui", "/uix", "/v1/stats",
                   "/ui\\evil", "/ui/\r\nSet-Cookie: x", None, ""):
        assert safe_next(target) == "/ui", target
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_api_settings_from_the_environment() -> None:
    settings = Settings.from_env({"MAILBOX_API_TOKENS": f" {TOKEN} ,, {OTHER}, ",
                                  "MAILBOX_API_PORT": "9000", "MAILBOX_API_HOST": "0.0.0.0",
                                  "MAILBOX_API_INSECURE_NO_AUTH": "no",
                                  "MAILBOX_API_FLOWER_URL": "http://flower:5555/"})
    assert settings.api_tokens == (TOKEN, OTHER)
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 9000)
    assert settings.api_insecure_no_auth is False
    assert settings.api_flower_url == "http://flower:5555"
    defaults = Settings.from_env({})
    assert (defaults.api_host, defaults.api_port, defaults.api_tokens) == ("127.0.0.1", 8000, ())
    assert defaults.api_sse_keepalive_s <= 15
    for env, name in (({"MAILBOX_API_PORT": "70000"}, "MAILBOX_API_PORT"),
                      ({"MAILBOX_API_INSECURE_NO_AUTH": "maybe"}, "MAILBOX_API_INSECURE_NO_AUTH"),
                      ({"MAILBOX_API_MAX_BODY_BYTES": "10"}, "MAILBOX_API_MAX_BODY_BYTES")):
        with pytest.raises(ValidationError, match=name):
            Settings.from_env(env)
