"""The coordination state on a real Redis Cluster (docs/redis-cluster.md): three masters
started from `redis-server` by tests/support/redis_cluster.py (the session's own cluster when
MAILBOX_TEST_REDIS_CLUSTER=1, else one for this module), and SQL as everywhere.

- Every Lua script runs on the cluster, for threads whose ids hold braces, percent signs and
  colons: redis-py refuses a script whose keys span slots before sending it, so one call of a
  script with keys in two slots fails these tests (tests/unit/test_redis_keys.py checks the
  same statically).
- Every key the mailbox leaves is in its thread's slot, a run's event stream included, and
  the run's events are found from its run id alone (the thread is looked up in SQL).
- Pipelined script calls survive a master that forgot its scripts (a cluster pipeline does
  not load them).
- A master that is down is an outage like a single Redis that is down (StoreUnavailableError),
  for its threads only; once it is back, empty, epochs come back from SQL and a refill that
  read SQL before a flush cannot cache an old epoch.
- Celery cannot use a cluster as its broker: a worker's configuration says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from redis.crc import key_slot
from sqlalchemy import event

from mailbox import DispatchStatus, Mailbox, StoreUnavailableError
from mailbox.audit import audit
from mailbox.coordination import Lease, hash_tag
from mailbox.events import CursorExpiredError
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import now_ms
from tests.support.redis_cluster import LocalRedisCluster, cluster_mode

ROOT = Path(__file__).resolve().parents[2]
THREADS = ["c-plain", "c-a}b", "c-{x}", "c-50%", "c-%7D", "c-a:b:c", "c-ü"]


@pytest.fixture(scope="module")
def cluster_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's cluster (MAILBOX_TEST_REDIS_CLUSTER=1), or one for this module."""
    if cluster_mode():
        yield str(request.getfixturevalue("redis_url"))
        return
    cluster = LocalRedisCluster()
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def box(make_mailbox: Callable[..., Mailbox], cluster_url: str) -> Mailbox:
    mailbox = make_mailbox(cluster_url)
    assert mailbox.store.coordinator.cluster, "not on a cluster client"
    return mailbox


@pytest.fixture
def private_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster of one test's own, free to flush and to lose a master."""
    cluster = LocalRedisCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def slot(key: bytes | str) -> int:
    return int(key_slot(key if isinstance(key, bytes) else key.encode()))


def process(box: Mailbox, thread_id: str) -> None:
    rt = box.runtime()
    ctx = claim_next(rt, thread_id)
    assert ctx is not None, thread_id
    run_chain(rt, ctx)


def node_of(cluster: LocalRedisCluster, thread_id: str) -> int:
    """Which master (index) serves the thread's slot (slots split evenly, in order)."""
    per = 16384 // len(cluster.nodes)
    return min(slot(hash_tag(thread_id)) // per, len(cluster.nodes) - 1)


# ============================================================== every script, one slot each
def test_every_operation_runs_on_the_cluster_and_keeps_a_thread_in_its_slot(
        box: Mailbox) -> None:
    ns = box.settings.namespace
    receipts = {}
    for thread in THREADS:
        receipts[thread] = box.submit(thread, "echo", f"hello {thread}")
        process(box, thread)
        asked = box.submit(thread, "ask", "approve?")
        process(box, asked.thread_id)  # suspends: run waiting, dispatch acked
        box.resume(asked.run_id, "yes")
        process(box, thread)
        box.submit(thread, "fail", "dead")
        process(box, thread)
        queued = box.submit(thread, "echo", "cancelled while queued")
        assert box.cancel(queued.dispatch_id)
        box.submit(thread, "echo", "superseded")
        assert box.interrupt(thread).new_dispatch_epoch == 1
        assert box.store.current_dispatch_epoch(thread) == 1
        running = box.submit(thread, "sleep", {"ms": 5000})
        rt = box.runtime()
        ctx = claim_next(rt, thread)
        assert ctx is not None
        assert box.cancel(running.dispatch_id)  # a cancel signal to the claim's holder
        assert rt.cancel_check is not None
        assert rt.cancel_check(thread, ctx.token) == "cancelled by request"
    report = box.sweep()
    assert report is not None
    assert audit(box).violations == []

    for thread, receipt in receipts.items():
        assert [e.type for e in box.events(receipt.run_id)][-1] == "run_finish"
        final = box.wait(receipt.dispatch_id, timeout_s=5)
        assert final.status == DispatchStatus.Acked and final.run_response == f"hello {thread}"

    # Every key of the namespace is a thread's, in that thread's slot.
    client = box.store.coordinator.client
    keys = [k.decode() for k in client.scan_iter(f"{ns}:*")]
    assert keys, "nothing written to the cluster"
    kinds = set()
    for key in keys:
        assert key.startswith(f"{ns}:{{"), key
        tag = key[len(ns) + 1:key.index("}") + 1]
        assert slot(key) == slot(tag), key
        kinds.add(key[key.index("}") + 2:].split(":", 1)[0])
    assert {"lease", "epoch", "epoch-generation", "events", "cancel"} <= kinds, kinds
    for thread, receipt in receipts.items():
        stream, meta = box.store.coordinator.keys.events(thread, receipt.run_id)
        assert client.exists(stream) == 1 and client.exists(meta) == 0  # books in entries
        assert slot(stream) == slot(meta) == slot(box.store.coordinator.lease_key(thread))


def test_sweep_wake_marks_and_garbage_collection_on_the_cluster(box: Mailbox) -> None:
    from mailbox.maintenance import garbage_collection, sweep
    from mailbox.wake_marks import SWEEP_WAKE_PREFIX

    published: list[tuple[str, str]] = []
    for thread in THREADS:
        box.submit(thread, "echo", "x", wake=False)
    sweep(box.runtime(), now_ms(), publish=lambda t, w: published.append((t, w)))
    assert sorted(t for t, _ in published) == sorted(THREADS)
    coordinator = box.store.coordinator
    assert all(coordinator.client.get(coordinator.wake_pending_key(t)) == w.encode()
               for t, w in published)
    assert all(w.startswith(SWEEP_WAKE_PREFIX) for _, w in published)
    coordinator.clear_wakes_pending(published)
    assert not any(coordinator.client.exists(coordinator.wake_pending_key(t)) for t in THREADS)
    for thread in THREADS:
        process(box, thread)
    # Everything expired: GC deletes the dispatches, runs, their streams, the epoch rows and
    # the cached epochs (one epoch_forget per thread, each in its slot).
    for thread in THREADS:
        box.store.current_dispatch_epoch(thread)
    later = now_ms() + 400 * 24 * 3600 * 1000
    report = garbage_collection(box.runtime(), later)
    assert report.dispatches == len(THREADS) and report.threads == len(THREADS), report
    assert report.event_streams == len(THREADS), report  # one stream per run
    assert list(coordinator.client.scan_iter(f"{box.settings.namespace}:{{*}}:epoch")) == []


def test_a_run_s_events_are_found_from_its_id_alone(
        box: Mailbox, make_mailbox: Callable[..., Mailbox], cluster_url: str) -> None:
    receipt = box.submit("c-events", "echo", "find me")
    process(box, "c-events")
    other = make_mailbox(cluster_url)  # another process: nothing remembered, SQL is asked
    events = list(other.events(receipt.run_id))
    assert [e.type for e in events] == ["run_queued", "run_started", "run_finish"]
    followed = list(other.events(receipt.run_id, after=events[0].id, follow=True,
                                 timeout_s=5))
    assert [e.id for e in followed] == [e.id for e in events[1:]]
    assert other.events.read("no-such-run") == []
    with pytest.raises(CursorExpiredError, match="expired or never existed"):
        other.events.read("no-such-run", after="1-0")


def test_pipelined_scripts_survive_masters_that_forgot_them(box: Mailbox) -> None:
    client = box.store.coordinator.client
    client.script_flush()  # every master: as after a restart
    runs = {f"run-{t}": t for t in THREADS}
    assert box.events.emit_batch([(r, "d1", "output", {"n": 1}, 1) for r in runs],
                                 threads=runs) == len(runs)
    client.script_flush()
    box.store.coordinator.clear_wakes_pending([(t, "w") for t in THREADS])
    client.script_flush()
    assert box.events.emit_many("run-c-plain", "d1", [("output", {"n": 2}, 2)],
                                thread_id="c-plain") == 1
    assert [e.data for e in box.events.read("run-c-plain", thread_id="c-plain")] == [
        {"n": 1}, {"n": 2}]


# ======================================================================= a master goes away
@contextmanager
def after_statement(engine: sa.Engine, prefix: str, action: Callable[[], None]
                    ) -> Iterator[list[str]]:
    fired: list[str] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not fired and statement.lstrip().upper().startswith(prefix):
            fired.append(statement)
            action()

    event.listen(engine, "after_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(engine, "after_cursor_execute", hook)


def test_a_master_down_is_an_outage_of_its_threads_only_and_comes_back_from_sql(
        make_mailbox: Callable[..., Mailbox], private_cluster: LocalRedisCluster) -> None:
    store = make_mailbox(private_cluster.url).store
    down_thread = next(t for t in (f"m-{i}" for i in range(100))
                       if node_of(private_cluster, t) == 0)
    up_thread = next(t for t in (f"m-{i}" for i in range(100))
                     if node_of(private_cluster, t) == 1)
    from mailbox import RunDispatch

    for thread in (down_thread, up_thread):
        store.enqueue(RunDispatch.queued(f"d-{thread}", thread, f"r-{thread}", 1000))
    [held] = store.claim(down_thread, "c1", 30_000, 1000)
    assert store.interrupt(down_thread, 1001).new_dispatch_epoch == 1
    store.enqueue(RunDispatch.queued("e-down", down_thread, "s-down", 1001))  # due, epoch 1

    private_cluster.kill(0)
    with pytest.raises(StoreUnavailableError):
        store.claim(down_thread, "c2", 30_000, 1002)
    [other] = store.claim(up_thread, "c2", 30_000, 1002)  # another master: unaffected
    assert other.dispatch_id == f"d-{up_thread}"
    private_cluster.start_node(0)  # back, empty

    assert store.coordinator.read_lease(down_thread) is None
    assert store.coordinator.cached_epoch(down_thread) is None
    assert store.claim(down_thread, "c3", 30_000, 1003) == []  # SQL: the thread is busy
    assert store.coordinator.read_lease(down_thread) == Lease(
        held.claim_token or "", held.dispatch_id, 31_000, "c1")  # rebuilt from the row
    assert store.current_dispatch_epoch(down_thread) == 1  # from SQL, cached again
    assert store.coordinator.cached_epoch(down_thread) == 1


def test_an_epoch_refill_racing_a_flush_of_the_thread_s_master_is_refused(
        make_mailbox: Callable[..., Mailbox], private_cluster: LocalRedisCluster) -> None:
    """As tests/faults/test_redis_loss.py on one server: the refill read SQL before an
    interrupt and a flush; the thread's own generation (in its slot) went with the flush,
    so the old value is not cached and the store never reports an epoch below one an
    interrupt returned."""
    from mailbox import RunDispatch

    a = make_mailbox(private_cluster.url).store
    b = make_mailbox(private_cluster.url).store
    thread = "c-refill"
    a.enqueue(RunDispatch.queued("d1", thread, "r1", 1000))
    assert b.interrupt(thread, 1000).new_dispatch_epoch == 1
    private_cluster.flushall()

    def interrupt_and_flush() -> None:
        assert b.interrupt(thread, 1001).new_dispatch_epoch == 2
        private_cluster.flushall()

    with after_statement(a.engine, "SELECT THREAD_DISPATCH_EPOCHS.CURRENT_EPOCH",
                         interrupt_and_flush) as fired:
        assert a.current_dispatch_epoch(thread) == 1  # read SQL before the interrupt
    assert fired
    assert b.current_dispatch_epoch(thread) == b.sql_epoch(thread) == 2


# ============================================================================ configuration
def test_a_worker_refuses_a_cluster_as_its_broker() -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAILBOX_", "CELERY_"))}
    env.update(MAILBOX_REDIS_URL="redis+cluster://127.0.0.1:1,127.0.0.1:2",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "import celeryconfig"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "CELERY_BROKER_URL" in out.stderr, out.stderr
    env["CELERY_BROKER_URL"] = "redis://127.0.0.1:1/0"
    out = subprocess.run([sys.executable, "-c", "import celeryconfig as c; print(c.broker_url)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "redis://127.0.0.1:1/0", out.stderr


def test_a_plain_redis_client_never_sees_cluster_keys(redis_url: str) -> None:
    """The single-Redis layout is untouched: a plain client names keys as it always did."""
    if cluster_mode():
        pytest.skip("the session's Redis is the cluster here")
    client = redis.Redis.from_url(redis_url)
    try:
        from mailbox.coordination import Coordinator

        assert not Coordinator(client, "ns").cluster
        assert Coordinator(client, "ns").lease_key("t") == "ns:lease:t"
    finally:
        client.close()
