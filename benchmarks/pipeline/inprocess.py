"""The mailbox's own work, measured in the benchmark's process (no Celery, no workers).

- `inprocess_breakdown`: SQL statements, transactions, pool checkouts and Redis commands per
  dispatch and per phase (`Meter` hooks the engine and the Redis client), in the throughput
  scenario; then `_profile`: pyinstrument over the submit and chain loops
  (`profile_<backend>.txt`).
- `parallel_chains`: the same work in 1 and in 2 processes at once on one database, how far
  the database lets `-c 2` scale.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from benchmarks.common import (
    create_schema,
    delete_keys,
    latency_summary,
    median,
    percentile,
    say,
)
from benchmarks.pipeline.config import AGENT, PER_THREAD
from mailbox.context import PhaseContext


# ===================================================================== in-process counting
@dataclass
class Bucket:
    calls: int = 0
    seconds: float = 0.0
    statements: int = 0
    verbs: Counter[str] = field(default_factory=Counter)
    transactions: int = 0
    write_transactions: int = 0
    checkouts: int = 0
    round_trips: int = 0  # Coordinator.round_trips
    redis: Counter[str] = field(default_factory=Counter)  # every command, by name


@dataclass
class OpenSection:
    """A section being measured; `rename` files its numbers under another name on exit."""

    name: str
    started: float
    trips: int
    scratch: Bucket = field(default_factory=Bucket)
    child_seconds: float = 0.0
    child_trips: int = 0

    def rename(self, name: str) -> None:
        self.name = name


class Meter:
    """Attributes SQL statements, transactions, pool checkouts and Redis commands to the
    innermost open section (exclusive of nested sections, like the time)."""

    def __init__(self, box: Any) -> None:
        self.box = box
        self.buckets: dict[str, Bucket] = {}
        self.stack: list[OpenSection] = []
        self.outside = Bucket()  # anything outside a section
        engine = box.store.engine
        event.listen(engine, "before_cursor_execute", self._on_execute)
        event.listen(engine, "begin", self._on_begin)
        event.listen(engine.pool, "checkout", self._on_checkout)
        coordinator = box.store.coordinator
        self.script_names = {script.sha: name for name, script in coordinator.scripts.items()}
        self.script_names[box.events.append_script.sha] = "events_append"
        client = coordinator.client
        original = client.execute_command
        make_pipeline = client.pipeline

        def count(args: Sequence[Any]) -> None:
            name = str(args[0]).upper() if args else "?"
            if name == "EVALSHA" and len(args) > 1:
                name = f"EVALSHA {self.script_names.get(str(args[1]), str(args[1])[:8])}"
            self.current.redis[name] += 1

        def counted(*args: Any, **kwargs: Any) -> Any:
            count(args)
            return original(*args, **kwargs)

        def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
            # Pipelined commands (verify's lease and epoch, a submit's event and gate, a
            # settle's report and hand-over) are counted when the pipeline is sent.
            pipe = make_pipeline(*args, **kwargs)
            send = pipe.execute

            def execute(*eargs: Any, **ekwargs: Any) -> Any:
                for command_args, _options in pipe.command_stack:
                    count(command_args)
                return send(*eargs, **ekwargs)

            pipe.execute = execute
            return pipe

        client.execute_command = counted
        client.pipeline = counted_pipeline

    @property
    def current(self) -> Bucket:
        return self.stack[-1].scratch if self.stack else self.outside

    def _on_execute(self, conn: sa.Connection, _cursor: Any, statement: str, _params: Any,
                    _context: Any, _many: bool) -> None:
        bucket = self.current
        bucket.statements += 1
        words = statement.split(None, 2)
        verb = words[0].upper() if words else "?"
        if verb == "BEGIN" and len(words) > 1 and words[1].upper() == "IMMEDIATE":
            verb = "BEGIN IMMEDIATE"
        bucket.verbs[verb] += 1
        # The transaction's BEGIN statement (SQLite) runs before the "begin" event, so the
        # first data write, not BEGIN IMMEDIATE, marks a writing transaction.
        writes = verb in ("INSERT", "UPDATE", "DELETE") or "FOR UPDATE" in statement
        if writes and not conn.info.get("bench_wrote"):
            conn.info["bench_wrote"] = True
            bucket.write_transactions += 1

    def _on_begin(self, conn: sa.Connection) -> None:
        conn.info["bench_wrote"] = False
        self.current.transactions += 1

    def _on_checkout(self, *_: Any) -> None:
        self.current.checkouts += 1

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[OpenSection]:
        coordinator = self.box.store.coordinator
        frame = OpenSection(name, time.perf_counter(), coordinator.round_trips)
        self.stack.append(frame)
        try:
            yield frame
        finally:
            self.stack.pop()
            elapsed = time.perf_counter() - frame.started
            trips = coordinator.round_trips - frame.trips
            bucket = self.buckets.setdefault(frame.name, Bucket())
            _add(bucket, frame.scratch)
            bucket.calls += 1
            bucket.seconds += elapsed - frame.child_seconds
            bucket.round_trips += trips - frame.child_trips
            if self.stack:
                self.stack[-1].child_seconds += elapsed
                self.stack[-1].child_trips += trips


SECTION_ORDER = ["submit (dispatch.delay's SQL + run_queued event)",
                 "wake task: claim won", "wake task: claim refused (busy thread)", "verify",
                 "reconstruct", "resolve", "execute", "settle",
                 "inline claim of a phase's wake (settle claims in its ack)"]


def inprocess_breakdown(kind: str, database_url: str, redis_url: str, n: int,
                        profile_path: Path, wakes_per_delay: float = 1.0) -> dict[str, Any]:
    """Count and time the mailbox's work per dispatch without Celery, in the throughput
    scenario (10 dispatches per thread, all submitted first): submit; the wake tasks
    `dispatch.delay()` publishes (`wakes_per_delay` per dispatch as measured on the broker,
    at least one per thread: the first of a thread claims, the others find the thread busy);
    the five phases; the settle's inline
    claim of the thread's next dispatch (tasks.publishing.worker_wake). That is what the
    workers run, minus the messages."""
    from mailbox import phases
    from mailbox.facade import Mailbox

    namespace = f"pbin{uuid.uuid4().hex[:8]}"
    box = Mailbox.connect(database_url, redis_url, namespace=namespace)
    box.create_schema()
    meter = Meter(box)
    pending: deque[PhaseContext] = deque()

    def wake(thread_id: str, delay_ms: int) -> None:
        with meter.section(SECTION_ORDER[-1]):  # as tasks.publishing.worker_wake claims
            ctx = phases.claim_next(rt, thread_id, expect_due=True)
        if ctx is not None:
            pending.append(ctx)

    rt = box.runtime(consumer_id=f"bench-{os.getpid()}", wake=wake)
    rt.start = pending.append  # as a worker's settle: its ack claims the next, it publishes
    chain_phases: list[tuple[str, Callable[[Any, Any], Any]]] = [
        ("verify", phases.verify), ("reconstruct", phases.reconstruct),
        ("resolve", phases.resolve), ("execute", phases.execute), ("settle", phases.settle)]

    cpu_s = [0.0, 0.0]  # process CPU of the submit loop, of the chain loop

    def workload(prefix: str, count: int) -> tuple[float, float]:
        threads = [f"{prefix}-t{j:03d}" for j in range(max(1, count // PER_THREAD))]
        c0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(count):
            with meter.section(SECTION_ORDER[0]):
                box.submit(threads[i % len(threads)], AGENT, f"message {i}")
        t1 = time.perf_counter()
        c1 = time.process_time()
        for i in range(max(len(threads), round(wakes_per_delay * count))):
            thread = threads[i % len(threads)]  # the wake-ups of dispatch.delay()
            with meter.section(SECTION_ORDER[1]) as section:  # a submit's wake-up
                ctx = phases.claim_next(rt, thread, expect_due=True)
                if ctx is None:
                    section.rename(SECTION_ORDER[2])
            if ctx is not None:
                pending.append(ctx)
        done = 0
        while pending:
            chain = pending.popleft()
            for name, func in chain_phases:
                with meter.section(name):
                    chain = func(rt, chain)
            if not chain.settled:
                raise RuntimeError(f"dispatch {chain.dispatch_id} did not settle: "
                                   f"{chain.reason}")
            done += 1
        if done != count:
            raise RuntimeError(f"{done} of {count} dispatches ran")
        cpu_s[0], cpu_s[1] = c1 - c0, time.process_time() - c1
        return t1 - t0, time.perf_counter() - t1

    try:
        workload("warm", 20)
        meter.buckets.clear()
        submit_s, chain_s = workload("count", n)
        rows = []
        total = Bucket()
        for name in SECTION_ORDER:
            b = meter.buckets.get(name, Bucket())
            rows.append(_bucket_row(name, b, n))
            _add(total, b)
        total_row = _bucket_row("total per dispatch", total, n)
        total_row["calls_per_dispatch"] = None
        rows.append(total_row)
    finally:
        _drop_keys(box, namespace)
        box.close()
    profile = _profile(kind, database_url, redis_url, n, profile_path)
    return {"backend": kind, "dispatches": n, "rows": rows, "wakes_per_delay": wakes_per_delay,
            "submit_ms_per_dispatch": round(1000 * submit_s / n, 3),
            "chain_ms_per_dispatch": round(1000 * chain_s / n, 3),
            "submit_cpu_ms_per_dispatch": round(1000 * cpu_s[0] / n, 3),
            "chain_cpu_ms_per_dispatch": round(1000 * cpu_s[1] / n, 3),
            "profile": profile}


def _drop_keys(box: Any, namespace: str) -> None:
    with contextlib.suppress(Exception):
        delete_keys(box.store.coordinator.client, f"{namespace}:*")


def _add(total: Bucket, b: Bucket) -> None:
    total.seconds += b.seconds
    total.statements += b.statements
    total.verbs.update(b.verbs)
    total.transactions += b.transactions
    total.write_transactions += b.write_transactions
    total.checkouts += b.checkouts
    total.round_trips += b.round_trips
    total.redis.update(b.redis)


def _bucket_row(name: str, b: Bucket, n: int) -> dict[str, Any]:
    redis_total = sum(b.redis.values())
    return {
        "section": name, "calls_per_dispatch": round(b.calls / n, 2),
        "ms": round(1000 * b.seconds / n, 3),
        "sql_statements": round(b.statements / n, 2),
        "sql_data_statements": round(sum(v for k, v in b.verbs.items()
                                         if not k.startswith(("BEGIN", "COMMIT"))) / n, 2),
        "transactions": round(b.transactions / n, 2),
        "write_transactions": round(b.write_transactions / n, 2),
        "pool_checkouts": round(b.checkouts / n, 2),
        "redis_commands": round(redis_total / n, 2),
        "coordinator_round_trips": round(b.round_trips / n, 2),
        "verbs": {k: round(v / n, 2) for k, v in sorted(b.verbs.items())},
        "redis_by_command": {k: round(v / n, 2) for k, v in b.redis.most_common()},
    }


# Where profiled time goes: the innermost frame's file decides, first match wins.
PROFILE_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("database driver + server (sqlite3 / psycopg)", ("/psycopg/", "/psycopg_binary/",
                                                      "sqlite3/", "<built-in>")),
    ("SQLAlchemy Core (compile, execute, rows)", ("/sqlalchemy/",)),
    ("Redis client + round trips", ("/redis/",)),
    ("Prometheus metrics", ("/prometheus_client/",)),
    ("threads (heartbeat start/stop)", ("/threading.py",)),
    ("mailbox model (validation, transitions)", ("/mailbox/model.py",)),
    ("mailbox store / runs / phases / events", ("/mailbox/",)),
    ("json / uuid / logging / other stdlib", ("/json/", "uuid", "/logging/", "/lib/python3")),
]
DB_DRIVER_FUNCTIONS = {"do_execute", "do_executemany", "do_commit", "do_rollback",
                       "do_begin", "do_ping", "_do_commit", "_do_rollback"}


def inline_runtime(box: Any, consumer_id: str) -> tuple[Any, deque[PhaseContext]]:
    """A runtime of `box` that runs as a worker's does, without the messages: a settle's ack
    claims the thread's next dispatch and starts it (`Runtime.start`), a wake-up claims
    inline (tasks.publishing.worker_wake); what either claimed lands in `pending`."""
    from mailbox import phases

    pending: deque[PhaseContext] = deque()

    def wake(thread_id: str, delay_ms: int) -> None:
        ctx = phases.claim_next(rt, thread_id, expect_due=True)
        if ctx is not None:
            pending.append(ctx)

    rt = box.runtime(consumer_id=consumer_id, wake=wake)
    rt.start = pending.append  # a worker's settle: its ack claims the next dispatch
    return rt, pending


def drain_threads(rt: Any, threads: list[str], pending: deque[PhaseContext]) -> int:
    """Claim each thread's first dispatch and run every chain in this process; settle's
    ack claims the thread's next one and appends it. Returns the number of chains run."""
    from mailbox import phases

    for thread in threads:
        first = phases.claim_next(rt, thread)
        if first is not None:
            pending.append(first)
    ran = 0
    while pending:
        phases.run_chain(rt, pending.popleft())
        ran += 1
    return ran


def _group_of(frame: Any, parent_group: str | None) -> str:
    path = str(frame.file_path or "")
    if path == "<built-in>" and parent_group is not None:
        return parent_group
    if str(frame.function) in DB_DRIVER_FUNCTIONS and "/sqlalchemy/" in path:
        return PROFILE_GROUPS[0][0]
    for name, needles in PROFILE_GROUPS:
        if any(n in path for n in needles):
            return name
    return "other"


def _self_times(frame: Any, parent_group: str | None, into: dict[str, float]) -> None:
    if frame.is_synthetic_leaf:
        key = parent_group or "other"
        into[key] = into.get(key, 0.0) + float(frame.time)
        return
    group = _group_of(frame, parent_group)
    children = list(frame.children)
    if not children:
        into[group] = into.get(group, 0.0) + float(frame.time)
    for child in children:
        _self_times(child, group, into)


def _profile(kind: str, database_url: str, redis_url: str, n: int, path: Path
             ) -> dict[str, Any]:
    """pyinstrument over `n` dispatches on a Mailbox without the meter's hooks: the submit
    loop, then claim_next + run_chain (the settle's wake claims the next one inline)."""
    from pyinstrument import Profiler

    from mailbox import phases
    from mailbox.facade import Mailbox

    namespace = f"pbpr{uuid.uuid4().hex[:8]}"
    box = Mailbox.connect(database_url, redis_url, namespace=namespace)
    rt, pending = inline_runtime(box, f"bench-prof-{os.getpid()}")
    try:
        for i in range(20):  # warm-up: connections, Lua scripts, compiled statements
            box.submit(f"pw-{i}", AGENT, "warm")
            ctx = phases.claim_next(rt, f"pw-{i}")
            if ctx is not None:
                phases.run_chain(rt, ctx)
        pending.clear()
        threads = [f"prof-t{j:03d}" for j in range(max(1, n // PER_THREAD))]
        submit_profiler = Profiler(interval=0.0005)
        submit_profiler.start()
        for i in range(n):
            box.submit(threads[i % len(threads)], AGENT, f"message {i}")
        submit_session = submit_profiler.stop()
        chain_profiler = Profiler(interval=0.0005)
        chain_profiler.start()
        started = time.perf_counter()
        ran = drain_threads(rt, threads, pending)
        chain_s = time.perf_counter() - started
        chain_session = chain_profiler.stop()
    finally:
        _drop_keys(box, namespace)
        box.close()
    groups: dict[str, dict[str, float]] = {}
    for label, session in (("submit", submit_session), ("chain", chain_session)):
        into: dict[str, float] = {}
        _self_times(session.root_frame(), None, into)
        total = sum(into.values()) or 1.0
        groups[label] = {g: round(100 * t / total, 1)
                         for g, t in sorted(into.items(), key=lambda kv: -kv[1])}
    text = [f"pyinstrument, {kind}: {n} dispatches (echo), interval 0.5 ms",
            "", "=" * 100, f"SUBMIT LOOP (Mailbox.submit: what dispatch.delay() does before "
                           f"it publishes), {submit_session.duration:.2f} s", "=" * 100,
            submit_profiler.output_text(unicode=True, color=False, show_all=False),
            "", "=" * 100, f"CHAIN LOOP (claim_next + run_chain, settle claims the thread's "
                           f"next dispatch inline), {chain_session.duration:.2f} s, "
                           f"{ran} chains", "=" * 100,
            chain_profiler.output_text(unicode=True, color=False, show_all=False),
            "", "Self time by group (% of samples):",
            json.dumps(groups, indent=2)]
    path.write_text("\n".join(text) + "\n")
    return {"file": path.name, "groups_pct": groups,
            "submit_ms_per_dispatch": round(1000 * submit_session.duration / n, 3),
            "chain_ms_per_dispatch": round(1000 * chain_s / max(1, ran), 3)}


# ================================================================ parallel in-process chains
def _parallel_worker(database_url: str, redis_url: str, namespace: str, prefix: str, n: int,
                     barrier: Any, results: Any) -> None:
    """One process of `parallel_chains`: submit n dispatches, wait for the others, then run
    every chain (claim_next + run_chain, the settle claiming the next inline); report the
    chain loop's wall time and the time spent waiting for transactions to begin."""
    from mailbox.facade import Mailbox

    box = Mailbox.connect(database_url, redis_url, namespace=namespace)
    begin_waits: list[float] = []
    started_at: dict[int, float] = {}

    # Timed around the store's own "begin" listener, which sends SQLite's BEGIN (IMMEDIATE)
    # and so waits for the write lock: not by cursor-execute events, whose listeners would
    # send every statement through SQLAlchemy's execute (mailbox/store/direct.py).
    def before(conn: Any) -> None:
        started_at[id(conn)] = time.perf_counter()

    def after(conn: Any) -> None:
        if id(conn) in started_at:
            begin_waits.append(time.perf_counter() - started_at.pop(id(conn)))

    rt, pending = inline_runtime(box, f"bench-par-{os.getpid()}")
    threads = [f"{prefix}-t{j:03d}" for j in range(max(1, n // PER_THREAD))]
    try:
        for i in range(n):
            box.submit(threads[i % len(threads)], AGENT, f"message {i}")
        if box.store.engine.dialect.name == "sqlite":
            event.listen(box.store.engine, "begin", before, insert=True)
            event.listen(box.store.engine, "begin", after)
        barrier.wait(timeout=120)
        t0 = time.perf_counter()
        c0 = time.process_time()
        ran = drain_threads(rt, threads, pending)
        results.put({"prefix": prefix, "ran": ran, "seconds": time.perf_counter() - t0,
                     "cpu_s": time.process_time() - c0, "begin_waits": begin_waits})
    except Exception as exc:
        results.put({"prefix": prefix, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        box.close()


PARALLEL_REPEATS = 3
"""How many times `parallel_chains` measures each process count (medians reported)."""


def scaling_pairs(runs: Sequence[dict[str, Any]]) -> list[float]:
    """2 processes / 1 process of each pair of consecutive runs (1 2, 2 1, 1 2: each pair
    seconds apart), in order. Their median is the reported scaling, as `analysis.paired_ratio`
    is the throughput's: a drift of the machine's speed between pairs (seen here up to 1.3x
    within a run) cancels out of each pair's ratio, where the ratio of the two counts'
    medians, measured minutes apart, keeps it."""
    pairs = []
    for first, second in zip(runs[::2], runs[1::2], strict=False):
        by_count = {first["processes"]: first["per_s"], second["processes"]: second["per_s"]}
        if set(by_count) == {1, 2} and by_count[1]:
            pairs.append(by_count[2] / by_count[1])
    return pairs


def parallel_chains(kind: str, database_url: str, redis_url: str, n: int) -> dict[str, Any]:
    """The mailbox's own work in 1 and in 2 processes at once on one database, no Celery:
    how much of '-c 2 vs -c 1' the database allows. On SQLite every write transaction takes
    the one database-wide write lock (BEGIN IMMEDIATE), and a process that finds it taken
    sleeps in SQLite's busy handler; PostgreSQL locks per thread row."""
    import multiprocessing

    from mailbox.facade import Mailbox

    namespace = f"pbpar{uuid.uuid4().hex[:8]}"
    create_schema(database_url, redis_url, namespace)
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, Any] = {"backend": kind, "dispatches_per_process": n, "runs": {},
                           "repeats": PARALLEL_REPEATS}
    measured: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    in_order: list[dict[str, Any]] = []
    try:
        # 1, 2, 2, 1, 1, 2: each count measured PARALLEL_REPEATS times, in alternating order,
        # so that a machine whose speed drifts during the run favours neither.
        order = [p for rep in range(PARALLEL_REPEATS) for p in ((1, 2) if rep % 2 == 0
                                                                 else (2, 1))]
        for run_no, procs in enumerate(order):
            barrier = ctx.Barrier(procs)
            results = ctx.Queue()
            workers = [ctx.Process(target=_parallel_worker, args=(
                database_url, redis_url, namespace, f"par{run_no}-{procs}-{k}", n, barrier,
                results)) for k in range(procs)]
            for w in workers:
                w.start()
            got = [results.get(timeout=300) for _ in workers]
            for w in workers:
                w.join(timeout=30)
            errors = [g["error"] for g in got if "error" in g]
            if errors:
                raise RuntimeError("; ".join(errors))
            wall = max(g["seconds"] for g in got)
            waits = [w for g in got for w in g["begin_waits"]]
            ran = sum(g["ran"] for g in got)
            in_order.append({
                "processes": procs, "dispatches": ran, "seconds": round(wall, 3),
                "per_s": round(ran / wall, 2),
                "cpu_ms_per_dispatch": round(1000 * sum(g["cpu_s"] for g in got) / ran, 2),
                # psycopg sends BEGIN with the first statement: nothing to time there, and
                # its row locks are per thread, which these processes do not share.
                "begin_wait": latency_summary([1000 * w for w in waits]),
                "begin_wait_ms_per_dispatch": round(1000 * sum(waits) / ran, 2)
                if waits else None,
            })
            measured[procs].append(in_order[-1])
            wait_text = (f"waiting to BEGIN {1000 * sum(waits) / ran:.2f} ms per dispatch "
                         f"(p99 {percentile([1000 * w for w in waits], 99):.2f} ms per BEGIN)"
                         if waits else "BEGIN not observable (implicit)")
            say(f"  {procs} process(es): {ran / wall:.1f} dispatches/s, {wait_text}")
        for procs, runs in measured.items():  # the median run of each count
            ranked = sorted(runs, key=lambda r: r["per_s"])
            out["runs"][str(procs)] = {**ranked[len(ranked) // 2],
                                       "rounds_per_s": [r["per_s"] for r in runs]}
        # The mailbox's own CPU per dispatch (the target): the median of the
        # one-process rounds, which run the work without the breakdown's counting hooks.
        out["one_process_cpu_ms"] = median([r["cpu_ms_per_dispatch"] for r in measured[1]])
        out["one_process_cpu_ms_rounds"] = [r["cpu_ms_per_dispatch"] for r in measured[1]]
        one, two = out["runs"]["1"]["per_s"], out["runs"]["2"]["per_s"]
        pairs = scaling_pairs(in_order)
        out["scaling_pairs"] = [round(r, 3) for r in pairs]
        out["scaling"] = round(median(pairs), 3) if pairs else None
        out["scaling_of_medians"] = round(two / one, 3) if one else None
    finally:
        box = Mailbox.connect(database_url, redis_url, namespace=namespace)
        _drop_keys(box, namespace)
        box.close()
    return out

