"""The Redis key scheme (mailbox/coordination.py `KeyScheme`, docs/redis-cluster.md#keys).

Pure unit tests, no server:
- on one Redis the key names are exactly the ones the project always used (an upgrade of a
  running deployment changes no key);
- on a Redis Cluster every key of a thread hashes to the thread's slot, whatever the thread
  id holds (braces, percent signs, colons, non-ASCII), and distinct threads keep distinct
  keys;
- a static check of every Lua script: each script's KEYS, as the code builds them for a
  cluster, share one hash tag and so one slot. The Coordinator and the event streams are
  driven against a recording stand-in for the client (the only fake here: it records which
  keys each script call names); every script under mailbox/lua/ must be called, and with
  as many keys as the script reads.

The same calls against a real three-master cluster, where a cross-slot call would fail, are in
tests/integration/test_redis_cluster.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest
from redis.crc import key_slot

from mailbox.coordination import (
    LUA_DIR,
    Coordinator,
    KeyScheme,
    Lease,
    cluster_nodes,
    hash_tag,
    is_cluster_url,
    lua_source,
    thread_of_tag,
)
from mailbox.events import EventStreams
from mailbox.settings import Settings

NS = "mbx"
THREADS = ["t1", "a}b", "{x}", "}", "{", "}{", "%7D", "50%", "%25}", "ü-thread", "a:b:c",
           "x" * 255, "lease", " sp ace ", "{t1}", "t1}"]


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


# ------------------------------------------------------------------------------- the names
def test_single_redis_names_are_the_ones_always_used() -> None:
    keys = KeyScheme(NS, cluster=False)
    assert keys.lease("t1") == "mbx:lease:t1"
    assert keys.epoch("t1") == "mbx:epoch:t1"
    assert keys.wake_pending("t1") == "mbx:wake-pending:t1"
    assert keys.epoch_generation("t1") == keys.epoch_generation("t2") == "mbx:epoch-generation"
    assert keys.cancel("t1", "tok") == "mbx:cancel:tok"
    assert keys.events("t1", "r1") == ("mbx:events:r1", "mbx:events:r1:meta")
    assert keys.gc_cursor() == "mbx:gc:thread-cursor"
    assert keys.pattern("lease") == "mbx:lease:*"
    assert keys.thread_of("mbx:lease:a:b", "lease") == "a:b"
    assert keys.thread_of("mbx:epoch-generation", "epoch") is None


def test_cluster_names_carry_the_thread_as_hash_tag() -> None:
    keys = KeyScheme(NS, cluster=True)
    assert keys.lease("t1") == "mbx:{t1}:lease"
    assert keys.epoch("t1") == "mbx:{t1}:epoch"
    assert keys.epoch_generation("t1") == "mbx:{t1}:epoch-generation"
    assert keys.wake_pending("t1") == "mbx:{t1}:wake-pending"
    assert keys.cancel("t1", "tok") == "mbx:{t1}:cancel:tok"
    assert keys.events("t1", "r1") == ("mbx:{t1}:events:r1", "mbx:{t1}:events:r1:meta")
    assert keys.lease("a}b") == "mbx:{a%7Db}:lease"
    assert keys.pattern("epoch") == "mbx:{*}:epoch"


@pytest.mark.parametrize("thread", THREADS)
def test_every_key_of_a_thread_is_in_the_thread_slot(thread: str) -> None:
    keys = KeyScheme(NS, cluster=True)
    own = slot(hash_tag(thread))
    names = [keys.lease(thread), keys.epoch(thread), keys.epoch_generation(thread),
             keys.wake_pending(thread), keys.cancel(thread, "0190-tok"),
             *keys.events(thread, "run-1"), *keys.events(thread, "run:{2}")]
    assert {slot(n) for n in names} == {own}, names
    # The tag Redis sees is the escaped thread id: the first "}" after our "{" is ours.
    tag = hash_tag(thread)
    assert tag.count("}") == 1 and tag.endswith("}") and len(tag) > 2
    assert thread_of_tag(tag[1:-1]) == thread
    for kind in ("lease", "epoch"):
        name = keys.lease(thread) if kind == "lease" else keys.epoch(thread)
        assert keys.thread_of(name, kind) == thread


def test_distinct_threads_keep_distinct_keys() -> None:
    keys = KeyScheme(NS, cluster=True)
    for make in (keys.lease, keys.epoch, keys.epoch_generation, keys.wake_pending):
        names = [make(t) for t in THREADS]
        assert len(set(names)) == len(THREADS)
    every = [k for t in THREADS for k in (keys.lease(t), keys.epoch(t),
                                          keys.epoch_generation(t), keys.wake_pending(t))]
    assert len(set(every)) == len(every)
    assert keys.thread_of("mbx:{a}:epoch-generation", "epoch") is None
    assert keys.thread_of("other:{a}:epoch", "epoch") is None


# --------------------------------------------------------------------------- configuration
def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://h:1") and is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://h:1/0") and not is_cluster_url(None)
    url, nodes = cluster_nodes("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001/0?x=1")
    assert url == "redis://u:p%40ss@10.0.0.1:7000/0?x=1"
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    url, nodes = cluster_nodes("rediss+cluster://[::1]:7000, 127.0.0.1:7001")
    assert url == "rediss://[::1]:7000" and nodes == [("::1", 7000), ("127.0.0.1", 7001)]
    for bad in ("redis://h:1", "redis+cluster://h", "redis+cluster://h:x",
                "redis+cluster://h:1,:2", "redis+cluster://h:70000"):
        with pytest.raises(ValueError):
            cluster_nodes(bad)


def test_a_cluster_is_never_the_default_broker() -> None:
    cluster = Settings.from_env({"MAILBOX_REDIS_URL": "redis+cluster://h:7000,h:7001"})
    assert cluster.redis_url == "redis+cluster://h:7000,h:7001" and cluster.broker_url is None
    given = Settings.from_env({"MAILBOX_REDIS_URL": "redis+cluster://h:7000",
                               "CELERY_BROKER_URL": "redis://b:6379/0"})
    assert given.broker_url == "redis://b:6379/0"
    plain = Settings.from_env({"MAILBOX_REDIS_URL": "redis://h:6379/0"})
    assert plain.broker_url == "redis://h:6379/0"


# ------------------------------------------------------------------ the scripts, statically
class RecordedScript:
    """What `register_script` hands back: calls record (script, keys)."""

    def __init__(self, client: RecordingClient, text: str) -> None:
        self.client, self.script = client, text
        self.name = next(p.stem for p in LUA_DIR.glob("*.lua") if lua_source(p.stem) == text)
        self.sha = f"sha-{self.name}"
        client.by_sha[self.sha] = self

    def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = (),
                 client: Any = None) -> Any:
        return self.client.record(self.name, list(keys))


class RecordingPipeline:
    def __init__(self, client: RecordingClient) -> None:
        self.client, self.replies = client, []  # type: ignore[var-annotated]

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        script = self.client.by_sha[sha]
        self.replies.append(self.client.record(script.name, list(keys_and_args[:numkeys])))

    def set(self, *_: Any, **__: Any) -> None:
        self.replies.append(True)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        return self.replies


class RecordingClient:
    REPLIES = {"lease_acquire": [1], "lease_take_executor": b"ok", "epoch_generation": b"g",
               "epoch_fill": 1, "epoch_forget": 1, "lease_put": 1, "lease_release": 1,
               "wake_consume": 1, "events_append": b"1-0", "wake_gate": 1, "wake_renew": 1,
               "wake_frontier": 5}

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.by_sha: dict[str, RecordedScript] = {}

    def register_script(self, text: str) -> RecordedScript:
        return RecordedScript(self, text)

    def record(self, name: str, keys: list[str]) -> Any:
        self.calls.append((name, keys))
        return self.REPLIES[name]

    def pipeline(self, transaction: bool = False) -> RecordingPipeline:
        return RecordingPipeline(self)


NAMESPACE_KEY_SCRIPTS = {"wake_frontier"}
"""Scripts that touch one key of the namespace, not of a thread (the wake-up frontier): one
key is always one slot, tag or not."""
OPTIONAL_KEYS = {("lease_acquire", 1)}
"""(script, key count) of calls that leave out a key the script reads only when given
(lease_acquire's pending-wake mark, passed by a wake-up's claim)."""


def keys_read(script: str) -> int | None:
    """How many KEYS a script reads: the highest KEYS[n], or None when it loops over
    KEYS (#KEYS)."""
    if "#KEYS" in script:
        return None
    return max(int(n) for n in re.findall(r"KEYS\[(\d+)\]", script))


def test_every_script_call_names_keys_of_one_slot() -> None:
    client = RecordingClient()
    coordinator = Coordinator(client, NS)  # type: ignore[arg-type]
    coordinator.keys = KeyScheme(NS, cluster=True)  # as on a cluster client
    events = EventStreams(client, NS, retention_s=60)  # type: ignore[arg-type]
    events.keys = KeyScheme(NS, cluster=True)
    lease = Lease("tok", "d1", 2000, "c1")
    for thread in THREADS:
        coordinator.acquire(thread, "tok", 2000, "c1", 1000, 30_000)
        coordinator.acquire(thread, "tok", 2000, "c1", 1000, 30_000, wake_id="wake-1")
        coordinator.gate_wake(thread, "wake-2", 1000, 30_000)
        coordinator.put(thread, lease, expected_token="tok", allow_missing=True,
                        lease_ms=30_000)
        coordinator.take_executor(thread, "tok", "x1", "d1", 2000, 30_000, create=True)
        coordinator.release(thread, "tok")
        coordinator.fill_epoch(thread, 3, coordinator.epoch_generation(thread))
        coordinator.consume_wake(thread, "sweep-wake-1")
        events.emit(f"run-{thread}", "d1", "run_started", {}, thread_id=thread)
        events.emit_many(f"run-{thread}", "d1", [("output", {"i": 1}, 1), ("output", {}, 2)],
                         thread_id=thread)
    coordinator.forget_epochs(THREADS)
    coordinator.clear_wakes_pending([(t, "sweep-wake-2") for t in THREADS])
    coordinator.renew_wakes_pending([(t, "sweep-wake-3", 30_000) for t in THREADS])
    coordinator.advance_wake_frontier(5, 60_000)
    events.emit_batch([(f"run-{t}", "d1", "run_queued", {}, 1) for t in THREADS],
                      threads={f"run-{t}": t for t in THREADS})

    scripts = {p.stem: lua_source(p.stem) for p in LUA_DIR.glob("*.lua")}
    called = {name for name, _ in client.calls}
    assert called == set(scripts), f"scripts never called here: {set(scripts) - called}"
    for name, keys in client.calls:
        wanted = keys_read(scripts[name])
        optional = (name, len(keys)) in OPTIONAL_KEYS
        assert wanted is None or len(keys) == wanted or optional, (name, keys)
        if name in NAMESPACE_KEY_SCRIPTS:
            assert keys == [coordinator.keys.wake_frontier()], (name, keys)
            continue
        assert len({slot(k) for k in keys}) == 1, f"{name} spans slots: {keys}"
        tags = {k[k.index("{"):k.index("}") + 1] for k in keys}
        assert len(tags) == 1, f"{name} keys do not share one hash tag: {keys}"


def test_on_one_redis_the_generation_stays_global_and_forget_is_one_call() -> None:
    client = RecordingClient()
    coordinator = Coordinator(client, NS)  # type: ignore[arg-type]
    coordinator.epoch_generation("t1")
    coordinator.forget_epochs(["t1", "t2"])
    assert client.calls == [
        ("epoch_generation", ["mbx:epoch-generation"]),
        ("epoch_forget", ["mbx:epoch-generation", "mbx:epoch:t1", "mbx:epoch:t2"])]
