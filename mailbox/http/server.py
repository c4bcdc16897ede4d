"""`python -m mailbox serve`: the API and the dashboard on uvicorn.

The server writes through the process's Mailbox (`tasks.runtime`), the same one
`dispatch.delay()` uses, so a submit over HTTP is exactly a `delay()` call. It refuses to
start without a token (or the explicit insecure setting, and then only on a loopback
address): a mailbox reachable without credentials lets anyone run agents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import uvicorn

from mailbox.http.app import create_app
from mailbox.http.auth import Auth, AuthConfigError, is_loopback
from mailbox.http.publishing import process_mailbox
from mailbox.settings import Settings

GRACEFUL_SHUTDOWN_S = 5  # open event streams never end on their own


def serve(settings: Settings, host: str, port: int,
          say: Callable[[str], None] = print) -> None:
    if settings.api_insecure_no_auth and not settings.api_tokens and not is_loopback(host):
        raise AuthConfigError(f"MAILBOX_API_INSECURE_NO_AUTH serves without tokens, so only on "
                              f"a loopback address (127.0.0.1, ::1, localhost), not {host}")
    Auth.from_settings(settings)  # refuse a bad configuration before connecting
    app = create_app(process_mailbox(), settings)
    if not settings.api_tokens:
        say("warning: serving WITHOUT authentication (MAILBOX_API_INSECURE_NO_AUTH)")
    shown = f"[{host}]" if ":" in host else host
    say(f"API        http://{shown}:{port}/v1   (docs: /docs)")
    say(f"dashboard  http://{shown}:{port}/ui")
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False,
                proxy_headers=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
