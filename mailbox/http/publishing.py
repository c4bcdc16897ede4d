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
from mailbox.facade import Mailbox, Receipt


class StoredNotPublishedError(MailboxError):
    """The dispatch is stored durably but its wake-up did not reach the broker; a worker's
    sweep delivers it. Carries the ids for the 503 answer."""

    prefix = "stored, wake-up not published"

    def __init__(self, message: str, dispatch_id: str) -> None:
        super().__init__(message)
        self.dispatch_id = dispatch_id


class BatchStoredNotPublishedError(MailboxError):
    """A batch is stored durably but some wake-ups did not reach the broker; the sweep
    delivers them. Carries every receipt for the 503 answer."""

    prefix = "stored, wake-ups not published"

    def __init__(self, message: str, receipts: list[Receipt]) -> None:
        super().__init__(message)
        self.receipts = receipts


class Publisher:
    """What the routes need from Celery: `submit` (dispatch.delay), `submit_many`
    (dispatch.delay_many, with the receipts) and `broker_ok`."""

    def __init__(self, submit: Callable[..., str], broker_check: Callable[[], None],
                 submit_many: Callable[..., list[Receipt]] | None = None) -> None:
        self.submit_fn = submit
        self.broker_check = broker_check
        self.submit_many_fn = submit_many

    def submit(self, thread_id: str, agent: str, input: Any, **options: Any) -> str:
        """The dispatch id, durable once this returns; StoredNotPublishedError when the
        broker refused the wake-up after the durable write."""
        return self.submit_fn(thread_id, agent, input, **options)

    def submit_many(self, items: list[dict[str, Any]], chunk_size: int) -> list[Receipt]:
        """The receipts, in order, durable once this returns; BulkSubmitError naming the
        refused item, BatchStoredNotPublishedError when wake-ups were refused."""
        if self.submit_many_fn is None:
            raise MailboxError("this server's publisher does not take batches")
        return self.submit_many_fn(items, chunk_size=chunk_size)

    def broker_ok(self) -> None:
        """Raise when the broker cannot be reached."""
        self.broker_check()


def celery_publisher() -> Publisher:
    """`dispatch.delay()` and the Celery app's own broker connection."""
    from tasks.app import app
    from tasks.dispatch import (
        WakeNotPublishedError,
        WakesNotPublishedError,
        dispatch,
        submit_and_wake,
    )

    def submit(thread_id: str, agent: str, input: Any, **options: Any) -> str:
        try:
            return str(dispatch.delay(thread_id, agent, input, **options).id)
        except WakeNotPublishedError as exc:
            raise StoredNotPublishedError(exc.message, exc.dispatch_id) from exc

    def submit_many(items: list[dict[str, Any]], chunk_size: int) -> list[Receipt]:
        try:
            return submit_and_wake(items, chunk_size=chunk_size)
        except WakesNotPublishedError as exc:
            raise BatchStoredNotPublishedError(exc.message, exc.receipts) from exc

    def broker_check() -> None:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                   timeout=3)

    return Publisher(submit, broker_check, submit_many)


def process_mailbox() -> Mailbox:
    """The process's Mailbox, the one `dispatch.delay()` writes through and whose waker
    publishes the wake-ups of cancel, resume and replay (tasks/runtime.py)."""
    from tasks.runtime import mailbox

    return mailbox()
