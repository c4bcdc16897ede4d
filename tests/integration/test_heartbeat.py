"""The heartbeat never dies of a fault (mailbox/heartbeat.py).

An attempt's heartbeat renews its lease in SQL (and Redis) and reads its cancel signal in
Redis. Before, one Redis error in the cancel check ended the heartbeat thread: renewals
stopped, the lease ran out under a still-running agent, the sweep reclaimed the attempt and
another worker ran it a second time while the first still ran. These tests inject errors of
every kind into both calls, against real SQL and Redis, with a sweep racing the attempt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import redis

from mailbox import DispatchStatus, Mailbox, RunStatus, StoreUnavailableError
from mailbox.agents import AgentContext, AgentResult, agent
from mailbox.model import Termination
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import Runtime, now_ms
from tests.support.phase_kit import (
    Wakes,
    claim,
    event_types,
    load,
    make_runtime,
    ops,
    register,
    run_of,
)

ERRORS: tuple[Callable[[], Exception], ...] = (
    lambda: redis.ConnectionError("injected: Connection refused"),
    lambda: redis.TimeoutError("injected: Timeout reading from socket"),
    lambda: StoreUnavailableError("injected: redis unreachable during extend_lease"),
    lambda: RuntimeError("injected: something nobody expected"),
)


class Bursts:
    """Fails in bursts: `fail_s` of errors (cycling through ERRORS), then `ok_s` of normal
    calls, over and over. Counts both."""

    def __init__(self, real: Callable[..., Any], fail_s: float, ok_s: float) -> None:
        self.real, self.fail_s, self.ok_s = real, fail_s, ok_s
        self.started = time.monotonic()
        self.failures = self.successes = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        phase = (time.monotonic() - self.started) % (self.fail_s + self.ok_s)
        if phase < self.fail_s:
            with self._lock:
                self.failures += 1
                error = ERRORS[self.failures % len(ERRORS)]()
            raise error
        value = self.real(*args, **kwargs)
        with self._lock:
            self.successes += 1
        return value


class EveryOther:
    """Every other call fails (cycling through ERRORS); the others go through."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.calls = self.failures = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls % 2 == 1:
            self.failures += 1
            raise ERRORS[self.failures % len(ERRORS)]()
        return self.real(*args, **kwargs)


def with_cancel_check(rt: Runtime, check: Callable[[str, str], str | None]) -> Runtime:
    return replace(rt, cancel_check=check)


@contextmanager
def sweeping(box: Mailbox, every_s: float = 0.05) -> Iterator[list[Any]]:
    """Another process's sweep at wall-clock time, racing the attempt: it reclaims the claim
    the moment its SQL lease runs out."""
    reports: list[Any] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            reports.append(box.sweep())

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield reports
    finally:
        stop.set()
        thread.join(10)


def sleeper(seconds: float) -> Callable[[AgentContext], Any]:
    def run(ctx: AgentContext) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ctx.cancelled():
                return AgentResult(termination=Termination.cancelled())
            time.sleep(0.02)
        return f"ran {seconds}s"

    return run


# Serial: the schedule gives the heartbeat 150 ms windows in which a cancel check (every
# 100 ms) must get through; with four test processes on two cores its thread once missed a
# window, and the gap ran past a lease.
@pytest.mark.serial
def test_errors_in_cancel_checks_and_renewals_over_three_leases_change_nothing(
        make_mailbox: Callable[..., Mailbox], monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel checks fail in bursts shorter than a lease, every other renewal fails, with
    every kind of error; the agent runs four leases while another sweep races it. One
    execution, no reclaim, the run completes."""
    lease_ms = 1500
    worker, other = make_mailbox(), make_mailbox()
    name, calls = register(sleeper(4 * lease_ms / 1000))
    rt = make_runtime(worker, Wakes(), lease_ms=lease_ms)
    checks = Bursts(rt.cancel_check, fail_s=0.9, ok_s=0.15)
    renewals = EveryOther(worker.store.extend_lease)
    monkeypatch.setattr(worker.store, "extend_lease", renewals)
    rt = with_cancel_check(rt, checks)
    errors_before = ops("cancel_check", "error")
    receipt = worker.submit("t-blips", name, "go")

    with sweeping(other) as sweeps:
        out = run_chain(rt, claim(rt, "t-blips"))

    assert calls.count == 1, "the agent ran more than once"
    assert out.stop_reason is None, f"the heartbeat stopped the agent: {out}"
    assert out.settled == "completed", out
    dispatch = load(worker, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    run = run_of(worker, receipt.run_id)
    assert run.status == RunStatus.done and run.response == f"ran {4 * lease_ms / 1000}s"
    assert not any(r.reclaimed or r.dead_lettered or r.acked for r in sweeps), sweeps
    assert len(sweeps) > 20, "the racing sweep hardly ran"
    assert event_types(worker, receipt.run_id).count("run_started") == 1
    # The faults really happened, in both calls, and were counted.
    # Bursts of failures with successes between them (a loaded machine gets fewer of the
    # 150 ms windows: five were seen under four test processes).
    assert checks.failures > 20 and checks.successes >= 3, vars(checks)
    assert renewals.failures >= 3 and renewals.calls - renewals.failures >= 3, vars(renewals)
    assert ops("cancel_check", "error") - errors_before == checks.failures


def test_cancel_signal_unreadable_for_a_lease_stops_the_attempt_as_a_transient_failure(
        mailbox: Mailbox) -> None:
    """Blind to cancels for a whole lease, the attempt must not run on silently: the agent is
    told to stop, and the attempt counts as a transient failure (nobody cancelled the run,
    so it is retried, not ended cancelled)."""
    lease_ms = 400

    def unreadable(thread_id: str, token: str) -> str | None:
        raise redis.ConnectionError("injected: Connection refused")

    name, calls = register(sleeper(10))
    rt = with_cancel_check(make_runtime(mailbox, Wakes(), lease_ms=lease_ms), unreadable)
    receipt = mailbox.submit("t-blind", name, "go")
    started = time.monotonic()
    out = run_chain(rt, claim(rt, "t-blind"))
    elapsed = time.monotonic() - started

    assert calls.count == 1
    assert out.stop_kind == "unsafe"
    assert out.stop_reason.startswith("cancel signal unreadable for ")
    assert out.settled == "transient_error"
    assert lease_ms / 1000 <= elapsed < 5, elapsed
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert dispatch.last_error is not None
    assert dispatch.last_error.startswith("attempt stopped: cancel signal unreadable for ")
    assert "ConnectionError" in dispatch.last_error
    assert run_of(mailbox, receipt.run_id).status != RunStatus.done
    finish = [e for e in mailbox.events_of(receipt.run_id) if e.type == "run_finish"]
    assert [e.data["status"] for e in finish] == ["retrying"]


def test_renewals_failing_for_a_lease_stop_the_attempt_as_a_transient_failure(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    lease_ms = 400

    def failing(*args: Any, **kwargs: Any) -> bool:
        raise StoreUnavailableError("injected: database unreachable during extend_lease")

    monkeypatch.setattr(mailbox.store, "extend_lease", failing)
    name, calls = register(sleeper(10))
    rt = make_runtime(mailbox, Wakes(), lease_ms=lease_ms)
    receipt = mailbox.submit("t-unrenewed", name, "go")
    out = run_chain(rt, claim(rt, "t-unrenewed"))

    assert calls.count == 1
    assert out.stop_kind == "unsafe"
    assert out.stop_reason.startswith("lease renewal failing for ")
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert dispatch.last_error is not None
    assert dispatch.last_error.startswith("attempt stopped: lease renewal failing for ")


def test_an_agent_that_ignores_the_safety_stop_and_raises_is_still_a_stopped_attempt(
        mailbox: Mailbox) -> None:
    """Whatever the agent does once stopped for safety — here it raises PermanentError — the
    attempt is the transient 'attempt stopped' failure, never a dead letter of its own."""
    from mailbox import PermanentError

    def stubborn(ctx: AgentContext) -> str:
        while not ctx.cancelled():
            time.sleep(0.02)
        raise PermanentError("I was interrupted, so I give up for good")

    def unreadable(thread_id: str, token: str) -> str | None:
        raise redis.ConnectionError("injected")

    name, _ = register(stubborn)
    rt = with_cancel_check(make_runtime(mailbox, Wakes(), lease_ms=300), unreadable)
    receipt = mailbox.submit("t-stubborn", name, "go")
    run_chain(rt, claim(rt, "t-stubborn"))
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert dispatch.last_error is not None and dispatch.last_error.startswith("attempt stopped")


def test_a_garbled_cancel_signal_still_cancels(mailbox: Mailbox) -> None:
    """The key exists, so somebody asked the claim to stop; its payload is not JSON."""
    rt = make_runtime(mailbox, Wakes(), lease_ms=1000)
    receipt = mailbox.submit("t-garbled", "sleep", {"ms": 10_000})
    ctx = claim(rt, "t-garbled")
    mailbox.store.coordinator.client.set(f"{mailbox.settings.namespace}:cancel:{ctx.token}",
                                         b"\xff not json")
    out = run_chain(rt, ctx)
    assert out.stop_kind == "requested" and out.stop_reason == "cancelled"
    assert load(mailbox, receipt.dispatch_id).termination == Termination.cancelled()


def test_interrupt_commits_when_redis_cannot_take_the_cancel_signal(
        make_mailbox: Callable[..., Mailbox]) -> None:
    """The interrupt is durable in SQL; the running attempt is fenced at its next renewal, so
    a Redis that cannot take the signal must not turn a done interrupt into an error. A
    cancel of a running dispatch has only the signal: it says Redis is unreachable."""
    box = make_mailbox()
    blind = make_mailbox("redis://127.0.0.1:1/0")  # nothing listens on port 1
    rt = make_runtime(box, Wakes())
    receipt = box.submit("t-nosignal", "sleep", {"ms": 10_000})
    ctx = claim(rt, "t-nosignal")

    with pytest.raises(StoreUnavailableError, match="signalling the worker"):
        blind.cancel(receipt.dispatch_id)
    result = blind.interrupt("t-nosignal")
    assert result.new_dispatch_epoch == 1
    assert result.active_dispatch is not None
    assert result.active_dispatch.dispatch_id == ctx.dispatch_id
    assert box.store.sql_epoch("t-nosignal") == 1
    assert box.store.extend_lease(ctx.dispatch_id, ctx.token, 1000, now_ms()) is False


# ============================================================================== time limits
class Stuck:
    """Runtime.stuck, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, dispatch_id: str, stuck: bool) -> None:
        self.calls.append((dispatch_id, stuck))


def stubborn_for(seconds: float) -> Callable[[AgentContext], Any]:
    """Ignores every stop for `seconds` (a blocking call that does not look up), then
    returns an answer."""
    def run(ctx: AgentContext) -> Any:
        time.sleep(seconds)
        return "late answer"
    return run


def test_a_cooperative_agent_past_its_timeout_is_a_transient_failure(mailbox: Mailbox) -> None:
    name, _ = register(sleeper(30))
    agent(name, "2", timeout_s=0.5)(sleeper(30))
    rt = make_runtime(mailbox, Wakes(), lease_ms=3000)
    receipt = mailbox.submit("t-timeout", name, "go")
    started = time.monotonic()
    out = run_chain(rt, claim(rt, "t-timeout"))
    assert 0.5 <= time.monotonic() - started < 3
    assert out.stop_kind == "timeout" and out.settled == "transient_error"
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Queued and dispatch.attempt_count == 1
    assert dispatch.last_error == "timed out after 0.5 s"


def test_a_global_default_bounds_agents_without_their_own_timeout(mailbox: Mailbox) -> None:
    name, _ = register(sleeper(30))
    rt = make_runtime(mailbox, Wakes(), lease_ms=3000, agent_timeout_s=1)
    receipt = mailbox.submit("t-default-timeout", name, "go")
    out = run_chain(rt, claim(rt, "t-default-timeout"))
    assert out.stop_kind == "timeout"
    assert load(mailbox, receipt.dispatch_id).last_error == "timed out after 1 s"


@pytest.mark.serial
def test_an_agent_that_ignores_its_timeout_is_abandoned_after_the_grace(
        mailbox: Mailbox) -> None:
    """A non-cooperative agent: past timeout + grace the heartbeat ends the attempt for it
    (a transient failure, the thread free for its next dispatch) while the agent still runs;
    the process is reported stuck until the agent returns, and its late answer is dropped."""
    name, calls = register(stubborn_for(3.5))
    agent(name, "2", timeout_s=0.5)(stubborn_for(3.5))
    stuck = Stuck()
    rt = replace(make_runtime(mailbox, Wakes(), lease_ms=3000, agent_timeout_grace_s=1),
                 stuck=stuck)
    receipt = mailbox.submit("t-hung", name, "go")
    later = mailbox.submit("t-hung", "echo", "next in line")
    results: dict[str, Any] = {}
    ctx = claim(rt, "t-hung")
    runner = threading.Thread(target=lambda: results.update(out=run_chain(rt, ctx)))
    started = time.monotonic()
    runner.start()

    def abandoned() -> bool:
        return load(mailbox, receipt.dispatch_id).status == DispatchStatus.Queued

    while not abandoned():
        assert time.monotonic() - started < 3, "not abandoned within timeout + grace"
        time.sleep(0.02)
    abandoned_after = time.monotonic() - started
    assert 1.5 <= abandoned_after < 3, abandoned_after
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.attempt_count == 1 and dispatch.last_error is not None
    assert dispatch.last_error.startswith("timed out after 0.5 s; the agent did not stop "
                                          "within 1 s and was abandoned")
    assert stuck.calls == [(receipt.dispatch_id, True)]
    # The thread is free: its next dispatch runs while the stuck agent still sleeps (the
    # abandonment gives the lease back just after its nack commits: poll for it).
    nxt = claim_next(rt, "t-hung")
    while nxt is None and time.monotonic() - started < 3.3:
        time.sleep(0.02)
        nxt = claim_next(rt, "t-hung")
    assert nxt is not None and nxt.dispatch_id == later.dispatch_id
    assert runner.is_alive(), "the stuck agent had already returned: this proves nothing"
    runner.join(10)
    out = results["out"]
    assert out.done and out.reason.startswith("abandoned")
    assert stuck.calls == [(receipt.dispatch_id, True), (receipt.dispatch_id, False)]
    assert load(mailbox, receipt.dispatch_id).run_response is None  # late answer dropped
    assert calls.count == 0  # version 2 ran, once


def test_an_agent_slow_to_heed_a_cancel_keeps_its_lease_then_ends_cancelled(
        mailbox: Mailbox) -> None:
    """After a cancel the heartbeat keeps renewing while the agent winds down (before, it
    stopped renewing at once: an agent slower than its lease to notice was reclaimed by the
    sweep and run a second time beside itself). Past the grace it is abandoned: cancelled."""
    lease_ms = 600
    name, calls = register(stubborn_for(2.5))
    rt = make_runtime(mailbox, Wakes(), lease_ms=lease_ms, agent_timeout_grace_s=1)
    receipt = mailbox.submit("t-slow-cancel", name, "go")
    ctx = claim(rt, "t-slow-cancel")
    results: dict[str, Any] = {}
    with sweeping(mailbox) as sweeps:
        runner = threading.Thread(target=lambda: results.update(out=run_chain(rt, ctx)))
        runner.start()
        deadline = time.monotonic() + 10
        while load(mailbox, receipt.dispatch_id).run_status != RunStatus.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        mailbox.cancel(receipt.dispatch_id)
        runner.join(15)
    assert not any(r.reclaimed for r in sweeps), "reclaimed while the agent wound down"
    assert calls.count == 1
    dispatch = load(mailbox, receipt.dispatch_id)
    assert dispatch.status == DispatchStatus.Acked and dispatch.attempt_count == 0
    assert dispatch.termination == Termination.cancelled()
    assert results["out"].reason.startswith("abandoned")
