"""Hot coordination state in Redis: per-thread leases and per-thread epochs
(docs/architecture.md#redis-and-sql),
and the sweep's per-thread "wake-up pending" marks.

SQL is the durable truth; these are fast copies that let a claim on a busy thread be refused
without touching SQL and let `verify` read the epoch without a SQL round trip. Everything
here may vanish (restart without persistence, failover, FLUSHALL): callers rebuild from SQL
and the SQL fences hold regardless. Key expiry is garbage collection only; a lease's validity
is its `lease_until`, which carries the caller's clock like every store time.

Each multi-step change is one Lua script (kept as a file under `lua/`, registered once per
client; redis-py reloads it by itself after a Redis restart forgets scripts).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

LUA_DIR = Path(__file__).resolve().parent / "lua"
EPOCH_TTL_MS = 7 * 24 * 3600 * 1000
MIN_LEASE_TTL_MS = 60_000
MAX_LEASE_TTL_MS = 30 * 24 * 3600 * 1000


@dataclass(frozen=True)
class Lease:
    token: str
    dispatch_id: str
    lease_until: int
    holder: str


def _lease_ttl(lease_ms: int) -> int:
    # Long enough that a live, renewed lease never expires between heartbeats.
    return min(MAX_LEASE_TTL_MS, max(MIN_LEASE_TTL_MS, 3 * lease_ms))


class Coordinator:
    """Redis side of the store. Counts its round trips so benchmarks can report them."""

    def __init__(self, client: redis.Redis[bytes], namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.round_trips = 0
        self.scripts = {  # name -> registered script (benchmarks name EVALSHA calls by it)
            name: client.register_script((LUA_DIR / f"{name}.lua").read_text())
            for name in ("lease_acquire", "lease_put", "lease_release", "lease_take_executor",
                         "epoch_generation", "epoch_fill", "wake_consume")
        }

    # -------------------------------------------------------------------------------- keys
    def lease_key(self, thread_id: str) -> str:
        return f"{self.namespace}:lease:{thread_id}"

    def epoch_key(self, thread_id: str) -> str:
        return f"{self.namespace}:epoch:{thread_id}"

    def wake_pending_key(self, thread_id: str) -> str:
        return f"{self.namespace}:wake-pending:{thread_id}"

    def _run(self, name: str, key: str, *args: Any) -> Any:
        self.round_trips += 1
        return self.scripts[name](keys=[key], args=list(args))

    # ------------------------------------------------------------------------------ leases
    def acquire(self, thread_id: str, token: str, lease_until: int, holder: str, now: int,
                lease_ms: int) -> Lease | None:
        """Take a pending lease; return None when taken, or the live lease that refused us."""
        reply = self._run("lease_acquire", self.lease_key(thread_id), token, lease_until,
                          holder, now, _lease_ttl(lease_ms))
        if int(reply[0]) == 1:
            return None
        return Lease(_text(reply[1]), _text(reply[2]), int(reply[3]), _text(reply[4]))

    def put(self, thread_id: str, lease: Lease, *, expected_token: str, allow_missing: bool,
            lease_ms: int) -> bool:
        return bool(self._run(
            "lease_put", self.lease_key(thread_id), expected_token, "1" if allow_missing else "0",
            lease.token, lease.dispatch_id, lease.lease_until, lease.holder, _lease_ttl(lease_ms),
        ))

    def release(self, thread_id: str, token: str) -> bool:
        return bool(self._run("lease_release", self.lease_key(thread_id), token))

    def take_executor(self, thread_id: str, token: str, executor: str, dispatch_id: str,
                      lease_until: int, lease_ms: int, *, create: bool = False) -> str:
        """'ok' when this process may execute the attempt (the lease now runs to at least
        `lease_until`), 'held:<id>' when another process already does, 'lost' when the
        thread's lease belongs to another claim, 'missing' when Redis has no lease and
        `create` is false (pass `create` only once SQL has recorded the start)."""
        return _text(self._run("lease_take_executor", self.lease_key(thread_id), token,
                               executor, dispatch_id, lease_until, _lease_ttl(lease_ms),
                               "1" if create else "0"))

    def read_lease(self, thread_id: str) -> Lease | None:
        self.round_trips += 1
        raw = self.client.hgetall(self.lease_key(thread_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Lease(fields.get("token", ""), fields.get("dispatch_id", ""),
                     int(fields.get("lease_until", "0") or 0), fields.get("holder", ""))

    # ------------------------------------------------------------------------------ epochs
    def cached_epoch(self, thread_id: str) -> int | None:
        self.round_trips += 1
        raw = self.client.get(self.epoch_key(thread_id))
        return None if raw is None else int(raw)

    def epoch_generation(self) -> str:
        """Taken before reading an epoch from SQL to refill the cache (see `fill_epoch`)."""
        self.round_trips += 1
        return _text(self.scripts["epoch_generation"](
            keys=[f"{self.namespace}:epoch-generation"], args=[uuid.uuid4().hex]))

    def fill_epoch(self, thread_id: str, epoch: int, generation: str) -> bool:
        """Cache an epoch read from SQL, unless Redis was flushed or restarted since the
        generation was taken: a value read before a flush may already be old, and an empty
        cache must never take an old value (epochs only go up). False when skipped."""
        return int(self._run_keys("epoch_fill", [self.epoch_key(thread_id),
                                      f"{self.namespace}:epoch-generation"],
                       epoch, generation, EPOCH_TTL_MS)) != -1

    # ----------------------------------------------------------------- sweep wake-ups
    def mark_wakes_pending(self, wakes: Sequence[tuple[str, str]], ttl_ms: int) -> list[bool]:
        """For each (thread_id, wake_id), SET NX PX the thread's pending-wake mark to the wake
        id; all in one round trip. True where the mark was newly set (publish that wake-up),
        False where an earlier sweep's wake-up is still pending."""
        if not wakes:
            return []
        self.round_trips += 1
        pipe = self.client.pipeline(transaction=False)
        for thread_id, wake_id in wakes:
            pipe.set(self.wake_pending_key(thread_id), wake_id, nx=True, px=ttl_ms)
        return [bool(reply) for reply in pipe.execute()]

    def consume_wake(self, thread_id: str, wake_id: str) -> bool:
        """Clear the thread's mark if it still names this wake-up: one round trip."""
        return bool(self._run("wake_consume", self.wake_pending_key(thread_id), wake_id))

    def clear_wakes_pending(self, wakes: Sequence[tuple[str, str]]) -> None:
        """`consume_wake` for wake-ups that were marked but never published, in one round
        trip."""
        if not wakes:
            return
        self.round_trips += 1
        pipe = self.client.pipeline(transaction=False)
        for thread_id, wake_id in wakes:
            self.scripts["wake_consume"](keys=[self.wake_pending_key(thread_id)],
                                          args=[wake_id], client=pipe)
        pipe.execute()

    def _run_keys(self, name: str, keys: list[str], *args: Any) -> Any:
        self.round_trips += 1
        return self.scripts[name](keys=keys, args=list(args))


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect_redis(url: str) -> redis.Redis[bytes]:
    """A client with bounded timeouts: a dead Redis fails fast instead of hanging a worker."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                health_check_interval=15, retry_on_timeout=False)
