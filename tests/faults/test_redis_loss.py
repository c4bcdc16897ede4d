"""Redis loses its data, or goes away, and nothing breaks (DESIGN.md §4.2).

Redis holds only hot copies (per-thread leases and epochs). When it forgets them — FLUSHALL,
a restart without persistence, a failover — every invariant of §4.1 must still hold, because
SQL is the truth: claims on a busy thread are refused by SQL (and the partial unique index),
the lease is rebuilt from the Claimed row, epochs are re-read from SQL and never go back, and
fenced writes are checked in SQL.

Every test uses `private_redis`, a redis-server of its own that it may flush, kill or restart.
The multi-process workloads reuse the harness of `tests/integration/test_races.py`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import event

from mailbox import DispatchStatus, Mailbox, RunDispatch, VersionConflictError
from mailbox.coordination import Lease
from mailbox.dev.embedded_redis import EmbeddedRedis

# The race harness lives in tests/integration/test_races.py; tests/ has no packages, so it
# is imported by module name, which spawned children resolve the same way (inherited sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_races import (
    WorkloadConfig,
    _children_import_project,  # noqa: F401 - autouse fixture: children import our mailbox
    check_workload,
    run_workload,
)

THREADS = ("thread-a", "thread-b", "thread-c", "thread-d")
T = "t1"


def flushall(server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        assert client.flushall()
        assert client.dbsize() == 0
    finally:
        client.close()


@contextmanager
def counting_sql(engine: sa.Engine) -> Iterator[list[str]]:
    """Collect the SQL statements the engine runs inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@contextmanager
def on_statement(engine: sa.Engine, prefix: str, action: Callable[[], None],
                 *, after: bool = False) -> Iterator[list[str]]:
    """Run `action` once, right before (or after) the first statement starting with `prefix`:
    a way to put a fault exactly in the middle of a store operation."""
    fired: list[str] = []
    name = "after_cursor_execute" if after else "before_cursor_execute"

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not fired and statement.lstrip().upper().startswith(prefix):
            fired.append(statement)
            action()

    event.listen(engine, name, hook)
    try:
        yield fired
    finally:
        event.remove(engine, name, hook)


def queued(dispatch_id: str, thread: str = T, now: int = 1000) -> RunDispatch:
    return RunDispatch.queued(dispatch_id, thread, f"run-{dispatch_id}", now)


# ====================================================================== FLUSHALL between ops
def test_flush_after_enqueue_and_after_claim_rebuilds_the_lease_from_sql(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    store = make_mailbox(private_redis.url).store
    store.enqueue(queued("d1"))
    store.enqueue(queued("d2"))
    flushall(private_redis)  # after enqueue: nothing to lose yet, the claim just works

    [held] = store.claim(T, "c1", 30_000, 1000)
    assert held.dispatch_id == "d1" and held.claim_token
    flushall(private_redis)  # after claim: the lease is gone, the Claimed row is not
    assert store.coordinator.read_lease(T) is None

    # The busy thread is still refused (SQL + the partial unique index), by thread and by id…
    assert store.claim(T, "c2", 30_000, 1001) == []
    assert store.claim_dispatch("d2", "c2", 30_000, 1001) is None
    # …and that refusal rebuilt the lease from the Claimed row.
    assert store.coordinator.read_lease(T) == Lease(held.claim_token, "d1", 31_000, "c1")
    # With the lease back, the next refusal does not even reach SQL.
    with counting_sql(store.engine) as statements:
        assert store.claim(T, "c3", 30_000, 1002) == []
    assert statements == [], f"busy thread refused with SQL: {statements}"

    # Fenced ops still fence after a flush: a wrong token changes nothing.
    flushall(private_redis)
    before = store.load_dispatch("d1")
    with pytest.raises(VersionConflictError) as refused:
        store.ack("d1", "not-the-token", 1100)
    assert (refused.value.expected, refused.value.actual) == (0, 1)
    assert store.load_dispatch("d1") == before
    assert not store.extend_lease("d1", "not-the-token", 30_000, 1100)

    store.ack("d1", held.claim_token, 1200)
    d1 = store.load_dispatch("d1")
    assert d1 is not None and d1.status == DispatchStatus.Acked
    [nxt] = store.claim(T, "c2", 30_000, 1300)
    assert nxt.dispatch_id == "d2"
    assert store.claimed_per_thread() == {}
    # Nothing lost: both dispatches are still there.
    assert {d.dispatch_id for d in store.list_dispatches(T)} == {"d1", "d2"}


def test_flush_after_interrupt_rereads_epochs_from_sql_and_they_never_go_back(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    store = make_mailbox(private_redis.url).store
    store.enqueue(queued("d1"))
    [held] = store.claim(T, "c1", 30_000, 1000)
    assert held.dispatch_epoch == 0 and held.claim_token
    assert store.interrupt(T, 1100).new_dispatch_epoch == 1
    assert store.interrupt(T, 1101).new_dispatch_epoch == 2
    assert store.coordinator.cached_epoch(T) == 2
    flushall(private_redis)  # after interrupt

    assert store.coordinator.cached_epoch(T) is None
    assert store.current_dispatch_epoch(T) == store.sql_epoch(T) == 2
    assert store.coordinator.cached_epoch(T) == 2  # the cache was refilled from SQL

    # The stale claim still cannot start: SQL fences it (T13) whatever Redis says.
    flushall(private_redis)
    with pytest.raises(VersionConflictError) as fenced:
        store.record_dispatch_start("d1", held.claim_token, "inst-1", 1200)
    assert (fenced.value.expected, fenced.value.actual) == (0, 2)
    d1 = store.load_dispatch("d1")
    assert d1 is not None and d1.status == DispatchStatus.Superseded
    assert d1.dispatch_epoch == 2 and d1.run_status is None

    # The next interrupt continues from SQL, not from an empty cache.
    flushall(private_redis)
    assert store.interrupt(T, 1300).new_dispatch_epoch == 3
    flushall(private_redis)
    store.enqueue(queued("d2", now=1400))
    d2 = store.load_dispatch("d2")
    assert d2 is not None and d2.dispatch_epoch == 3
    assert store.current_dispatch_epoch(T) == 3
    [claimed] = store.claim(T, "c2", 30_000, 1500)
    assert claimed.dispatch_id == "d2"
    store.ack("d2", claimed.claim_token or "", 1600)
    assert {d.dispatch_id: d.status for d in store.list_dispatches(T)} == {
        "d1": DispatchStatus.Superseded, "d2": DispatchStatus.Acked}


def test_flush_between_every_operation_of_a_dispatch_life(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    """A full life (claim, start, extend, nack, reclaim, claim, ack) with Redis emptied
    before every single call, two consumers competing: same outcome as with Redis intact."""
    a = make_mailbox(private_redis.url).store
    b = make_mailbox(private_redis.url).store

    def step(call: Callable[[], Any]) -> Any:
        flushall(private_redis)
        return call()

    step(lambda: a.enqueue(queued("d1")))
    step(lambda: a.enqueue(queued("d2")))
    [first] = step(lambda: a.claim(T, "a", 1000, 1000))
    assert first.dispatch_id == "d1"
    token = first.claim_token or ""
    assert step(lambda: b.claim(T, "b", 1000, 1001)) == []
    assert step(lambda: b.claim_dispatch("d2", "b", 1000, 1001)) is None
    step(lambda: a.record_dispatch_start("d1", token, "inst", 1002))
    assert step(lambda: a.extend_lease("d1", token, 1000, 1500))
    assert step(lambda: b.claim(T, "b", 1000, 2400)) == []  # lease until 2500 holds in SQL
    step(lambda: a.nack("d1", token, 2000, "boom", 1600))
    [second] = step(lambda: b.claim(T, "b", 1000, 2000))  # d1 again: priority, FIFO
    assert second.dispatch_id == "d1" and second.attempt_count == 1
    with pytest.raises(VersionConflictError):
        step(lambda: a.ack("d1", token, 2001))  # a's old token
    assert step(lambda: b.reclaim_expired_leases(3001, 10))[0].dispatch_id == "d1"
    [third] = step(lambda: a.claim(T, "a", 1000, 3002))
    assert third.dispatch_id == "d1" and third.attempt_count == 2
    with pytest.raises(VersionConflictError):
        step(lambda: b.ack("d1", second.claim_token or "", 3003))
    step(lambda: a.ack("d1", third.claim_token or "", 3004))
    [fourth] = step(lambda: b.claim(T, "b", 1000, 3005))
    assert fourth.dispatch_id == "d2"
    step(lambda: b.ack("d2", fourth.claim_token or "", 3006))
    assert {d.dispatch_id: d.status for d in a.list_dispatches(T)} == {
        "d1": DispatchStatus.Acked, "d2": DispatchStatus.Acked}


# ================================================================= FLUSHALL inside an op
def test_flush_between_the_lease_and_the_sql_claim(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    """Redis forgets the pending lease while the claim is in SQL: the claim still binds a
    lease for the winner, and a competitor is refused."""
    store = make_mailbox(private_redis.url).store
    other = make_mailbox(private_redis.url).store
    store.enqueue(queued("d1"))
    store.enqueue(queued("d2"))
    with on_statement(store.engine, "UPDATE RUN_DISPATCHES",
                      lambda: flushall(private_redis)) as fired:
        [held] = store.claim(T, "c1", 30_000, 1000)
    assert fired
    assert store.coordinator.read_lease(T) == Lease(held.claim_token or "", "d1", 31_000, "c1")
    assert other.claim(T, "c2", 30_000, 1001) == []
    assert other.claim_dispatch("d2", "c2", 30_000, 1001) is None
    assert store.claimed_per_thread() == {}


def test_epoch_cache_refill_racing_a_flush_does_not_leave_an_old_epoch(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    """current_dispatch_epoch on a cache miss reads SQL, then writes that value to Redis. If an
    interrupt commits and Redis is flushed in between, the value written is already old.
    Once both calls have returned, the epoch the store reports must be the SQL one (it must
    not go back below an epoch an interrupt already returned)."""
    a = make_mailbox(private_redis.url).store
    b = make_mailbox(private_redis.url).store
    a.enqueue(queued("d1"))
    assert b.interrupt(T, 1000).new_dispatch_epoch == 1
    flushall(private_redis)

    def interrupt_and_flush() -> None:
        assert b.interrupt(T, 1001).new_dispatch_epoch == 2
        flushall(private_redis)

    with on_statement(a.engine, "SELECT THREAD_DISPATCH_EPOCHS.CURRENT_EPOCH",
                      interrupt_and_flush, after=True) as fired:
        assert a.current_dispatch_epoch(T) == 1  # it read SQL before the interrupt: fine
    assert fired
    assert b.sql_epoch(T) == 2
    assert b.current_dispatch_epoch(T) == 2, (
        "the epoch went back: an interrupt returned 2, the store now reports "
        f"{b.current_dispatch_epoch(T)} (Redis holds {b.coordinator.cached_epoch(T)}, "
        "written from a SQL read that predates the flush)")


# ============================================================== the multi-process workloads
def test_flushall_every_few_ms_during_a_four_process_workload(
        mailbox: Mailbox, database_url: str, private_redis: EmbeddedRedis, namespace: str,
        tmp_path: Path) -> None:
    """4 processes run the claim / ack / nack / interrupt mix while a background thread in
    the parent flushes Redis every 2-5 ms. Nothing may raise (Redis never went away), and
    every invariant holds."""
    cfg = WorkloadConfig(database_url, private_redis.url, namespace, THREADS, 5.0,
                         str(tmp_path), lease_ms=2_000, seed=2)
    flushes: list[int] = [0]

    def flusher(_start: float, deadline: float) -> None:
        """In the parent while the children work: a failed FLUSHALL fails the test."""
        client = redis.Redis.from_url(private_redis.url)
        try:
            while time.monotonic() < deadline:
                client.flushall()
                flushes[0] += 1
                time.sleep(0.002 + 0.001 * (flushes[0] % 4))
        finally:
            client.close()

    run = run_workload(cfg, workers=4, during=flusher)
    with Mailbox.connect(database_url, private_redis.url, namespace=namespace) as checker:
        summary = check_workload(run, checker.store, cfg)
    print(f"\nflush-during summary ({database_url.split(':')[0]}): flushes={flushes[0]} "
          f"{summary}")
    assert flushes[0] > 100, "the flusher barely ran"


def test_redis_restart_mid_workload_clients_recover(
        mailbox: Mailbox, database_url: str, private_redis: EmbeddedRedis, namespace: str,
        tmp_path: Path) -> None:
    """Redis restarts twice under 4 working processes (a clean restart, then a crash with
    half a second of downtime). While it is down, operations may fail, but only with
    StoreUnavailableError; afterwards every process works again and every invariant holds."""
    cfg = WorkloadConfig(database_url, private_redis.url, namespace, THREADS, 7.0,
                         str(tmp_path), lease_ms=2_000, seed=3, tolerate_unavailable=True)
    back_up: list[float] = []

    def faults(start: float, deadline: float) -> None:
        time.sleep(max(0.0, start + 1.0 - time.monotonic()))
        private_redis.restart()
        time.sleep(1.0)
        private_redis.kill()
        time.sleep(0.5)
        private_redis.start()
        back_up.append(time.monotonic())

    run = run_workload(cfg, workers=4, during=faults)
    with Mailbox.connect(database_url, private_redis.url, namespace=namespace) as checker:
        summary = check_workload(run, checker.store, cfg)
    print(f"\nrestart summary ({database_url.split(':')[0]}): {summary}")
    assert back_up and back_up[0] < run.started + cfg.seconds - 2, "faults ran too late"
    assert summary["unavailable"] > 0, "Redis was never seen down: the fault did not bite"
    for worker in run.workers:
        after = [t for t in worker["ok_claim_times"] if t > back_up[0]]
        calls = [t for t in worker["claim_call_ok_times"] if t > back_up[0]]
        assert calls, f"{worker['worker']} never completed a claim call after the restart"
        print(f"{worker['worker']}: {len(after)} claims after Redis came back")


def test_workload_with_no_shared_redis_state_relies_on_sql_alone(
        mailbox: Mailbox, database_url: str, private_redis: EmbeddedRedis, namespace: str,
        tmp_path: Path) -> None:
    """Each process gets its own namespace, so none sees the others' leases or epochs: a
    permanent split brain of the coordination layer. SQL alone must keep the invariants."""
    cfg = WorkloadConfig(database_url, private_redis.url, namespace, THREADS, 4.0,
                         str(tmp_path), lease_ms=2_000, seed=4, split_namespaces=True)
    run = run_workload(cfg, workers=4)
    flushall(private_redis)  # the sampler's namespace cached epochs no interrupt ever raised
    with Mailbox.connect(database_url, private_redis.url, namespace=namespace) as checker:
        summary = check_workload(run, checker.store, cfg)
    print(f"\nsplit-redis summary ({database_url.split(':')[0]}): {summary}")
