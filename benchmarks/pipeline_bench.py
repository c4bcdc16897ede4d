"""End-to-end benchmark of the mailbox pipeline against bare Celery, in one run ("Prove it").

Run from the project root:

    python -m benchmarks.pipeline_bench                   # full run (< 15 min on 2 cores)
    python -m benchmarks.pipeline_bench --quick           # smoke run (< 2 min)
    python -m benchmarks.pipeline_bench --skip-rabbitmq --skip-postgres --dispatches 100

What it measures, each configuration (and each pass over it) with its own namespace, database
and worker processes (`celery -A tasks worker` and `celery -A benchmarks.baseline_app worker`,
prefork, same concurrency, `-l WARNING`, no `-E`: docs/architecture.md#configuration), killed when
it is done:

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

This module is the entry point; the benchmark lives in `benchmarks/pipeline/`, by role:
`config` (options, configurations, targets), `run` (services, passes, orchestration),
`client` (the client subprocess), `inprocess` (per-dispatch counts, profile, 1 vs 2
processes), `analysis` (summary, targets) and `report` (Markdown, chart). What it shares with
`store_bench` and `soak` is in `benchmarks/common.py` and `benchmarks/processes.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--client" in args:  # the submitting side of one configuration (benchmarks.pipeline.run)
        from benchmarks.pipeline.client import client_main

        return client_main(Path(args[args.index("--client") + 1]))
    from benchmarks.pipeline.run import main as run_main

    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
