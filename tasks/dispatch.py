"""`dispatch.delay(thread_id, agent, input, ...)` and the `mailbox.dispatch` task.

`delay` runs in the caller: validate, write the run, its input and the dispatch durably, then
publish a wake-up whose task id is the dispatch id (so Flower shows it under that id). The
task body runs in a worker: claim the thread's next eligible dispatch and start its chain of
five phases. A busy thread or nothing due: the task simply returns — whoever holds the thread
wakes it again when it settles.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Task
from celery.result import AsyncResult

from mailbox import metrics
from mailbox.errors import MailboxError, ValidationError
from mailbox.facade import BulkSubmitError, Receipt, wakes_for
from mailbox.model import check_text, show_value
from tasks.app import app
from tasks.publishing import (
    WAKE_GROUP,
    WAKE_MANY_TASK,
    publish_gated,
    publish_wakes,
    start_next,
    wake_consumed,
)
from tasks.runtime import mailbox, runtime

log = logging.getLogger(__name__)
MAX_WAKE_GROUP = 4 * WAKE_GROUP  # what a dispatch_many message may carry (hostile input)


class WakeNotPublishedError(MailboxError):
    """The dispatch is stored durably, but its wake-up could not reach the broker."""

    prefix = "stored, wake-up not published"

    def __init__(self, dispatch_id: str, cause: BaseException) -> None:
        super().__init__(f"dispatch {dispatch_id} is stored durably but the broker refused the "
                         f"wake-up ({cause}); a worker's sweep will deliver it")
        self.dispatch_id = dispatch_id


class WakesNotPublishedError(MailboxError):
    """A bulk submission is stored durably, but some of its wake-ups could not reach the
    broker. `receipts` (and `results`, as AsyncResults) are every stored dispatch."""

    prefix = "stored, wake-ups not published"

    def __init__(self, receipts: list[Receipt], unsent: int, cause: BaseException) -> None:
        super().__init__(f"{len(receipts)} dispatches are stored durably but the broker "
                         f"refused wake-ups for {unsent} threads ({cause}); a worker's sweep "
                         f"will deliver them")
        self.receipts = receipts
        self.results = [AsyncResult(r.dispatch_id, app=app) for r in receipts]
        self.unsent = unsent


def submit_and_wake(items: Sequence[Mapping[str, Any]], *, chunk_size: int = 500
                    ) -> list[Receipt]:
    """`dispatch.delay_many` with the facade's receipts (run ids, resumed) instead of
    AsyncResults: what the HTTP API's batch route answers with."""
    box = mailbox()
    try:
        receipts = box.submit_many(items, chunk_size=chunk_size, wake=False)
    except BulkSubmitError as exc:
        _wake_all(box.settings.namespace, items, exc.submitted)
        raise
    _wake_all(box.settings.namespace, items, receipts)
    return receipts


def _wake_all(queue: str, items: Sequence[Mapping[str, Any]], receipts: list[Receipt]) -> None:
    wakes = [(w.thread_id, w.delay_ms) for w in wakes_for(items, receipts)]
    sent: list[str] = []
    try:
        publish_wakes(queue, wakes, sent)
    except Exception as exc:  # kombu raises several types for an unreachable broker
        raise WakesNotPublishedError(receipts, len(wakes) - len(sent), exc) from exc


class DispatchTask(Task):
    """A task whose `delay` submits durably before it publishes."""

    def delay(self, thread_id: str, agent: str, input: Any, *, priority: int = 128,
              dedupe_key: str | None = None, delay_ms: int = 0, max_attempts: int | None = None,
              interrupt: bool = False) -> AsyncResult:
        box = mailbox()
        # The wake gate is asked with the run_queued event, in one round trip; the pending
        # mark names the dispatch id, which is the wake-up's task id.
        receipt, gate = box.submit_gated(thread_id, agent, input, priority=priority,
                                         dedupe_key=dedupe_key, delay_ms=delay_ms,
                                         max_attempts=max_attempts, interrupt=interrupt)
        try:
            publish_gated(box.store.coordinator, box.settings, thread_id, gate, delay_ms,
                          wake_id=receipt.dispatch_id, dispatch_id=receipt.dispatch_id)
        except Exception as exc:  # kombu raises several types for an unreachable broker
            raise WakeNotPublishedError(receipt.dispatch_id, exc) from exc
        return self.AsyncResult(receipt.dispatch_id)

    def delay_many(self, items: Sequence[Mapping[str, Any]], *, chunk_size: int = 500
                   ) -> list[AsyncResult]:
        """Submit many dispatches (`Mailbox.submit_many`: each item a mapping of `delay`'s
        arguments by name, all validated before any write, each chunk one transaction) and
        wake each thread once, not once per item, threads grouped into a few messages over
        one broker connection (`tasks.publishing.publish_wakes`). One AsyncResult per item,
        in order. A refused item raises BulkSubmitError after the chunks written before it
        were woken; a broker failure WakesNotPublishedError (everything stored)."""
        return [self.AsyncResult(r.dispatch_id)
                for r in submit_and_wake(items, chunk_size=chunk_size)]


@app.task(bind=True, base=DispatchTask, name="mailbox.dispatch")
def dispatch(self: DispatchTask, thread_id: str, dispatch_id: str | None = None) -> str | None:
    """Claim the thread's next dispatch and chain its phases; None when busy or idle."""
    try:
        # Anyone can put bytes on the queue: a thread id no submit could have stored (blank,
        # a non-string, 5 MB of text, NUL) is refused here, before it reaches a Redis key
        # or a SQL parameter, with a log line that shows its shape rather than its bytes.
        check_text("thread_id", thread_id)
    except ValidationError as exc:
        log.error("mailbox.dispatch refused a malformed message: %s", exc.message)
        return None
    # The claim clears the thread's pending-wake mark if it names this wake-up (a sweep's or
    # a submit's), in the same round trip as the lease, before it looks for work: anything
    # due before then is claimed here or by the holder's next claim; later writes wake again.
    # A submit's wake-up names its dispatch: something is due, the claim skips its read-ahead.
    rt = runtime()
    started = start_next(rt, thread_id, wake_id=self.request.id,
                         expect_due=dispatch_id is not None)
    metrics.count_operation("wake_task", "claimed" if started else "nothing_to_claim")
    wake_consumed(rt.store.coordinator, rt.settings, self.request.id)
    return started


@app.task(bind=True, name=WAKE_MANY_TASK)
def dispatch_many(self: Task, thread_ids: list[str]) -> int:
    """A bulk submission's wake-up for a group of threads: claim each one's next dispatch
    and chain its phases, as `mailbox.dispatch` does for one. How many chains started.

    One thread's failure (a store outage) is logged and the rest still go: a thread not
    started is woken again by whoever holds it when it settles, or by the sweep."""
    if not isinstance(thread_ids, list) or not 1 <= len(thread_ids) <= MAX_WAKE_GROUP:
        log.error("mailbox.dispatch_many refused a malformed message: thread_ids must be a "
                  "list of 1..%d thread ids, got %s", MAX_WAKE_GROUP, show_value(thread_ids))
        return 0
    rt = runtime()
    started = 0
    for thread_id in thread_ids:
        try:
            check_text("thread_id", thread_id)
        except ValidationError as exc:
            log.error("mailbox.dispatch_many skipped a malformed thread id: %s", exc.message)
            continue
        try:
            started += start_next(rt, thread_id) is not None
        except MailboxError as exc:
            log.warning("mailbox.dispatch_many could not start thread %s (%s); its holder "
                        "or the sweep wakes it again", thread_id, exc)
    return started
