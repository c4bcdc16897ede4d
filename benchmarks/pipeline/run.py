"""The pipeline benchmark's orchestration: services, configurations, passes, outputs.

`main` starts (or finds) the services, runs every configuration once per pass in ABBA order
(`run_configuration`: fresh namespace, database and workers, the submitting side in a
client subprocess, see `client`), then the delay() rate, the in-process measurements
(`inprocess`) and the claim latency of `benchmarks.store_bench`, and writes the report
(`report`). `python -m benchmarks.pipeline_bench` calls it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from benchmarks.common import (
    ROOT,
    Services,
    code_version,
    create_schema,
    delete_keys,
    first_line,
    fresh_database,
    load_average,
    machine_facts,
    say,
    start_redis,
)
from benchmarks.pipeline.analysis import celery_messages_per_dispatch, wake_ups_per_dispatch
from benchmarks.pipeline.config import (
    Configuration,
    Options,
    configurations,
    delay_configurations,
)
from benchmarks.pipeline.inprocess import inprocess_breakdown, parallel_chains
from benchmarks.pipeline.report import targets_table, throughput_table, write_outputs
from benchmarks.processes import ProcessGroup, stack_env


# ================================================================================== services
def start_services(opts: Options) -> Services:
    """Redis (from the environment, else embedded), PostgreSQL and RabbitMQ when reachable
    and not skipped."""
    services = start_redis()
    if opts.skip_postgres:
        services.postgres_note = "skipped (--skip-postgres)"
    else:
        services.probe_postgres()
    if opts.skip_rabbitmq:
        services.rabbitmq_note = "skipped (--skip-rabbitmq)"
    else:
        services.probe_rabbitmq()
    return services


# Scratch PostgreSQL schemas of this benchmark: pbench_<label>_<random>.
SCHEMA_PREFIX = "pbench"


def prepare_database(url: str, redis_url: str, namespace: str) -> None:
    """Mailbox schema (Alembic) plus the baseline's table, in the same database."""
    from benchmarks.baseline_app import create_table

    create_schema(url, redis_url, namespace)
    create_table(url)


def cleanup_broker(namespace: str, services: Services, broker: str) -> None:
    """Delete the namespace's keys (mailbox state, kombu queues and bindings) and, on
    RabbitMQ, its two queues."""
    client = redis.Redis.from_url(services.redis_url, socket_connect_timeout=5)
    try:
        delete_keys(client, f"*{namespace}*")
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
            say(f"    (could not delete RabbitMQ queues of {namespace}: {first_line(exc)})")


# =================================================================================== workers
class Workers(ProcessGroup):
    """The worker processes of one configuration; each in its own process group."""

    def start(self, app: str, queue: str, concurrency: int, label: str) -> None:
        self.start_worker(label, app, queue, concurrency, f"{label}@%h")


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
    with fresh_database(cfg.database, services.postgres_url, cdir, cfg.key,
                        SCHEMA_PREFIX) as db_url:
        prepare_database(db_url, services.redis_url, namespace)
        env = stack_env(db_url, services.redis_url, namespace, cdir, broker_url=broker_url,
                        inherit=lambda k: not k.startswith(("MAILBOX_", "CELERY_",
                                                            "PROMETHEUS_")))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
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
            # Every other round in reverse (a b c, then c b a): neither kind always runs
            # first, when the workers have just warmed up or the machine is about to slow.
            for kind in cfg.kinds if round_no % 2 else cfg.kinds[::-1]:
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


# ====================================================================================== main
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
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
        "machine": machine_facts(code=True, celery=True, **services.versions),
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
        for delay_cfg in delay_configurations(services):
            merge_pass(report["configurations"], delay_cfg,
                       run_pass(delay_cfg, opts, services, workdir, 1, idle=False))
        messages = celery_messages_per_dispatch(report["configurations"].get("ref"))
        report["celery_messages_per_dispatch"] = messages
        wake_ups = wake_ups_per_dispatch(report)
        wakes = 1.0 if math.isnan(wake_ups) else min(3.0, wake_ups)
        backends = ["sqlite"] + (["postgres"] if services.postgres_url else [])
        for backend in backends:
            say(f"\n== in-process per-dispatch counts and profile: {backend} ({wakes:.2f} wake-up "
                f"task(s) per dispatch.delay(), as measured on the broker) ==")
            try:
                with fresh_database(backend, services.postgres_url, workdir,
                                    f"inproc-{backend}", SCHEMA_PREFIX) as url:
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
                with fresh_database(backend, services.postgres_url, workdir, f"par-{backend}",
                                    SCHEMA_PREFIX) as url:
                    report["parallel"][backend] = parallel_chains(
                        backend, url, services.redis_url, max(20, opts.inprocess))
            except Exception as exc:
                report["parallel"][backend] = {"backend": backend,
                                               "error": f"{type(exc).__name__}: {exc}"}
                say(f"  !! {report['parallel'][backend]['error']}")
        report["claim_latency"] = claim_latency(opts, services)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        services.stop()
    report["machine"]["load_average_at_end"] = load_average()
    report["machine"]["code_at_end"] = code_version()
    report["elapsed_s"] = round(time.perf_counter() - wall, 1)
    write_outputs(report, opts.out)
    say("\n" + targets_table(report["summary"]))
    say("\n" + throughput_table(report))
    say(f"\nwrote {opts.out / 'pipeline.json'}, pipeline.md, pipeline.png, profile_*.txt "
        f"({report['elapsed_s']} s)")
    return 0


