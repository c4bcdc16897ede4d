"""What a pipeline benchmark run is: its options, its worker configurations and targets.

Shared by every role: the orchestration (`run`), the client subprocess (`client`), the
in-process measurements (`inprocess`) and the report (`analysis`, `report`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS, Services

PER_THREAD = 10  # dispatches per mailbox thread in throughput rounds
REF_ROUNDS = 3
"""Throughput rounds per pass in the reference configuration (quick: 1). Its (c)/(a) is the
median of the rounds' own c/a ratios (`analysis.paired_ratio`): the kinds of one round run one
after another, seconds apart, so a drift of the machine's speed between rounds (seen here up
to 1.3x) cancels out of each ratio, where a ratio of two medians of rounds run apart keeps it;
the median of six damps the swings that come faster than that."""
IDLE_THREADS = 20
AGENT = "echo"

# The targets of the issue: (name, comparison, threshold).
TARGET_THROUGHPUT = 0.6  # (c)/(a) >=
TARGET_IDLE_P50_MS = 25.0  # <=
TARGET_IDLE_P99_MS = 60.0  # <=
TARGET_DELAY = 0.45  # dispatch.delay() rate / bare task.delay() rate >=
TARGET_BULK_OVER_DELAY = 3.0  # dispatch.delay_many() per item / dispatch.delay() >=
TARGET_BULK_OVER_BARE = 1.5  # dispatch.delay_many() per item / bare task.delay() >=
BULK_BATCH = 100  # items per delay_many() call in the submit-rate step
TARGET_CLAIM = 1.5  # claim p50 at 100k queued / at 1k <=
# The mailbox's -c 2 / -c 1 >= bare Celery's -c 2 / -c 1 minus this (same run): on a small
# machine the whole system is CPU-bound and bare Celery gains little from -c 2 itself.
TARGET_SCALING_SLACK = 0.05
TARGET_PG_TWO_PROCESSES = 1.7  # no Celery, PostgreSQL: 2 processes / 1 process >=
TARGET_REDIS_COMMANDS = 75.0  # Redis commands per mailbox dispatch, broker included <=
TARGET_SQL_TRANSACTIONS = 5.0  # SQL transactions per dispatch (no Celery) <=
TARGET_CPU_MS = {"sqlite": 4.5, "postgres": 8.0}  # mailbox CPU per dispatch, no Celery <=
TARGET_WAKE_UPS = 0.15  # wake-up messages per dispatch beside the five phase messages <=

KIND_LABEL = {"a": "(a) bare chain, 5 no-op tasks", "b": "(b) chain, 1 SQL write per link",
              "c": "(c) mailbox echo dispatch"}


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
        p.add_argument("--out", type=Path, default=RESULTS)
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
                      ("a", "b", "c"), 1 if opts.quick else REF_ROUNDS, idle=True),
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
DELAY_PG_CONFIGURATION = Configuration("delay_pg",
                                       "delay() rate, Redis broker, PostgreSQL, no workers",
                                       "redis", "postgres", 0, (), 1, delay_rate=True)


def delay_configurations(services: Services) -> list[Configuration]:
    """The submit-rate measurements: SQLite, and PostgreSQL when it is there."""
    return [DELAY_CONFIGURATION] + ([DELAY_PG_CONFIGURATION] if services.postgres_url else [])

