"""From the raw numbers of a run to the summary: medians over rounds, ratios, targets.

`analyse(report)` is what `pipeline.json` carries under "summary" and what the tables and
the chart of `report` show.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from benchmarks.common import median
from benchmarks.pipeline.config import (
    TARGET_BULK_OVER_BARE,
    TARGET_BULK_OVER_DELAY,
    TARGET_CLAIM,
    TARGET_CPU_MS,
    TARGET_DELAY,
    TARGET_IDLE_P50_MS,
    TARGET_IDLE_P99_MS,
    TARGET_PG_TWO_PROCESSES,
    TARGET_REDIS_COMMANDS,
    TARGET_SCALING_SLACK,
    TARGET_SQL_TRANSACTIONS,
    TARGET_THROUGHPUT,
    TARGET_WAKE_UPS,
)

PHASE_MESSAGES = 5  # verify, reconstruct, resolve, execute, settle: one message each


def round_rates(config: dict[str, Any] | None, kind: str) -> dict[int, float]:
    """Items/s of each throughput round of `kind`, by round number, in the order run."""
    prefix = f"throughput_{kind}_"
    out: dict[int, float] = {}
    for key, value in (config or {}).get("steps", {}).items():
        if key.startswith(prefix) and "per_s" in value and key[len(prefix):].isdigit():
            out[int(key[len(prefix):])] = float(value["per_s"])
    return out


def rates(config: dict[str, Any], kind: str) -> list[float]:
    return list(round_rates(config, kind).values())


def throughput(config: dict[str, Any] | None, kind: str) -> float:
    return median(rates(config, kind)) if config else math.nan


def paired_ratios(config: dict[str, Any] | None, top: str, bottom: str) -> list[float]:
    """`top`/`bottom` of each round that ran both kinds, in round order."""
    tops, bottoms = round_rates(config, top), round_rates(config, bottom)
    return [tops[r] / bottoms[r] for r in sorted(tops.keys() & bottoms.keys()) if bottoms[r]]


def paired_ratio(config: dict[str, Any] | None, top: str, bottom: str) -> float:
    """The median of the rounds' own `top`/`bottom` ratios (config.REF_ROUNDS says why):
    NaN when no round ran both."""
    return median(paired_ratios(config, top, bottom))


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
    c_over_a = paired_ratio(ref, "c", "a")
    summary: dict[str, Any] = {
        "reference": {"a_per_s": _r(a), "b_per_s": _r(b), "c_per_s": _r(c),
                      "c_over_a": _r(c_over_a),
                      "c_over_a_rounds": [_r(x) for x in paired_ratios(ref, "c", "a")],
                      "c_over_a_of_medians": _r(ratio(c, a)),
                      "c_over_b": _r(paired_ratio(ref, "c", "b")),
                      "b_over_a": _r(paired_ratio(ref, "b", "a")),
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
        "c_over_a": _r(paired_ratio(amqp, "c", "a")),
        "c_amqp_over_c_redis": _r(ratio(throughput(amqp, "c"), c)),
        "a_amqp_over_a_redis": _r(ratio(throughput(amqp, "a"), a))}
    summary["idle"] = {"c": idle_c.get("latency"), "a": idle_a.get("latency"),
                       "c_submit_to_started": idle_c.get("submit_to_started"),
                       "c_started_to_settled": idle_c.get("started_to_settled")}
    summary["delay"] = {"dispatch_per_s": d_rate, "bare_per_s": bare_rate,
                        "ratio": _r(ratio(d_rate, bare_rate)), "rates": delay}
    summary["bulk"] = bulk_summary(cfgs)
    claim = report.get("claim_latency", {})
    claim_ratios = {name: res.get("ratio") or {}
                    for name, res in (claim.get("backends") or {}).items()
                    if res.get("status") == "ok"}
    targets = [
        {"target": f"throughput (c)/(a) ≥ {TARGET_THROUGHPUT}",
         **verdict(c_over_a, TARGET_THROUGHPUT, True)},
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
    bare_scaling = ratio(a, a_c1)
    targets.append({"target": f"mailbox -c 2 / -c 1 ≥ bare Celery's ({_show(bare_scaling)}) "
                              f"- {TARGET_SCALING_SLACK}",
                    **verdict(ratio(c, c_c1), bare_scaling - TARGET_SCALING_SLACK, True)})
    pg_two = ((report.get("parallel") or {}).get("postgres") or {}).get("scaling")
    if pg_two is not None:
        targets.append({"target": f"no Celery, PostgreSQL: 2 processes ≥ "
                                  f"{TARGET_PG_TWO_PROCESSES}x 1 process",
                        **verdict(float(pg_two), TARGET_PG_TWO_PROCESSES, True)})
    targets.append({"target": f"Redis commands per dispatch, broker included ≤ "
                              f"{TARGET_REDIS_COMMANDS:g}",
                    **verdict(redis_commands_per_dispatch(ref), TARGET_REDIS_COMMANDS, False)})
    targets.append({"target": f"wake-up messages per dispatch ≤ {TARGET_WAKE_UPS:g}",
                    **verdict(wake_ups_per_dispatch(report), TARGET_WAKE_UPS, False)})
    for backend, inproc in (report.get("inprocess") or {}).items():
        if not isinstance(inproc, dict) or "rows" not in inproc:
            continue
        total = inproc["rows"][-1]
        targets.append({"target": f"SQL transactions per dispatch ≤ "
                                  f"{TARGET_SQL_TRANSACTIONS:g} ({backend}, no Celery)",
                        **verdict(float(total["transactions"]), TARGET_SQL_TRANSACTIONS,
                                  False)})
        if backend in TARGET_CPU_MS:
            cpu, how = mailbox_cpu_ms(report, backend, inproc)
            targets.append({"target": f"mailbox CPU per dispatch (claim + five phases) ≤ "
                                      f"{TARGET_CPU_MS[backend]:g} ms ({backend}, no Celery, "
                                      f"{how})",
                            **verdict(cpu, TARGET_CPU_MS[backend], False)})
    for backend, bulk in summary["bulk"].items():
        targets.append({"target": f"dispatch.delay_many() per item ≥ {TARGET_BULK_OVER_DELAY:g}x "
                                  f"dispatch.delay() ({backend})",
                        **verdict(bulk["over_delay"], TARGET_BULK_OVER_DELAY, True)})
        targets.append({"target": f"dispatch.delay_many() per item ≥ {TARGET_BULK_OVER_BARE:g}x "
                                  f"bare task.delay() ({backend})",
                        **verdict(bulk["over_bare"], TARGET_BULK_OVER_BARE, True)})
    summary["targets"] = targets
    return summary


def mailbox_cpu_ms(report: dict[str, Any], backend: str, inproc: dict[str, Any]
                   ) -> tuple[float, str]:
    """The mailbox's own CPU per dispatch and how it was measured: the median of the
    one-process rounds of the 1-vs-2-process comparison (the work alone, three rounds); the
    breakdown's single pass (which runs with its counting hooks) when those are missing."""
    parallel = (report.get("parallel") or {}).get(backend) or {}
    if parallel.get("one_process_cpu_ms") is not None:
        rounds = len(parallel.get("one_process_cpu_ms_rounds") or []) or 1
        return float(parallel["one_process_cpu_ms"]), f"median of {rounds} rounds"
    return float(inproc["chain_cpu_ms_per_dispatch"]), "one pass with counting hooks"


def _r(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 3)


def round_values(cfg: dict[str, Any], kind: str, getter: Callable[[dict[str, Any]], Any]
                 ) -> list[float]:
    """`getter` of each throughput round of `kind` (rounds where it fails are left out)."""
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
    return median(round_values(cfg, kind, lambda v: v["cpu_per_item"][part]))


def _show(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def redis_commands_per_dispatch(ref: dict[str, Any] | None) -> float:
    """Every Redis command of a (c) round (broker, coordination, events) per dispatch."""
    if not ref:
        return math.nan
    values = round_values(ref, "c", lambda v: v["redis_commands"]["total"] / v["n"])
    return median(values) if values else math.nan


def wake_ups_per_dispatch(report: dict[str, Any]) -> float:
    """Wake-up messages per dispatch: the broker's messages beyond the five phase messages
    (docs/behaviour.md#wake-gate). In the throughput rounds (ten dispatches per thread, all
    submitted at once) one wake-up per thread is 0.1."""
    messages = report.get("celery_messages_per_dispatch")
    return math.nan if messages is None else max(0.0, float(messages) - PHASE_MESSAGES)


def celery_messages_per_dispatch(ref: dict[str, Any] | None) -> float | None:
    """Messages the broker carried per mailbox dispatch (LPUSH per dispatch: the Redis
    transport pushes every message once), from the reference configuration's (c) rounds."""
    if not ref:
        return None
    values = round_values(ref, "c", lambda v: v["redis_commands"]["calls"]["lpush"] / v["n"])
    return None if not values else round(median(values), 2)




def bulk_summary(cfgs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per database: the per-item rate of dispatch.delay_many() against dispatch.delay() and
    a bare task.delay(), measured in the same client run."""
    out: dict[str, dict[str, float]] = {}
    for key, backend in (("delay", "sqlite"), ("delay_pg", "postgres")):
        rates = (cfgs.get(key) or {}).get("steps", {}).get("delay_rate", {}).get("rates", {})
        bulk = next((v.get("per_s", math.nan) for k, v in rates.items()
                     if k.startswith("dispatch.delay_many()")), None)
        if bulk is None:
            continue
        single = rates.get("dispatch.delay()", {}).get("per_s", math.nan)
        bare = rates.get("task.delay() (bare)", {}).get("per_s", math.nan)
        out[backend] = {"bulk_per_s": bulk, "delay_per_s": single, "bare_per_s": bare,
                        "over_delay": ratio(bulk, single), "over_bare": ratio(bulk, bare)}
    return out
