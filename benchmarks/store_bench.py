"""Benchmark of `MailboxStore` on SQLite and PostgreSQL, with Redis for leases and epochs.

Run from the project root:

    python -m benchmarks.store_bench                      # full run (< 10 min on 2 cores)
    python -m benchmarks.store_bench --quick              # smoke run (< 1 min)
    python -m benchmarks.store_bench --backends sqlite --sizes 1000,10000

Per backend it measures, in one process and sequentially:

1. throughput and per-operation latency of `enqueue`, a full claim→ack cycle and
   `extend_lease`;
2. claim latency with 1k / 10k / 100k queued dispatches spread over threads (10 per thread),
   each measured claim followed by an ack and a replacement enqueue so the backlog stays the
   same size; the backlog itself is bulk-loaded with SQLAlchemy Core (rows built by the model
   and the store's own row mapping), which is much faster than calling `enqueue` 100k times;
3. SQL statements (the engine's `before_cursor_execute`, so SQLite's explicit BEGIN IMMEDIATE
   is counted; psycopg's implicit BEGIN and the DBAPI-level COMMIT are not, they are counted
   as transactions), pool checkouts (a PostgreSQL connection idle a second or more is
   pinged first: `mailbox.database.PING_AFTER_IDLE_S`; none is in these loops) and Redis
   round trips (`Coordinator.round_trips`) per operation.

4. claim latency on a thread that already holds 0 / 1k / 10k acked dispatches (terminal rows
   stay until purge), in the largest backlog database.

At the largest backlog and the longest history it also records the query plans of the
statements one claim issues (on PostgreSQL also the generic plan a prepared statement gets:
psycopg prepares a statement after 5 executions on a connection). The backlog sizes (and the
history sizes) are measured interleaved, so load from other processes hits them alike.

Services: SQLite is a file in a temporary directory. PostgreSQL comes from
MAILBOX_BENCH_POSTGRES_URL or MAILBOX_TEST_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/test); every database the benchmark uses is a fresh
schema, dropped afterwards; an unreachable server is skipped with a note. Redis comes from
MAILBOX_REDIS_URL or MAILBOX_TEST_REDIS_URL, else an embedded redis-server started here; keys
live under a unique namespace and are deleted afterwards.

Results: a table on stdout while running, then `<out>/store.json` and `<out>/store.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy import event

from benchmarks.common import (
    Services,
    delete_keys,
    fresh_database,
    load_average,
    machine_facts,
    percentile,
    say,
    start_redis,
)
from benchmarks.common import table as markdown_table
from mailbox.facade import Mailbox
from mailbox.model import RunDispatch
from mailbox.schema import dispatches, thread_epochs
from mailbox.store import MailboxStore
from mailbox.store.statements import dispatch_row

CLAIM_RATIO_GOAL = 1.5
LEASE_MS = 30_000
CONSUMER = "bench-worker"
LOAD_CHUNK = 5_000


# ============================================================================ configuration
@dataclass(frozen=True)
class Config:
    backends: tuple[str, ...]
    sizes: tuple[int, ...]
    quick: bool
    out: Path
    ops: int  # enqueues, claim→ack cycles and lease extensions, each
    busy_ops: int  # claims refused by a live Redis lease
    samples: int  # measured claims per backlog size
    warmup: int
    per_thread: int
    seed: int
    history: tuple[int, ...]  # acked rows of one thread, for the thread-history test
    history_samples: int

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Config:
        parser = argparse.ArgumentParser(
            prog="python -m benchmarks.store_bench",
            description="Benchmark the mailbox store on SQLite and PostgreSQL.")
        parser.add_argument("--backends", default="sqlite,postgres",
                            help="comma-separated: sqlite, postgres (default: both)")
        parser.add_argument("--sizes", default=None,
                            help="backlog sizes for the claim-latency phase "
                                 "(default 1000,10000,100000; --quick: 1000,10000)")
        parser.add_argument("--quick", action="store_true",
                            help="smoke run: few operations, small backlogs (< 1 minute)")
        parser.add_argument("--out", default="benchmarks/results", type=Path,
                            help="directory for store.json and store.md")
        parser.add_argument("--ops", type=int, default=None,
                            help="operations per throughput test (default 2000; quick 200)")
        parser.add_argument("--samples", type=int, default=None,
                            help="measured claims per backlog size (default 500; quick 100)")
        parser.add_argument("--per-thread", type=int, default=10,
                            help="queued dispatches per thread in the backlog (default 10)")
        parser.add_argument("--history", default=None,
                            help="acked dispatches already in one thread's history, for the "
                                 "history test (default 0,1000,10000; quick 0,1000; "
                                 "'none' skips it)")
        parser.add_argument("--seed", type=int, default=1234)
        args = parser.parse_args(argv)
        backends = tuple(b.strip() for b in str(args.backends).split(",") if b.strip())
        unknown = set(backends) - {"sqlite", "postgres"}
        if unknown or not backends:
            parser.error(f"unknown backends: {', '.join(sorted(unknown)) or '(none)'}")
        quick = bool(args.quick)
        raw_sizes = args.sizes or ("1000,10000" if quick else "1000,10000,100000")
        try:
            sizes = tuple(sorted({int(s) for s in str(raw_sizes).split(",") if s.strip()}))
        except ValueError:
            parser.error(f"--sizes must be integers, got {raw_sizes!r}")
        per_thread = int(args.per_thread)
        if per_thread < 1 or not sizes or min(sizes) < per_thread:
            parser.error("--sizes must be at least --per-thread, which must be positive")
        raw_history = args.history or ("0,1000" if quick else "0,1000,10000")
        try:
            history = () if raw_history == "none" else tuple(sorted(
                {int(h) for h in str(raw_history).split(",") if h.strip()}))
        except ValueError:
            parser.error(f"--history must be integers or 'none', got {raw_history!r}")
        if any(h < 0 for h in history):
            parser.error("--history sizes must not be negative")
        ops = int(args.ops) if args.ops is not None else (200 if quick else 2000)
        samples = int(args.samples) if args.samples is not None else (100 if quick else 500)
        if ops < 10 or samples < 10:
            parser.error("--ops and --samples must be at least 10")
        return cls(backends=backends, sizes=sizes, quick=quick, out=Path(args.out), ops=ops,
                   busy_ops=200 if quick else 1000, samples=samples,
                   warmup=10 if quick else 25, per_thread=per_thread, seed=int(args.seed),
                   history=history, history_samples=50 if quick else 150)


# ================================================================================ counting
@dataclass
class Counts:
    statements: int = 0  # cursor executes seen by SQLAlchemy (SQLite's BEGIN IMMEDIATE too)
    begin_commit_statements: int = 0  # of those, explicit BEGIN/COMMIT/ROLLBACK text
    transactions: int = 0  # SQLAlchemy "begin" events
    commits: int = 0
    rollbacks: int = 0
    checkouts: int = 0  # pool checkouts (PostgreSQL pings only connections idle >= 1 s)
    redis: int = 0  # Coordinator.round_trips

    def minus(self, other: Counts) -> Counts:
        return Counts(**{k: v - getattr(other, k) for k, v in asdict(self).items()})

    def plus(self, other: Counts) -> Counts:
        return Counts(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


class Meter:
    """Counts what the store sends to SQL and Redis; optionally captures the SQL text."""

    def __init__(self, store: MailboxStore) -> None:
        self.store = store
        self.counts = Counts()
        self.captured: list[tuple[str, Any]] | None = None
        engine = store.engine
        event.listen(engine, "before_cursor_execute", self._on_execute)
        event.listen(engine, "begin", self._on_begin)
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine, "rollback", self._on_rollback)
        event.listen(engine.pool, "checkout", self._on_checkout)

    def _on_execute(self, _conn: sa.Connection, _cursor: Any, statement: str, parameters: Any,
                    _context: Any, _executemany: bool) -> None:
        self.counts.statements += 1
        head = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        if head in ("BEGIN", "COMMIT", "ROLLBACK", "END"):
            self.counts.begin_commit_statements += 1
        if self.captured is not None:
            self.captured.append((statement, parameters))

    def _on_begin(self, _conn: sa.Connection) -> None:
        self.counts.transactions += 1

    def _on_commit(self, _conn: sa.Connection) -> None:
        self.counts.commits += 1

    def _on_rollback(self, _conn: sa.Connection) -> None:
        self.counts.rollbacks += 1

    def _on_checkout(self, *_args: Any) -> None:
        self.counts.checkouts += 1

    def snapshot(self) -> Counts:
        c = Counts(**asdict(self.counts))
        c.redis = self.store.coordinator.round_trips
        return c


# ================================================================================ statistics
def latency_stats(durations_s: Sequence[float], wall_s: float | None = None,
                  cpu_s: float | None = None) -> dict[str, Any]:
    """Latency summary; `cpu_s` is this process's CPU time over the loop (client side:
    SQLAlchemy, drivers, redis-py; not the servers'), much less sensitive to other load."""
    values = sorted(durations_s)
    total = wall_s if wall_s is not None else sum(values)
    n = len(values)
    return {
        "n": n,
        "total_s": round(total, 4),
        "ops_per_s": round(n / total, 1) if total > 0 else None,
        "mean_ms": round(1000 * sum(values) / n, 3) if n else None,
        "p50_ms": round(1000 * percentile(values, 50), 3),
        "p99_ms": round(1000 * percentile(values, 99), 3),
        "max_ms": round(1000 * values[-1], 3) if n else None,
        "client_cpu_ms": round(1000 * cpu_s / n, 3) if cpu_s is not None and n else None,
    }


def per_op(counts: Counts, n: int, postgres: bool) -> dict[str, Any]:
    """Average counts per operation, plus the estimated database round trips."""
    d = {k: round(v / n, 2) for k, v in asdict(counts).items()}
    if postgres:
        # psycopg sends BEGIN as its own command; COMMIT is another (no ping: the loops
        # reuse connections within a second, mailbox.database.PING_AFTER_IDLE_S).
        d["db_round_trips_est"] = round(
            (counts.statements + 2 * counts.commits + counts.rollbacks) / n, 2)
    else:
        d["db_round_trips_est"] = None  # in-process library: no network round trips
    return d


def now_ms() -> int:
    return int(time.time() * 1000)


# ================================================================================= services
@contextmanager
def open_mailbox(database_url: str, redis_url: str) -> Iterator[Mailbox]:
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    box = Mailbox.connect(database_url, redis_url, namespace=namespace)
    try:
        box.create_schema()
        yield box
    finally:
        try:
            delete_keys(box.store.coordinator.client, f"{namespace}:*", batch=1000)
        except redis.RedisError as exc:
            say(f"  (could not delete Redis keys of {namespace}: {exc})")
        box.close()


# ================================================================= phase 1: single operations
def bench_operations(box: Mailbox, cfg: Config, postgres: bool) -> dict[str, Any]:
    store = box.store
    meter = Meter(store)
    n = cfg.ops
    n_threads = max(1, n // cfg.per_thread)
    threads = [f"ops-t{j:05d}" for j in range(n_threads)]
    base = now_ms() - 60_000
    results: dict[str, Any] = {}
    counts: dict[str, Any] = {}

    # --- enqueue: round robin over threads, so the first pass creates the epoch rows
    durations: list[float] = []
    new_thread = Counts()
    old_thread = Counts()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        d = RunDispatch.queued(f"op-{i:07d}", threads[i % n_threads], f"run-{i:07d}",
                               base + i)
        before = meter.snapshot()
        start = time.perf_counter()
        store.enqueue(d)
        durations.append(time.perf_counter() - start)
        delta = meter.snapshot().minus(before)
        if i < n_threads:
            new_thread = new_thread.plus(delta)
        else:
            old_thread = old_thread.plus(delta)
    results["enqueue"] = latency_stats(durations, time.perf_counter() - wall,
                                      time.process_time() - cpu)
    counts["enqueue (new thread)"] = per_op(new_thread, n_threads, postgres)
    if n > n_threads:
        counts["enqueue (existing thread)"] = per_op(old_thread, n - n_threads, postgres)
    report_op("enqueue", results["enqueue"])

    # --- claim→ack cycles: consume what was enqueued, in thread round robin
    cycles: list[float] = []
    claims: list[float] = []
    acks: list[float] = []
    claim_counts = Counts()
    ack_counts = Counts()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        cycle = claim_and_ack(store, meter, threads[i % n_threads], f"cycle {i}")
        claims.append(cycle.claim_s)
        acks.append(cycle.ack_s)
        cycles.append(cycle.claim_s + cycle.ack_s)
        claim_counts = claim_counts.plus(cycle.claim_counts)
        ack_counts = ack_counts.plus(cycle.ack_counts)
    results["claim→ack cycle"] = latency_stats(cycles, time.perf_counter() - wall,
                                      time.process_time() - cpu)
    results["claim (in cycle)"] = latency_stats(claims)
    results["ack (in cycle)"] = latency_stats(acks)
    counts["claim→ack cycle"] = per_op(claim_counts.plus(ack_counts), n, postgres)
    counts["claim (success)"] = per_op(claim_counts, n, postgres)
    counts["ack"] = per_op(ack_counts, n, postgres)
    report_op("claim→ack cycle", results["claim→ack cycle"])

    # --- extend_lease: heartbeats over a few claimed dispatches
    holders = []
    for j in range(min(20, n_threads)):
        d = RunDispatch.queued(f"ext-{j:04d}", f"ext-t{j:04d}", f"ext-run-{j:04d}", base)
        store.enqueue(d)
        got = store.claim(d.thread_id, CONSUMER, LEASE_MS, now_ms())
        assert got and got[0].claim_token is not None
        holders.append(got[0])
    durations = []
    before = meter.snapshot()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        h = holders[i % len(holders)]
        token = h.claim_token or ""
        start = time.perf_counter()
        ok = store.extend_lease(h.dispatch_id, token, LEASE_MS, now_ms())
        durations.append(time.perf_counter() - start)
        if not ok:
            raise RuntimeError(f"extend_lease refused for {h.dispatch_id}")
    results["extend_lease"] = latency_stats(durations, time.perf_counter() - wall,
                                      time.process_time() - cpu)
    counts["extend_lease"] = per_op(meter.snapshot().minus(before), n, postgres)
    report_op("extend_lease", results["extend_lease"])

    # --- claims that find the thread busy (a live lease in Redis): no SQL expected
    busy = holders[0]
    durations = []
    before = meter.snapshot()
    cpu = time.process_time()
    for _ in range(cfg.busy_ops):
        start = time.perf_counter()
        got = store.claim(busy.thread_id, CONSUMER, LEASE_MS, now_ms())
        durations.append(time.perf_counter() - start)
        if got:
            raise RuntimeError("a busy thread was claimed twice")
    results["claim (busy thread)"] = latency_stats(durations, None, time.process_time() - cpu)
    counts["claim (busy thread, live lease)"] = per_op(meter.snapshot().minus(before),
                                                        cfg.busy_ops, postgres)
    report_op("claim (busy thread)", results["claim (busy thread)"])

    # --- busy thread whose Redis lease was lost: SQL finds the holder, Redis is rebuilt
    lost_n = max(10, cfg.busy_ops // 10)
    key = store.coordinator.lease_key(busy.thread_id)
    durations = []
    total = Counts()
    for _ in range(lost_n):
        store.coordinator.client.delete(key)
        before = meter.snapshot()
        start = time.perf_counter()
        got = store.claim(busy.thread_id, CONSUMER, LEASE_MS, now_ms())
        durations.append(time.perf_counter() - start)
        total = total.plus(meter.snapshot().minus(before))
        if got:
            raise RuntimeError("a busy thread was claimed twice after losing its lease")
    results["claim (busy, Redis lease lost)"] = latency_stats(durations)
    counts["claim (busy thread, Redis lease lost)"] = per_op(total, lost_n, postgres)

    # --- a known thread with nothing queued
    idle = threads[0]
    durations = []
    before = meter.snapshot()
    for _ in range(lost_n):
        start = time.perf_counter()
        got = store.claim(idle, CONSUMER, LEASE_MS, now_ms())
        durations.append(time.perf_counter() - start)
        if got:
            raise RuntimeError("an empty thread produced a claim")
    results["claim (empty thread)"] = latency_stats(durations)
    counts["claim (empty thread)"] = per_op(meter.snapshot().minus(before), lost_n, postgres)

    for h in holders:
        store.ack(h.dispatch_id, h.claim_token or "", now_ms())
    return {"operations": results, "counts": counts}


@dataclass
class Cycle:
    """One claim→ack of a thread's next dispatch: when, and each call's time and counts."""

    now: int
    claim_s: float
    ack_s: float
    claim_counts: Counts
    ack_counts: Counts


def claim_and_ack(store: MailboxStore, meter: Meter, thread: str, what: str) -> Cycle:
    """Claim the thread's next dispatch, then ack it; each call timed and counted alone."""
    now = now_ms()
    before = meter.snapshot()
    t0 = time.perf_counter()
    got = store.claim(thread, CONSUMER, LEASE_MS, now)
    t1 = time.perf_counter()
    mid = meter.snapshot()
    if not got:
        raise RuntimeError(f"claim on {thread} found nothing ({what})")
    token = got[0].claim_token
    assert token is not None
    t2 = time.perf_counter()
    store.ack(got[0].dispatch_id, token, now + 1)
    t3 = time.perf_counter()
    return Cycle(now, t1 - t0, t3 - t2, mid.minus(before), meter.snapshot().minus(mid))


def report_op(name: str, stats: dict[str, Any]) -> None:
    say(f"    {name:<28} n={stats['n']:>5}  {stats['ops_per_s']:>9.1f} ops/s  "
        f"p50 {stats['p50_ms']:>7.3f} ms  p99 {stats['p99_ms']:>7.3f} ms")


# ===================================================================== phase 2: claim latency
def bulk_load(store: MailboxStore, start: int, stop: int, per_thread: int, base: int,
              postgres: bool) -> int:
    """Insert dispatches [start, stop) as Queued rows (epoch 0) of threads i // per_thread,
    plus the missing epoch rows, with SQLAlchemy Core. Returns the number of threads."""
    first_thread = -(-start // per_thread)  # threads below this already have their epoch row
    last_thread = (stop - 1) // per_thread
    with store.engine.begin() as conn:
        for lo in range(start, stop, LOAD_CHUNK):
            rows = [
                dispatch_row(RunDispatch.queued(
                    f"bk-{i:08d}", f"bk-t{i // per_thread:07d}", f"bk-run-{i:08d}",
                    base + i).enqueued(0))
                for i in range(lo, min(stop, lo + LOAD_CHUNK))
            ]
            conn.execute(sa.insert(dispatches), rows)
        epoch_rows = [{"thread_id": f"bk-t{t:07d}", "current_epoch": 0}
                      for t in range(first_thread, last_thread + 1)]
        for lo in range(0, len(epoch_rows), LOAD_CHUNK):
            conn.execute(sa.insert(thread_epochs), epoch_rows[lo:lo + LOAD_CHUNK])
    if postgres:
        # What autovacuum would do soon after such a load; SQLite gets no ANALYZE, as in the
        # application (the store never runs it).
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE run_dispatches")
            conn.exec_driver_sql("ANALYZE thread_dispatch_epochs")
    return last_thread + 1


@dataclass
class Lane:
    """One measured configuration of an interleaved test: a store and the threads to claim."""

    label: int
    store: MailboxStore
    meter: Meter
    threads: list[str]
    load_s: float
    claims: list[float]
    acks: list[float]
    counts: Counts


def run_interleaved(lanes: Sequence[Lane], rounds: int, warmup: int, rng: random.Random,
                    prefix: str) -> None:
    """Claim (timed), ack (timed) and enqueue a replacement (untimed) once per lane per round,
    lanes in a fresh random order each round, so that noise from other processes on the
    machine lands on every lane alike instead of on whichever configuration ran last."""
    serial = 0
    order = list(lanes)
    for k in range(warmup + rounds):
        rng.shuffle(order)
        for lane in order:
            thread = rng.choice(lane.threads)
            cycle = claim_and_ack(lane.store, lane.meter, thread, f"{prefix} {lane.label}")
            serial += 1  # keep the thread's queue at the same length (not timed)
            lane.store.enqueue(RunDispatch.queued(f"{prefix}-rp-{serial:08d}", thread,
                                                  f"{prefix}-rprun-{serial:08d}", cycle.now))
            if k >= warmup:
                lane.claims.append(cycle.claim_s)
                lane.acks.append(cycle.ack_s)
                lane.counts = lane.counts.plus(cycle.claim_counts)


def bench_backlog(boxes: Sequence[tuple[int, Mailbox]], cfg: Config, postgres: bool,
                  backend: str) -> dict[str, Any]:
    """Claim latency with `size` queued dispatches, one fresh database per size."""
    rng = random.Random(cfg.seed)
    base = now_ms() - 86_400_000
    lanes: list[Lane] = []
    for size, box in boxes:
        started = time.perf_counter()
        n_threads = bulk_load(box.store, 0, size, cfg.per_thread, base, postgres)
        load_s = time.perf_counter() - started
        say(f"    backlog {size:>7} queued over {n_threads:>6} threads: loaded in "
            f"{load_s:.1f} s")
        lanes.append(Lane(size, box.store, Meter(box.store),
                          [f"bk-t{t:07d}" for t in range(n_threads)], load_s, [], [], Counts()))
    say(f"    measuring {cfg.samples} rounds over the {len(lanes)} backlogs, interleaved …")
    run_interleaved(lanes, cfg.samples, cfg.warmup, rng, "bk")
    rows: list[dict[str, Any]] = []
    for lane in lanes:
        claim_stats = latency_stats(lane.claims)
        ack_stats = latency_stats(lane.acks)
        rows.append({"queued": lane.label, "threads": len(lane.threads),
                     "load_s": round(lane.load_s, 2), "claim": claim_stats, "ack": ack_stats,
                     "claim_counts": per_op(lane.counts, len(lane.claims), postgres)})
        say(f"    backlog {lane.label:>7}: claim p50 {claim_stats['p50_ms']:.3f} ms  "
            f"p99 {claim_stats['p99_ms']:.3f} ms   ack p50 {ack_stats['p50_ms']:.3f} ms  "
            f"p99 {ack_stats['p99_ms']:.3f} ms")
    largest = lanes[-1]
    plans = explain_claim(largest.store, largest.meter, rng.choice(largest.threads), postgres)
    plans["queued"] = largest.label
    plans["backend"] = backend
    first, last = rows[0], rows[-1]
    ratio = (last["claim"]["p50_ms"] / first["claim"]["p50_ms"]
             if first["claim"]["p50_ms"] else math.nan)
    say(f"    p50({last['queued']})/p50({first['queued']}) = {ratio:.2f} "
        f"(goal ≤ {CLAIM_RATIO_GOAL}: {'met' if ratio <= CLAIM_RATIO_GOAL else 'NOT met'})")
    return {
        "sizes": rows,
        "ratio": {"p50_large_over_small": round(ratio, 3), "large": last["queued"],
                  "small": first["queued"], "goal": CLAIM_RATIO_GOAL,
                  "met": bool(ratio <= CLAIM_RATIO_GOAL)},
        "plans": plans,
    }


def bench_history(box: Mailbox, cfg: Config, postgres: bool, backend: str) -> dict[str, Any]:
    """Claim latency on a thread by the number of acked dispatches it already holds.

    Terminal rows stay until `purge_terminal` (retention: a day by default), so a busy
    thread can carry thousands of them; the claim's per-thread selects should not scan them.
    One thread per history size (each with `per_thread` queued dispatches), interleaved.
    """
    store = box.store
    base = now_ms() - 86_400_000
    started = time.perf_counter()
    with store.engine.begin() as conn:
        for size in cfg.history:
            thread = f"hist-t{size}"
            conn.execute(sa.insert(thread_epochs), [{"thread_id": thread, "current_epoch": 0}])
            conn.execute(sa.insert(dispatches), [
                dispatch_row(RunDispatch.queued(f"hist-{size}-q{j:04d}", thread,
                                           f"hist-{size}-qrun{j:04d}", base + j).enqueued(0))
                for j in range(cfg.per_thread)])
            for lo in range(0, size, LOAD_CHUNK):
                batch = []
                for i in range(lo, min(size, lo + LOAD_CHUNK)):
                    t = base - 1_000_000 + i
                    done = (RunDispatch.queued(f"hist-{size}-a{i:08d}", thread,
                                               f"hist-{size}-arun{i:08d}", t).enqueued(0)
                            .claimed(f"tok-{i}", CONSUMER, LEASE_MS, t).acked(t + 1))
                    batch.append(dispatch_row(done))
                conn.execute(sa.insert(dispatches), batch)
    if postgres:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE run_dispatches")
    say(f"    loaded {sum(cfg.history)} acked rows in {time.perf_counter() - started:.1f} s")
    meter = Meter(store)
    lanes = [Lane(size, store, meter, [f"hist-t{size}"], 0.0, [], [], Counts())
             for size in cfg.history]
    run_interleaved(lanes, cfg.history_samples, cfg.warmup, random.Random(cfg.seed + 1),
                    "hist")
    rows: list[dict[str, Any]] = []
    for lane in lanes:
        stats = latency_stats(lane.claims)
        rows.append({"acked_in_thread": lane.label, "claim": stats})
        say(f"    thread with {lane.label:>6} acked rows: claim p50 {stats['p50_ms']:.3f} ms  "
            f"p99 {stats['p99_ms']:.3f} ms")
    largest = lanes[-1]
    plans = explain_claim(store, meter, largest.threads[0], postgres)
    plans["acked_in_thread"] = largest.label
    plans["backend"] = backend
    return {"sizes": rows, "plans": plans}


def explain_claim(store: MailboxStore, meter: Meter, thread: str, postgres: bool
                  ) -> dict[str, Any]:
    """Capture the statements of one real claim, then show how the database runs them."""
    meter.captured = []
    try:
        got = store.claim(thread, CONSUMER, LEASE_MS, now_ms())
    finally:
        captured, meter.captured = meter.captured, None
    if got:
        store.ack(got[0].dispatch_id, got[0].claim_token or "", now_ms())
    plans: list[dict[str, Any]] = []
    for statement, parameters in captured:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb not in ("SELECT", "UPDATE"):
            continue
        if postgres:
            analyze = "ANALYZE, BUFFERS, " if verb == "SELECT" else ""
            prefix = f"EXPLAIN ({analyze}COSTS) "
        else:
            prefix = "EXPLAIN QUERY PLAN "
        entry: dict[str, Any] = {"sql": " ".join(statement.split())}
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql(prefix + statement, parameters).fetchall()
            entry["plan"] = [str(r[0]) for r in rows] if postgres else _sqlite_plan(rows)
            conn.rollback()
        if postgres and verb == "SELECT" and isinstance(parameters, dict):
            entry["generic_plan"] = _postgres_generic_plan(store, statement, parameters)
        plans.append(entry)
    return {"thread": thread, "statements": plans}


_PLACEHOLDER = re.compile(r"%\((\w+)\)s(::\w+)?")


def _postgres_generic_plan(store: MailboxStore, statement: str, parameters: dict[str, Any]
                           ) -> list[str]:
    """The plan PostgreSQL uses once it switches a prepared statement to a generic plan.

    psycopg prepares a statement server-side after 5 executions on a connection
    (`prepare_threshold`), and PostgreSQL may then plan it once for all parameter values
    (plan_cache_mode=auto picks a generic plan after 5 custom ones when it looks no worse).
    A one-shot EXPLAIN always shows the custom plan, so prepare the statement here and force
    the generic plan to see what a long-running worker may actually run.
    """
    names: dict[str, str] = {}  # placeholder name -> its cast (the dialect renders one)

    def positional(match: re.Match[str]) -> str:
        names.setdefault(match.group(1), match.group(2) or "")
        return f"${list(names).index(match.group(1)) + 1}{match.group(2) or ''}"

    prepared = _PLACEHOLDER.sub(positional, statement)
    with store.engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        # EXECUTE is a utility statement: no bound parameters, so quote the values here
        args = ", ".join(pgsql.Literal(parameters[n]).as_string(raw) + cast
                         for n, cast in names.items())
        try:
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            conn.exec_driver_sql(f"PREPARE bench_generic AS {prepared}")
            rows = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, BUFFERS, COSTS) EXECUTE bench_generic({args})").fetchall()
            return [str(r[0]) for r in rows]
        finally:
            conn.rollback()
            conn.exec_driver_sql("DEALLOCATE bench_generic")  # not ALL: psycopg's own stay
            conn.commit()


def _sqlite_plan(rows: Sequence[Any]) -> list[str]:
    """EXPLAIN QUERY PLAN rows (id, parent, notused, detail), indented by depth."""
    depth: dict[int, int] = {0: -1}
    lines = []
    for node, parent, _unused, detail in rows:
        level = depth.get(int(parent), -1) + 1
        depth[int(node)] = level
        lines.append("  " * level + str(detail))
    return lines


# ================================================================================== driver
def run_backend(backend: str, cfg: Config, services: Services, workdir: Path
                ) -> dict[str, Any]:
    postgres = backend == "postgres"
    say(f"\n== {backend} ==")
    result: dict[str, Any] = {"status": "ok", "load_average_at_start": load_average()}
    started = time.perf_counter()
    with fresh_database(backend, services.postgres_url, workdir, "ops") as url, \
            open_mailbox(url, services.redis_url) as box:
        say(f"  [1/3] single operations ({cfg.ops} each, sequential)")
        result.update(bench_operations(box, cfg, postgres))
    say("  [2/3] claim latency vs backlog "
        f"({cfg.samples} claims on random threads per size, each followed by ack)")
    with ExitStack() as stack:
        boxes = []
        for size in cfg.sizes:
            url = stack.enter_context(fresh_database(backend, services.postgres_url, workdir,
                                                     f"q{size}"))
            boxes.append((size, stack.enter_context(open_mailbox(url, services.redis_url))))
        result["backlog"] = bench_backlog(boxes, cfg, postgres, backend)
        if cfg.history:
            say(f"  [3/3] claim latency vs the claimed thread's history of acked dispatches "
                f"({cfg.history_samples} claims per size, in the {cfg.sizes[-1]} database)")
            result["history"] = bench_history(boxes[-1][1], cfg, postgres, backend)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["load_average_at_end"] = load_average()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg = Config.from_args(argv)
    wall = time.perf_counter()
    services = start_redis()
    workdir = Path(tempfile.mkdtemp(prefix="mailbox-bench-"))
    try:
        if "postgres" in cfg.backends:
            services.probe_postgres()
        pg_note = services.postgres_note and f"PostgreSQL {services.postgres_note}"
        machine = machine_facts(postgres=services.versions.get("postgres"),
                                postgres_note=pg_note, redis=services.versions["redis"],
                                redis_source=services.redis_source)
        say(f"store benchmark ({'quick' if cfg.quick else 'full'}): backends "
            f"{', '.join(cfg.backends)}; backlog sizes {', '.join(map(str, cfg.sizes))}")
        say(f"  {machine['cpu_count']} CPUs, Python {machine['python']}, SQLite "
            f"{machine['sqlite']}, PostgreSQL {machine['postgres'] or '-'}, Redis "
            f"{machine['redis']} ({services.redis_source})")
        results: dict[str, Any] = {}
        for backend in cfg.backends:
            if backend == "postgres" and services.postgres_url is None:
                say(f"\n== postgres == skipped: {pg_note}")
                results[backend] = {"status": "skipped", "reason": pg_note}
                continue
            results[backend] = run_backend(backend, cfg, services, workdir)
        report = {
            "benchmark": "mailbox store",
            "command": "python -m benchmarks.store_bench " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "config": {"quick": cfg.quick, "backends": list(cfg.backends),
                       "sizes": list(cfg.sizes), "ops": cfg.ops, "busy_ops": cfg.busy_ops,
                       "samples": cfg.samples, "warmup": cfg.warmup,
                       "per_thread": cfg.per_thread, "lease_ms": LEASE_MS, "seed": cfg.seed,
                       "history": list(cfg.history), "history_samples": cfg.history_samples},
            "machine": machine,
            "backends": results,
            "elapsed_s": round(time.perf_counter() - wall, 1),
        }
        machine["load_average_at_end"] = load_average()
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "store.json").write_text(json.dumps(report, indent=2, ensure_ascii=False)
                                            + "\n")
        markdown = render_markdown(report)
        (cfg.out / "store.md").write_text(markdown)
        say("\n" + summary_tables(report))
        say(f"\nwrote {cfg.out / 'store.json'} and {cfg.out / 'store.md'} "
            f"({report['elapsed_s']} s)")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        services.stop()


# ================================================================================ reporting
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; columns whose values are all numbers are right-aligned, floats
    get three significant-ish digits."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v.is_integer() and abs(v) < 1e6:
                return str(int(v))
            if abs(v) < 10:
                return f"{v:.3f}"
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    def numeric(col: int) -> bool:
        return all(isinstance(r[col], int | float) or r[col] is None for r in rows)

    return markdown_table(headers, rows, cell=cell,
                          right=[bool(rows) and numeric(i) for i in range(len(headers))])


OPS_SHOWN = ("enqueue", "claim→ack cycle", "extend_lease", "claim (in cycle)",
             "ack (in cycle)", "claim (busy thread)", "claim (busy, Redis lease lost)",
             "claim (empty thread)")


def summary_tables(report: dict[str, Any]) -> str:
    ok = {k: v for k, v in report["backends"].items() if v.get("status") == "ok"}
    ops_rows = []
    for name, res in ok.items():
        for op in OPS_SHOWN:
            s = res["operations"].get(op)
            if s:
                ops_rows.append([name, op, s["n"], s["ops_per_s"], s["mean_ms"], s["p50_ms"],
                                 s["p99_ms"], s.get("client_cpu_ms")])
    backlog_rows = []
    for name, res in ok.items():
        for r in res["backlog"]["sizes"]:
            backlog_rows.append([name, r["queued"], r["threads"], r["load_s"], r["claim"]["n"],
                                 r["claim"]["p50_ms"], r["claim"]["p99_ms"],
                                 r["ack"]["p50_ms"], r["ack"]["p99_ms"]])
    ratio_rows = []
    for name, res in ok.items():
        q = res["backlog"]["ratio"]
        ratio_rows.append([name, f"p50({q['large']}) / p50({q['small']})",
                           q["p50_large_over_small"], f"≤ {q['goal']}",
                           "yes" if q["met"] else "**no**"])
    history_rows = []
    for name, res in ok.items():
        hist = (res.get("history") or {}).get("sizes", [])
        for h in hist:
            c = h["claim"]
            history_rows.append([name, h["acked_in_thread"], c["n"], c["p50_ms"], c["p99_ms"],
                                 round(c["p50_ms"] / hist[0]["claim"]["p50_ms"], 2)])
    count_rows = []
    for name, res in ok.items():
        for op, c in res["counts"].items():
            count_rows.append([name, op, c["statements"], c["begin_commit_statements"],
                               c["commits"], c["checkouts"], c["redis"],
                               c["db_round_trips_est"]])
    parts = [
        "### Throughput and latency per operation (one process, sequential)",
        table(["backend", "operation", "n", "ops/s", "mean ms", "p50 ms", "p99 ms",
               "client CPU ms/op"], ops_rows),
        "### Claim latency vs queued backlog (claim on a random thread, then ack)",
        table(["backend", "queued", "threads", "load s", "claims", "claim p50 ms",
               "claim p99 ms", "ack p50 ms", "ack p99 ms"], backlog_rows),
        table(["backend", "ratio", "value", "goal", "met"], ratio_rows),
        *(["### Claim latency vs one thread's history (acked rows of the claimed thread)",
           table(["backend", "acked rows in thread", "claims", "claim p50 ms",
                  "claim p99 ms", "p50 / p50(first)"], history_rows)]
          if history_rows else []),
        "### SQL statements and Redis round trips per operation (means)",
        table(["backend", "operation", "SQL stmts", "of which BEGIN/COMMIT", "commits",
               "pool checkouts", "Redis round trips", "est. DB round trips"], count_rows),
    ]
    skipped = [f"- {k}: skipped ({v.get('reason')})" for k, v in report["backends"].items()
               if v.get("status") != "ok"]
    if skipped:
        parts.append("\n".join(skipped))
    return "\n\n".join(parts)


def _loads(values: Any) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "?"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    cfg = report["config"]
    facts = [
        ["Date", m["date"]],
        ["CPUs", f"{m['cpu_count']} ({m['cpu_model'] or 'unknown model'})"],
        ["Platform", m["platform"]],
        ["Python", m["python"]],
        ["SQLAlchemy", m["sqlalchemy"]],
        ["SQLite", m["sqlite"]],
        ["PostgreSQL server", m["postgres"] or f"not measured: {m['postgres_note']}"],
        ["Redis", f"{m['redis']} ({m['redis_source']})"],
        ["Load average (1/5/15 min)", f"{_loads(m.get('load_average_at_start'))} at start, "
                                      f"{_loads(m.get('load_average_at_end'))} at end"],
        *[[f"Load average, {name}", f"{_loads(res.get('load_average_at_start'))} → "
                                    f"{_loads(res.get('load_average_at_end'))}"]
          for name, res in report["backends"].items() if res.get("status") == "ok"],
        ["Run", f"`{report['command'].strip()}` ({'quick' if cfg['quick'] else 'full'}), "
                f"{report['elapsed_s']} s"],
    ]
    notes = [
        "- Everything runs in one process, sequentially; times are wall-clock per store call "
        "(`time.perf_counter`), including Redis calls and the store's metrics. The machine may "
        "be shared (see the load averages): *client CPU ms/op* (this process's CPU time per "
        "call: SQLAlchemy, psycopg/sqlite3, redis-py, the model; not the database or Redis "
        "server) is much less sensitive to other load than wall-clock numbers.",
        f"- Throughput tests: {cfg['ops']} enqueues over {max(1, cfg['ops'] // cfg['per_thread'])}"
        f" threads (round robin; the first pass creates each thread's epoch row), then "
        f"{cfg['ops']} claim→ack cycles consuming them, then {cfg['ops']} `extend_lease` calls "
        "over 20 claimed dispatches. ops/s = calls / wall time of the loop.",
        f"- Backlog test: {cfg['per_thread']} queued dispatches per thread. The backlog is "
        "**bulk-loaded with SQLAlchemy Core** straight into `run_dispatches` and "
        "`thread_dispatch_epochs` (rows built with `RunDispatch.queued(...).enqueued(0)` and "
        "`mailbox.store.statements.dispatch_row`), not through `enqueue`, to keep set-up "
        "short. Each size has a fresh database of its own. PostgreSQL gets `ANALYZE` after "
        "each load (what autovacuum would do soon); SQLite gets none, like the application.",
        f"- Per size: {cfg['warmup']} warm-up then {cfg['samples']} measured claims on "
        "uniformly random threads; each claim is followed by an ack (timed separately) and an "
        "untimed replacement `enqueue` on the same thread, so the queued backlog stays at its "
        "size (acked rows accumulate: a few hundred per size). The sizes are measured "
        "**interleaved** (one claim per size per round, in random order), so load from other "
        "processes hits every size alike and the p50 ratio stays meaningful.",
        f"- History test: one thread per size, each with {cfg['per_thread']} queued "
        f"dispatches and {', '.join(map(str, cfg['history']))} acked ones (bulk-loaded the "
        f"same way), {cfg['history_samples']} interleaved claims each (claim, ack, replacement "
        "enqueue), in the largest backlog database after the backlog test.",
        "- Counts: *SQL stmts* = cursor executes seen by SQLAlchemy's `before_cursor_execute` "
        "(on SQLite this includes the store's explicit `BEGIN IMMEDIATE`; the DBAPI-level "
        "COMMIT is not a cursor execute and is counted in *commits*). *est. DB round trips* "
        "(PostgreSQL only) = statements + BEGIN (psycopg sends it as its own command) + COMMIT "
        "(a connection is pinged only after sitting idle a second, never in these loops). "
        "Redis = "
        "`Coordinator.round_trips`.",
    ]
    parts = [
        "# Mailbox store benchmark",
        "Generated by `python -m benchmarks.store_bench`; raw numbers in `store.json`.",
        "## Machine",
        table(["fact", "value"], facts),
        summary_tables(report).replace("### ", "## "),
        "## Method",
        "\n".join(notes),
    ]
    for name, res in report["backends"].items():
        if res.get("status") != "ok":
            continue
        sections = [(res["backlog"].get("plans"), "queued", "queued")]
        if res.get("history"):
            sections.append((res["history"].get("plans"), "acked_in_thread",
                             "acked rows in the claimed thread"))
        for plans, key, what in sections:
            if not plans:
                continue
            body = [f"## Claim query plans: {name}, {plans[key]} {what} "
                    f"(thread `{plans['thread']}`)"]
            for st in plans["statements"]:
                text = f"```sql\n{st['sql']}\n```\n```\n" + "\n".join(st["plan"]) + "\n```"
                if st.get("generic_plan"):
                    text += ("\nGeneric plan (prepared statement, plan_cache_mode="
                             "force_generic_plan):\n```\n" + "\n".join(st["generic_plan"])
                             + "\n```")
                body.append(text)
            parts.append("\n\n".join(body))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
