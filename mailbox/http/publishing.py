"""The server's one door into `tasks/` (DESIGN.md §2: the HTTP layer imports tasks only to
publish): submitting through `dispatch.delay()`, the Mailbox whose waker publishes, and the
broker's reachability for /healthz.

Imported lazily by the server and the default `Publisher`, so that `create_app` with a
Publisher of one's own (tests of the routes) loads no Celery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailbox.errors import MailboxError
from mailbox.facade import Mailbox


class StoredNotPublishedError(MailboxError):
    """The dispatch is stored durably but its wake-up did not reach the broker; a worker's
    sweep delivers it. Carries the ids for the 503 answer."""

    prefix = "stored, wake-up not published"

    def __init__(self, message: str, dispatch_id: str) -> None:
        super().__init__(message)
        self.dispatch_id = dispatch_id


class Publisher:
    """What the routes need from Celery: `submit` (dispatch.delay) and `broker_ok`."""

    def __init__(self, submit: Callable[..., str], broker_check: Callable[[], None]) -> None:
        self.submit_fn = submit
        self.broker_check = broker_check

    def submit(self, thread_id: str, agent: str, input: Any, **options: Any) -> str:
        """The dispatch id, durable once this returns; StoredNotPublishedError when the
        broker refused the wake-up after the durable write."""
        return self.submit_fn(thread_id, agent, input, **options)

    def broker_ok(self) -> None:
        """Raise when the broker cannot be reached."""
        self.broker_check()


def celery_publisher() -> Publisher:
    """`dispatch.delay()` and the Celery app's own broker connection."""
    from tasks.app import app
    from tasks.dispatch import WakeNotPublishedError, dispatch

    def submit(thread_id: str, agent: str, input: Any, **options: Any) -> str:
        try:
            return str(dispatch.delay(thread_id, agent, input, **options).id)
        except WakeNotPublishedError as exc:
            raise StoredNotPublishedError(exc.message, exc.dispatch_id) from exc

    def broker_check() -> None:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                   timeout=3)

    return Publisher(submit, broker_check)


def process_mailbox() -> Mailbox:
    """The process's Mailbox, the one `dispatch.delay()` writes through and whose waker
    publishes the wake-ups of cancel, resume and replay (tasks/runtime.py)."""
    from tasks.runtime import mailbox

    return mailbox()
