"""Beat tasks: the sweep (every MAILBOX_SWEEP_INTERVAL_S) and GC (every MAILBOX_GC_INTERVAL_S),
and the recovery a worker runs when it starts (docs/behaviour.md#sweep)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from celery.signals import worker_ready

from mailbox import clock, maintenance, redis_policy
from mailbox.runtime import now_ms
from tasks.app import app
from tasks.publishing import publish_wake, queued_messages
from tasks.runtime import queue, runtime

log = logging.getLogger(__name__)
_deployment_check_due = clock.AtMostEvery(clock.CHECK_EVERY_S)


def publish_sweep_wake(thread_id: str, wake_id: str) -> None:
    """`publish_wake`, with the sweep's wake id as the task id: the `mailbox.dispatch` body
    that consumes it clears the thread's pending mark as its claim begins."""
    publish_wake(queue(), thread_id, 0, wake_id=wake_id)


@app.task(name="mailbox.sweep")
def sweep(wake_all: bool = False) -> dict[str, int]:
    # Due threads get wake-ups (behind phase messages) rather than claims made right here:
    # claiming every due thread at once started more chains than the workers could run
    # within a lease, and their leases ran out while they queued behind each other. A thread
    # whose previous wake-up is still queued is not woken again ("already_pending"), except
    # by a worker's start-up sweep (`wake_all`): a restarted broker lost what was queued.
    # The queue is counted before this sweep adds to it: a wake-up marked pending can only be
    # among the messages already there (docs/behaviour.md#wake-marks).
    rt = runtime()
    if _deployment_check_due():
        # What the invariants need of the servers, warned about in the log: this host's
        # clock against Redis's (docs/behaviour.md#clocks) and a Redis that does not evict
        # (#eviction). In the pool process that runs the sweep, not in the worker's main
        # process; every starting worker publishes a sweep, and beat one every few seconds.
        clock.check(rt.store.coordinator.client, rt.settings.lease_ms)
        redis_policy.check(rt.store.coordinator.client)
        broker = redis_policy.separate_broker_url(rt.settings.broker_url,
                                                  rt.settings.redis_url)
        if broker is not None:
            redis_policy.check_broker(broker)
    waiting = queued_messages(queue())
    wake = functools.partial(publish_wake, rt.settings.namespace)
    report = maintenance.sweep(dataclasses.replace(rt, wake=wake), now_ms(),
                               publish=publish_sweep_wake, wake_all=wake_all is True,
                               queued=waiting)
    return {name: len(getattr(report, name)) for name in (
        "acked", "reclaimed", "dead_lettered", "reconciled", "woken", "already_pending",
        "renewed")}


@app.task(name="mailbox.gc")
def gc() -> int:
    return maintenance.collect_garbage(runtime(), now_ms())


@worker_ready.connect
def recover_on_start(**_: Any) -> None:
    """A starting worker sweeps once: expired claims of dead workers, stranded queues, and
    every due thread woken even where a wake-up is marked pending (it may have been lost
    with a broker that restarted: one duplicate per due thread and worker start at most)."""
    try:
        sweep.apply_async(kwargs={"wake_all": True}, queue=queue())
    except Exception as exc:
        log.warning("could not publish the start-up sweep: %s", exc)
