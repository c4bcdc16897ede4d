"""Who may call the API and use the dashboard (README, "HTTP API and dashboard").

The API (`/v1`) takes a bearer token, `Authorization: Bearer <token>`, one of
`MAILBOX_API_TOKENS`. Each configured token is compared with `hmac.compare_digest`, and all of
them every time, so neither the answer's timing nor its path tells how much of a guess was
right. Tokens are the only secret: short ones are refused at start-up.

A browser cannot put a header on a navigation, so the dashboard (`/ui`) logs in once: the
login page takes a token and answers with a session cookie, `mailbox_session` — HttpOnly (no
script reads it), SameSite=Strict (no other site's page can make the browser send it),
Path=/ui, Secure when served over HTTPS, signed and timestamped with itsdangerous (12 hours).
The cookie carries the fingerprint of the token that logged in and is signed with a key
derived from that token: removing the token from MAILBOX_API_TOKENS ends its sessions at the
next request, and adding another leaves them alone. The session also holds a random CSRF
secret that every dashboard form sends back (`csrf_token`); a POST without it, or with an
`Origin` that is not the server's own, changes nothing. The login form itself is protected
the same way with a short-lived pre-session cookie (no login CSRF).

Without tokens the server refuses to start, unless MAILBOX_API_INSECURE_NO_AUTH=1 and it
listens on a loopback address (local development): then every caller is let in, and the
dashboard still issues sessions, so its forms keep their CSRF protection.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer

from mailbox.errors import MailboxError
from mailbox.settings import Settings

MIN_TOKEN_CHARS = 16
SESSION_COOKIE = "mailbox_session"
LOGIN_COOKIE = "mailbox_login"
SESSION_MAX_AGE_S = 12 * 3600
LOGIN_MAX_AGE_S = 3600
UI_PATH = "/ui"


class AuthConfigError(MailboxError):
    """The server cannot start: no usable token and no explicit insecure setting."""

    prefix = "API authentication"


@dataclass(frozen=True)
class Session:
    """A logged-in dashboard session: the token fingerprint it belongs to and the secret its
    forms must send back."""

    fingerprint: str
    csrf: str


def check_tokens(tokens: Sequence[str]) -> None:
    """Refuse tokens a guess could find, or that cannot travel in an HTTP header."""
    for n, token in enumerate(tokens, 1):
        if len(token) < MIN_TOKEN_CHARS:
            raise AuthConfigError(f"MAILBOX_API_TOKENS: token {n} has {len(token)} characters; "
                                  f"use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex "
                                  f"32`)")
        if not token.isascii() or not token.isprintable() or " " in token:
            raise AuthConfigError(f"MAILBOX_API_TOKENS: token {n} must be printable ASCII "
                                  f"without spaces")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _fingerprint(secret: bytes) -> str:
    return hmac.new(secret, b"mailbox session fingerprint", hashlib.sha256).hexdigest()[:24]


class Auth:
    """The tokens and the session signer of one server."""

    def __init__(self, tokens: Sequence[str], *, insecure: bool = False) -> None:
        check_tokens(tokens)
        if not tokens and not insecure:
            raise AuthConfigError(
                "no token configured: set MAILBOX_API_TOKENS (comma-separated, e.g. `openssl "
                "rand -hex 32`), or MAILBOX_API_INSECURE_NO_AUTH=1 for local development on a "
                "loopback address")
        self.required = bool(tokens)
        self._tokens = tuple(t.encode() for t in tokens)
        # Without tokens (insecure mode) sessions are signed with a key of this process.
        secrets_ = self._tokens or (secrets.token_bytes(32),)
        self._signers = {_fingerprint(s): URLSafeTimedSerializer(
            hashlib.sha256(b"mailbox session key\0" + s).digest(), salt="mailbox-ui-session")
            for s in secrets_}
        self._login = URLSafeTimedSerializer(
            hashlib.sha256(b"mailbox login key\0" + b"\0".join(secrets_)).digest(),
            salt="mailbox-ui-login")

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        return cls(settings.api_tokens, insecure=settings.api_insecure_no_auth)

    # --------------------------------------------------------------------------- tokens
    def _matching(self, presented: str) -> bytes | None:
        """The configured token equal to `presented`, comparing against every one."""
        given = presented.encode("utf-8", "replace")
        found = None
        for token in self._tokens:
            if hmac.compare_digest(token, given):
                found = token
        return found

    def token_ok(self, presented: str) -> bool:
        return not self.required or self._matching(presented) is not None

    def bearer_ok(self, authorization: str | None) -> bool:
        """An `Authorization: Bearer <token>` header carrying a configured token."""
        if not self.required:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self._matching(token.strip()) is not None

    # ------------------------------------------------------------------------- sessions
    def new_session(self, token: str) -> str | None:
        """The cookie value of a new session for `token`, or None when it is not one of
        ours (any value in insecure mode)."""
        if self.required:
            matched = self._matching(token)
            if matched is None:
                return None
            fingerprint = _fingerprint(matched)
        else:
            fingerprint = next(iter(self._signers))
        signed = self._signers[fingerprint].dumps({"csrf": secrets.token_urlsafe(24)})
        return f"{fingerprint}.{signed}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie holds: signed by a current token's key, and not too old."""
        if not cookie:
            return None
        fingerprint, _, signed = cookie.partition(".")
        signer = None
        for known, candidate in self._signers.items():
            if hmac.compare_digest(known.encode(), fingerprint.encode("utf-8", "replace")):
                signer = candidate
        if signer is None:
            return None
        try:
            data = signer.loads(signed, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # also SignatureExpired
            return None
        csrf = data.get("csrf") if isinstance(data, dict) else None
        return Session(fingerprint, csrf) if isinstance(csrf, str) and csrf else None

    @staticmethod
    def csrf_ok(session: Session, submitted: str | None) -> bool:
        return bool(submitted) and hmac.compare_digest(session.csrf.encode(),
                                                       (submitted or "").encode())

    # -------------------------------------------------------------- the login form's CSRF
    def new_login_nonce(self) -> tuple[str, str]:
        """(cookie value, form value) of a login form: the form value is the signed cookie
        value, so only a page of ours, read by the browser that got the cookie, can post."""
        nonce = secrets.token_urlsafe(24)
        return nonce, self._login.dumps(nonce)

    def login_nonce_ok(self, cookie: str | None, form_value: str | None) -> bool:
        if not cookie or not form_value:
            return False
        try:
            nonce = self._login.loads(form_value, max_age=LOGIN_MAX_AGE_S)
        except BadSignature:
            return False
        return isinstance(nonce, str) and hmac.compare_digest(nonce.encode(), cookie.encode())


def same_origin(origin: str | None, host: str | None, scheme: str) -> bool:
    """A browser's `Origin` (sent with every POST) names this server: no other site's page
    made the request. A missing Origin (older browsers, non-browser clients) passes: the
    SameSite cookie and the CSRF token still stand."""
    if origin is None:
        return True
    if origin == "null" or host is None:
        return False
    parts = urlsplit(origin)
    return parts.scheme == scheme and parts.netloc.lower() == host.lower()


def safe_next(target: str | None) -> str:
    """Where a login may send the browser next: a dashboard path of this server only (never
    another site: `//evil.example` and `/\\evil` are refused)."""
    if (not target or not target.startswith(UI_PATH) or target.startswith("//")
            or "\\" in target or any(ord(c) < 32 for c in target)):
        return UI_PATH
    rest = target[len(UI_PATH):]
    return target if rest == "" or rest[0] in "/?" else UI_PATH
