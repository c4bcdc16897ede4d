"""Every message the mailbox publishes, in one place (docs/architecture.md#pipeline).

A wake-up (`mailbox.dispatch`) asks a worker to claim a thread's next dispatch; a chain is
the five phases of one claimed dispatch, published as one `mailbox.verify` message that
carries the other four links. Both go to the queue named after the namespace, wake-ups at the
priority that puts them behind phase messages (`tasks.priorities`). Messages are addressed by
task name, so this module needs the app, not the task modules (which import it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from celery import Signature

from mailbox import tracing
from mailbox.context import PhaseContext
from mailbox.phases import claim_next
from mailbox.runtime import Runtime
from tasks.app import app
from tasks.priorities import MAX_COUNTDOWN_MS, wake_priority

WAKE_TASK = "mailbox.dispatch"
CHAIN = ("mailbox.verify", "mailbox.reconstruct", "mailbox.resolve", "mailbox.execute",
         "mailbox.settle")


def publish_wake(queue: str, thread_id: str, delay_ms: int = 0, *, wake_id: str | None = None,
                 dispatch_id: str | None = None) -> None:
    """Ask a worker to claim the thread's next dispatch, after `delay_ms`. Delays longer than
    MAX_COUNTDOWN_MS are not published: the sweep wakes the thread when it is due.
    `wake_id` is the message's task id (a submit's wake-up carries its dispatch id, shown by
    Flower; the sweep's wake-ups name their pending mark). Broker errors propagate."""
    if delay_ms > MAX_COUNTDOWN_MS:
        return
    kwargs = {"dispatch_id": dispatch_id} if dispatch_id else {}
    app.send_task(WAKE_TASK, args=(thread_id,), kwargs=kwargs,
                  countdown=delay_ms / 1000 if delay_ms > 0 else None, task_id=wake_id,
                  queue=queue, priority=wake_priority(app.conf.broker_url))


def publish_wakes(queue: str, wakes: Sequence[tuple[str, int, str | None]],
                  sent: list[str] | None = None) -> None:
    """Many wake-ups, (thread_id, delay_ms, wake_id) each, over one broker connection (bulk
    submission: one per thread; a wake_id names the thread's first dispatch), each thread
    appended to `sent` once handed over (delays past MAX_COUNTDOWN_MS count as handed to the
    sweep). A broker error propagates."""
    sent = [] if sent is None else sent
    with app.producer_or_acquire() as producer:
        for thread_id, delay_ms, wake_id in wakes:
            if delay_ms <= MAX_COUNTDOWN_MS:
                kwargs = {"dispatch_id": wake_id} if wake_id else {}
                app.send_task(WAKE_TASK, args=(thread_id,), kwargs=kwargs,
                              countdown=delay_ms / 1000 if delay_ms > 0 else None,
                              task_id=wake_id, queue=queue, producer=producer,
                              priority=wake_priority(app.conf.broker_url))
            sent.append(thread_id)


def publish_chain(queue: str, ctx: PhaseContext) -> None:
    """The five phases of one claimed dispatch: verify now, the rest as its chain."""
    # argsrepr: the task-sent event (MAILBOX_WORKER_EVENTS=1) shows ids, never the token.
    app.send_task(CHAIN[0], args=(ctx.to_message(),), queue=queue, chain=_rest_of_chain(queue),
                  argsrepr=ctx.describe(), kwargsrepr="{}")


def start_next(rt: Runtime, thread_id: str) -> str | None:
    """Claim the thread's next eligible dispatch and publish its chain; its dispatch id, or
    None when the thread is busy or has nothing due."""
    started = time.time_ns()
    ctx = claim_next(rt, thread_id)
    if ctx is None:
        return None
    with tracing.span("mailbox.claim", traceparent=ctx.traceparent, start_ns=started,
                      attributes=tracing.phase_attributes(ctx)):
        publish_chain(rt.settings.namespace, ctx)
    return ctx.dispatch_id


def worker_wake(rt: Runtime, thread_id: str, delay_ms: int = 0) -> None:
    """How a worker wakes a thread: a due thread is claimed right here and its chain
    published (one message hop less than a wake-up for another worker to claim); a later
    one gets a delayed wake-up."""
    if delay_ms > 0:
        publish_wake(rt.settings.namespace, thread_id, delay_ms)
    else:
        start_next(rt, thread_id)


@functools.cache
def _signatures_after_verify(queue: str) -> tuple[dict[str, Any], ...]:
    # The message's `chain` field: the links after verify, last first (Celery pops from the
    # end). Built once: composing a canvas per dispatch cost a third more CPU than the
    # publish itself (measured 1.19 ms against 0.87 ms).
    return tuple(dict(Signature(name, app=app).set(queue=queue))
                 for name in reversed(CHAIN[1:]))


def _rest_of_chain(queue: str) -> list[dict[str, Any]]:
    return [dict(signature) for signature in _signatures_after_verify(queue)]
