"""The database or Redis goes away mid-operation (DESIGN.md §4, errors.py).

Contract under test: a store call whose backend is unreachable raises `StoreUnavailableError`
— never a raw SQLAlchemy / psycopg / sqlite3 / redis-py exception — and leaves no half-written
state behind (its transaction rolled back, its pending Redis lease released); once the backend
is back, the same store object works again.

PostgreSQL: the store talks to Postgres through a small TCP proxy owned by the test; cutting
the proxy drops every connection at once, exactly between two statements of the operation
(right before its last write statement) or right before its COMMIT.
SQLite: another connection holds the write lock (BEGIN IMMEDIATE) longer than a short busy
timeout.
Redis: `private_redis` is stopped or killed, before the operation or in its middle.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from mailbox import (
    DispatchStatus,
    Mailbox,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    StoreUnavailableError,
    Termination,
)
from mailbox.coordination import Coordinator, Lease, connect_redis
from mailbox.database import create_engine
from mailbox.dev.embedded_redis import EmbeddedRedis, free_port
from mailbox.schema import thread_epochs
from mailbox.store import MailboxStore

BACKENDS = [b.strip() for b in os.environ.get("MAILBOX_TEST_BACKENDS", "sqlite,postgres"
                                              ).split(",") if b.strip()]
T = "t-fault"


def only(backend: str) -> pytest.MarkDecorator:
    """Run a test on one backend only (it overrides the conftest's database_url params)."""
    marks = () if backend in BACKENDS else (
        pytest.mark.skip(reason=f"{backend} not in MAILBOX_TEST_BACKENDS"),)
    return pytest.mark.parametrize("database_url", [pytest.param(backend, marks=marks)],
                                   indirect=True)


# ================================================================================ TCP proxy
class TcpProxy:
    """127.0.0.1:<port> → target, one pair of pump threads per connection. `cut()` closes
    the listener and every live connection (both sides) at once; `restore()` listens again
    on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._running = threading.Event()

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        self._running.set()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()
        return self

    restore = start

    def _accept(self, listener: socket.socket) -> None:
        while self._running.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and drop every open one, on both sides."""
        self._running.clear()
        if self._acceptor is not None:
            self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = cut


def proxied_url(database_url: str, port: int) -> str:
    """The same database (and its `options=-csearch_path=…` schema) through the proxy."""
    return make_url(database_url).set(host="127.0.0.1", port=port).render_as_string(
        hide_password=False)


@contextmanager
def before_statement(engine: sa.Engine, prefix: str, action: Callable[[], None]
                     ) -> Iterator[list[str]]:
    """Run `action` once, right before the first statement that starts with `prefix`."""
    fired: list[str] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not fired and statement.lstrip().upper().startswith(prefix):
            fired.append(statement)
            action()

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(engine, "before_cursor_execute", hook)


@contextmanager
def before_commit(engine: sa.Engine, action: Callable[[], None]) -> Iterator[list[str]]:
    """Run `action` once, right before the first COMMIT (every statement already ran)."""
    fired: list[str] = []

    def hook(_conn: Any) -> None:
        if not fired:
            fired.append("COMMIT")
            action()

    event.listen(engine, "commit", hook)
    try:
        yield fired
    finally:
        event.remove(engine, "commit", hook)


# ==================================================================== the operations under test
def queued(dispatch_id: str, now: int = 1000) -> RunDispatch:
    return RunDispatch.queued(dispatch_id, T, f"run-{dispatch_id}", now)


Ctx = dict[str, Any]


def _two_queued(store: MailboxStore) -> Ctx:
    store.enqueue(queued("d1"))
    store.enqueue(queued("d2"))
    return {}


def _one_claimed(store: MailboxStore) -> Ctx:
    _two_queued(store)
    [held] = store.claim(T, "holder", 1_000, 1000)
    return {"token": held.claim_token}


def _one_cancelled(store: MailboxStore) -> Ctx:
    store.enqueue(queued("d1"))
    store.cancel("d1", 1100)
    return {}


def _status(store: MailboxStore, dispatch_id: str) -> DispatchStatus | None:
    found = store.load_dispatch(dispatch_id)
    return None if found is None else found.status


@dataclass(frozen=True)
class Case:
    """One store operation: how to prepare for it, run it, where to cut it, and what a
    successful run (after the backend is back) must have done."""

    name: str
    setup: Callable[[MailboxStore], Ctx]
    run: Callable[[MailboxStore, Ctx], object]
    cut_at: str  # upper-case start of the operation's last write statement
    check: Callable[[MailboxStore, Ctx, object], None]


def _check_enqueued(s: MailboxStore, _c: Ctx, _r: object) -> None:
    assert _status(s, "d1") == DispatchStatus.Queued and s.sql_epoch(T) == 0


def _check_claimed(s: MailboxStore, _c: Ctx, r: object) -> None:
    assert isinstance(r, list) and [d.dispatch_id for d in r] == ["d1"]
    assert s.coordinator.read_lease(T) == Lease(r[0].claim_token, "d1", 32_000, "c")


def _check_claimed_by_id(s: MailboxStore, _c: Ctx, r: object) -> None:
    assert isinstance(r, RunDispatch) and r.dispatch_id == "d2"
    assert _status(s, "d2") == DispatchStatus.Claimed


def _check_started(s: MailboxStore, _c: Ctx, _r: object) -> None:
    d1 = s.load_dispatch("d1")
    assert d1 is not None and d1.run_status == RunStatus.running


def _check_extended(s: MailboxStore, _c: Ctx, r: object) -> None:
    d1 = s.load_dispatch("d1")
    assert r is True and d1 is not None and d1.lease_until == 2000 + 5_000


def _check_result(s: MailboxStore, _c: Ctx, _r: object) -> None:
    d1 = s.load_dispatch("d1")
    assert d1 is not None and d1.run_response == "done" and d1.completed_at == 2000


def _check_acked(s: MailboxStore, _c: Ctx, _r: object) -> None:
    assert _status(s, "d1") == DispatchStatus.Acked
    assert s.coordinator.read_lease(T) is None  # released


def _check_nacked(s: MailboxStore, _c: Ctx, _r: object) -> None:
    d1 = s.load_dispatch("d1")
    assert d1 is not None and d1.status == DispatchStatus.Queued and d1.attempt_count == 1


def _check_dead(s: MailboxStore, _c: Ctx, _r: object) -> None:
    assert _status(s, "d1") == DispatchStatus.DeadLetter


def _check_superseded(s: MailboxStore, _c: Ctx, r: object) -> None:
    assert isinstance(r, RunDispatch) and r.status == DispatchStatus.Superseded
    assert _status(s, "d1") == DispatchStatus.Superseded


def _check_cancelled(s: MailboxStore, _c: Ctx, _r: object) -> None:
    assert _status(s, "d2") == DispatchStatus.Cancelled


def _check_interrupted(s: MailboxStore, _c: Ctx, r: object) -> None:
    assert getattr(r, "new_dispatch_epoch", None) == 1 and s.sql_epoch(T) == 1
    assert _status(s, "d2") == DispatchStatus.Superseded
    assert _status(s, "d1") == DispatchStatus.Claimed


def _check_reclaimed(s: MailboxStore, _c: Ctx, r: object) -> None:
    assert isinstance(r, list) and [d.dispatch_id for d in r] == ["d1"]
    d1 = s.load_dispatch("d1")
    assert d1 is not None and d1.status == DispatchStatus.Queued and d1.attempt_count == 1


def _check_purged(s: MailboxStore, _c: Ctx, r: object) -> None:
    assert r == 1 and s.load_dispatch("d1") is None


UPDATE = "UPDATE RUN_DISPATCHES"
CASES = [
    # A new thread: the epoch row is inserted first, then the dispatch; cut before the latter.
    Case("enqueue", lambda s: {}, lambda s, c: s.enqueue(queued("d1")),
         "INSERT INTO RUN_DISPATCHES", _check_enqueued),
    Case("claim", _two_queued, lambda s, c: s.claim(T, "c", 30_000, 2000), UPDATE,
         _check_claimed),
    Case("claim_dispatch", _two_queued, lambda s, c: s.claim_dispatch("d2", "c", 30_000, 2000),
         UPDATE, _check_claimed_by_id),
    Case("record_dispatch_start", _one_claimed,
         lambda s, c: s.record_dispatch_start("d1", c["token"], "inst", 2000), UPDATE,
         _check_started),
    Case("extend_lease", _one_claimed, lambda s, c: s.extend_lease("d1", c["token"], 5_000, 2000),
         UPDATE, _check_extended),
    Case("record_run_result", _one_claimed,
         lambda s, c: s.record_run_result("d1", c["token"], RunDispatchResult(
             "run-d1", "inst", RunStatus.done, Termination.natural_end(), response="done"),
             2000), UPDATE, _check_result),
    Case("ack", _one_claimed, lambda s, c: s.ack("d1", c["token"], 2000), UPDATE, _check_acked),
    Case("nack", _one_claimed, lambda s, c: s.nack("d1", c["token"], 3000, "boom", 2000), UPDATE,
         _check_nacked),
    Case("dead_letter", _one_claimed, lambda s, c: s.dead_letter("d1", c["token"], "x", 2000),
         UPDATE, _check_dead),
    Case("supersede_claimed", _one_claimed,
         lambda s, c: s.supersede_claimed("d1", c["token"], 2000, "gave up"), UPDATE,
         _check_superseded),
    Case("cancel", _one_claimed, lambda s, c: s.cancel("d2", 2000), UPDATE, _check_cancelled),
    # The epoch UPDATE runs first, then the Queued dispatches are superseded: cut before that.
    Case("interrupt", _one_claimed, lambda s, c: s.interrupt(T, 2000), UPDATE,
         _check_interrupted),
    Case("reclaim_expired_leases", _one_claimed,
         lambda s, c: s.reclaim_expired_leases(5_000, 10), UPDATE, _check_reclaimed),
    Case("purge_terminal", _one_cancelled, lambda s, c: s.purge_terminal(10**12),
         "DELETE FROM RUN_DISPATCHES", _check_purged),
]
CASE_IDS = [c.name for c in CASES]


def snapshot(store: MailboxStore) -> dict[str, Any]:
    """Everything an operation on thread T could have touched: its rows, its raw epoch row
    (does it even exist?), its Redis lease and its cached epoch."""
    with store.engine.connect() as conn:
        epoch_rows = conn.execute(sa.select(thread_epochs).where(
            thread_epochs.c.thread_id == T)).all()
    return {
        "dispatches": {d.dispatch_id: d for d in store.list_dispatches(T)},
        "epoch_rows": [tuple(r) for r in epoch_rows],
        "lease": store.coordinator.read_lease(T),
        "cached_epoch": store.coordinator.cached_epoch(T),
    }


# ======================================================================= PostgreSQL: cut proxy
@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    try:
        yield proxy
    finally:
        proxy.close()


@only("postgres")
@pytest.mark.parametrize("when", ["statement", "commit"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_postgres_connection_cut_mid_operation(
        case: Case, when: str, make_mailbox: Callable[..., Mailbox], database_url: str,
        redis_url: str, namespace: str, pg_proxy: TcpProxy) -> None:
    """Every connection to Postgres drops in the middle of the operation (before its last
    write statement, or before its COMMIT): StoreUnavailableError, nothing written; after
    the proxy is back the same store performs the operation."""
    truth = make_mailbox().store  # direct connection: creates the schema, reads the truth
    ctx = case.setup(truth)
    with Mailbox.connect(proxied_url(database_url, pg_proxy.port), redis_url,
                         namespace=namespace) as box:
        store = box.store
        before = snapshot(truth)
        hook = (before_commit(store.engine, pg_proxy.cut) if when == "commit"
                else before_statement(store.engine, case.cut_at, pg_proxy.cut))
        with hook as fired, pytest.raises(StoreUnavailableError):
            case.run(store, ctx)
        assert fired, f"the cut point {case.cut_at!r} / {when} was never reached"
        assert snapshot(truth) == before, "a failed operation left a trace"

        # Down for good: the next attempt fails the same way, quickly and cleanly.
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            case.run(store, ctx)
        assert time.monotonic() - started < 10
        assert snapshot(truth) == before

        pg_proxy.restore()
        result = case.run(store, ctx)
        case.check(truth, ctx, result)


@only("postgres")
def test_postgres_connections_are_pinged_only_after_sitting_idle(
        database_url: str, pg_proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ping for a connection used moments ago (the round trip pre-ping would add to every
    transaction); one that sat idle past PING_AFTER_IDLE_S is pinged, so a server that
    dropped it meanwhile costs nobody an error."""
    from mailbox import database

    engine = create_engine(proxied_url(database_url, pg_proxy.port))
    try:
        def select_one() -> object:
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT 1")).scalar()

        monkeypatch.setattr(database, "PING_AFTER_IDLE_S", 3600.0)
        assert select_one() == 1
        pg_proxy.cut()
        pg_proxy.restore()
        with pytest.raises(sa.exc.OperationalError):  # warm: used as it is, not pinged
            select_one()
        assert select_one() == 1, "the dead connection was replaced after the error"

        monkeypatch.setattr(database, "PING_AFTER_IDLE_S", 0.0)
        pg_proxy.cut()
        pg_proxy.restore()
        assert select_one() == 1, "idle: pinged, found dead and replaced before use"
    finally:
        engine.dispose()


READS: list[tuple[str, Callable[[MailboxStore], object]]] = [
    ("load_dispatch", lambda s: s.load_dispatch("d1")),
    ("list_dispatches", lambda s: s.list_dispatches(T)),
    ("count_dispatches_by_status", lambda s: s.count_dispatches_by_status(
        DispatchStatus.Queued)),
    ("list_terminal_dispatches", lambda s: s.list_terminal_dispatches(10)),
    ("queued_thread_ids", lambda s: s.queued_thread_ids()),
    # a thread id never seen before, so the epoch is not in the Redis cache yet
    ("current_dispatch_epoch", lambda s: s.current_dispatch_epoch(f"new-{uuid.uuid4()}")),
    ("sql_epoch", lambda s: s.sql_epoch(T)),
    ("claimed_per_thread", lambda s: s.claimed_per_thread()),
    ("counts_by_status", lambda s: s.counts_by_status()),
]


@only("postgres")
@pytest.mark.parametrize("read", READS, ids=[name for name, _ in READS])
def test_postgres_down_every_public_read_raises_store_unavailable(
        read: tuple[str, Callable[[MailboxStore], object]], make_mailbox: Callable[..., Mailbox],
        database_url: str, redis_url: str, namespace: str, pg_proxy: TcpProxy) -> None:
    """errors.py: driver exceptions never escape the store. That includes every public read
    of MailboxStore, not only the decorated operations."""
    _two_queued(make_mailbox().store)
    with Mailbox.connect(proxied_url(database_url, pg_proxy.port), redis_url,
                         namespace=namespace) as box:
        name, call = read
        expected = call(box.store)  # warm: a pooled connection through the proxy
        pg_proxy.cut()
        try:
            call(box.store)
        except StoreUnavailableError:
            pass
        except Exception as exc:
            pytest.fail(f"{name} with the database down raised {type(exc).__module__}."
                        f"{type(exc).__name__} instead of StoreUnavailableError: {exc}")
        else:
            pytest.fail(f"{name} returned with the database down")
        pg_proxy.restore()
        assert call(box.store) == expected


# =========================================================================== SQLite: locked
@only("sqlite")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sqlite_write_lock_held_past_the_busy_timeout(
        case: Case, make_mailbox: Callable[..., Mailbox], database_url: str, redis_url: str,
        namespace: str) -> None:
    """Another connection holds the write lock longer than the store's busy timeout:
    StoreUnavailableError, nothing written (and no pending lease left in Redis); once the
    lock is gone the same store performs the operation."""
    truth = make_mailbox().store
    engine = create_engine(database_url)

    @event.listens_for(engine, "connect")
    def _short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        # Runs after the store's own connect hook (which sets 30 s): wait 200 ms only.
        dbapi_connection.execute("PRAGMA busy_timeout=200")

    store = MailboxStore(engine, Coordinator(connect_redis(redis_url), namespace))
    try:
        ctx = case.setup(truth)
        before = snapshot(truth)
        path = make_url(database_url).database
        assert path
        locker = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            locker.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                case.run(store, ctx)
            assert time.monotonic() - started < 5, "the short busy timeout was not used"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert snapshot(truth) == before, "a failed operation left a trace"
        result = case.run(store, ctx)
        case.check(truth, ctx, result)
    finally:
        store.coordinator.client.close()
        engine.dispose()


# =============================================================================== Redis down
def test_redis_down_claim_raises_store_unavailable_and_sql_is_unchanged(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    store = make_mailbox(private_redis.url).store
    _two_queued(store)
    rows = {d.dispatch_id: d for d in store.list_dispatches(T)}
    private_redis.stop()
    with pytest.raises(StoreUnavailableError):
        store.claim(T, "c", 30_000, 2000)
    with pytest.raises(StoreUnavailableError):
        store.claim_dispatch("d2", "c", 30_000, 2000)
    assert {d.dispatch_id: d for d in store.list_dispatches(T)} == rows
    # The epoch read goes to Redis first: it may fail as unavailable, never answer wrongly.
    with suppress(StoreUnavailableError):
        assert store.current_dispatch_epoch(T) == store.sql_epoch(T)

    private_redis.start()  # back, and empty
    [claimed] = store.claim(T, "c", 30_000, 2100)
    assert claimed.dispatch_id == "d1"
    assert store.coordinator.read_lease(T) == Lease(claimed.claim_token or "", "d1", 32_100, "c")


def test_redis_dead_after_the_claim_fenced_writes_still_commit_in_sql(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    """Documented behaviour: the fenced writes (start, extend, ack, nack …) and interrupt are
    SQL transactions; their Redis updates (release the lease, refresh it, raise the cached
    epoch) come after the commit and are best effort. So with Redis dead they SUCCEED in
    SQL — they do not raise StoreUnavailableError — and the stale Redis copy is repaired
    (or simply expires) later."""
    store = make_mailbox(private_redis.url).store
    _two_queued(store)
    [held] = store.claim(T, "holder", 30_000, 1000)
    token = held.claim_token or ""
    private_redis.kill()

    store.record_dispatch_start("d1", token, "inst", 1100)
    assert store.extend_lease("d1", token, 30_000, 1200) is True
    store.ack("d1", token, 1300)
    d1 = store.load_dispatch("d1")
    assert d1 is not None and d1.status == DispatchStatus.Acked and d1.completed_at == 1300
    assert store.interrupt(T, 1400).new_dispatch_epoch == 1
    assert store.sql_epoch(T) == 1
    assert _status(store, "d2") == DispatchStatus.Superseded

    private_redis.start()  # empty: the epoch comes back from SQL, the thread is free
    assert store.current_dispatch_epoch(T) == 1
    store.enqueue(queued("d3", now=1500))
    [nxt] = store.claim(T, "c", 30_000, 1600)
    assert nxt.dispatch_id == "d3" and nxt.dispatch_epoch == 1


def test_redis_dies_between_the_sql_claim_and_the_lease_bind(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    """Redis is killed while the claim is in SQL (after the pending lease was taken, before
    it is bound to the dispatch). Documented behaviour: the SQL claim is the truth, so the
    claim RETURNS the dispatch; the missing lease is rebuilt from the Claimed row by the next
    claimer once Redis is back, and nobody else gets the thread meanwhile."""
    store = make_mailbox(private_redis.url).store
    other = make_mailbox(private_redis.url).store
    _two_queued(store)
    with before_statement(store.engine, UPDATE, private_redis.kill) as fired:
        [held] = store.claim(T, "holder", 30_000, 1000)
    assert fired and held.dispatch_id == "d1" and held.claim_token
    assert _status(store, "d1") == DispatchStatus.Claimed

    with pytest.raises(StoreUnavailableError):
        other.claim(T, "other", 30_000, 1100)
    private_redis.start()
    assert other.claim(T, "other", 30_000, 1200) == []
    assert other.claim_dispatch("d2", "other", 30_000, 1200) is None
    assert other.coordinator.read_lease(T) == Lease(held.claim_token, "d1", 31_000, "holder")
    store.ack("d1", held.claim_token, 1300)
    [nxt] = other.claim(T, "other", 30_000, 1400)
    assert nxt.dispatch_id == "d2"
    assert store.claimed_per_thread() == {}
