"""Races between real processes over one mailbox (DESIGN.md §4.1, invariants 1-6).

Every test here starts child processes with the "spawn" start method; each child connects its
own `Mailbox` to the test's database and Redis, so SQL transactions, row locks, the partial
unique indexes and the Redis Lua scripts are exercised exactly as several workers would
exercise them. Children log what they observed (with `time.monotonic()`, which is one
system-wide clock on Linux, so intervals from different processes can be compared) and the
parent checks the invariants from those logs and from the store afterwards.

The workload harness (`WorkloadConfig`, `run_workload`, `check_workload`) is shared with
`tests/faults/test_redis_loss.py`, which runs the same workload while Redis is flushed,
restarted or split.

MAILBOX_RACE_SECONDS (default 10) sets how long the main race runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import threading
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from mailbox import (
    AlreadyExistsError,
    DispatchStatus,
    Mailbox,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    StoreUnavailableError,
    Termination,
    VersionConflictError,
)
from mailbox.store import MailboxStore
from tests.support.racers import race

ROOT = Path(__file__).resolve().parents[2]
SPAWN = multiprocessing.get_context("spawn")
RACE_SECONDS = float(os.environ.get("MAILBOX_RACE_SECONDS", "10"))
MAX_LOGGED_ERRORS = 50


# ------------------------------------------------------------------------------ child plumbing
def child_setup() -> None:
    """First thing every child runs: make sure `mailbox` is the project's package.

    The stdlib has a `mailbox` module too; the project's wins only with the project root ahead
    of the stdlib on sys.path (DESIGN.md §2). Spawned children inherit the parent's sys.path
    and PYTHONPATH; this re-asserts it and proves which package was imported.
    """
    root = str(ROOT)
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    import mailbox as package

    if not getattr(package, "IS_DISPATCH_MAILBOX", False):
        raise RuntimeError(f"child imported the wrong mailbox module: {package.__file__}")


@pytest.fixture(autouse=True)
def _children_import_project(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawned interpreters start from PYTHONPATH: put the project root first there too."""
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + old if old else ""))


def now_ms() -> int:
    return int(time.time() * 1000)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def run_processes(targets: list[tuple[Callable[..., None], tuple[Any, ...]]],
                  timeout_s: float,
                  parent: Callable[[], None] | None = None) -> None:
    """Start one spawned process per target, optionally run `parent` meanwhile, join all.

    A process still alive at the timeout is killed (by its own handle, nothing broader) and the
    test fails; so does any non-zero exit code.
    """
    procs = [SPAWN.Process(target=func, args=args, daemon=True) for func, args in targets]
    for proc in procs:
        proc.start()
    try:
        if parent is not None:
            parent()
    finally:
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        hung = [proc for proc in procs if proc.is_alive()]
        for proc in hung:
            proc.kill()
            proc.join(10)
    assert not hung, f"{len(hung)} child process(es) hung and were killed"
    codes = [proc.exitcode for proc in procs]
    assert all(code == 0 for code in codes), f"child exit codes: {codes}"


# =============================================================================== the workload
@dataclass(frozen=True)
class WorkloadConfig:
    """What every workload child needs. Picklable, so it crosses the spawn boundary."""

    database_url: str
    redis_url: str
    namespace: str
    threads: tuple[str, ...]
    seconds: float
    out_dir: str
    lease_ms: int = 60_000
    seed: int = 0
    # Redis faults: StoreUnavailableError is then allowed (and counted); never otherwise.
    tolerate_unavailable: bool = False
    # One namespace per worker: each process sees its own, empty Redis state, so only SQL
    # can keep the invariants (a "split brain" of the coordination layer).
    split_namespaces: bool = False

    def namespace_for(self, worker: int) -> str:
        return f"{self.namespace}-w{worker}" if self.split_namespaces else self.namespace


@dataclass
class WorkerLog:
    """Everything one worker saw, in a JSON-friendly shape."""

    worker: str
    attempted: list[str] = field(default_factory=list)  # enqueue called (any outcome)
    enqueued: list[list[str]] = field(default_factory=list)  # [dispatch_id, thread] returned
    # claims: {d, t, token, epoch, via, c0, c1, r0, r1, end}; [c0, c1] brackets the claim
    # call, [r0, r1] the call that ended the claim.
    claims: list[dict[str, Any]] = field(default_factory=list)
    interrupts: list[list[Any]] = field(default_factory=list)  # [t, epoch, start, end]
    # successful fenced writes on our own live claim: [d, t, epoch, op, start, end]
    fenced_ok: list[list[Any]] = field(default_factory=list)
    # epoch conflicts on our own live claim: [d, t, expected, actual, start, end]
    fenced_out: list[list[Any]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    stale_attempts: int = 0
    stale_by_op: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unavailable: int = 0
    unavailable_ops: dict[str, int] = field(default_factory=dict)
    ok_claim_times: list[float] = field(default_factory=list)  # claims that returned one
    claim_call_ok_times: list[float] = field(default_factory=list)  # claim calls that returned
    ops: int = 0
    fatal: str | None = None

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_LOGGED_ERRORS:
            self.errors.append(text)

    def violation(self, text: str) -> None:
        if len(self.violations) < MAX_LOGGED_ERRORS:
            self.violations.append(text)


class Workload:
    """The randomized mix one worker runs: enqueue, claim (by thread or id), start, extend,
    record a result, ack / nack / dead-letter / give up, interrupt, and deliberate writes
    with tokens of claims that are already over."""

    def __init__(self, store: MailboxStore, cfg: WorkloadConfig, index: int, log: WorkerLog
                 ) -> None:
        self.store = store
        self.cfg = cfg
        self.log = log
        self.name = f"w{index}"
        self.rng = random.Random(cfg.seed * 1009 + index)
        self.seq = 0
        self.own: list[str] = []
        self.run_of: dict[str, str] = {}
        self.finished: list[tuple[str, str]] = []  # (dispatch_id, token) of claims now over

    # ------------------------------------------------------------------------------ loop
    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            thread = self.rng.choice(self.cfg.threads)
            pick = self.rng.random()
            op = ("enqueue" if pick < 0.22 else "interrupt" if pick < 0.26
                  else "stale" if pick < 0.40 else "claim_dispatch" if pick < 0.48 else "claim")
            self.log.ops += 1
            try:
                if op == "enqueue":
                    self.enqueue(thread)
                elif op == "interrupt":
                    self.interrupt(thread)
                elif op == "stale":
                    self.stale_write()
                elif op == "claim_dispatch":
                    self.claim_by_id()
                else:
                    self.claim(thread)
            except StoreUnavailableError as exc:
                self.unavailable(op, exc)
            except Exception:  # every unexpected exception is a finding
                self.log.error(f"{op}: {traceback.format_exc()}")

    def unavailable(self, op: str, exc: StoreUnavailableError) -> None:
        if not self.cfg.tolerate_unavailable:
            self.log.error(f"{op}: unexpected {exc!r}")
            return
        self.log.unavailable += 1
        self.log.unavailable_ops[op] = self.log.unavailable_ops.get(op, 0) + 1
        time.sleep(0.01)

    # ---------------------------------------------------------------------------- the ops
    def enqueue(self, thread: str) -> None:
        self.seq += 1
        dispatch_id = f"{self.name}-{self.seq}-{uuid.uuid4().hex[:6]}"
        run_id = f"run-{dispatch_id}"
        now = now_ms()
        dispatch = RunDispatch.queued(
            dispatch_id, thread, run_id, now, priority=self.rng.choice((0, 64, 128, 255)),
            available_at=now + self.rng.choice((0, 0, 0, 20)), max_attempts=3)
        self.log.attempted.append(dispatch_id)
        self.store.enqueue(dispatch)
        self.log.enqueued.append([dispatch_id, thread])
        self.own.append(dispatch_id)
        self.run_of[dispatch_id] = run_id

    def interrupt(self, thread: str) -> None:
        start = time.monotonic()
        result = self.store.interrupt(thread, now_ms())
        self.log.interrupts.append([thread, result.new_dispatch_epoch, start, time.monotonic()])
        for dispatch in result.superseded:
            if dispatch.status != DispatchStatus.Superseded:
                self.log.violation(f"interrupt returned {dispatch.dispatch_id} as "
                                   f"{dispatch.status}, not Superseded")

    def claim(self, thread: str) -> None:
        start = time.monotonic()
        got = self.store.claim(thread, self.name, self.cfg.lease_ms, now_ms())
        end = time.monotonic()
        self.log.claim_call_ok_times.append(end)
        if len(got) > 1:
            self.log.violation(f"claim returned {len(got)} dispatches for one thread")
        if got:
            self.hold(got[0], start, end, "claim")

    def claim_by_id(self) -> None:
        if not self.own:
            return
        dispatch_id = self.rng.choice(self.own[-50:])
        start = time.monotonic()
        got = self.store.claim_dispatch(dispatch_id, self.name, self.cfg.lease_ms, now_ms())
        end = time.monotonic()
        self.log.claim_call_ok_times.append(end)
        if got is not None:
            self.hold(got, start, end, "claim_dispatch")

    # ------------------------------------------------------------------ holding a claim
    def hold(self, dispatch: RunDispatch, c0: float, c1: float, via: str) -> None:
        token = dispatch.claim_token
        if dispatch.status != DispatchStatus.Claimed or not token:
            self.log.violation(f"{via} returned {dispatch.dispatch_id} as {dispatch.status} "
                               f"with token {token!r}")
            return
        record: dict[str, Any] = {
            "d": dispatch.dispatch_id, "t": dispatch.thread_id, "token": token,
            "epoch": dispatch.dispatch_epoch, "via": via, "c0": c0, "c1": c1,
            "r0": None, "r1": None, "end": None,
        }
        self.log.claims.append(record)
        self.log.ok_claim_times.append(c1)
        steps = [s for s, p in (("start", 0.6), ("extend", 0.4), ("result", 0.3))
                 if self.rng.random() < p]
        final = self.rng.choices(("ack", "nack", "dead_letter", "supersede"),
                                 weights=(55, 35, 5, 5))[0]
        for step in [*steps, final]:
            time.sleep(self.rng.uniform(0, 0.002))
            if self.step(dispatch, token, step, record):
                break
        else:  # the final step did not end the claim (only after StoreUnavailableError)
            deadline = time.monotonic() + 30
            while record["end"] is None and time.monotonic() < deadline:
                time.sleep(0.05)
                self.step(dispatch, token, "ack", record)
            if record["end"] is None:
                self.log.violation(f"could not release {dispatch.dispatch_id} in 30 s")
        self.finished.append((dispatch.dispatch_id, token))

    def step(self, d: RunDispatch, token: str, op: str, record: dict[str, Any]) -> bool:
        """One write on our live claim; True when the claim is over afterwards."""
        start = time.monotonic()
        now = now_ms()
        ended: str | None = None
        try:
            if op == "start":
                self.store.record_dispatch_start(d.dispatch_id, token, f"inst-{token}", now)
            elif op == "extend":
                if not self.store.extend_lease(d.dispatch_id, token, self.cfg.lease_ms, now):
                    return self.claim_lost(d, token, op, start, record)
            elif op == "result":
                self.store.record_run_result(d.dispatch_id, token, RunDispatchResult(
                    d.run_id, f"inst-{token}", RunStatus.done, Termination.natural_end(),
                    response="ok"), now)
            elif op == "ack":
                self.store.ack(d.dispatch_id, token, now)
                self.log.acked.append(d.dispatch_id)
                ended = "ack"
            elif op == "nack":
                self.store.nack(d.dispatch_id, token, now + self.rng.randint(0, 30), "retry",
                                now)
                ended = "nack"
            elif op == "dead_letter":
                self.store.dead_letter(d.dispatch_id, token, "gave up", now)
                self.log.dead.append(d.dispatch_id)
                ended = "dead_letter"
            else:
                after = self.store.supersede_claimed(d.dispatch_id, token, now, "test gave up")
                if after is None or after.status != DispatchStatus.Superseded:
                    self.log.violation(f"supersede_claimed of our live claim "
                                       f"{d.dispatch_id} returned {after!r}")
                ended = "supersede"
        except VersionConflictError as exc:
            end = time.monotonic()
            if exc.expected < exc.actual:  # fenced by an interrupt: now Superseded
                self.log.fenced_out.append([d.dispatch_id, d.thread_id, exc.expected,
                                            exc.actual, start, end])
                return self.ended(record, start, end, f"fenced@{op}")
            self.log.violation(f"{op} on our live claim {d.dispatch_id} refused as not ours "
                               f"{exc!r}")
            return self.ended(record, start, end, f"lost@{op}")
        except StoreUnavailableError as exc:
            self.unavailable(op, exc)
            return self.claim_lost(d, token, op, start, record, check_only=True)
        end = time.monotonic()
        if op != "supersede":  # supersede_claimed gives up even a stale claim (T14)
            self.log.fenced_ok.append([d.dispatch_id, d.thread_id, d.dispatch_epoch, op,
                                       start, end])
        return False if ended is None else self.ended(record, start, end, ended)

    def claim_lost(self, d: RunDispatch, token: str, op: str, start: float,
                   record: dict[str, Any], *, check_only: bool = False) -> bool:
        """After extend_lease said False or an op failed as unavailable: look at the row."""
        row = self.load_patiently(d.dispatch_id)
        if row is not None and row.status == DispatchStatus.Claimed and row.claim_token == token:
            if not check_only:
                self.log.violation(f"extend_lease refused our live claim {d.dispatch_id}")
            return False
        end = time.monotonic()
        if not check_only and (row is None or row.status != DispatchStatus.Superseded):
            self.log.violation(f"extend_lease lost {d.dispatch_id} without a fence: {row!r}")
        if not check_only:
            self.log.fenced_out.append([d.dispatch_id, d.thread_id, d.dispatch_epoch,
                                        row.dispatch_epoch if row else -1, start, end])
        return self.ended(record, start, end, f"gone@{op}")

    def load_patiently(self, dispatch_id: str) -> RunDispatch | None:
        deadline = time.monotonic() + 30
        while True:
            try:
                return self.store.load_dispatch(dispatch_id)
            except StoreUnavailableError as exc:
                self.unavailable("load_dispatch", exc)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @staticmethod
    def ended(record: dict[str, Any], start: float, end: float, how: str) -> bool:
        record.update(r0=start, r1=end, end=how)
        return True

    # --------------------------------------------------------------- stale-token writes
    def stale_write(self) -> None:
        """Write with the token of a claim that is already over: must change nothing."""
        if not self.finished:
            return
        dispatch_id, token = self.rng.choice(self.finished)
        op = self.rng.choice(("ack", "nack", "dead_letter", "start", "result", "extend",
                              "supersede"))
        now = now_ms()
        self.log.stale_attempts += 1
        self.log.stale_by_op[op] = self.log.stale_by_op.get(op, 0) + 1
        outcome: object = "raised nothing"
        try:
            if op == "ack":
                self.store.ack(dispatch_id, token, now)
            elif op == "nack":
                self.store.nack(dispatch_id, token, now, "stale", now)
            elif op == "dead_letter":
                self.store.dead_letter(dispatch_id, token, "stale", now)
            elif op == "start":
                self.store.record_dispatch_start(dispatch_id, token, "stale-instance", now)
            elif op == "result":
                self.store.record_run_result(dispatch_id, token, RunDispatchResult(
                    self.run_of.get(dispatch_id, f"run-{dispatch_id}"), "stale-instance",
                    RunStatus.done, Termination.natural_end()), now)
            elif op == "extend":
                outcome = self.store.extend_lease(dispatch_id, token, 1_000_000, now)
                if outcome is False:
                    return
            else:
                outcome = self.store.supersede_claimed(dispatch_id, token, now, "stale")
                if outcome is None:
                    return  # not Claimed any more: nothing to supersede
        except VersionConflictError as exc:
            if (exc.expected, exc.actual) != (0, 1):
                self.log.violation(f"stale {op} on {dispatch_id}: {exc!r}, expected (0, 1)")
            return
        self.log.violation(f"stale-token {op} on {dispatch_id} succeeded: {outcome!r}")


def workload_child(cfg: WorkloadConfig, index: int, ready: Barrier) -> None:
    child_setup()
    log = WorkerLog(worker=f"w{index}")
    try:
        box = Mailbox.connect(cfg.database_url, cfg.redis_url,
                              namespace=cfg.namespace_for(index))
        try:
            ready.wait(120)
        except BaseException:
            ready.abort()
            raise
        Workload(box.store, cfg, index, log).run(time.monotonic() + cfg.seconds)
        box.close()
    except BaseException:  # reported to the parent through the log
        log.fatal = traceback.format_exc()
        ready.abort()
    finally:
        write_json(Path(cfg.out_dir) / f"w{index}.json", asdict(log))


@dataclass
class SamplerLog:
    samples: int = 0
    violations: list[str] = field(default_factory=list)
    # current_dispatch_epoch going back between two samples (the Redis cache regressed)
    epoch_regressions: list[str] = field(default_factory=list)
    unavailable: int = 0
    errors: list[str] = field(default_factory=list)
    fatal: str | None = None


def sampler_child(cfg: WorkloadConfig, ready: Barrier) -> None:
    """Samples the store while the workers run: never two Claimed on a thread; the SQL epoch
    never goes back; the cached epoch is never ahead of SQL and never goes back."""
    child_setup()
    log = SamplerLog()
    try:
        box = Mailbox.connect(cfg.database_url, cfg.redis_url, namespace=cfg.namespace)
        try:
            ready.wait(120)
        except BaseException:
            ready.abort()
            raise
        store = box.store
        deadline = time.monotonic() + cfg.seconds
        last_sql: dict[str, int] = defaultdict(int)
        last_current: dict[str, int] = defaultdict(int)
        while time.monotonic() < deadline:
            try:
                doubles = store.claimed_per_thread()
                if doubles and len(log.violations) < MAX_LOGGED_ERRORS:
                    log.violations.append(f"two Claimed on a thread: {doubles}")
                for thread in cfg.threads:
                    current = store.current_dispatch_epoch(thread)
                    sql = store.sql_epoch(thread)
                    if current > sql:
                        log.violations.append(f"{thread}: cached epoch {current} ahead of SQL "
                                              f"{sql}")
                    if sql < last_sql[thread]:
                        log.violations.append(f"{thread}: SQL epoch went back "
                                              f"{last_sql[thread]} -> {sql}")
                    if current < last_current[thread]:
                        log.epoch_regressions.append(
                            f"{thread}: current_dispatch_epoch went back "
                            f"{last_current[thread]} -> {current} (SQL {sql})")
                    last_sql[thread] = max(last_sql[thread], sql)
                    last_current[thread] = max(last_current[thread], current)
                log.samples += 1
                time.sleep(0.002)  # leave the CPU to the workers on small machines
            except StoreUnavailableError as exc:
                if not cfg.tolerate_unavailable:
                    log.errors.append(repr(exc))
                log.unavailable += 1
                time.sleep(0.01)
        box.close()
    except BaseException:
        log.fatal = traceback.format_exc()
        ready.abort()
    finally:
        write_json(Path(cfg.out_dir) / "sampler.json", asdict(log))


@dataclass
class WorkloadRun:
    workers: list[dict[str, Any]]
    sampler: dict[str, Any]
    started: float  # monotonic time the workload began


def run_workload(cfg: WorkloadConfig, workers: int,
                 during: Callable[[float, float], None] | None = None) -> WorkloadRun:
    """Run `workers` workload processes plus one sampler for `cfg.seconds`.

    `during(start, deadline)` runs in the parent while the children work (fault injection).
    """
    ready = SPAWN.Barrier(workers + 2)
    started: list[float] = []

    def parent() -> None:
        try:
            ready.wait(120)
        except threading.BrokenBarrierError:
            return  # a child failed to start; its log says why (checked by check_workload)
        started.append(time.monotonic())
        if during is not None:
            during(started[0], started[0] + cfg.seconds)

    targets: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (workload_child, (cfg, i, ready)) for i in range(workers)]
    targets.append((sampler_child, (cfg, ready)))
    run_processes(targets, timeout_s=cfg.seconds + 120, parent=parent)
    out = Path(cfg.out_dir)
    return WorkloadRun([read_json(out / f"w{i}.json") for i in range(workers)],
                       read_json(out / "sampler.json"), started[0] if started else 0.0)


def all_rows(store: MailboxStore, threads: tuple[str, ...]) -> dict[str, RunDispatch]:
    rows: dict[str, RunDispatch] = {}
    for thread in threads:
        offset = 0
        while True:
            page = store.list_dispatches(thread, limit=1000, offset=offset)
            rows.update((d.dispatch_id, d) for d in page)
            if len(page) < 1000:
                break
            offset += 1000
    return rows


def drain(store: MailboxStore, threads: tuple[str, ...]) -> int:
    """Take every live dispatch to a terminal state, as a worker would far in the future."""
    far = now_ms() + 86_400_000
    while store.reclaim_page(far, 1000).more:  # pages: list calls are bounded
        pass
    acked = 0
    for _ in range(100_000):
        progressed = False
        for thread in store.queued_thread_ids():
            got = store.claim(thread, "drain", 60_000, far)
            if got:
                store.ack(got[0].dispatch_id, got[0].claim_token or "", far)
                acked += 1
                progressed = True
        if not store.queued_thread_ids():
            break
        assert progressed, f"drain is stuck: queued threads {store.queued_thread_ids()}"
    counts = store.counts_by_status()
    assert counts[DispatchStatus.Queued] == 0 and counts[DispatchStatus.Claimed] == 0, counts
    return acked


def _overlaps(claims: list[dict[str, Any]]) -> list[str]:
    """Per thread, the certainly-held intervals [claim returned, release call began] must be
    disjoint: each actual hold contains its certain interval, and actual holds of one thread
    never overlap when the invariant holds."""
    found: list[str] = []
    by_thread: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for claim in claims:
        by_thread[claim["t"]].append(claim)
    for thread, items in by_thread.items():
        items.sort(key=lambda c: c["c1"])
        latest: dict[str, Any] | None = None
        for claim in items:
            if latest is not None and latest["r0"] > claim["c1"]:
                found.append(f"{thread}: {latest['d']} (token {latest['token']}, held until "
                             f"{latest['r0']:.6f}) overlaps {claim['d']} (token "
                             f"{claim['token']}, claimed by {claim['c1']:.6f})")
            if latest is None or claim["r0"] > latest["r0"]:
                latest = claim
    return found


def check_workload(run: WorkloadRun, store: MailboxStore, cfg: WorkloadConfig,
                   *, strict_epoch_cache: bool = True) -> dict[str, Any]:
    """Every invariant of DESIGN.md §4.1 from the children's logs and the store. Returns a
    summary (printed by the tests, shown with -s or on failure)."""
    workers = run.workers
    fatal = [w["fatal"] for w in workers if w["fatal"]]
    assert not fatal, "a worker crashed:\n" + "\n".join(fatal)
    assert not run.sampler["fatal"], f"the sampler crashed:\n{run.sampler['fatal']}"
    errors = [e for w in workers for e in w["errors"]] + run.sampler["errors"]
    assert not errors, f"{len(errors)} unexpected error(s), first ones:\n" + "\n".join(
        errors[:5])
    violations = [v for w in workers for v in w["violations"]]
    assert not violations, "invariant violations seen by workers:\n" + "\n".join(
        violations[:20])
    assert not run.sampler["violations"], "sampler saw:\n" + "\n".join(
        run.sampler["violations"][:20])
    if strict_epoch_cache:
        assert not run.sampler["epoch_regressions"], "\n".join(
            run.sampler["epoch_regressions"][:20])
    assert run.sampler["samples"] > 0, "the sampler never completed a sample"

    claims = [c for w in workers for c in w["claims"]]
    assert claims, "no claim succeeded: the workload did not exercise anything"
    assert all(c["r0"] is not None for c in claims), "a claim was never released"
    tokens = [c["token"] for c in claims]
    assert len(tokens) == len(set(tokens)), "a claim token was handed out twice"

    # Invariants 2 and 3: per thread, holds never overlap.
    overlaps = _overlaps(claims)
    assert not overlaps, "two holders of one thread at once:\n" + "\n".join(overlaps[:10])

    # Invariant 4: no write with the token of a finished claim succeeded (checked in the
    # workers, counted here so the test proves it tried).
    stale = sum(w["stale_attempts"] for w in workers)
    assert stale > 0, "no stale-token write was attempted"

    # Invariant 5: epochs per thread are 1..K, each handed out once, in real-time order.
    interrupts: dict[str, list[list[Any]]] = defaultdict(list)
    for w in workers:
        per_thread_last: dict[str, int] = {}
        for thread, epoch, start, end in w["interrupts"]:
            assert epoch > per_thread_last.get(thread, 0), (
                f"{w['worker']} saw {thread}'s epoch go back to {epoch}")
            per_thread_last[thread] = epoch
            interrupts[thread].append([epoch, start, end])
    for thread in cfg.threads:
        items = sorted(interrupts[thread])
        epochs = [e for e, _, _ in items]
        sql = store.sql_epoch(thread)
        assert epochs == list(range(1, len(epochs) + 1)), (
            f"{thread}: interrupts returned epochs {epochs[:20]}…, not 1..{len(epochs)}")
        assert sql == len(epochs), f"{thread}: SQL epoch {sql}, {len(epochs)} interrupts"
        suffix_min_end = float("inf")
        for epoch, start, end in reversed(items):
            assert suffix_min_end >= start, (
                f"{thread}: an interrupt returning a higher epoch than {epoch} ended before "
                f"the one returning {epoch} began")
            suffix_min_end = min(suffix_min_end, end)

    def interrupted_before(thread: str, epoch: int, moment: float) -> list[int]:
        """Epochs above `epoch` that an interrupt of `thread` had returned before `moment`."""
        return [e for e, _, end in interrupts[thread] if e > epoch and end < moment]

    for claim in claims:
        late = interrupted_before(claim["t"], claim["epoch"], claim["c0"])
        assert not late, (f"{claim['d']} was claimed with epoch {claim['epoch']} after the "
                          f"thread reached epoch {max(late)}")
    for d, thread, epoch, op, start, _end in (x for w in workers for x in w["fenced_ok"]):
        late = interrupted_before(thread, epoch, start)
        assert not late, (f"{op} of {d} (epoch {epoch}) succeeded after the thread reached "
                          f"epoch {max(late)}")
    for d, thread, expected, actual, _start, end in (x for w in workers
                                                     for x in w["fenced_out"]):
        assert actual > expected, f"{d} fenced with epochs {expected} -> {actual}"
        assert any(e == actual and s < end for e, s, _ in interrupts[thread]), (
            f"{d} fenced at epoch {actual} that no interrupt had produced yet")

    # After the workers stopped: nothing left Claimed (every claim was released).
    counts = store.counts_by_status()
    assert counts[DispatchStatus.Claimed] == 0, f"Claimed rows left behind: {counts}"

    # Invariants 1 and 6: every enqueue that returned is stored; nothing appears that was
    # never enqueued; every ack / dead letter stuck; a drain ends everything terminal.
    rows = all_rows(store, cfg.threads)
    confirmed = {d for w in workers for d, _ in w["enqueued"]}
    attempted = {d for w in workers for d in w["attempted"]}
    missing = confirmed - rows.keys()
    assert not missing, f"{len(missing)} enqueued dispatches lost: {sorted(missing)[:10]}"
    assert rows.keys() <= attempted, f"unknown rows: {sorted(rows.keys() - attempted)[:10]}"
    for w in workers:
        for d in w["acked"]:
            assert rows[d].status == DispatchStatus.Acked, f"acked {d} is {rows[d].status}"
        for d in w["dead"]:
            assert rows[d].status == DispatchStatus.DeadLetter, f"{d} is {rows[d].status}"
    drained = drain(store, cfg.threads)
    rows = all_rows(store, cfg.threads)
    assert rows.keys() >= confirmed
    live = [d for d in rows.values() if not d.is_terminal]
    assert not live, f"{len(live)} dispatches not terminal after the drain"
    for thread in cfg.threads:
        assert store.current_dispatch_epoch(thread) == store.sql_epoch(thread), (
            f"{thread}: current_dispatch_epoch {store.current_dispatch_epoch(thread)} != SQL "
            f"{store.sql_epoch(thread)} once everything is quiet")

    by_end: dict[str, int] = defaultdict(int)
    for claim in claims:
        by_end[claim["end"].split("@")[0]] += 1
    return {
        "ops": sum(w["ops"] for w in workers),
        "enqueued": len(confirmed),
        "claims": len(claims),
        "claims_by_end": dict(by_end),
        "interrupts": sum(len(v) for v in interrupts.values()),
        "fenced_by_epoch": sum(len(w["fenced_out"]) for w in workers),
        "stale_token_writes_refused": stale,
        "unavailable": sum(w["unavailable"] for w in workers) + run.sampler["unavailable"],
        "sampler_samples": run.sampler["samples"],
        "epoch_cache_regressions": len(run.sampler["epoch_regressions"]),
        "drained": drained,
        "final_status": {s.value: n for s, n in store.counts_by_status().items()},
    }


# ===================================================================================== tests
THREADS = ("thread-a", "thread-b", "thread-c", "thread-d")


def test_eight_processes_hammering_four_threads_keep_every_invariant(
        mailbox: Mailbox, database_url: str, redis_url: str, namespace: str,
        tmp_path: Path) -> None:
    """(1) 8 processes claim / start / extend / result / ack / nack / dead-letter / interrupt
    and retry with finished tokens on 4 threads while a 9th samples the store."""
    cfg = WorkloadConfig(database_url, redis_url, namespace, THREADS, RACE_SECONDS,
                         str(tmp_path), seed=1)
    for i, thread in enumerate(THREADS):  # something to claim from the first moment
        for j in range(5):
            mailbox.store.enqueue(RunDispatch.queued(f"seed-{i}-{j}", thread, f"run-s{i}{j}",
                                                     now_ms()))
    run = run_workload(cfg, workers=8)
    seeded = {f"seed-{i}-{j}" for i in range(len(THREADS)) for j in range(5)}
    run.workers[0]["enqueued"] += [[d, ""] for d in sorted(seeded)]
    run.workers[0]["attempted"] += sorted(seeded)
    summary = check_workload(run, mailbox.store, cfg)
    print(f"\nrace summary ({database_url.split(':')[0]}): {summary}")
    # Guards that the race exercised something (not invariants; kept low for slow machines).
    assert summary["claims"] >= 10, f"too few claims to mean anything: {summary}"
    assert summary["fenced_by_epoch"] > 0, f"no claim was ever fenced by an interrupt: {summary}"


# ---------------------------------------------------------------------------- dedupe race
DEDUPE_ROUNDS = 12


def dedupe_child(database_url: str, redis_url: str, namespace: str, index: int,
                 barrier: Barrier, out: str) -> None:
    child_setup()
    results: list[list[Any]] = []
    try:
        box = Mailbox.connect(database_url, redis_url, namespace=namespace)
        for rnd in range(DEDUPE_ROUNDS):
            thread = f"dd-thread-{rnd}" if rnd % 2 == 0 else "dd-shared"
            dispatch = RunDispatch.queued(f"dd-{rnd}-{index}", thread, f"run-{rnd}-{index}",
                                          now_ms(), dedupe_key=f"key-{rnd}")
            barrier.wait(60)
            try:
                box.store.enqueue(dispatch)
                results.append([rnd, "ok", ""])
            except AlreadyExistsError as exc:
                results.append([rnd, "exists", exc.message])
            except Exception:
                results.append([rnd, "error", traceback.format_exc()])
        box.close()
    except BaseException:
        results.append([-1, "fatal", traceback.format_exc()])
        barrier.abort()
    finally:
        write_json(out, results)


def test_concurrent_enqueues_with_one_dedupe_key_store_exactly_one(
        mailbox: Mailbox, database_url: str, redis_url: str, namespace: str,
        tmp_path: Path) -> None:
    """(2) N processes enqueue the same (thread, dedupe_key) at once: one row, the rest
    AlreadyExistsError("dedupe_key=…"). Even rounds use a fresh thread (the epoch row is
    created in the race too), odd rounds one shared thread."""
    n = 8
    barrier = SPAWN.Barrier(n)
    outs = [tmp_path / f"dedupe-{i}.json" for i in range(n)]
    run_processes([(dedupe_child, (database_url, redis_url, namespace, i, barrier, str(outs[i])))
                   for i in range(n)], timeout_s=120)
    results = [read_json(p) for p in outs]
    bad = [r for rs in results for r in rs if r[1] in ("error", "fatal")]
    assert not bad, "\n".join(r[2] for r in bad)
    store = mailbox.store
    for rnd in range(DEDUPE_ROUNDS):
        outcomes = [(i, r) for i, rs in enumerate(results) for r in rs if r[0] == rnd]
        assert len(outcomes) == n
        winners = [i for i, r in outcomes if r[1] == "ok"]
        assert len(winners) == 1, f"round {rnd}: {len(winners)} enqueues succeeded"
        messages = {r[2] for _, r in outcomes if r[1] == "exists"}
        assert messages == {f"dedupe_key=key-{rnd}"}, messages
        thread = f"dd-thread-{rnd}" if rnd % 2 == 0 else "dd-shared"
        rows = [d for d in store.list_dispatches(thread) if d.dedupe_key == f"key-{rnd}"]
        assert [d.dispatch_id for d in rows] == [f"dd-{rnd}-{winners[0]}"]
        assert rows[0].status == DispatchStatus.Queued
    assert len(store.list_dispatches("dd-shared")) == DEDUPE_ROUNDS // 2


# ------------------------------------------------------------------------ claim_dispatch race
CLAIM_ROUNDS = 12


def claim_dispatch_child(database_url: str, redis_url: str, namespace: str, index: int,
                         barrier: Barrier, out: str) -> None:
    child_setup()
    results: list[list[Any]] = []
    try:
        box = Mailbox.connect(database_url, redis_url, namespace=namespace)
        for rnd in range(CLAIM_ROUNDS):
            # Even rounds: everybody claims dispatch a. Odd rounds: half claim a, half claim b
            # of the same thread (one winner per thread, §3.1 claim_dispatch).
            target = f"cd-{rnd}-a" if rnd % 2 == 0 or index % 2 == 0 else f"cd-{rnd}-b"
            barrier.wait(60)
            try:
                got = box.store.claim_dispatch(target, f"consumer-{index}", 60_000, now_ms())
                results.append([rnd, "won" if got else "lost", target,
                                got.claim_token if got else None])
            except Exception:
                results.append([rnd, "error", target, traceback.format_exc()])
        box.close()
    except BaseException:
        results.append([-1, "fatal", "", traceback.format_exc()])
        barrier.abort()
    finally:
        write_json(out, results)


def test_concurrent_claim_dispatch_has_exactly_one_winner(
        mailbox: Mailbox, database_url: str, redis_url: str, namespace: str,
        tmp_path: Path) -> None:
    """(3) 8 processes claim_dispatch one dispatch (or two of one thread) at the same moment:
    exactly one wins, and the row carries the winner's token and consumer id."""
    store = mailbox.store
    for rnd in range(CLAIM_ROUNDS):
        for suffix in ("a", "b"):
            store.enqueue(RunDispatch.queued(f"cd-{rnd}-{suffix}", f"cd-thread-{rnd}",
                                             f"run-{rnd}-{suffix}", now_ms()))
    n = 8
    barrier = SPAWN.Barrier(n)
    outs = [tmp_path / f"claim-{i}.json" for i in range(n)]
    run_processes([(claim_dispatch_child,
                    (database_url, redis_url, namespace, i, barrier, str(outs[i])))
                   for i in range(n)], timeout_s=120)
    results = [read_json(p) for p in outs]
    bad = [r for rs in results for r in rs if r[1] in ("error", "fatal")]
    assert not bad, "\n".join(str(r[3]) for r in bad)
    for rnd in range(CLAIM_ROUNDS):
        outcomes = [(i, r) for i, rs in enumerate(results) for r in rs if r[0] == rnd]
        assert len(outcomes) == n
        winners = [(i, r) for i, r in outcomes if r[1] == "won"]
        assert len(winners) == 1, f"round {rnd}: {len(winners)} winners: {winners}"
        index, (_, _, target, token) = winners[0]
        row = store.load_dispatch(target)
        assert row is not None and row.status == DispatchStatus.Claimed
        assert (row.claim_token, row.claimed_by) == (token, f"consumer-{index}")
        claimed = store.list_dispatches(f"cd-thread-{rnd}", [DispatchStatus.Claimed])
        assert [d.dispatch_id for d in claimed] == [target]




RECONCILE_ROUNDS = 20


def race_reconciles(box: Mailbox, dispatch: RunDispatch, racers: int) -> list[object]:
    """`racers` threads reconcile the same terminal dispatch at once; what each returned or
    raised."""
    def reconcile() -> object:
        try:
            return box.runs.reconcile(dispatch, now_ms())
        except Exception as exc:  # an outcome the test judges, like a return value
            return exc

    return race(*[reconcile] * racers, start_together=True, timeout_s=30)


def test_concurrent_reconciles_of_one_superseded_run_finish_it_exactly_once(
        mailbox: Mailbox) -> None:
    """The caller of interrupt() and the worker that finds its dispatch superseded both
    reconcile the run. Racing, each must either finish the run or see it finished: neither
    may fail with "changed concurrently", and exactly one reports the change (the one that
    emits run_finish). PostgreSQL's read-committed writers raced here before runs were
    locked for their read-modify-write (seen in CI through interrupt())."""
    racers = 4
    for i in range(RECONCILE_ROUNDS):
        receipt = mailbox.submit(f"reconcile-race-{i}", "echo", "x")
        [superseded] = mailbox.store.interrupt(receipt.thread_id, now_ms()).superseded
        outcomes = race_reconciles(mailbox, superseded, racers)
        errors = [o for o in outcomes if isinstance(o, Exception)]
        assert not errors, f"{receipt.thread_id}: {errors}"
        finished = [o for o in outcomes if o is not None]
        assert len(outcomes) == racers and len(finished) == 1, outcomes
        run = mailbox.runs.load_run(receipt.run_id)
        assert run is not None and run.status == RunStatus.done
