"""Garbage collection of 100k rows does not stall live work (docs/behaviour.md#gc).

100,000 old Acked dispatches with their done runs and input messages, on 1,000 threads, are
bulk-inserted with SQLAlchemy Core. Garbage collection then runs in one thread (its own
Mailbox: its own engine, pool and writers' gate, as in another process) while another thread
submits, claims and acks live work on a thread of its own. On SQLite every transaction takes
the database's one write lock, so one long DELETE would hold every claim behind it: the test
asserts that no claim waited longer than a generous bound, that garbage collection committed
many short transactions, and that it deleted everything it should. (Measured here on a busy
two-core machine: GC 31 s in 1,601 write transactions, the longest 118 ms, median 0.5 ms;
1,401 live claims meanwhile, the longest wait 206 ms.)
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from mailbox import Mailbox, RunDispatch
from mailbox.database import READ_ONLY
from mailbox.maintenance import GcReport, garbage_collection
from mailbox.runtime import now_ms
from mailbox.schema import dispatches, messages, runs, thread_epochs
from tests.support.racers import race

ROWS = 100_000
THREADS = 1_000
MAX_CLAIM_WAIT_S = 2.0
MAX_TRANSACTION_S = 1.0
DAY_MS = 24 * 3600 * 1000


def _bulk_insert(box: Mailbox, old: int) -> None:
    """ROWS Acked dispatches, done runs and input messages, last changed 60 days ago."""
    with box.store.engine.begin() as conn:
        conn.execute(thread_epochs.insert(), [
            {"thread_id": f"old-{t:04d}", "current_epoch": 3} for t in range(THREADS)])
        for start in range(0, ROWS, 10_000):
            ids = range(start, min(ROWS, start + 10_000))
            conn.execute(runs.insert(), [
                {"run_id": f"run-{i:06d}", "thread_id": f"old-{i % THREADS:04d}",
                 "agent_id": "echo", "resolution_id": "echo@1", "status": "done",
                 "termination": {"type": "natural_end"}, "response": "hi",
                 "dispatch_id": f"d-{i:06d}", "created_at": old, "updated_at": old,
                 "finished_at": old} for i in ids])
            conn.execute(messages.insert(), [
                {"thread_id": f"old-{i % THREADS:04d}", "seq": i // THREADS + 1,
                 "message_id": f"m-{i:06d}", "run_id": f"run-{i:06d}", "role": "user",
                 "content": "hi", "created_at": old} for i in ids])
            conn.execute(dispatches.insert(), [
                {"dispatch_id": f"d-{i:06d}", "thread_id": f"old-{i % THREADS:04d}",
                 "run_id": f"run-{i:06d}", "priority": 128, "dedupe_key": None,
                 "dispatch_epoch": 3, "status": "Acked", "available_at": old,
                 "attempt_count": 0, "max_attempts": 5, "last_error": None,
                 "claim_token": None, "claimed_by": None, "lease_until": None,
                 "dispatch_instance_id": f"i-{i:06d}", "run_status": "done",
                 "termination": {"type": "natural_end"}, "run_response": "hi",
                 "run_error": None, "completed_at": old, "created_at": old,
                 "updated_at": old} for i in ids])


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class TransactionClock:
    """Counts the write transactions an engine commits and how long each held it (on SQLite:
    the write lock, BEGIN IMMEDIATE to COMMIT)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.durations: list[float] = []
        self._started: dict[int, float] = {}

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            if not conn.get_execution_options().get(READ_ONLY):
                self._started[id(conn)] = time.perf_counter()

        @sa.event.listens_for(engine, "commit")
        def _commit(conn: sa.Connection) -> None:
            started = self._started.pop(id(conn), None)
            if started is not None:
                self.durations.append(time.perf_counter() - started)


def _live_work(box: Mailbox, stop: threading.Event, waits: dict[str, list[float]]) -> None:
    """Submit, claim and ack on a thread of its own until stopped; every call timed."""
    store, n = box.store, 0
    while not stop.is_set():
        n += 1
        now = now_ms()
        started = time.perf_counter()
        store.enqueue(RunDispatch.queued(f"live-{n}", "live", f"live-run-{n}", now))
        claimed_at = time.perf_counter()
        [claimed] = store.claim("live", "live-worker", 30_000, now)
        acked_at = time.perf_counter()
        store.ack(claimed.dispatch_id, claimed.claim_token or "", now)
        finished = time.perf_counter()
        waits["enqueue"].append(claimed_at - started)
        waits["claim"].append(acked_at - claimed_at)
        waits["ack"].append(finished - acked_at)
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.serial
def test_gc_of_100k_rows_does_not_stall_claims(make_mailbox: Callable[..., Mailbox],
                                               database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        # PostgreSQL locks rows, not the database: GC's deletes never wait for or hold up a
        # claim of another thread. Measured once: GC of the same 100k rows 45 s, claims of
        # live work at most 120 ms meanwhile; not worth a minute of every PostgreSQL run.
        pytest.skip("the write lock that GC could hold up is SQLite's")
    gc_box, live_box = make_mailbox(), make_mailbox()
    now = now_ms()
    _bulk_insert(gc_box, now - 60 * DAY_MS)
    clock = TransactionClock(gc_box.store.engine)
    waits: dict[str, list[float]] = {"enqueue": [], "claim": [], "ack": []}
    stop = threading.Event()
    reports: list[GcReport] = []
    started = time.perf_counter()

    def collect() -> None:
        try:
            reports.append(garbage_collection(gc_box.runtime(), now))
        finally:
            stop.set()

    race(collect, lambda: _live_work(live_box, stop, waits), timeout_s=300)
    elapsed = time.perf_counter() - started
    [report] = reports
    claims = waits["claim"]
    summary = (f"GC {elapsed:.1f}s: {report}; {len(clock.durations)} write transactions, "
               f"longest {max(clock.durations) * 1000:.0f} ms, median "
               f"{statistics.median(clock.durations) * 1000:.1f} ms; {len(claims)} live "
               f"claims: " + ", ".join(
                   f"{name} p50 {_ms(statistics.median(w))} p99 "
                   f"{_ms(statistics.quantiles(w, n=100)[98])} max {_ms(max(w))}"
                   for name, w in waits.items()))
    print(summary)
    assert (report.dispatches, report.runs, report.messages, report.threads) == (
        ROWS, ROWS, ROWS, THREADS), summary
    assert len(clock.durations) >= ROWS // 500 * 3, "many short transactions: " + summary
    assert max(clock.durations) < MAX_TRANSACTION_S, summary
    assert len(claims) >= 20, "live work went on meanwhile: " + summary
    assert max(claims) < MAX_CLAIM_WAIT_S, summary
    assert max(waits["ack"]) < MAX_CLAIM_WAIT_S, summary
    with gc_box.store.engine.connect() as conn:
        left = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t).where(
            t.c.thread_id != "live")).scalar_one()
            for t in (dispatches, runs, messages, thread_epochs)}
    assert set(left.values()) == {0}, left
    assert gc_box.store.list_dispatches("live", limit=1), "live work is kept"
