"""What every route of one server shares: the Mailbox, the settings, the auth, the publisher,
the event-stream slots and the templates — kept on `app.state.services`, so that routes
depend on the app they run in rather than on module globals (tests run several servers)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates

from mailbox.facade import Mailbox
from mailbox.http.auth import Auth, Session
from mailbox.http.middleware import SESSION_SCOPE_KEY
from mailbox.http.publishing import Publisher, celery_publisher
from mailbox.http.sse import StreamSlots
from mailbox.settings import Settings


@dataclass
class Services:
    mailbox: Mailbox
    settings: Settings
    auth: Auth
    templates: Jinja2Templates
    slots: StreamSlots = field(default_factory=StreamSlots)
    given_publisher: Publisher | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publisher(self) -> Publisher:
        """The Celery publisher, made on first use (a server given its own publisher, or one
        that never submits, loads no Celery)."""
        with self.lock:
            if self.given_publisher is None:
                self.given_publisher = celery_publisher()
            return self.given_publisher


def services(request: Request) -> Services:
    found: Any = request.app.state.services
    assert isinstance(found, Services)
    return found


def box(request: Request) -> Mailbox:
    return services(request).mailbox


def session(request: Request) -> Session:
    """The dashboard session the auth gate found (it lets no /ui request through without)."""
    found = request.scope.get("state", {}).get(SESSION_SCOPE_KEY)
    assert isinstance(found, Session)
    return found
