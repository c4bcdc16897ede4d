"""The core Mailbox service tests of reference §6.2, adapted to this port.

Mapping. The reference's fake executors become test agents registered under unique names
(Counting = returns "ok" and counts; Blocking = waits for a release; PermanentInference =
raises PermanentError("unauthorized: …"); TransientInference = raises TransientError("rate
limited: …"); MissingAgent = a run pinned to an agent this process does not have).
"try_dispatch_next" is `claim_next` + `run_chain` (what the Celery `dispatch` task does);
"submit_background" is `Mailbox.submit` with the facade's waker pointed at an in-test `Worker`;
"run_sweep" / "recover" are `mailbox.maintenance.sweep(rt, now)`; "start_lifecycle" is a sweep
followed by running what it woke. A "prepared dispatch" is a submitted one (run, input and
dispatch written together) that nobody has woken.

Numbering follows §6.2. Adapted or skipped:
* 14 checks the metric families the mailbox records itself (start/completion histograms,
  runs, operation counters and durations, with the port's `mailbox_` prefix and `submit` in
  place of `enqueue`). The dispatch-depth gauge is computed at scrape time by the worker's
  exposition (`tasks/`), which is outside the phase functions tested here.
* 15 and 16 (classification, backoff) are pure functions: tests/unit/test_backoff_and_
  classification.py.
* 26 and 27 (reconstructing missing dispatch WALs) are about a concept this port does not
  have: submit writes run + input + dispatch in ONE transaction, so a run without its dispatch
  cannot exist. Replaced by 26': a failed submit writes neither (a real integrity conflict
  inside the transaction, a dedupe conflict, and an injected database failure), and 27': two
  instances sweeping the same expired claim concurrently transition it exactly once.
* 28-33, 35-37 and 40 are outside this file's scope (foreground/inline claims, live cancel
  delivery, signal loops, background-task waits).

Faults are injected by replacing ONE store method on the instance (`FailOnce`,
`InterruptOnFirstVerify`, `CountCalls`); everything else is the real SQL and Redis.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import exc as sa_exc

from mailbox import (
    AlreadyExistsError,
    DispatchStatus,
    Mailbox,
    MailboxError,
    PermanentError,
    RunDispatch,
    RunRecord,
    RunStatus,
    StoreUnavailableError,
    Termination,
    TransientError,
    VersionConflictError,
)
from mailbox.agents import AgentContext, agent
from mailbox.context import PhaseContext
from mailbox.maintenance import SweepReport, collect_garbage, sweep
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import Runtime, now_ms
from mailbox.schema import dispatches, messages, runs
from mailbox.store import Resolution
from tests.support.racers import race, racing

PERMANENT_TEXT = "unauthorized: 403 pre_consume_token_quota_failed"
TRANSIENT_TEXT = "rate limited: 429 too many requests"


# =================================================================================== helpers
class Clock:
    """Synthetic milliseconds, a minute ahead of the wall clock so that dispatches submitted
    during the test (stamped with the wall clock) are already due."""

    def __init__(self) -> None:
        self.now = now_ms() + 60_000

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


@dataclass
class Calls:
    contexts: list[AgentContext] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.contexts)


def register(behaviour: Callable[[AgentContext], Any]) -> tuple[str, Calls]:
    calls = Calls()
    name = f"test-agent-{uuid.uuid4().hex[:12]}"

    def handler(ctx: AgentContext) -> Any:
        calls.contexts.append(ctx)
        return behaviour(ctx)

    agent(name)(handler)
    return name, calls


def counting() -> tuple[str, Calls]:
    return register(lambda ctx: "ok")


def permanent() -> tuple[str, Calls]:
    def fail(ctx: AgentContext) -> str:
        raise PermanentError(PERMANENT_TEXT)

    return register(fail)


class Worker:
    """One worker process as the Celery tasks drive the phases: `wake` is the runtime's (and,
    when attached, the facade's) waker; `drain` runs the dispatch task for every zero-delay
    wake. Delayed wakes are left to the sweep, as DESIGN §5 says (no countdown/eta)."""

    def __init__(self, box: Mailbox, *, consumer: str | None = None,
                 clock: Callable[[], int] | None = None, **settings: Any) -> None:
        self.box = box
        self.wakes: list[tuple[str, int]] = []
        self.pending: deque[str] = deque()
        self.ran: list[str] = []
        rt = box.runtime(consumer_id=consumer, wake=self.wake)
        if settings:
            rt = replace(rt, settings=replace(box.settings, **settings))
        if clock is not None:
            rt = replace(rt, clock=clock)
        self.rt: Runtime = rt

    def attach(self) -> Worker:
        """Receive the facade's wakes too (what `dispatch.delay` publishes)."""
        self.box.waker = self.wake
        return self

    def wake(self, thread_id: str, delay_ms: int) -> None:
        self.wakes.append((thread_id, delay_ms))
        if delay_ms == 0:
            self.pending.append(thread_id)

    def dispatch(self, thread_id: str) -> PhaseContext | None:
        ctx = claim_next(self.rt, thread_id)
        if ctx is None:
            return None
        self.ran.append(ctx.dispatch_id)
        return run_chain(self.rt, ctx)

    def drain(self, limit: int = 500) -> int:
        done = 0
        while self.pending and done < limit:
            self.dispatch(self.pending.popleft())
            done += 1
        return done

    def sweep(self, now: int | None = None) -> SweepReport:
        return sweep(self.rt, self.rt.clock() if now is None else now)

    def start_lifecycle(self, now: int | None = None) -> SweepReport:
        report = self.sweep(now)
        self.drain()
        return report


def load(box: Mailbox, dispatch_id: str) -> RunDispatch:
    dispatch = box.store.load_dispatch(dispatch_id)
    assert dispatch is not None
    return dispatch


def run_of(box: Mailbox, run_id: str) -> RunRecord:
    run = box.get_run(run_id)
    assert run is not None
    return run


def ops(operation: str, result: str = "ok") -> float:
    value = REGISTRY.get_sample_value("mailbox_operations_total",
                                      {"operation": operation, "result": result})
    return value or 0.0


def count_rows(box: Mailbox, table: sa.Table, thread_id: str) -> int:
    with box.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                                .where(table.c.thread_id == thread_id)).scalar_one())


NO_DEPLOY_GRACE: dict[str, Any] = {"missing_agent_grace_s": 0}


def prepare_missing_agent(box: Mailbox, thread_id: str, *, max_attempts: int = 5
                          ) -> tuple[str, str, str]:
    """A run pinned to an agent this process does not have (another deploy submitted it).
    The tests that use it as the original's permanent resolve failure run their Worker with
    NO_DEPLOY_GRACE: a missing version is deferred for a grace period first (T19)."""
    missing = f"missing-agent-{uuid.uuid4().hex[:8]}"
    now = now_ms()
    run_id, dispatch_id = f"run-{uuid.uuid4().hex[:10]}", f"d-{uuid.uuid4().hex[:10]}"
    dispatch = RunDispatch.queued(dispatch_id, thread_id, run_id, now,
                                  max_attempts=max_attempts)
    run = RunRecord(run_id, thread_id, missing, f"{missing}@1", RunStatus.created,
                    dispatch_id=dispatch_id, created_at=now, updated_at=now)
    box.runs.submit(run, dispatch, Resolution(f"{missing}@1", missing, "1"),
                    f"m-{uuid.uuid4().hex[:10]}", "hello", now)
    return missing, run_id, dispatch_id


class FailOnce:
    """The first call of ONE store method fails with `error`; later calls pass through."""

    def __init__(self, real: Callable[..., Any], error: Exception) -> None:
        self.real = real
        self.error = error
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return self.real(*args, **kwargs)


class CountCalls:
    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ================================================================== 1-4: reconstruct failures
def test_01_reconstruct_failure_dead_letters_once_without_repolling(mailbox: Mailbox) -> None:
    name, calls = counting()
    clock = Clock()
    worker = Worker(mailbox, clock=clock)
    receipt = mailbox.submit("thread-gc", name, "hello")
    with mailbox.store.engine.begin() as conn:  # the run survives, its input is gone
        conn.execute(sa.delete(messages).where(messages.c.thread_id == "thread-gc"))

    assert worker.dispatch("thread-gc") is not None
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error is not None and "not found" in dispatch.last_error
    assert calls.count == 0

    clock.advance(50)
    worker.drain()
    assert worker.dispatch("thread-gc") is None
    assert worker.sweep().woken == []
    again = load(mailbox, receipt.dispatch_id)
    assert again.status == DispatchStatus.DeadLetter
    assert again.attempt_count == dispatch.attempt_count and calls.count == 0


def test_02_reconstruct_failure_missing_run_dead_letters_once(mailbox: Mailbox) -> None:
    worker = Worker(mailbox, clock=Clock())
    mailbox.store.enqueue(RunDispatch.queued("d-remapped", "thread-nr", "nonexistent-run",
                                             now_ms()))
    worker.dispatch("thread-nr")
    dispatch = load(mailbox, "d-remapped")
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error is not None and "not found" in dispatch.last_error
    assert "nonexistent-run" in dispatch.last_error
    assert dispatch.attempt_count == 0 and worker.dispatch("thread-nr") is None


def test_03_reconstruct_failure_cleans_worker_and_dispatches_next_queued(
        mailbox: Mailbox) -> None:
    name, calls = counting()
    worker = Worker(mailbox, clock=Clock())
    mailbox.store.enqueue(RunDispatch.queued("d-a", "thread-next", "missing-run", now_ms(),
                                             priority=10, max_attempts=3))
    b = mailbox.submit("thread-next", name, "b", priority=20)

    assert worker.dispatch("thread-next") is not None
    assert load(mailbox, "d-a").status == DispatchStatus.DeadLetter
    assert load(mailbox, b.dispatch_id).status == DispatchStatus.Queued
    worker.drain()  # no further call from the test: the settle's wake starts B
    assert load(mailbox, b.dispatch_id).status == DispatchStatus.Acked
    assert worker.ran == ["d-a", b.dispatch_id] and calls.count == 1


def test_04_reconstruct_failure_dead_letters_once_and_is_not_polled_again(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountCalls(mailbox.store.dead_letter)
    monkeypatch.setattr(mailbox.store, "dead_letter", counter)
    worker = Worker(mailbox, clock=Clock())
    mailbox.store.enqueue(RunDispatch.queued("d-once", "thread-once", "missing-run",
                                             now_ms()))
    worker.dispatch("thread-once")
    assert load(mailbox, "d-once").status == DispatchStatus.DeadLetter
    for _ in range(5):
        worker.drain()
        assert worker.dispatch("thread-once") is None
        worker.start_lifecycle()
    assert counter.calls == 1
    assert worker.ran == ["d-once"]


# ====================================================================== 5-8: error handling
def test_05_permanent_error_dead_letters_after_single_run(mailbox: Mailbox) -> None:
    name, calls = permanent()
    worker = Worker(mailbox, clock=Clock()).attach()
    receipt = mailbox.submit("thread-perm", name, "x", max_attempts=5)
    worker.drain()
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error is not None and "unauthorized" in dispatch.last_error
    assert calls.count == 1 and dispatch.attempt_count < 5


def test_06_transient_error_nacks_for_retry(mailbox: Mailbox) -> None:
    def rate_limited(ctx: AgentContext) -> str:
        raise TransientError(TRANSIENT_TEXT)

    name, calls = register(rate_limited)
    clock = Clock()
    worker = Worker(mailbox, clock=clock, retry_base_ms=600_000,
                    retry_max_ms=600_000).attach()
    receipt = mailbox.submit("thread-429", name, "x")
    worker.drain()

    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert dispatch.last_error is not None and "rate limited" in dispatch.last_error
    assert dispatch.available_at == clock() + 600_000
    assert ("thread-429", 600_000) in worker.wakes
    assert calls.count == 1, "no re-claim: available_at is 10 min ahead"
    assert worker.start_lifecycle(clock.advance(599_999)).woken == []
    assert calls.count == 1
    assert worker.start_lifecycle(clock.advance(1)).woken == ["thread-429"]
    assert calls.count == 2


def test_07_quota_storm_drains_with_bounded_work(mailbox: Mailbox) -> None:
    name, calls = permanent()
    worker = Worker(mailbox, clock=Clock())
    threads = [f"storm-{i:02d}" for i in range(50)]
    receipts = [mailbox.submit(t, name, "x") for t in threads]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(worker.dispatch, threads))

    assert all(load(mailbox, r.dispatch_id).status == DispatchStatus.DeadLetter
               for r in receipts)
    assert calls.count == 50
    assert mailbox.store.count_dispatches_by_status(DispatchStatus.Queued) == 0
    assert mailbox.store.count_dispatches_by_status(DispatchStatus.Claimed) == 0


def test_08_permanent_error_recovers_from_transient_dead_letter_fault(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = FailOnce(mailbox.store.dead_letter,
                     StoreUnavailableError("injected: i/o error writing dead letter"))
    monkeypatch.setattr(mailbox.store, "dead_letter", fault)
    name, calls = permanent()
    worker = Worker(mailbox, lease_ms=300).attach()
    receipt = mailbox.submit("thread-dlq-fault", name, "x")
    worker.drain()
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Claimed

    deadline = time.monotonic() + 5
    while load(mailbox, receipt.dispatch_id).status != DispatchStatus.DeadLetter:
        assert time.monotonic() < deadline, "never dead-lettered"
        time.sleep(0.05)
        worker.start_lifecycle()
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.last_error is not None and "unauthorized" in dispatch.last_error
    assert calls.count == 2, "fault left it Claimed → expired → reclaimed → re-run"
    assert dispatch.attempt_count == 1 and fault.calls == 2


# ============================================================ 9-11: results and their records
def test_09_background_success_records_run_result_and_keeps_ids_separate(
        mailbox: Mailbox) -> None:
    worker = Worker(mailbox, clock=Clock()).attach()
    receipt = mailbox.submit("thread-bg", "echo", "finished")
    worker.drain()
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked
    assert dispatch.run_status == RunStatus.done
    assert dispatch.run_id == receipt.run_id != receipt.dispatch_id
    assert dispatch.dispatch_instance_id is not None
    assert dispatch.termination == Termination.natural_end()
    assert dispatch.run_response == "finished" and dispatch.run_error is None
    assert dispatch.completed_at is not None


def test_10_background_success_recovers_ack_after_result_was_recorded(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = FailOnce(mailbox.runs.ack, MailboxError("injected ack failure"))
    monkeypatch.setattr(mailbox.runs, "ack", fault)
    worker = Worker(mailbox, clock=Clock()).attach()
    receipt = mailbox.submit("thread-ack", "echo", "finished")
    worker.drain()
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.run_status == RunStatus.done
    assert dispatch.run_response == "finished"
    assert fault.calls == 2, "ack recovery issued the second ack"


def test_11_background_permanent_error_records_run_result_before_dead_letter(
        mailbox: Mailbox) -> None:
    worker = Worker(mailbox, clock=Clock(), **NO_DEPLOY_GRACE)
    missing, run_id, dispatch_id = prepare_missing_agent(mailbox, "thread-missing")
    worker.wake("thread-missing", 0)  # what dispatch.delay publishes
    worker.drain()
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.run_status == RunStatus.done
    assert dispatch.run_error is not None and missing in dispatch.run_error
    assert dispatch.last_error is not None and missing in dispatch.last_error
    assert dispatch.termination is not None and dispatch.termination.type == "error"
    assert missing in str(dispatch.termination.value)
    assert dispatch.dispatch_instance_id is not None and dispatch.completed_at is not None
    assert run_id != dispatch_id


# ================================================================ 12-14: start, lease, metrics
class InterruptOnFirstVerify:
    """Verify's first look (`claim_current_in_redis`, before any SQL) interrupts the thread
    first: an interrupt lands between the claim and the start."""

    def __init__(self, box: Mailbox) -> None:
        self.box = box
        self.real = box.store.claim_current_in_redis
        self.fired = False

    def __call__(self, thread_id: str, *args: Any) -> bool:
        if not self.fired:
            self.fired = True
            self.box.store.interrupt(thread_id, now_ms())
        return self.real(thread_id, *args)


def test_12_interrupt_between_claim_and_execution_supersedes_without_runtime_start(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailbox.store, "claim_current_in_redis", InterruptOnFirstVerify(mailbox))
    name, calls = counting()
    worker = Worker(mailbox, lease_ms=300).attach()
    names = ("load_dispatch", "current_dispatch_epoch", "supersede_claimed",
             "mark_run_superseded")
    before = {n: ops(n) for n in names}
    receipt = mailbox.submit("thread-int", name, "x")
    worker.drain()

    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Superseded
    assert dispatch.claim_token is None and dispatch.lease_until is None
    assert calls.count == 0
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination == Termination.cancelled()
    assert run.dispatch_id == receipt.dispatch_id
    for n in names:
        assert ops(n) > before[n], f"operation {n} not recorded"


def test_13_lease_renewal_is_wired_and_prevents_reclaim(mailbox: Mailbox) -> None:
    started, release = threading.Event(), threading.Event()

    def blocking(ctx: AgentContext) -> str:
        started.set()
        assert release.wait(30)
        return "released"

    name, _ = register(blocking)
    worker = Worker(mailbox, lease_ms=450)
    receipt = mailbox.submit("thread-lease", name, "x")
    renewals = ops("lease_renewal")
    with racing(lambda: worker.dispatch("thread-lease"), timeout_s=30):
        try:
            assert started.wait(30)
            initial = load(mailbox, receipt.dispatch_id).lease_until
            assert initial is not None
            wait_until(lambda: (load(mailbox, receipt.dispatch_id).lease_until or 0) > initial,
                       timeout_s=30)
            time.sleep(0.6)  # longer than one lease: only renewal keeps it alive
            assert mailbox.store.reclaim_expired_leases(now_ms(), 100) == []
        finally:
            release.set()
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked
    assert ops("lease_renewal") > renewals


def test_14_execution_records_dispatch_latency_metrics(mailbox: Mailbox) -> None:
    histograms: dict[str, dict[str, str]] = {
        "mailbox_dispatch_enqueue_to_start_seconds_count": {},
        "mailbox_dispatch_eligible_to_start_seconds_count": {},
        "mailbox_dispatch_claim_to_start_seconds_count": {},
        "mailbox_dispatch_runtime_seconds_count": {"outcome": "completed"},
        "mailbox_dispatch_enqueue_to_complete_seconds_count": {"outcome": "completed"},
        "mailbox_runs_total": {"outcome": "completed"},
    }
    operations = ("submit", "claim", "record_dispatch_start", "record_run_result", "ack")

    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {n: sample(n, labels) for n, labels in histograms.items()}
    before_ops = {op: ops(op) for op in operations}
    worker = Worker(mailbox, clock=Clock()).attach()
    receipt = mailbox.submit("thread-metrics", "echo", "x")
    worker.drain()
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked

    for name, labels in histograms.items():
        assert sample(name, labels) == before[name] + 1, name
    for op in operations:
        assert ops(op) == before_ops[op] + 1, op
    text = generate_latest(REGISTRY).decode()
    for family in ("mailbox_operations_total", "mailbox_operation_duration_seconds"):
        assert family in text, family
    assert 'operation="ack",result="ok"' in text


# ======================================================================= 17-25: maintenance
def test_17_sweep_reclaims_expired_lease_and_completes_work(mailbox: Mailbox) -> None:
    name, calls = counting()
    clock = Clock()
    worker = Worker(mailbox, clock=clock)
    receipt = mailbox.submit("thread-crash", name, "x")
    [crashed] = mailbox.store.claim("thread-crash", "crashed-consumer", 100, clock())
    assert crashed.dispatch_id == receipt.dispatch_id

    report = worker.start_lifecycle(clock.advance(1000))
    assert report.reclaimed == [receipt.dispatch_id] and report.woken == ["thread-crash"]
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert calls.count >= 1


def test_18_gc_purges_old_terminal_dispatches(mailbox: Mailbox) -> None:
    store = mailbox.store
    store.enqueue(RunDispatch.queued("d-gc", "thread-gc-old", "r-gc", 1000))
    store.enqueue(RunDispatch.queued("d-live", "thread-gc-live", "r-live", 1000))
    [claimed] = store.claim("thread-gc-old", "c", 30_000, 1000)
    store.ack("d-gc", claimed.claim_token or "", 2000)

    kept = Worker(mailbox)  # default retention: a day
    assert collect_garbage(kept.rt, 3000) == 0
    assert store.load_dispatch("d-gc") is not None
    gc = Worker(mailbox, retention_s=0)
    assert collect_garbage(gc.rt, 2000) == 0, "strictly older than the cut-off"
    assert collect_garbage(gc.rt, 2001) == 1
    assert store.load_dispatch("d-gc") is None
    assert store.load_dispatch("d-live") is not None, "live dispatches are never purged"


def test_19_terminal_run_is_not_redispatched_by_recovery(mailbox: Mailbox) -> None:
    name, calls = counting()
    clock = Clock()
    worker = Worker(mailbox, clock=clock, retention_s=0).attach()
    receipt = mailbox.submit("thread-terminal", name, "x")
    worker.drain()
    assert calls.count == 1
    assert collect_garbage(worker.rt, clock.advance(1000)) == 1  # its dispatch row is gone
    assert run_of(mailbox, receipt.run_id).status == RunStatus.done

    report = worker.start_lifecycle()
    assert (report.reclaimed, report.woken, report.reconciled) == ([], [], [])
    assert mailbox.store.list_dispatches("thread-terminal") == []
    assert calls.count == 1


def test_20_startup_recovery_runs_existing_queued_dispatches(mailbox: Mailbox) -> None:
    missing, _, dispatch_id = prepare_missing_agent(mailbox, "thread-startup")
    worker = Worker(mailbox, clock=Clock(), **NO_DEPLOY_GRACE)  # nobody poked the dispatch
    report = worker.start_lifecycle()
    assert report.woken == ["thread-startup"]
    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error is not None and missing in dispatch.last_error


def test_21_startup_reclaims_expired_claimed_dispatches_and_executes_them(
        mailbox: Mailbox) -> None:
    missing, run_id, dispatch_id = prepare_missing_agent(mailbox, "thread-dead-consumer")
    clock = Clock()
    mailbox.store.claim("thread-dead-consumer", "dead-consumer", 1, clock())
    clock.advance(2)
    Worker(mailbox, clock=clock, **NO_DEPLOY_GRACE).start_lifecycle()

    dispatch = load(mailbox, dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.run_status == RunStatus.done and dispatch.attempt_count == 1
    assert run_id != dispatch_id and dispatch.dispatch_instance_id is not None
    assert dispatch.termination is not None and dispatch.termination.type == "error"
    assert missing in str(dispatch.termination.value)
    assert dispatch.run_error is not None and missing in dispatch.run_error


def test_22_multi_instance_lifecycle_executes_shared_dispatch_once(
        make_mailbox: Callable[..., Mailbox]) -> None:
    box_a, box_b = make_mailbox(), make_mailbox()
    name, calls = counting()
    receipt = box_a.submit("thread-shared", name, "x")
    clock = Clock()
    workers = [Worker(box_a, consumer="a", clock=clock), Worker(box_b, consumer="b",
                                                                clock=clock)]
    race(*(w.start_lifecycle for w in workers), start_together=True)
    assert load(box_a, receipt.dispatch_id).status == DispatchStatus.Acked
    assert calls.count == 1
    assert sorted(workers[0].ran + workers[1].ran) == [receipt.dispatch_id]


def test_23_recover_reconciles_terminal_cancelled_and_superseded_dispatches_after_crash(
        mailbox: Mailbox) -> None:
    name, calls = counting()
    clock = Clock()
    cancelled = mailbox.submit("thread-c", name, "x")
    superseded = mailbox.submit("thread-s", name, "y")
    # crashed between the store write and the run write: runs still `created`
    assert mailbox.store.cancel(cancelled.dispatch_id, clock()) is not None
    assert mailbox.store.interrupt("thread-s", clock()).superseded_count == 1
    assert run_of(mailbox, cancelled.run_id).status == RunStatus.created
    before = {n: ops(n) for n in ("unreconciled_terminal_dispatches", "mark_run_cancelled",
                                  "mark_run_superseded")}

    report = Worker(mailbox, clock=clock).start_lifecycle()
    assert (report.reclaimed, report.dead_lettered, report.woken) == ([], [], [])
    assert sorted(report.reconciled) == sorted([cancelled.dispatch_id, superseded.dispatch_id])
    for receipt in (cancelled, superseded):
        run = run_of(mailbox, receipt.run_id)
        assert run.status == RunStatus.done and run.termination == Termination.cancelled()
        assert run.dispatch_id == receipt.dispatch_id
    for n, value in before.items():
        assert ops(n) > value, n
    assert calls.count == 0
    assert Worker(mailbox, clock=clock).start_lifecycle().reconciled == [], "idempotent"


def test_24_reclaim_dead_letter_marks_run_error(mailbox: Mailbox) -> None:
    name, calls = counting()
    clock = Clock()
    receipt = mailbox.submit("thread-reclaim-dlq", name, "x", max_attempts=1)
    mailbox.store.claim("thread-reclaim-dlq", "stale-consumer", 100, clock())
    marked = ops("mark_run_dead_letter")

    report = Worker(mailbox, clock=clock).start_lifecycle(clock.advance(1000))
    assert report.dead_lettered == [receipt.dispatch_id] and report.reclaimed == []
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.DeadLetter
    assert dispatch.last_error == "lease expired; max attempts reached"
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done and run.termination is not None
    assert run.termination.type == "error" and run.dispatch_id == receipt.dispatch_id
    assert ops("mark_run_dead_letter") == marked + 1
    assert calls.count == 0


def test_25_sweep_reconciles_dead_letter_dispatch_after_crash(mailbox: Mailbox) -> None:
    name, _ = counting()
    clock = Clock()
    receipt = mailbox.submit("thread-dl-crash", name, "x")
    [claimed] = mailbox.store.claim("thread-dl-crash", "c", 30_000, clock())
    mailbox.store.dead_letter(receipt.dispatch_id, claimed.claim_token or "",
                              "crashed after dead_letter", clock())
    assert run_of(mailbox, receipt.run_id).status == RunStatus.created

    Worker(mailbox, clock=clock).sweep()
    run = run_of(mailbox, receipt.run_id)
    assert run.status == RunStatus.done
    assert run.termination == Termination.error("crashed after dead_letter")
    assert run.dispatch_id == receipt.dispatch_id


# =============================================================== 26'-27': atomic submit, sweep
def _nothing_written(box: Mailbox, thread_id: str) -> None:
    assert count_rows(box, runs, thread_id) == 0
    assert count_rows(box, dispatches, thread_id) == 0
    assert count_rows(box, messages, thread_id) == 0


def test_26a_submit_failing_inside_its_transaction_writes_neither_run_nor_dispatch(
        mailbox: Mailbox) -> None:
    """The input message is the last insert of the submit transaction; make it collide with
    an existing message id, so the run and dispatch inserts before it must roll back."""
    name, _ = counting()
    existing = mailbox.submit("thread-other", name, "first")
    [message] = mailbox.runs.run_messages(existing.run_id)
    now = now_ms()
    dispatch = RunDispatch.queued("d-atomic", "thread-atomic", "r-atomic", now)
    run = RunRecord("r-atomic", "thread-atomic", name, f"{name}@1", RunStatus.created,
                    dispatch_id="d-atomic", created_at=now, updated_at=now)
    with pytest.raises(AlreadyExistsError):
        mailbox.runs.submit(run, dispatch, Resolution(f"{name}@1", name, "1"),
                            message.message_id, "second", now)
    _nothing_written(mailbox, "thread-atomic")
    assert mailbox.get_run("r-atomic") is None and mailbox.get_dispatch("d-atomic") is None


def test_26b_submit_with_a_live_dedupe_key_writes_nothing(mailbox: Mailbox) -> None:
    name, _ = counting()
    worker = Worker(mailbox, clock=Clock()).attach()
    first = mailbox.submit("thread-dedupe", name, "one", dedupe_key="k")
    worker.wakes.clear()
    with pytest.raises(AlreadyExistsError):
        mailbox.submit("thread-dedupe", name, "two", dedupe_key="k")
    assert count_rows(mailbox, runs, "thread-dedupe") == 1
    assert count_rows(mailbox, dispatches, "thread-dedupe") == 1
    assert [m.content for m in mailbox.runs.thread_messages("thread-dedupe")] == ["one"]
    assert worker.wakes == [], "a refused submit publishes nothing"
    worker.dispatch("thread-dedupe")
    assert load(mailbox, first.dispatch_id).status == DispatchStatus.Acked
    mailbox.submit("thread-dedupe", name, "three", dedupe_key="k")  # key is free again


def test_26c_submit_on_a_database_failure_writes_nothing_and_can_be_retried(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    name, calls = counting()
    failure = sa_exc.OperationalError("INSERT INTO agent_resolutions", {},
                                      Exception("injected: server closed the connection"))
    monkeypatch.setattr(mailbox.runs, "_ensure_resolution",
                        FailOnce(mailbox.runs._ensure_resolution, failure))
    worker = Worker(mailbox, clock=Clock()).attach()
    with pytest.raises(StoreUnavailableError):
        mailbox.submit("thread-db-down", name, "x")
    _nothing_written(mailbox, "thread-db-down")
    assert worker.wakes == []

    receipt = mailbox.submit("thread-db-down", name, "x")
    worker.drain()
    assert load(mailbox, receipt.dispatch_id).status == DispatchStatus.Acked
    assert calls.count == 1


def test_27_concurrent_sweeps_of_two_instances_reclaim_once(
        make_mailbox: Callable[..., Mailbox]) -> None:
    box_a, box_b = make_mailbox(), make_mailbox()
    name, _ = counting()
    clock = Clock()
    receipt = box_a.submit("thread-two-sweeps", name, "x")
    box_a.store.claim("thread-two-sweeps", "crashed", 100, clock())
    workers = [Worker(box_a, clock=clock), Worker(box_b, clock=clock)]
    now = clock.advance(1000)
    reports = race(*(lambda w=w: w.sweep(now) for w in workers), start_together=True)
    assert sorted(d for r in reports for d in r.reclaimed) == [receipt.dispatch_id]
    dispatch = load(box_a, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1


# ============================================================= 34, 38, 39: distributed claims
def test_34_concurrent_submits_on_one_thread_only_one_runs_at_a_time(
        make_mailbox: Callable[..., Mailbox]) -> None:
    boxes = [make_mailbox(), make_mailbox()]  # two "processes", five workers between them
    lock = threading.Lock()
    running = [0]
    overlap: list[int] = []

    def exclusive(ctx: AgentContext) -> str:
        with lock:
            running[0] += 1
            overlap.append(running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return str(ctx.input)

    name, calls = register(exclusive)
    clock = Clock()
    with ThreadPoolExecutor(max_workers=5) as pool:
        receipts = list(pool.map(lambda i: boxes[i % 2].submit("thread-conc", name, i),
                                 range(5)))
    assert len({r.dispatch_id for r in receipts}) == 5
    workers = [Worker(boxes[i % 2], consumer=f"w{i}", clock=clock) for i in range(5)]
    barrier = threading.Barrier(5)

    def try_claim(worker: Worker) -> PhaseContext | None:
        barrier.wait()
        return claim_next(worker.rt, "thread-conc")

    with ThreadPoolExecutor(max_workers=5) as pool:
        claims = [c for c in pool.map(try_claim, workers) if c is not None]
    assert len(claims) == 1, "exactly one concurrent claim wins"
    assert len(boxes[0].store.list_dispatches("thread-conc", [DispatchStatus.Claimed])) == 1

    run_chain(workers[0].rt, claims[0])
    for _ in range(4):
        assert workers[0].dispatch("thread-conc") is not None
    assert all(load(boxes[0], r.dispatch_id).status == DispatchStatus.Acked for r in receipts)
    assert calls.count == 5 and max(overlap) == 1
    assert boxes[0].store.claimed_per_thread() == {}


def test_38_expired_lease_reclaim_rejects_late_old_owner_ack(mailbox: Mailbox) -> None:
    store = mailbox.store
    store.enqueue(RunDispatch.queued("d-38", "thread-38", "r-38", 0))
    a = store.claim_dispatch("d-38", "consumer-a", 100, 1000)
    assert a is not None and a.claim_token is not None
    [requeued] = store.reclaim_expired_leases(1101, 10)
    assert requeued.status == DispatchStatus.Queued and requeued.attempt_count == 1
    [b] = store.claim("thread-38", "consumer-b", 100, 1102)
    assert b.claim_token is not None and b.claim_token != a.claim_token

    with pytest.raises(VersionConflictError):
        store.ack("d-38", a.claim_token, 1103)
    still = load(mailbox, "d-38")
    assert still.status == DispatchStatus.Claimed and still.claimed_by == "consumer-b"
    assert still.claim_token == b.claim_token
    store.ack("d-38", b.claim_token, 1104)
    assert load(mailbox, "d-38").status == DispatchStatus.Acked


def test_38b_late_old_owner_chain_is_a_no_op_and_the_new_owner_finishes(
        mailbox: Mailbox) -> None:
    name, calls = counting()
    clock = Clock()
    old, new = Worker(mailbox, consumer="old", clock=clock), Worker(mailbox, consumer="new",
                                                                    clock=clock)
    receipt = mailbox.submit("thread-38b", name, "x")
    old_ctx = claim_next(old.rt, "thread-38b")
    assert old_ctx is not None
    assert old.sweep(clock.advance(mailbox.settings.lease_ms + 1)).reclaimed == [
        receipt.dispatch_id]
    new_ctx = claim_next(new.rt, "thread-38b")
    assert new_ctx is not None and new_ctx.attempt == 1

    late = run_chain(old.rt, old_ctx)
    assert late.done is True and late.reason == "not ours: Claimed"
    assert calls.count == 0
    assert load(mailbox, receipt.dispatch_id).claim_token == new_ctx.token
    run_chain(new.rt, new_ctx)
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 1
    assert calls.count == 1


def test_39_lease_reclaim_uses_strict_expiry_boundary(mailbox: Mailbox) -> None:
    store = mailbox.store
    store.enqueue(RunDispatch.queued("d-39", "thread-39", "r-39", 0))
    claimed = store.claim_dispatch("d-39", "consumer", 100, 1000)
    assert claimed is not None and claimed.lease_until == 1100
    assert store.reclaim_expired_leases(999, 10) == []
    worker = Worker(mailbox)
    assert worker.sweep(1100).reclaimed == [], "lease_until == now still belongs to the owner"
    assert load(mailbox, "d-39").status == DispatchStatus.Claimed
    [reclaimed] = store.reclaim_expired_leases(1101, 10)
    assert reclaimed.dispatch_id == "d-39" and reclaimed.status == DispatchStatus.Queued
