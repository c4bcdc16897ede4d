"""`MailboxHarness`: run agents through the real mailbox, in-process and synchronously
(README "Test your agents").

Celery's eager mode (`task_always_eager`) runs a task body in the caller, but it is not what
a worker does: arguments never meet the serializer (objects that cannot travel pass), a chain
runs as nested calls, and nothing is fenced against anything. The harness keeps everything
that decides what a run comes to and leaves out only the broker and the worker process:

- the phase functions a worker runs (`mailbox.phases`: claim → verify → reconstruct →
  resolve → execute → settle), with the context turned into the JSON a Celery message
  carries and back before every phase (`PhaseContext.to_message`, kombu's JSON serializer,
  `PhaseContext.from_message`), and a phase that raises handled as the task wrappers of
  `tasks/phases.py` handle it;
- the store with its fencing (claim tokens, epochs, leases in Redis and SQL), the heartbeat
  and its cancel checks, the event streams, the agent registry, retries and dead letters;
- SQLite (in memory by default: `mailbox.testing.memory_db`) migrated to head, and a real
  Redis (an embedded `redis-server` per harness unless given a URL; a namespace per harness).

What differs, and why:

- Time. The phases read `clock`, the wall clock plus an offset: `drain` moves it forward to
  the next retry or delayed dispatch when nothing else is due (`auto_advance`), so a backoff
  costs no waiting, and `advance(ms)` moves it by hand (to expire a lease before `sweep()`).
  The facade's own writes (submit, cancel, interrupt, resume) keep the wall clock. Backoff
  delays, attempt counts and `available_at` are the real ones, computed by settle.
- Scheduling. Wake-ups are recorded (`wakes`) rather than published; `drain` claims every
  thread with due work, as the wake-ups and the sweep of a worker would. Due work starts at
  once, even past the 5-minute countdown that production leaves to the sweep's next pass.
- One attempt at a time per `drain` call, in the caller's thread (`worker()` runs the same
  loop in a background thread, for tests that act on a running agent).

For real Celery messages and a real (in-process) worker, see `mailbox.testing.celery_worker`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu import serialization

from mailbox import maintenance
from mailbox.context import PhaseContext
from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.errors import MailboxError
from mailbox.events import Event
from mailbox.facade import Mailbox, Receipt
from mailbox.maintenance import SweepReport
from mailbox.model import DispatchStatus, MailboxInterrupt, RunDispatch, RunRecord, RunStatus
from mailbox.phases import claim_next, execute, reconstruct, resolve, settle, verify
from mailbox.runtime import Runtime, now_ms
from mailbox.settings import Settings, validate_namespace
from mailbox.store import Message
from mailbox.store.dispatches import MAX_LIST_LIMIT
from mailbox.testing.memory_db import MemoryDatabase

log = logging.getLogger(__name__)

Phase = Callable[[Runtime, PhaseContext], PhaseContext]
PHASES: tuple[tuple[str, Phase], ...] = (
    ("verify", verify), ("reconstruct", reconstruct), ("resolve", resolve),
    ("execute", execute), ("settle", settle))
DEFAULT_MAX_ATTEMPTS = 1000
_ACCEPT = serialization.prepare_accept_content(["json"])  # type: ignore[no-untyped-call]
_OWN_SETTINGS = frozenset({"database_url", "redis_url", "broker_url", "namespace"})


class HarnessError(MailboxError):
    """The harness was used in a way it cannot serve (not started, a drain that never ends)."""

    prefix = "harness"


class PhaseCrashedError(HarnessError):
    """A phase raised. A worker would log it, leave the dispatch Claimed until its lease
    runs out and let the sweep retry it; the harness does the same, then raises this (unless
    `raise_crashes=False`) so that the test sees the bug."""

    prefix = "phase crashed"


def wire(message: dict[str, Any]) -> dict[str, Any]:
    """A phase message as the next phase receives it: through kombu's JSON serializer, the
    one Celery uses for task arguments (celeryconfig: JSON only)."""
    content_type, encoding, data = serialization.dumps(  # type: ignore[no-untyped-call]
        message, serializer="json")
    decoded = serialization.loads(  # type: ignore[no-untyped-call]
        data, content_type, encoding, accept=_ACCEPT)
    if not isinstance(decoded, dict):
        raise HarnessError(f"a phase message decoded as {type(decoded).__name__}")
    return decoded


class HarnessClock:
    """The phases' clock: the wall clock plus an offset that only grows (`advance`)."""

    def __init__(self) -> None:
        self._offset = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return now_ms() + self._offset

    @property
    def offset_ms(self) -> int:
        """How far ahead of the wall clock the harness runs."""
        return self._offset

    def advance(self, ms: int) -> int:
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise HarnessError(f"advance takes a number of milliseconds >= 0, got {ms!r}")
        with self._lock:
            self._offset += ms
        return self()

    def advance_to(self, at: int) -> int:
        """Move forward so that the clock reads at least `at` (never backwards)."""
        with self._lock:
            self._offset += max(0, at - (now_ms() + self._offset))
        return self()


@dataclass(frozen=True)
class Attempt:
    """One chain the harness ran: a claim and its five phases."""

    dispatch_id: str
    thread_id: str
    run_id: str
    attempt: int
    """attempt_count at the claim (0 for the first attempt)."""
    outcome: str | None
    """What the attempt came to (`completed`, `transient_error`, `permanent_error`,
    `deferred`), None when the chain stopped before (fenced, superseded, crashed)."""
    error: str | None
    settled: str | None
    """The outcome settle wrote (ack, nack or dead letter), None when it wrote nothing."""
    reason: str | None
    """Why the chain stopped early (the context's `reason`)."""
    crashed: str | None
    """`phase: ExceptionType: message` when a phase raised."""
    hops: tuple[dict[str, Any], ...]
    """The context as each phase received it, decoded from its JSON message (verify first)."""


@dataclass(frozen=True)
class RunResult:
    """A dispatch and its run as the store has them now, with the run's events and messages
    and the attempts the harness ran for the dispatch."""

    receipt: Receipt
    dispatch: RunDispatch
    run: RunRecord
    events: tuple[Event, ...]
    messages: tuple[Message, ...]
    """The run's own messages: its input (or decision) and what the agent answered."""
    attempts: tuple[Attempt, ...]

    @property
    def status(self) -> DispatchStatus:
        return self.dispatch.status

    @property
    def response(self) -> str | None:
        return self.run.response

    @property
    def error(self) -> str | None:
        return self.run.error or self.dispatch.last_error

    @property
    def event_types(self) -> list[str]:
        return [e.type for e in self.events]

    @property
    def completed(self) -> bool:
        """Acked, and the run done with a natural end (the agent answered)."""
        termination = self.run.termination
        return (self.dispatch.status == DispatchStatus.Acked
                and self.run.status == RunStatus.done
                and termination is not None and termination.type == "natural_end")


class MailboxHarness:
    """A private mailbox for a test: its own database, Redis namespace, clock and runtime.

    `with MailboxHarness() as box:` starts an embedded Redis and an in-memory SQLite; pass
    `redis_url` to share a Redis server (each harness keeps to its namespace, and deletes its
    keys when it closes) or `database_url` for another database (it is migrated to head, and
    should be fresh). Other keyword arguments are `Settings` fields (`lease_ms=2000`,
    `retry_base_ms=10`, `agent_modules="myapp.agents"`, ...); MAILBOX_* variables of the
    environment are not read, so a test sees the same settings on every machine.
    """

    def __init__(self, *, database_url: str | None = None, redis_url: str | None = None,
                 namespace: str | None = None, auto_advance: bool = True,
                 raise_crashes: bool = True, **settings: Any) -> None:
        known = {f.name for f in dataclasses.fields(Settings)} - _OWN_SETTINGS
        unknown = sorted(set(settings) - known)
        if unknown:
            raise HarnessError(f"unknown settings {unknown}: pass Settings fields "
                               f"({', '.join(sorted(known))})")
        self.namespace = validate_namespace(namespace or f"harness-{uuid.uuid4().hex[:12]}")
        self.auto_advance = auto_advance
        self.raise_crashes = raise_crashes
        self.clock = HarnessClock()
        self.wakes: list[tuple[str, int]] = []
        """Every wake-up the mailbox asked for: (thread_id, delay_ms), in order."""
        self._overrides = settings
        self._database_url = database_url
        self._redis_url = redis_url
        self._memory: MemoryDatabase | None = None
        self._redis: EmbeddedRedis | None = None
        self._mailbox: Mailbox | None = None
        self._runtime: Runtime | None = None
        self._attempts: dict[str, list[Attempt]] = {}
        self._lock = threading.Lock()
        self._woken = threading.Event()

    # ----------------------------------------------------------------------- life cycle
    def start(self) -> MailboxHarness:
        if self._mailbox is not None:
            return self
        try:
            if self._database_url is None:
                self._memory = MemoryDatabase().open()
            database_url = self._memory.url if self._memory else self._database_url
            redis_url = self._redis_url
            if redis_url is None:
                self._redis = EmbeddedRedis(
                    workdir=Path(tempfile.mkdtemp(prefix="mailbox-harness-redis-")))
                redis_url = self._redis.start()
            settings = dataclasses.replace(Settings.from_env({}), **self._overrides)
            box = Mailbox.connect(database_url, redis_url, namespace=self.namespace,
                                  settings=dataclasses.replace(settings, broker_url=None))
            self._mailbox = box
            box.create_schema()
            box.waker = self._record_wake
            self._runtime = dataclasses.replace(
                box.runtime(consumer_id=f"harness:{self.namespace}:{uuid.uuid4().hex[:8]}",
                            wake=self._record_wake),
                clock=self.clock)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the connections, delete the namespace's keys from a shared Redis, stop the
        embedded Redis and drop the in-memory database."""
        box, self._mailbox, self._runtime = self._mailbox, None, None
        try:
            if box is not None:
                if self._redis is None:
                    with contextlib.suppress(Exception):  # a test may have stopped its Redis
                        client = box.store.coordinator.client
                        keys = list(client.scan_iter(f"{self.namespace}:*"))
                        if keys:
                            client.delete(*keys)
                box.close()
        finally:
            if self._redis is not None:
                self._redis.stop()
                shutil.rmtree(self._redis.workdir, ignore_errors=True)
                self._redis = None
            if self._memory is not None:
                self._memory.close()
                self._memory = None

    def __enter__(self) -> MailboxHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mailbox(self) -> Mailbox:
        """The facade over the harness's stores (dead letters, replay, stats: all of it)."""
        if self._mailbox is None:
            raise HarnessError("the harness is not started: use `with MailboxHarness() as "
                               "box:` or call start()")
        return self._mailbox

    @property
    def runtime(self) -> Runtime:
        """The runtime the phases get: the harness's clock, recorded wake-ups."""
        if self._runtime is None:
            raise HarnessError("the harness is not started")
        return self._runtime

    @property
    def settings(self) -> Settings:
        return self.mailbox.settings

    def environment(self) -> dict[str, str]:
        """The MAILBOX_* variables that point a process (`tasks.runtime`, a Celery worker)
        at this harness's database, Redis and namespace with the same settings. The
        database is in this process's memory unless `database_url` named another: only
        this process can use it then."""
        s = self.settings
        env = {"MAILBOX_DATABASE_URL": s.database_url, "MAILBOX_REDIS_URL": s.redis_url or "",
               "MAILBOX_NAMESPACE": s.namespace, "MAILBOX_AGENT_MODULES": s.agent_modules}
        fields = [f.name for f in dataclasses.fields(Settings)
                  if not f.name.startswith("api_") and f.name not in _OWN_SETTINGS]
        for name in fields:
            value = getattr(s, name)
            if isinstance(value, int) and not isinstance(value, bool):
                env[f"MAILBOX_{name.upper()}"] = str(value)
        seen = Settings.from_env(env)
        lost = [name for name in fields if getattr(seen, name) != getattr(s, name)]
        if lost:  # a setting whose variable is not MAILBOX_<FIELD>: say so, never drift
            raise HarnessError(f"settings {lost} cannot be passed through the environment")
        return env

    # ------------------------------------------------------------------------- submitting
    def submit(self, thread_id: str, agent: str, input: Any, **options: Any) -> Receipt:
        """`Mailbox.submit` (the arguments of `dispatch.delay`): stored durably, not run yet."""
        return self.mailbox.submit(thread_id, agent, input, **options)

    def run(self, agent: str, input: Any, *, thread_id: str | None = None,
            advance: bool | None = None, **options: Any) -> RunResult:
        """Submit, run everything due until the dispatch is settled (retries included, on
        the harness's clock), and return the outcome. On a thread with earlier queued work,
        that work runs first, in order. A run that waits for a decision comes back waiting
        (`resume`, then `drain`)."""
        receipt = self.submit(thread_id or f"thread-{uuid.uuid4().hex[:12]}", agent, input,
                              **options)
        self.drain(advance=advance)
        return self.result(receipt.dispatch_id, receipt=receipt)

    # ---------------------------------------------------------------------------- running
    def drain(self, thread_id: str | None = None, *, advance: bool | None = None,
              max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Attempt]:
        """Run due work (of one thread, or of all) until nothing is due, one attempt at a
        time. With `advance` (default: the harness's `auto_advance`), when only later work
        is left (a retry in backoff, `delay_ms`), move the clock to it and go on. A thread
        whose dispatch is still Claimed (a crashed phase) waits for `advance` + `sweep`."""
        advance = self.auto_advance if advance is None else advance
        ran: list[Attempt] = []
        while True:
            progressed = False
            threads = [thread_id] if thread_id is not None else \
                self.mailbox.store.due_thread_ids(self.clock(), MAX_LIST_LIMIT)
            for thread in threads:
                attempt = self.step(thread)
                if attempt is not None:
                    ran.append(attempt)
                    progressed = True
                    if len(ran) >= max_attempts:
                        raise HarnessError(f"drain ran {len(ran)} attempts and work is still "
                                           f"due: an agent that never settles?")
            if progressed:
                continue
            due = self.next_due(thread_id) if advance else None
            if due is None:
                return ran
            self.clock.advance_to(due)

    def step(self, thread_id: str) -> Attempt | None:
        """Claim the thread's next due dispatch and run its five phases; None when the thread
        is busy or has nothing due."""
        rt = self.runtime
        claimed = claim_next(rt, thread_id)
        if claimed is None:
            return None
        message = wire(claimed.to_message())  # what publish_chain puts in the verify message
        hops: list[dict[str, Any]] = []
        crash: tuple[str, BaseException] | None = None
        ctx = claimed
        for name, phase in PHASES:
            hops.append(message)
            ctx = PhaseContext.from_message(message)
            try:
                ctx = phase(rt, ctx)
            except Exception as exc:  # as tasks/phases.py: log, finish, and let settle wake
                log.exception("phase %s failed for %s", name, ctx.describe())
                crash = crash or (name, exc)
                ctx.finish(f"phase {name} crashed")
                if name == "settle":
                    rt.wake(ctx.thread_id, 0)
            message = wire(ctx.to_message())
        attempt = Attempt(
            claimed.dispatch_id, claimed.thread_id, claimed.run_id, claimed.attempt,
            None if ctx.outcome is None else ctx.outcome.kind,
            None if ctx.outcome is None else ctx.outcome.error, ctx.settled, ctx.reason,
            None if crash is None else f"{crash[0]}: {type(crash[1]).__name__}: {crash[1]}",
            tuple(hops))
        with self._lock:
            self._attempts.setdefault(claimed.dispatch_id, []).append(attempt)
        if crash is not None and self.raise_crashes:
            raise PhaseCrashedError(f"{attempt.crashed} (dispatch {claimed.dispatch_id} is "
                                    f"left Claimed, as a worker would leave it)") from crash[1]
        return attempt

    def next_due(self, thread_id: str | None = None) -> int | None:
        """When the earliest Queued dispatch that is not due yet becomes due (None: none)."""
        store = self.mailbox.store
        now = self.clock()
        threads = [thread_id] if thread_id is not None else store.queued_thread_ids()
        later = [d.available_at for t in threads
                 for d in store.list_dispatches(t, [DispatchStatus.Queued], MAX_LIST_LIMIT)
                 if d.available_at > now]
        return min(later, default=None)

    def advance(self, ms: int) -> int:
        """Move the harness's clock `ms` forward; returns the new time."""
        return self.clock.advance(ms)

    def sweep(self) -> SweepReport:
        """One sweep at the harness's time (what beat runs): reclaim expired leases,
        reconcile runs, wake due threads (recorded; `drain` runs them)."""
        return maintenance.sweep(self.runtime, self.clock())

    @contextlib.contextmanager
    def worker(self, *, poll_s: float = 0.02, stop_timeout_s: float = 30.0) -> Iterator[None]:
        """Run `drain` in a background thread until the block ends, on the real clock's pace
        (no jumps): for tests that cancel, interrupt or watch a running agent. An error in
        the background thread is raised when the block ends."""
        stop = threading.Event()
        errors: list[BaseException] = []

        def loop() -> None:
            while not stop.is_set():
                try:
                    if not self.drain(advance=False):
                        self._woken.wait(poll_s)
                        self._woken.clear()
                except BaseException as exc:
                    errors.append(exc)
                    return

        thread = threading.Thread(target=loop, name=f"harness-worker-{self.namespace}",
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            self._woken.set()
            thread.join(stop_timeout_s)
            if thread.is_alive():
                raise HarnessError(f"the harness worker did not stop within {stop_timeout_s} "
                                   f"s: an agent still running?")
        if errors:
            raise errors[0]

    def _record_wake(self, thread_id: str, delay_ms: int) -> None:
        self.wakes.append((thread_id, delay_ms))
        self._woken.set()

    # ----------------------------------------------------------------------- thread control
    def cancel(self, dispatch_id: str) -> bool:
        return self.mailbox.cancel(dispatch_id)

    def interrupt(self, thread_id: str) -> MailboxInterrupt:
        return self.mailbox.interrupt(thread_id)

    def resume(self, run_id: str, decision: Any) -> Receipt:
        """Queue the decision for a waiting run (run it with `drain`)."""
        return self.mailbox.resume(run_id, decision)

    def wait(self, dispatch_id: str, timeout_s: float = 30.0) -> RunDispatch:
        """`Mailbox.wait`: for work that runs elsewhere (`worker()`, a Celery worker)."""
        return self.mailbox.wait(dispatch_id, timeout_s)

    def wait_for_event(self, run_id: str, type: str, timeout_s: float = 30.0) -> Event:
        """The run's first event of this type, waiting for it (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        after: str | None = None
        while (left := deadline - time.monotonic()) > 0:
            for event in self.mailbox.events(run_id, after, follow=True, timeout_s=left):
                if event.type == type:
                    return event
                after = event.id
            time.sleep(0.01)  # the stream ended (its final run_finish) or timed out
        raise TimeoutError(f"no {type!r} event on run {run_id} within {timeout_s} s")

    # -------------------------------------------------------------------------- inspecting
    def result(self, dispatch_id: str, *, receipt: Receipt | None = None) -> RunResult:
        dispatch = self.dispatch(dispatch_id)
        run = self.get_run(dispatch.run_id)
        with self._lock:
            attempts = tuple(self._attempts.get(dispatch_id, ()))
        return RunResult(receipt or Receipt(dispatch_id, run.run_id, run.thread_id), dispatch,
                         run, tuple(self.events(run.run_id)),
                         tuple(self.mailbox.runs.run_messages(run.run_id)), attempts)

    def dispatch(self, dispatch_id: str) -> RunDispatch:
        found = self.mailbox.get_dispatch(dispatch_id)
        if found is None:
            raise HarnessError(f"no dispatch {dispatch_id}")
        return found

    def get_run(self, run_id: str) -> RunRecord:
        found = self.mailbox.get_run(run_id)
        if found is None:
            raise HarnessError(f"no run {run_id}")
        return found

    def dispatches(self, thread_id: str) -> list[RunDispatch]:
        """The thread's dispatches in claim order (priority, then arrival), any status."""
        return self.mailbox.store.list_dispatches(thread_id, None, MAX_LIST_LIMIT)

    def thread(self, thread_id: str, *, limit: int = MAX_LIST_LIMIT) -> list[Message]:
        """The thread's conversation, oldest first (its newest `limit` messages)."""
        return self.mailbox.thread_messages(thread_id, limit=limit)

    def events(self, run_id: str) -> list[Event]:
        """Every retained event of the run, oldest first."""
        return list(self.mailbox.events(run_id))

    def attempts(self, dispatch_id: str) -> list[Attempt]:
        with self._lock:
            return list(self._attempts.get(dispatch_id, ()))


__all__ = ["Attempt", "HarnessClock", "HarnessError", "MailboxHarness", "PhaseCrashedError",
           "RunResult", "wire"]
