"""One Mailbox and phase runtime per worker process, created on first use.

Per process, not per import: a prefork pool forks children after the app loads, and database
and Redis connections must never be shared across a fork.
"""

from __future__ import annotations

import os
import threading

from mailbox.facade import Mailbox
from mailbox.phases import Runtime

MAX_COUNTDOWN_MS = 5 * 60 * 1000
# Wake-ups go behind phase messages. kombu's Redis transport keeps one list per priority
# step and pops step 0 (a phase's default) before step 9, so a backlog of wake-ups never
# delays a chain already holding a lease: under a burst, a FIFO queue made every hop of
# every claimed chain wait behind thousands of wake-ups until leases ran out between phases
# and attempts were spent on queueing alone (found by the 10k-dispatch load test). And since
# a worker takes a wake-up only when no phase is waiting, claims follow capacity.
# RabbitMQ counts the other way (larger is served first) and only on a queue declared with
# x-max-priority: celeryconfig declares ours so on amqp, with the phases at
# AMQP_PHASE_PRIORITY (the default priority there) and wake-ups at 0.
WAKE_PRIORITY = 9
AMQP_WAKE_PRIORITY = 0
AMQP_PHASE_PRIORITY = 1
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp", "librabbitmq")

_lock = threading.Lock()
_state: dict[int, tuple[Mailbox, Runtime]] = {}


def publish_wake(thread_id: str, delay_ms: int = 0, *, wake_id: str | None = None) -> None:
    """Ask a worker to claim the thread's next dispatch. Delays longer than a few minutes are
    left to the sweep: long ETAs are where Redis visibility timeouts duplicate messages.
    `wake_id`, when given, is the message's task id (the sweep's wake-ups name their mark)."""
    from tasks.dispatch import dispatch

    if delay_ms > MAX_COUNTDOWN_MS:
        return
    dispatch.apply_async(args=(thread_id,), countdown=delay_ms / 1000 if delay_ms > 0 else None,
                         task_id=wake_id, queue=queue(), priority=wake_priority())


def is_amqp(broker_url: object) -> bool:
    return isinstance(broker_url, str) and broker_url.split("://", 1)[0] in AMQP_SCHEMES


def wake_priority() -> int:
    """The priority that puts a wake-up behind phase messages on this app's broker."""
    from tasks.app import app

    return AMQP_WAKE_PRIORITY if is_amqp(app.conf.broker_url) else WAKE_PRIORITY


def worker_wake(thread_id: str, delay_ms: int = 0) -> None:
    """Inside a worker, a due thread is claimed right here and its chain published: one
    message hop less than publishing a wake-up for another worker to claim."""
    if delay_ms > 0:
        publish_wake(thread_id, delay_ms)
        return
    from tasks.dispatch import start_next

    start_next(thread_id)


def queue() -> str:
    """Every message goes to the queue named after the namespace, so tenants and tests that
    share a broker never take each other's work."""
    return mailbox().settings.namespace


def current() -> tuple[Mailbox, Runtime]:
    pid = os.getpid()
    with _lock:
        if pid not in _state:
            mailbox = Mailbox.connect()
            mailbox.waker = publish_wake
            _state[pid] = (mailbox, mailbox.runtime(wake=worker_wake))
        return _state[pid]


def mailbox() -> Mailbox:
    return current()[0]


def runtime() -> Runtime:
    return current()[1]
