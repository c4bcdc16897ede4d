"""Every message the mailbox publishes, in one place (docs/architecture.md#pipeline).

A wake-up (`mailbox.dispatch`) asks a worker to claim a thread's next dispatch; a chain is
the five phases of one claimed dispatch, published as one `mailbox.verify` message that
carries the other four links. Both go to the queue named after the namespace, wake-ups at the
priority that puts them behind phase messages (`tasks.priorities`). Messages are addressed by
task name, so this module needs the app, not the task modules (which import it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Signature

from mailbox import metrics, tracing
from mailbox.context import PhaseContext
from mailbox.coordination import WAKE_HELD, WAKE_PUBLISH, Coordinator
from mailbox.phases import claim_next
from mailbox.runtime import Runtime, now_ms
from mailbox.settings import Settings
from mailbox.wake_marks import (
    FRONTIER_STEP_MS,
    new_wake_id,
    wake_pending_max_ms,
    wake_pending_ttl_ms,
    wake_time_ms,
)
from tasks.app import app
from tasks.priorities import MAX_COUNTDOWN_MS, wake_priority

log = logging.getLogger(__name__)

WAKE_TASK = "mailbox.dispatch"
WAKE_MANY_TASK = "mailbox.dispatch_many"
WAKE_GROUP = 50
"""Threads per `mailbox.dispatch_many` message: the worker that takes one claims them one
after the other, so a group is small enough that its last thread starts soon (50 claims:
~0.1-0.3 s) and a burst still spreads over every worker."""
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


def publish_wakes(queue: str, wakes: Sequence[tuple[str, int]],
                  sent: list[str] | None = None) -> None:
    """Wake many threads, (thread_id, delay_ms) each (bulk submission): threads due at the
    same delay go together in one `mailbox.dispatch_many` message of up to WAKE_GROUP
    threads (a lone thread gets a plain wake-up), all over one broker connection — so a
    burst over 1,000 threads costs 20 publishes, not 1,000. Each thread is appended to
    `sent` once its message is handed over (delays past MAX_COUNTDOWN_MS count as handed
    to the sweep). A broker error propagates."""
    sent = [] if sent is None else sent
    by_delay: dict[int, list[str]] = {}
    for thread_id, delay_ms in wakes:
        by_delay.setdefault(delay_ms, []).append(thread_id)
    priority = wake_priority(app.conf.broker_url)
    with app.producer_or_acquire() as producer:
        for delay_ms, threads in by_delay.items():
            for start in range(0, len(threads), WAKE_GROUP):
                group = threads[start:start + WAKE_GROUP]
                if delay_ms <= MAX_COUNTDOWN_MS:
                    name, args = ((WAKE_TASK, (group[0],)) if len(group) == 1
                                  else (WAKE_MANY_TASK, (group,)))
                    app.send_task(name, args=args, queue=queue, producer=producer,
                                  countdown=delay_ms / 1000 if delay_ms > 0 else None,
                                  priority=priority)
                sent.extend(group)


def publish_chain(queue: str, ctx: PhaseContext) -> None:
    """The five phases of one claimed dispatch: verify now, the rest as its chain."""
    # argsrepr: the task-sent event (MAILBOX_WORKER_EVENTS=1) shows ids, never the token.
    app.send_task(CHAIN[0], args=(ctx.to_message(),), queue=queue, chain=_rest_of_chain(queue),
                  argsrepr=ctx.describe(), kwargsrepr="{}")


def wake_thread(coordinator: Coordinator, settings: Settings, thread_id: str,
                delay_ms: int = 0, *, wake_id: str | None = None,
                dispatch_id: str | None = None) -> bool:
    """A wake-up after a durable write (submit, cancel, resume, replay) — unless it would find
    nothing to do (docs/behaviour.md#wake-gate): due now while a claim of the thread is in
    flight (its holder claims again when it releases the lease, which the gate marked) or
    while a wake-up is already on its way (its claim will see this write). Without the gate
    nearly every submit to a busy thread published a wake-up that found the thread busy.
    Redis unreachable for the gate: publish, as without it. True when published."""
    gate = WAKE_PUBLISH
    if delay_ms == 0:
        wake_id = wake_id or new_wake_id()  # the pending mark names the message's task id
        try:
            gate = coordinator.gate_wake(thread_id, wake_id, now_ms(),
                                         wake_pending_ttl_ms(settings))
        except redis.RedisError:
            gate = WAKE_PUBLISH
    return publish_gated(coordinator, settings, thread_id, gate, delay_ms, wake_id=wake_id,
                         dispatch_id=dispatch_id)


def publish_gated(coordinator: Coordinator, settings: Settings, thread_id: str, gate: int,
                  delay_ms: int = 0, *, wake_id: str | None = None,
                  dispatch_id: str | None = None) -> bool:
    """Publish the wake-up the gate asked for (`gate`: its answer, asked under `wake_id`),
    or count the one it held back. True when published."""
    if gate != WAKE_PUBLISH:
        metrics.count_operation("wake_publish",
                                "skipped_held" if gate == WAKE_HELD else "skipped_pending")
        return False
    try:
        publish_wake(settings.namespace, thread_id, delay_ms, wake_id=wake_id,
                     dispatch_id=dispatch_id)
    except Exception:
        # A mark for a message never sent would hold back the next submits' wake-ups (when
        # Redis refuses this too, the mark expires and the sweep wakes the thread then).
        if delay_ms == 0 and wake_id is not None:
            with contextlib.suppress(redis.RedisError):
                coordinator.consume_wake(thread_id, wake_id)
        raise
    return True


def start_next(rt: Runtime, thread_id: str, *, wake_id: str | None = None,
               expect_due: bool = False) -> str | None:
    """Claim the thread's next eligible dispatch and publish its chain; its dispatch id, or
    None when the thread is busy or has nothing due. A wake-up passes its task id: its claim
    clears the thread's pending-wake mark if the mark names it. `expect_due`: the caller
    knows something is due (`MailboxStore.claim`)."""
    started = time.time_ns()
    ctx = claim_next(rt, thread_id, wake_id=wake_id, expect_due=expect_due)
    if ctx is None:
        return None
    start_claimed(rt, ctx, started_ns=started)
    return ctx.dispatch_id


def start_claimed(rt: Runtime, ctx: PhaseContext, *, started_ns: int | None = None) -> None:
    """Publish the chain of a dispatch this process claimed (`Runtime.start`: a settle
    claims the thread's next dispatch in its ack's transaction and starts it here). A
    broker error propagates: the claim is left to run out its lease, and the sweep
    reclaims it."""
    with tracing.span("mailbox.claim", traceparent=ctx.traceparent,
                      start_ns=started_ns or time.time_ns(),
                      attributes=tracing.phase_attributes(ctx)):
        publish_chain(rt.settings.namespace, ctx)


def worker_wake(rt: Runtime, thread_id: str, delay_ms: int = 0) -> None:
    """How a worker wakes a thread: a due thread is claimed right here and its chain
    published (one message hop less than a wake-up for another worker to claim); a later
    one gets a delayed wake-up. A phase wakes its thread now when something may be due (a
    settle whose ack saw nothing due does not wake it: `phases.settle`), so the claim skips
    its read-ahead. When it claims nothing, a thread left idle with work for later (a retry
    in backoff, a deferral) gets one delayed wake-up for its earliest Queued dispatch
    (docs/behaviour.md#future-wakes); a busy one is left to its claim's holder."""
    if delay_ms > 0:
        publish_wake(rt.settings.namespace, thread_id, delay_ms)
    elif start_next(rt, thread_id, expect_due=True) is None:
        wake_at = rt.store.next_wake_at(thread_id)
        delay = None if wake_at is None else wake_at - rt.clock()
        if delay is not None and delay > 0:
            publish_wake(rt.settings.namespace, thread_id, delay)


def queued_messages(queue: str) -> int | None:
    """The messages waiting in the broker's queue (not those a worker has taken); None when
    the broker does not answer. The sweep asks it once (`mailbox.wake_marks`): with none
    waiting, no wake-up can be among them. A queue the broker does not know holds nothing
    (the Redis transport deletes an emptied queue's lists; a passive declare of it is
    refused)."""
    try:
        with app.pool.acquire(block=True, timeout=5) as conn, conn.channel() as channel:
            try:
                declared = channel.queue_declare(queue=queue, passive=True)
            except conn.channel_errors:
                return 0
            return int(declared.message_count)
    except Exception as exc:  # kombu raises several types for an unreachable broker
        log.warning("could not count the messages in queue %s: %s", queue, exc)
        return None


_frontier_written: dict[int, int] = {}
"""Per process (pid: a forked child starts afresh), the frontier it last wrote."""


def wake_consumed(coordinator: Coordinator, settings: Settings, wake_id: str | None) -> None:
    """A worker took the wake-up named `wake_id` off the queue: move the wake-up frontier to
    its publish time (`mailbox.wake_marks`), at most once per FRONTIER_STEP_MS of publish
    time per process. Best effort: a frontier that lags only makes the sweep renew marks a
    little longer, and nothing is lost when Redis refuses it."""
    published_at = None if wake_id is None else wake_time_ms(wake_id)
    if published_at is not None:
        # Published no later than now: an id stamped ahead of this clock (another host's, a
        # process that minted many ids at once, a forged message) moves it no further.
        published_at = min(published_at, now_ms())
    pid = os.getpid()
    if published_at is None or published_at < _frontier_written.get(pid, 0) + FRONTIER_STEP_MS:
        return
    try:
        _frontier_written[pid] = coordinator.advance_wake_frontier(
            published_at, wake_pending_max_ms(settings))
    except redis.RedisError as exc:
        log.debug("wake-up frontier not moved: %s", exc)


@functools.cache
def _signatures_after_verify(queue: str) -> tuple[dict[str, Any], ...]:
    # The message's `chain` field: the links after verify, last first (Celery pops from the
    # end). Built once: composing a canvas per dispatch cost a third more CPU than the
    # publish itself (measured 1.19 ms against 0.87 ms).
    return tuple(dict(Signature(name, app=app).set(queue=queue))
                 for name in reversed(CHAIN[1:]))


def _rest_of_chain(queue: str) -> list[dict[str, Any]]:
    return [dict(signature) for signature in _signatures_after_verify(queue)]
