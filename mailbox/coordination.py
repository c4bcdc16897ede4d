"""Hot coordination state in Redis: per-thread leases and per-thread epochs
(docs/architecture.md#redis-and-sql),
and the per-thread "wake-up pending" marks with the wake-up frontier (mailbox/wake_marks.py).

SQL is the durable truth; these are fast copies that let a claim on a busy thread be refused
without touching SQL and let `verify` read the epoch without a SQL round trip. Everything
here may vanish (restart without persistence, failover, FLUSHALL): callers rebuild from SQL
and the SQL fences hold regardless. Key expiry is garbage collection only; a lease's validity
is its `lease_until`, which carries the caller's clock like every store time. A lease hash
also records when its key's TTL ends (`expires`, same clock), so that renewing the lease costs
no PEXPIRE while that TTL still outlives the new `lease_until` by a third of a TTL
(lease_put.lua has the rule).

Each multi-step change is one Lua script (kept as a file under `lua/`, registered once per
client; redis-py reloads it by itself after a Redis restart forgets scripts).

The coordination Redis is one server (`redis://…`) or a Redis Cluster (`redis+cluster://…`,
docs/redis-cluster.md). Every key is named by `KeyScheme`: on one server the names are the
ones this project always used; on a cluster every key of a thread carries the thread as its
hash tag, so each script touches one slot, and a run's event stream lives in its thread's
slot.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import redis
from redis.backoff import ExponentialWithJitterBackoff  # type: ignore[attr-defined]
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (  # type: ignore[attr-defined]
    ClusterDownError,
    NoScriptError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

LUA_DIR = Path(__file__).resolve().parent / "lua"
_INCLUDE = re.compile(r"^-- #include (\w+)$", re.MULTILINE)
EPOCH_TTL_MS = 7 * 24 * 3600 * 1000
MIN_LEASE_TTL_MS = 60_000
MAX_LEASE_TTL_MS = 30 * 24 * 3600 * 1000
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""MAILBOX_REDIS_URL schemes that name a Redis Cluster, and the scheme of one node's URL."""


@dataclass(frozen=True)
class Lease:
    token: str
    dispatch_id: str
    lease_until: int
    holder: str


def lua_source(name: str) -> str:
    """The text of `lua/<name>.lua`, each `-- #include <lib>` line replaced by
    `lua/lib/<lib>.lua`: a piece two scripts share is written once, and each script is
    still one call, sent whole."""
    text = (LUA_DIR / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: (LUA_DIR / "lib" / f"{m[1]}.lua").read_text(), text)


def _lease_ttl(lease_ms: int) -> int:
    # Long enough that a live, renewed lease never expires between heartbeats. At least three
    # leases: the scripts set the TTL again only when the one set before would outlive the
    # new lease_until (now + lease) by less than ttl/3, and a TTL set now outlives it by
    # ttl - lease >= ttl * 2/3 (lease_put.lua).
    return min(MAX_LEASE_TTL_MS, max(MIN_LEASE_TTL_MS, 3 * lease_ms))


# ------------------------------------------------------------------------------------ keys
_ESCAPED = re.compile(r"%(25|7D)")


def hash_tag(thread_id: str) -> str:
    """The thread's hash tag on a cluster: `{<thread>}` with `%` and `}` percent-escaped, so
    that the first `}` after our `{` is ours (Redis hashes only what is between them), the
    tag is never empty (thread ids are), and distinct threads keep distinct keys."""
    return "{" + thread_id.replace("%", "%25").replace("}", "%7D") + "}"


def thread_of_tag(escaped: str) -> str:
    """The inverse of `hash_tag`, for the text between the braces."""
    return _ESCAPED.sub(lambda m: "%" if m[1] == "25" else "}", escaped)


@dataclass(frozen=True)
class KeyScheme:
    """Every Redis key of the mailbox (docs/redis-cluster.md#keys).

    One server (`cluster=False`): the names the project always used — `<ns>:lease:<thread>`,
    `<ns>:epoch:<thread>`, `<ns>:epoch-generation`, `<ns>:events:<run>` … — so upgrading a
    running deployment changes no key. A cluster: every key of a thread starts with
    `<ns>:{<thread>}:` (the hash tag), so a script's keys share a slot and everything of a
    thread — lease, epoch and its generation, wake mark, cancel signals, its runs' event
    streams — lives on one master. The namespace alphabet has no braces
    (`settings.validate_namespace`), so the first `{` of a key is always the tag's."""

    namespace: str
    cluster: bool = False

    def _of_thread(self, thread_id: str, kind: str) -> str:
        if self.cluster:
            return f"{self.namespace}:{hash_tag(thread_id)}:{kind}"
        return f"{self.namespace}:{kind}:{thread_id}"

    def lease(self, thread_id: str) -> str:
        return self._of_thread(thread_id, "lease")

    def epoch(self, thread_id: str) -> str:
        return self._of_thread(thread_id, "epoch")

    def wake_pending(self, thread_id: str) -> str:
        return self._of_thread(thread_id, "wake-pending")

    def epoch_generation(self, thread_id: str) -> str:
        """The epoch cache's generation (`epoch_fill.lua`): one per server, renewed by a
        flush or restart that empties it; on a cluster one per thread, in the thread's slot
        (a script may not touch a global key beside the thread's), which a flush or a
        restart of the thread's master empties just the same."""
        if self.cluster:
            return self._of_thread(thread_id, "epoch-generation")
        return f"{self.namespace}:epoch-generation"

    def cancel(self, thread_id: str, token: str) -> str:
        """A stop signal for the claim holding `token` (read by its heartbeat)."""
        if self.cluster:
            return f"{self._of_thread(thread_id, 'cancel')}:{token}"
        return f"{self.namespace}:cancel:{token}"

    def events(self, thread_id: str, run_id: str) -> tuple[str, str]:
        """A run's event stream and its meta hash (where streams written before the books
        moved into their entries kept them: events_append.lua); on a cluster in its
        thread's slot."""
        base = (f"{self._of_thread(thread_id, 'events')}:{run_id}" if self.cluster
                else f"{self.namespace}:events:{run_id}")
        return base, base + ":meta"

    def wake_frontier(self) -> str:
        """The newest publish time of a consumed wake-up (mailbox/wake_marks.py): one key per
        namespace, not a thread's (its script touches it alone: any slot will do)."""
        return f"{self.namespace}:wake-frontier"

    def gc_cursor(self) -> str:
        """Where garbage collection stopped (one key, not a thread's: any slot will do)."""
        return f"{self.namespace}:gc:thread-cursor"

    # ------------------------------------------------------------------- scans (the audit)
    def pattern(self, kind: str) -> str:
        """A SCAN MATCH pattern for every per-thread key of this kind ("lease", "epoch")."""
        if self.cluster:
            return f"{self.namespace}:{{*}}:{kind}"
        return f"{self.namespace}:{kind}:*"

    def thread_of(self, key: str, kind: str) -> str | None:
        """The thread a per-thread key of this kind belongs to; None for any other key."""
        if self.cluster:
            head, tail = f"{self.namespace}:{{", f"}}:{kind}"
            if key.startswith(head) and key.endswith(tail) and len(key) > len(head + tail):
                inner = key[len(head):-len(tail)]
                return None if "}" in inner else thread_of_tag(inner)
            return None
        head = f"{self.namespace}:{kind}:"
        return key[len(head):] if key.startswith(head) and len(key) > len(head) else None


def is_cluster_client(client: object) -> bool:
    return isinstance(client, RedisCluster)


@dataclass(frozen=True)
class ScriptCall:
    """One call of a registered Lua script, not yet sent: so that calls of different scripts
    (a submit's event and its wake gate) can share one round trip (`run_calls`)."""

    script: Any
    keys: list[str]
    args: list[Any]


def run_scripts(client: redis.Redis[bytes], script: Any,
                calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
    """Run `script` once per (keys, args), pipelined in one round trip; the replies in order.
    The first error is raised once every call was tried (see `run_calls`)."""
    replies = run_calls(client, [ScriptCall(script, list(keys), list(args))
                                 for keys, args in calls])
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def run_calls(client: redis.Redis[bytes], calls: Sequence[ScriptCall]) -> list[Any]:
    """Run script calls pipelined in one round trip; the replies in order, a call's error
    (a cluster outage as `redis.ConnectionError`, see `as_outage`) in its place.

    A cluster pipeline does not load scripts, and a master that restarted has forgotten
    them: calls refused with NOSCRIPT are run again once their script is loaded (on every
    master). Only those: so the calls of one batch must be independent — no two of them
    touching the same keys — or a retried one could land after a later one that went
    through."""
    if not calls:
        return []
    replies = _pipelined(client, calls)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {id(calls[i].script): calls[i].script for i in missing}.values():
            client.script_load(script.script)  # type: ignore[no-untyped-call]
        for i, reply in zip(missing, _pipelined(client, [calls[i] for i in missing]),
                            strict=True):
            replies[i] = reply
    return [as_outage(r) if isinstance(r, Exception) else r for r in replies]


def _pipelined(client: redis.Redis[bytes], calls: Sequence[ScriptCall]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for call in calls:
        # EVALSHA straight into the pipeline: no SCRIPT EXISTS round trip before it (the
        # NOSCRIPT replies are handled by the caller, the same way on one server and on a
        # cluster).
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    return execute(pipe, raise_on_error=False)


CLUSTER_OUTAGES = (SlotNotCoveredError, RedisClusterUnreachableError, ClusterDownError,
                   TryAgainError)
"""What a cluster client raises while (part of) the cluster cannot serve: no node answers, a
slot nobody serves, CLUSTERDOWN / MASTERDOWN, TRYAGAIN while slots move."""


def as_outage(exc: BaseException) -> BaseException:
    """A cluster outage as the `redis.ConnectionError` a single Redis that is down raises
    (the store turns that into StoreUnavailableError); anything else as it is."""
    if isinstance(exc, CLUSTER_OUTAGES):
        error = redis.ConnectionError(f"redis cluster unavailable: {exc!r}")
        error.__cause__ = exc
        return error
    return exc


def execute(pipe: Any, *, raise_on_error: bool = True) -> list[Any]:
    """`pipe.execute()`, with a cluster outage reported as a `redis.ConnectionError` like
    any Redis that is down (see `MailboxCluster`)."""
    try:
        return list(pipe.execute(raise_on_error=raise_on_error))
    except CLUSTER_OUTAGES as exc:
        raise as_outage(exc) from exc


WAKE_HELD, WAKE_PUBLISH, WAKE_PENDING = 0, 1, 2
"""What `gate_wake` answers (wake_gate.lua)."""
LEASE_NOT_OURS, RELEASED, WAKE_REQUESTED = 0, 1, 2
"""What `release` answers: the lease was not ours (or gone), it was deleted, or it was
deleted and a submit had skipped its wake-up on it (the caller claims again)."""


class Coordinator:
    """Redis side of the store. Counts its round trips so benchmarks can report them."""

    def __init__(self, client: redis.Redis[bytes], namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.keys = KeyScheme(namespace, cluster=is_cluster_client(client))
        self.round_trips = 0
        self.scripts = {  # name -> registered script (benchmarks name EVALSHA calls by it)
            name: client.register_script(lua_source(name))
            for name in ("lease_acquire", "lease_put", "lease_release", "lease_take_executor",
                         "epoch_generation", "epoch_fill", "epoch_forget", "wake_consume",
                         "wake_gate", "wake_renew", "wake_frontier")
        }

    @property
    def cluster(self) -> bool:
        return self.keys.cluster

    # -------------------------------------------------------------------------------- keys
    def lease_key(self, thread_id: str) -> str:
        return self.keys.lease(thread_id)

    def epoch_key(self, thread_id: str) -> str:
        return self.keys.epoch(thread_id)

    def wake_pending_key(self, thread_id: str) -> str:
        return self.keys.wake_pending(thread_id)

    def _run(self, name: str, key: str, *args: Any) -> Any:
        self.round_trips += 1
        return self.scripts[name](keys=[key], args=list(args))

    # ------------------------------------------------------------------------------ leases
    def acquire(self, thread_id: str, token: str, lease_until: int, holder: str, now: int,
                lease_ms: int, *, wake_id: str | None = None) -> Lease | None:
        """Take a pending lease; return None when taken, or the live lease that refused us.
        A wake-up's claim passes its id: the thread's pending-wake mark is cleared first if
        it names that wake-up (wake_gate.lua), in the same round trip."""
        keys = [self.lease_key(thread_id)]
        args: list[Any] = [token, lease_until, holder, now, _lease_ttl(lease_ms)]
        if wake_id:
            keys.append(self.wake_pending_key(thread_id))
            args.append(wake_id)
        reply = self._run_keys("lease_acquire", keys, *args)
        if int(reply[0]) == 1:
            return None
        return Lease(_text(reply[1]), _text(reply[2]), int(reply[3]), _text(reply[4]))

    def put(self, thread_id: str, lease: Lease, *, expected_token: str, allow_missing: bool,
            lease_ms: int, now: int | None = None) -> bool:
        """Compare-and-set the lease (lease_put.lua). `now` (the caller's clock, as for
        `lease.lease_until`) lets the script skip the key's PEXPIRE while the TTL set before
        still covers the lease; without it the TTL is set every time."""
        call = self.put_call(thread_id, lease, expected_token=expected_token,
                             allow_missing=allow_missing, lease_ms=lease_ms, now=now)
        self.round_trips += 1
        return bool(call.script(keys=call.keys, args=call.args))

    def put_call(self, thread_id: str, lease: Lease, *, expected_token: str,
                 allow_missing: bool, lease_ms: int, now: int | None = None) -> ScriptCall:
        """`put`'s call, not yet sent (a settle sends its hand-over with its report)."""
        args: list[Any] = [expected_token, "1" if allow_missing else "0", lease.token,
                           lease.dispatch_id, lease.lease_until, lease.holder,
                           _lease_ttl(lease_ms)]
        if now is not None:
            args.append(now)
        return ScriptCall(self.scripts["lease_put"], [self.lease_key(thread_id)], args)

    def release(self, thread_id: str, token: str) -> int:
        """Delete our lease: 0 when it is not ours, 1 when deleted, WAKE_REQUESTED when a
        submit found it standing and skipped its wake-up (the caller claims again)."""
        return int(self._run("lease_release", self.lease_key(thread_id), token))

    def gate_wake(self, thread_id: str, wake_id: str, now: int, pending_ttl_ms: int) -> int:
        """After a submit's commit: WAKE_PUBLISH when the caller must publish a wake-up named
        `wake_id` (the pending mark now names it), WAKE_HELD when a claim is in flight (the
        lease is marked: its holder claims again on release), WAKE_PENDING when a wake-up is
        already on its way. One round trip (wake_gate.lua)."""
        call = self.gate_call(thread_id, wake_id, now, pending_ttl_ms)
        self.round_trips += 1
        return int(call.script(keys=call.keys, args=call.args))

    def gate_call(self, thread_id: str, wake_id: str, now: int, pending_ttl_ms: int
                  ) -> ScriptCall:
        """`gate_wake`'s call, not yet sent (a submit sends it with its event: `run_calls`)."""
        return ScriptCall(self.scripts["wake_gate"],
                          [self.lease_key(thread_id), self.wake_pending_key(thread_id)],
                          [now, pending_ttl_ms, wake_id])

    def take_executor(self, thread_id: str, token: str, executor: str, dispatch_id: str,
                      lease_until: int, lease_ms: int, *, create: bool = False,
                      now: int | None = None) -> str:
        """'ok' when this process may execute the attempt (the lease now runs to at least
        `lease_until`), 'held:<id>' when another process already does, 'lost' when the
        thread's lease belongs to another claim, 'missing' when Redis has no lease and
        `create` is false (pass `create` only once SQL has recorded the start). `now` as
        for `put`: without it the key's TTL is set every time."""
        args: list[Any] = [token, executor, dispatch_id, lease_until, _lease_ttl(lease_ms),
                           "1" if create else "0"]
        if now is not None:
            args.append(now)
        return _text(self._run("lease_take_executor", self.lease_key(thread_id), *args))

    def read_lease(self, thread_id: str) -> Lease | None:
        self.round_trips += 1
        raw = self.client.hgetall(self.lease_key(thread_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Lease(fields.get("token", ""), fields.get("dispatch_id", ""),
                     int(fields.get("lease_until", "0") or 0), fields.get("holder", ""))

    def lease_and_epoch(self, thread_id: str) -> tuple[Lease | None, int | None]:
        """The thread's lease and cached epoch, in one round trip (HMGET and GET pipelined;
        both keys in the thread's slot on a cluster): what verify asks before it reads SQL."""
        self.round_trips += 1
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.lease_key(thread_id), "token", "dispatch_id", "lease_until")
        pipe.get(self.epoch_key(thread_id))
        (token, dispatch_id, lease_until), epoch = execute(pipe)
        lease = None if token is None else Lease(
            _text(token), _text(dispatch_id or b""), int(lease_until or 0), "")
        return lease, None if epoch is None else int(epoch)

    # ------------------------------------------------------------------------------ epochs
    def cached_epoch(self, thread_id: str) -> int | None:
        self.round_trips += 1
        raw = self.client.get(self.epoch_key(thread_id))
        return None if raw is None else int(raw)

    def cached_epochs(self, thread_ids: Sequence[str]) -> dict[str, int]:
        """The cached epochs of these threads (those Redis has), in one round trip per
        server (MGET on one server; split by slot on a cluster)."""
        if not thread_ids:
            return {}
        self.round_trips += 1
        keys = [self.epoch_key(t) for t in thread_ids]
        values = (self.client.mget_nonatomic(keys)  # type: ignore[attr-defined]
                  if self.cluster else self.client.mget(keys))
        found: dict[str, int] = {}
        for thread_id, raw in zip(thread_ids, values, strict=True):
            try:
                found[thread_id] = int(raw)
            except (TypeError, ValueError):
                continue
        return found

    def epoch_generation(self, thread_id: str) -> str:
        """Taken before reading the thread's epoch from SQL to refill the cache (see
        `fill_epoch`). One generation per server; on a cluster one per thread, expiring
        with the epochs it guards."""
        self.round_trips += 1
        ttl = str(EPOCH_TTL_MS) if self.cluster else "0"
        return _text(self.scripts["epoch_generation"](
            keys=[self.keys.epoch_generation(thread_id)], args=[uuid.uuid4().hex, ttl]))

    def fill_epoch(self, thread_id: str, epoch: int, generation: str) -> bool:
        """Cache an epoch read from SQL, unless Redis was flushed or restarted since the
        generation was taken: a value read before a flush may already be old, and an empty
        cache must never take an old value (epochs only go up). False when skipped."""
        return int(self._run_keys("epoch_fill", [self.epoch_key(thread_id),
                                                 self.keys.epoch_generation(thread_id)],
                                  epoch, generation, EPOCH_TTL_MS)) != -1

    def forget_epochs(self, thread_ids: Sequence[str]) -> int:
        """Delete these threads' cached epochs and renew the generation that guards them
        (garbage collection deleted their epoch rows, docs/behaviour.md#gc): one call on one
        server, one per thread on a cluster (each in its thread's slot). How many cached
        epochs existed."""
        if not self.cluster:
            return int(self._run_keys("epoch_forget", [
                self.keys.epoch_generation(""), *(self.epoch_key(t) for t in thread_ids)],
                uuid.uuid4().hex))
        return sum(int(self._run_keys("epoch_forget", [self.keys.epoch_generation(t),
                                                       self.epoch_key(t)],
                                      uuid.uuid4().hex, EPOCH_TTL_MS))
                   for t in thread_ids)

    # ----------------------------------------------------------------- sweep wake-ups
    def mark_wakes_pending(self, wakes: Sequence[tuple[str, str]], ttl_ms: int, *,
                           overwrite: bool = False) -> list[str | None]:
        """For each (thread_id, wake_id), SET NX PX the thread's pending-wake mark to the wake
        id, and read the mark back; all in one round trip. None where the mark was newly set
        (publish that wake-up), else the id of the earlier wake-up still pending (the sweep
        may renew its mark: `renew_wakes_pending`). `overwrite`: SET without NX, every mark
        now names its new wake-up (a worker's start-up sweep: the wake-ups the old marks stand
        for may have been lost with the broker)."""
        if not wakes:
            return []
        self.round_trips += 1
        pipe = self.client.pipeline(transaction=False)
        for thread_id, wake_id in wakes:
            key = self.wake_pending_key(thread_id)
            pipe.set(key, wake_id, nx=not overwrite, px=ttl_ms)
            pipe.get(key)
        replies = execute(pipe)
        return [None if was_set else _text(current) or None
                for was_set, current in zip(replies[::2], replies[1::2], strict=True)]

    def renew_wakes_pending(self, marks: Sequence[tuple[str, str, int]]) -> list[bool]:
        """For each (thread_id, wake_id, ttl_ms), let the thread's mark stand `ttl_ms` more if
        it still names that wake-up (wake_renew.lua); one round trip, one call per thread.
        True where renewed."""
        if not marks:
            return []
        self.round_trips += 1
        return [bool(reply) for reply in run_scripts(
            self.client, self.scripts["wake_renew"],
            [([self.wake_pending_key(thread_id)], [wake_id, ttl_ms])
             for thread_id, wake_id, ttl_ms in marks])]

    def advance_wake_frontier(self, published_at: int, ttl_ms: int) -> int:
        """Move the wake-up frontier forward to `published_at` (never back); the frontier as
        it is now (wake_frontier.lua)."""
        return int(self._run("wake_frontier", self.keys.wake_frontier(), published_at, ttl_ms))

    def wake_frontier(self) -> int | None:
        """The newest publish time of a consumed wake-up; None when none is recorded."""
        self.round_trips += 1
        value = self.client.get(self.keys.wake_frontier())
        return None if value is None else int(value)

    def consume_wake(self, thread_id: str, wake_id: str) -> bool:
        """Clear the thread's mark if it still names this wake-up: one round trip."""
        return bool(self._run("wake_consume", self.wake_pending_key(thread_id), wake_id))

    def clear_wakes_pending(self, wakes: Sequence[tuple[str, str]]) -> None:
        """`consume_wake` for wake-ups that were marked but never published, in one round
        trip."""
        if not wakes:
            return
        self.round_trips += 1
        run_scripts(self.client, self.scripts["wake_consume"],
                    [([self.wake_pending_key(thread_id)], [wake_id])
                     for thread_id, wake_id in dict(wakes).items()])

    def _run_keys(self, name: str, keys: list[str], *args: Any) -> Any:
        self.round_trips += 1
        return self.scripts[name](keys=keys, args=list(args))


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------ connecting
class MailboxCluster(RedisCluster):  # type: ignore[type-arg]
    """redis-py's cluster client, reporting an outage of the cluster or of the master a key
    lives on (`CLUSTER_OUTAGES`, once redis-py's own retries gave up) as
    `redis.ConnectionError`, like a single Redis that is down: the store turns that into
    StoreUnavailableError and the heartbeat into a blind renewal
    (docs/redis-cluster.md#failures). Other cluster errors — a script whose keys span
    slots — stay what they are: bugs, not outages."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except CLUSTER_OUTAGES as exc:
            raise as_outage(exc) from exc


def is_cluster_url(url: object) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """Split `redis+cluster://[user:password@]host:port[,host:port…][/0][?options]` into a
    node URL for redis-py (`redis://[user:password@]<first node>[/0][?options]`, which
    carries the credentials and options) and every (host, port) given. IPv6 hosts in
    brackets. ValueError says what is wrong."""
    scheme, sep, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES.get(scheme.lower())
    if not sep or node_scheme is None:
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://host:port,...): {url!r}")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hostlist = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"Redis Cluster URL: {item.strip()!r} is not host:port in {url!r}")
        nodes.append((unquote(host), int(port)))
    first, first_port = nodes[0]
    shown = f"[{first}]" if ":" in first else first
    return f"{node_scheme}://{userinfo}{at}{shown}:{first_port}{tail}", nodes


def connect_redis(url: str) -> redis.Redis[bytes]:
    """A client with bounded timeouts: a dead Redis fails fast instead of hanging a worker.

    A `redis+cluster://` (or `rediss+cluster://`) URL gives a cluster client (`MailboxCluster`)
    that discovers the cluster from the nodes listed; it offers the same commands, so it is
    typed as a `redis.Redis` here (keys are named for it by `KeyScheme`)."""
    if is_cluster_url(url):
        node_url, nodes = cluster_nodes(url)
        return cast("redis.Redis[bytes]", MailboxCluster(
            url=node_url, startup_nodes=[ClusterNode(h, p) for h, p in nodes[1:]],
            socket_timeout=5, socket_connect_timeout=5, retry_on_timeout=False,
            # A master that is down: give up within about a second, like a single Redis
            # (connect refused at once); the store calls that an outage, SQL stays the truth.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3)))
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                health_check_interval=15, retry_on_timeout=False)
