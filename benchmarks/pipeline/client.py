"""The submitting side of a configuration: a subprocess per configuration and pass.

`run.run_configuration` writes a plan (`plan.json`: the steps, the worker pids, where the
result goes) and starts `python -m benchmarks.pipeline_bench --client <plan>` with the
configuration's environment, because `celeryconfig` and `tasks.runtime` read their settings
from the environment once per process. `client_main` runs the steps (warm-ups, throughput
rounds, idle latency, the delay() rate) and writes `result.json` after every step.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks.common import latency_summary, say
from benchmarks.pipeline.config import AGENT, BULK_BATCH, IDLE_THREADS, KIND_LABEL, PER_THREAD

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
                 "Mailbox.submit() (SQL only)": 0.0, "wake publish (apply_async)": 0.0,
                 f"dispatch.delay_many() per item ({BULK_BATCH} a call)": 0.0}
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

        def bulk(items: int) -> None:
            """`items` submissions in calls of BULK_BATCH, over as many threads as the
            single calls use (so each call wakes up to BULK_BATCH threads)."""
            nonlocal serial
            name = f"dispatch.delay_many() per item ({BULK_BATCH} a call)"
            started = time.perf_counter()
            for first in range(0, items, BULK_BATCH):
                batch = []
                for _ in range(min(BULK_BATCH, items - first)):
                    serial += 1
                    batch.append({"thread_id": f"db-t{serial % threads:04d}", "agent": AGENT,
                                  "input": f"m{serial}"})
                dispatch.delay_many(batch)
            spent[name] += time.perf_counter() - started
            calls[name] += items

        # warm-up: connections, scripts, the first epoch rows
        for i in range(20):
            dispatch.delay(f"dw-{i}", AGENT, "warm")
            noop.delay({"key": key, "item": i, "hop": 0, "links": 99})
            plain.submit(f"dw-{i}", AGENT, "warm")
        bulk(BULK_BATCH)
        for name in spent:  # the warm-up is not measured
            spent[name], calls[name] = 0.0, 0
        for _ in range(blocks):
            timed("dispatch.delay()", lambda i: dispatch.delay(
                f"dd-t{i % threads:04d}", AGENT, f"m{i}"))
            timed("task.delay() (bare)", lambda i: noop.delay(
                {"key": key, "item": i, "hop": 0, "links": 99}))
            timed("Mailbox.submit() (SQL only)", lambda i: plain.submit(
                f"ds-t{i % threads:04d}", AGENT, f"m{i}"))
            timed("wake publish (apply_async)", lambda i: dispatch.apply_async(
                args=(f"dw-t{i % threads:04d}",)))
            bulk(per)
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

