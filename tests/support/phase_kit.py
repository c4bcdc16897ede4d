"""Helpers for tests that drive the phase functions by hand against real SQL and Redis:
a synthetic clock, a recorded waker, per-test agents, and single-method fault injection.

Used by tests/integration/test_phases.py and the heartbeat tests; the only doubles are
`FailOnce`-style injections and direct SQL/Redis edits that stage what a crash or another
process would leave behind.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from prometheus_client import REGISTRY

from mailbox import Mailbox, RunDispatch, RunRecord, RunStatus
from mailbox.agents import AgentContext, agent
from mailbox.context import PhaseContext
from mailbox.phases import claim_next, execute, reconstruct, resolve, settle
from mailbox.runtime import Runtime, now_ms
from mailbox.store import MailboxStore, Resolution

Phase = Callable[[Runtime, PhaseContext], PhaseContext]


class Clock:
    """Synthetic milliseconds for the runtime. Starts a minute ahead of the wall clock so that
    dispatches submitted during the test (stamped with the wall clock) are already due."""

    def __init__(self) -> None:
        self.now = now_ms() + 60_000

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


class Wakes:
    """The runtime's `wake(thread_id, delay_ms)`, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, thread_id: str, delay_ms: int) -> None:
        with self._lock:
            self.calls.append((thread_id, delay_ms))


@dataclass
class Calls:
    """What a test agent saw, one entry per invocation."""

    contexts: list[AgentContext] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.contexts)


def register(behaviour: Callable[[AgentContext], Any], *, name: str | None = None,
             version: str = "1") -> tuple[str, Calls]:
    calls = Calls()
    agent_name = name or f"test-agent-{uuid.uuid4().hex[:12]}"

    def handler(ctx: AgentContext) -> Any:
        calls.contexts.append(ctx)
        return behaviour(ctx)

    agent(agent_name, version)(handler)
    return agent_name, calls


def make_runtime(box: Mailbox, wakes: Wakes, *, clock: Callable[[], int] | None = None,
                 consumer: str | None = None, **settings: Any) -> Runtime:
    rt = box.runtime(consumer_id=consumer, wake=wakes)
    if settings:
        rt = replace(rt, settings=replace(box.settings, **settings))
    if clock is not None:
        rt = replace(rt, clock=clock)
    return rt


def claim(rt: Runtime, thread_id: str) -> PhaseContext:
    ctx = claim_next(rt, thread_id)
    assert ctx is not None, f"nothing claimable on {thread_id}"
    return ctx


def phases(rt: Runtime, ctx: PhaseContext, *steps: Phase) -> PhaseContext:
    for step in steps:
        ctx = step(rt, ctx)
    return ctx


def after_verify(rt: Runtime, ctx: PhaseContext) -> PhaseContext:
    return phases(rt, ctx, reconstruct, resolve, execute, settle)


def load(box: Mailbox, dispatch_id: str) -> RunDispatch:
    dispatch = box.store.load_dispatch(dispatch_id)
    assert dispatch is not None
    return dispatch


def run_of(box: Mailbox, run_id: str) -> RunRecord:
    run = box.get_run(run_id)
    assert run is not None
    return run


def event_types(box: Mailbox, run_id: str) -> list[str]:
    return [e.type for e in box.events_of(run_id)]


def ops(operation: str, result: str = "ok") -> float:
    value = REGISTRY.get_sample_value("mailbox_operations_total",
                                      {"operation": operation, "result": result})
    return value or 0.0


def sql(box: Mailbox, statement: sa.Executable) -> None:
    with box.store.engine.begin() as conn:
        conn.execute(statement)


def submit_raw(box: Mailbox, thread_id: str, *, agent_id: str, resolution_id: str | None,
               resolution: Resolution, content: Any = "input", max_attempts: int = 5
               ) -> tuple[str, str]:
    """Write run + input + dispatch the way another process (another deploy) would have."""
    now = now_ms()
    run_id, dispatch_id = f"run-{uuid.uuid4().hex[:10]}", f"d-{uuid.uuid4().hex[:10]}"
    dispatch = RunDispatch.queued(dispatch_id, thread_id, run_id, now,
                                  max_attempts=max_attempts)
    run = RunRecord(run_id, thread_id, agent_id, resolution_id, RunStatus.created,
                    dispatch_id=dispatch_id, created_at=now, updated_at=now)
    box.runs.submit(run, dispatch, resolution, f"m-{uuid.uuid4().hex[:10]}", content, now)
    return run_id, dispatch_id


class FailOnce:
    """Fault injection for ONE store method: the first call fails (optionally after the real
    call went through, as when a response is lost), later calls pass through."""

    def __init__(self, real: Callable[..., Any], error: Exception, *,
                 after_real: bool = False) -> None:
        self.real = real
        self.error = error
        self.after_real = after_real
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            if self.after_real:
                self.real(*args, **kwargs)
            raise self.error
        return self.real(*args, **kwargs)


def assert_no_claim(dispatch: RunDispatch) -> None:
    assert (dispatch.claim_token, dispatch.claimed_by, dispatch.lease_until) == (None, None, None)


@contextmanager
def count_sql(store: MailboxStore) -> Iterator[list[str]]:
    """The SQL statements the store's engine runs inside the block."""
    statements: list[str] = []

    def before_cursor_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", before_cursor_execute)
    try:
        yield statements
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", before_cursor_execute)


def forget_lease(mailbox: Mailbox, thread_id: str) -> None:
    """Redis loses the thread's lease (a flush, a restart): what SQL says then decides."""
    mailbox.store.coordinator.client.delete(mailbox.store.coordinator.lease_key(thread_id))
