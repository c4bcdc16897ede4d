"""Broker priorities and publishing limits: constants only, so `celeryconfig.py` can read them
without importing the domain or the app.

Wake-ups go behind phase messages. kombu's Redis transport keeps one list per priority step
and pops step 0 (a phase's default) before step 9, so a backlog of wake-ups never delays a
chain already holding a lease: under a burst, a FIFO queue made every hop of every claimed
chain wait behind thousands of wake-ups until leases ran out between phases and attempts were
spent on queueing alone (found by the 10k-dispatch load test). And since a worker takes a
wake-up only when no phase is waiting, claims follow capacity. RabbitMQ counts the other way
(larger is served first) and only on a queue declared with x-max-priority: celeryconfig
declares ours so on amqp, with the phases at AMQP_PHASE_PRIORITY (the default priority there)
and wake-ups at 0.
"""

from __future__ import annotations

WAKE_PRIORITY = 9
AMQP_WAKE_PRIORITY = 0
AMQP_PHASE_PRIORITY = 1
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp", "librabbitmq")
MAX_COUNTDOWN_MS = 5 * 60 * 1000
"""Longer delays are left to the sweep: long ETAs are where Redis visibility timeouts
duplicate messages."""


def is_amqp(broker_url: object) -> bool:
    return isinstance(broker_url, str) and broker_url.split("://", 1)[0] in AMQP_SCHEMES


def wake_priority(broker_url: object) -> int:
    """The priority that puts a wake-up behind phase messages on this broker."""
    return AMQP_WAKE_PRIORITY if is_amqp(broker_url) else WAKE_PRIORITY
