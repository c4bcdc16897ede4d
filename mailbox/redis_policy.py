"""Whether the coordination Redis may evict the mailbox's keys (docs/behaviour.md#eviction).

With `maxmemory` set and any `maxmemory-policy` but `noeviction`, a full Redis drops keys to
make room — `volatile-*` policies too, since leases, wake marks and event streams all carry
TTLs. SQL stays the truth of every dispatch and run, but what Redis drops is gone: a run's
event stream (what `watch`, SSE and the dashboard show), and a cancel signal the running
attempt has not seen yet (the attempt then runs to its end; an interrupt still stops it at
its next renewal, which the raised epoch fences); the epoch cache and leases are rebuilt
from SQL. BullMQ and Sidekiq warn about exactly this at start; a worker here warns when it
runs the sweep (every starting worker publishes one; at most once a minute a process),
and `python -m mailbox audit` reports it. `noeviction` makes a full Redis refuse writes
instead: a store outage the mailbox reports and retries.

A Redis broker of its own (CELERY_BROKER_URL naming another Redis) is checked too, by a
looser rule: Celery's queues carry no TTL, which `volatile-*` policies need before they
evict, so only the `allkeys-*` policies can drop a queued message. A dropped phase message
leaves its dispatch claimed until the lease runs out, and the sweep then counts that attempt
as failed (a crash looks the same), so repeated evictions can dead-letter a dispatch; a
dropped wake-up waits for the next sweep.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"


def eviction_policies(client: Any) -> dict[str, str]:
    """`maxmemory-policy` by server: {"redis": policy} for one Redis, {"host:port": policy}
    for each master of a Redis Cluster. Empty when the server refuses CONFIG (managed
    services often do) or cannot be reached: unknown, not unsafe."""
    try:
        primaries = getattr(client, "get_primaries", None)
        if primaries is None:
            return {"redis": _policy(client.config_get("maxmemory-policy"))}
        return {node.name: _policy(client.config_get("maxmemory-policy", target_nodes=node))
                for node in primaries()}
    except Exception as exc:
        log.debug("could not read Redis's maxmemory-policy: %s", exc)
        return {}


def unsafe(policies: dict[str, str]) -> dict[str, str]:
    """The servers whose policy may evict the mailbox's keys."""
    return {server: p for server, p in policies.items() if p != SAFE_POLICY}


def check(client: Any) -> dict[str, str]:
    """Log a warning naming every server that may evict; return them."""
    evicting = unsafe(eviction_policies(client))
    if evicting:
        log.warning("the coordination Redis may evict the mailbox's keys when it is full "
                    "(maxmemory-policy %s): a run's event stream or a cancel signal it drops "
                    "is lost (the cancelled attempt runs to its end). Set "
                    "maxmemory-policy noeviction (a full Redis then refuses writes, which the "
                    "mailbox reports and retries).",
                    ", ".join(f"{p} on {server}" for server, p in sorted(evicting.items())))
    return evicting


def broker_evicting(policies: dict[str, str]) -> dict[str, str]:
    """The servers whose policy may evict a Redis broker's queues: the `allkeys-*` ones."""
    return {server: p for server, p in policies.items() if p.startswith("allkeys-")}


def separate_broker_url(broker_url: str | None, redis_url: str | None) -> str | None:
    """The broker's URL when it is a Redis other than the coordination one (that one is
    checked by the stricter rule already); None for RabbitMQ and the like."""
    if broker_url is None or broker_url == redis_url:
        return None
    return broker_url if broker_url.startswith(("redis://", "rediss://", "unix://")) else None


def broker_policies(broker_url: str) -> dict[str, str]:
    """`eviction_policies` of the broker at this URL, over a connection of its own (closed
    again: the check runs once a minute at most). Empty when it cannot be asked."""
    try:
        client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    except ValueError as exc:
        log.debug("cannot read the broker's maxmemory-policy: %s", exc)
        return {}
    try:
        policy = eviction_policies(client).get("redis")  # a broker is never a cluster
        return {} if policy is None else {"broker": policy}
    finally:
        client.close()


def check_broker(broker_url: str) -> dict[str, str]:
    """Log a warning when the Redis broker at this URL may evict queued messages."""
    evicting = broker_evicting(broker_policies(broker_url))
    if evicting:
        log.warning("the Redis broker may evict queued messages when it is full "
                    "(maxmemory-policy %s): a dropped phase message leaves its dispatch "
                    "claimed until the lease runs out, and the sweep then counts that attempt "
                    "as failed; a dropped wake-up waits for the next sweep. Set "
                    "maxmemory-policy noeviction on the broker (or a volatile-* policy: "
                    "Celery's queues carry no TTL).", ", ".join(sorted(evicting.values())))
    return evicting


def _policy(reply: Any) -> str:
    value = reply.get("maxmemory-policy") if isinstance(reply, dict) else None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value) if value is not None else SAFE_POLICY
