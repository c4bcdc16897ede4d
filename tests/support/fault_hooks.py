"""Fault injection inside real worker processes (and the test process), for tests/faults/.

Loaded into a worker with `Stack.start_worker(include=["tests.support.fault_hooks"],
FAULT_HOOKS="1")`. Celery imports `-I/--include` modules in the worker's main process before
it forks the pool, so every pool child — and every child the pool forks later to replace a
killed one — starts with the hooks in place. (MAILBOX_AGENT_MODULES would not do: a child
imports those at its first task, inside `runtime()`, after that task already looked up the
unwrapped phase function.) The test process installs the same hooks with `installed(...)`.

Nothing in the product knows about this module: it wraps `mailbox.phases.<phase>` (the
phase tasks look those up at call time) and the Celery app's `amqp.send_task_message` (every
publish — `dispatch.delay`, wake-ups, chain links — goes through it).

Faults are armed and disarmed at run time through Redis keys under `<namespace>:fault:`, so a
test steers them while the workers run:

traps     HASH thread_id -> "phase:when[:hold_s]". The first call of that phase on that thread,
          `when` = "before" or "after" the real phase function, takes the trap (HDEL decides,
          so exactly one process gets it): it pushes {pid, dispatch_id, thread_id, phase,
          when, attempt, outcome_recorded} on the list `hits` and sleeps `hold_s` (default
          60), so the test can SIGKILL that pool process exactly there. A chain that already
          ended (its context is done: fenced, superseded, lease lost) is never trapped.
publish   HASH task name -> JSON list of rules {"copies": n, "attempt": a, "thread_prefix": p,
          "not_from": t, "priority": q} (all but copies optional; the first rule that matches
          applies). Each matching message this process publishes is sent n times: 0 drops it,
          3 triples it. `attempt` matches phase messages whose context has that attempt;
          `thread_prefix` matches the message's thread; `not_from` skips messages published
          while the task named t runs (e.g. the sweep's own wake-ups); `priority` publishes
          it with that broker priority.
          Counters: `dropped`, `duplicated` (HASH task name -> n).
lost-acks SET of thread ids. The next settle's ack on that thread (`RunStore.ack_and_claim_next`,
          a worker's) commits, then raises StoreUnavailableError as if the connection dropped
          after COMMIT: its answer is lost, and whatever it would have done after the commit
          (hand the lease to the claim it made) is not done. SREM decides, so one ack takes
          it; it pushes {pid, thread_id, fault: "lost_ack", claimed} on `hits`.

A hook that cannot reach Redis (the test restarts it) injects nothing: faults are opt-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

PHASES = ("verify", "reconstruct", "resolve", "execute", "settle")
WHENS = ("before", "after")
DEFAULT_HOLD_S = 60.0


@dataclass(frozen=True)
class Keys:
    namespace: str

    @property
    def traps(self) -> str:
        return f"{self.namespace}:fault:traps"

    @property
    def hits(self) -> str:
        return f"{self.namespace}:fault:hits"

    @property
    def publish(self) -> str:
        return f"{self.namespace}:fault:publish"

    @property
    def dropped(self) -> str:
        return f"{self.namespace}:fault:dropped"

    @property
    def duplicated(self) -> str:
        return f"{self.namespace}:fault:duplicated"

    @property
    def lost_acks(self) -> str:
        return f"{self.namespace}:fault:lost-acks"


class _Config:
    """Where the hooks of this process look for their faults (per pid: a forked child opens
    its own connection)."""

    def __init__(self) -> None:
        self.redis_url: str | None = None
        self.keys: Keys | None = None
        self._clients: dict[int, redis.Redis[bytes]] = {}
        self._lock = threading.Lock()

    def configure(self, redis_url: str, namespace: str) -> None:
        self.redis_url, self.keys = redis_url, Keys(namespace)

    def client(self) -> redis.Redis[bytes] | None:
        if self.redis_url is None:
            return None
        pid = os.getpid()
        with self._lock:
            if pid not in self._clients:
                self._clients[pid] = redis.Redis.from_url(
                    self.redis_url, socket_timeout=1, socket_connect_timeout=1)
            return self._clients[pid]


CONFIG = _Config()
_originals: dict[str, Any] = {}


# ----------------------------------------------------------------------------- phase traps
def _thread_and_attempt(ctx: Any) -> tuple[str | None, int | None]:
    # A Mapping, not only a dict: a phase's return value, which Celery publishes as the next
    # link's argument, is a read-only Mapping (tasks.phases.PhaseMessage) until serialized.
    if not isinstance(ctx, Mapping):
        return None, None
    thread_id, attempt = ctx.get("thread_id"), ctx.get("attempt")
    return (thread_id if isinstance(thread_id, str) else None,
            attempt if isinstance(attempt, int) else None)


def _maybe_trap(phase: str, when: str, ctx: Any) -> None:
    keys, client = CONFIG.keys, CONFIG.client()
    thread_id, attempt = _thread_and_attempt(ctx)
    if keys is None or client is None or thread_id is None or ctx.get("done"):
        return  # a chain that already ended passes through its phases: nothing to kill there
    try:
        raw = client.hget(keys.traps, thread_id)
        if raw is None:
            return
        spec = raw.decode().split(":")
        if spec[:2] != [phase, when] or not client.hdel(keys.traps, thread_id):
            return
        hold_s = float(spec[2]) if len(spec) > 2 else DEFAULT_HOLD_S
        outcome = ctx.get("outcome")
        client.rpush(keys.hits, json.dumps({
            "pid": os.getpid(), "dispatch_id": ctx.get("dispatch_id"), "thread_id": thread_id,
            "phase": phase, "when": when, "attempt": attempt, "at": time.time(),
            "outcome_recorded": isinstance(outcome, dict) and bool(outcome.get("recorded"))}))
    except redis.RedisError:
        return
    time.sleep(hold_s)  # the test SIGKILLs this process here


def _as_message(ctx: Any) -> Any:
    """A phase function's context (a PhaseContext) as the JSON object it travels as."""
    return ctx.to_message() if hasattr(ctx, "to_message") else ctx


def _wrap_phase(phase: str, real: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def trapped(rt: Any, ctx: Any) -> Any:
        before = _as_message(ctx)
        acting = isinstance(before, dict) and not before.get("done")
        _maybe_trap(phase, "before", before)
        out = real(rt, ctx)
        if acting:  # "after" means after the phase did its work, even if it ended the chain
            after = _as_message(out)
            _maybe_trap(phase, "after", dict(after, done=False) if isinstance(after, dict)
                        else before)
        return out

    trapped.__wrapped__ = real  # type: ignore[attr-defined]
    trapped.__name__ = getattr(real, "__name__", phase)
    return trapped


# -------------------------------------------------------------------------- publish rules
def _message_target(name: str, message: Any) -> tuple[str | None, int | None]:
    """(thread id, attempt) of a task message: `mailbox.dispatch` carries the thread id, a
    phase message the context dict (the chain passes it as the first argument)."""
    try:
        args = message[2][0]
    except (IndexError, KeyError, TypeError):
        return None, None
    if not args:
        return None, None
    first = args[0]
    if isinstance(first, str):
        return first, None
    return _thread_and_attempt(first)


def _publishing_task() -> str | None:
    """The name of the task this process is running while it publishes (None outside one)."""
    from celery._state import get_current_task

    task = get_current_task()
    return None if task is None else str(getattr(task, "name", None))


def _rule(name: str, message: Any) -> dict[str, Any] | None:
    """The first publish rule for `name` that matches this message, if any."""
    keys, client = CONFIG.keys, CONFIG.client()
    if keys is None or client is None or not name.startswith("mailbox."):
        return None
    try:
        raw = client.hget(keys.publish, name)
    except redis.RedisError:
        return None
    if raw is None:
        return None
    thread_id, attempt = _message_target(name, message)
    for rule in json.loads(raw):
        if "attempt" in rule and attempt != rule["attempt"]:
            continue
        prefix = rule.get("thread_prefix")
        if prefix is not None and not (thread_id or "").startswith(prefix):
            continue
        if "not_from" in rule and _publishing_task() == rule["not_from"]:
            continue
        copies = int(rule.get("copies", 1))
        with contextlib.suppress(redis.RedisError):
            if copies == 0:
                client.hincrby(keys.dropped, name, 1)
            elif copies > 1:
                client.hincrby(keys.duplicated, name, copies - 1)
        return dict(rule)
    return None


def _wrap_send(real: Callable[..., Any]) -> Callable[..., Any]:
    def send(producer: Any, name: str, message: Any, *args: Any, **kwargs: Any) -> Any:
        rule = _rule(name, message) or {}
        if "priority" in rule:
            kwargs["priority"] = rule["priority"]
        result = None
        for _ in range(int(rule.get("copies", 1))):
            result = real(producer, name, message, *args, **kwargs)
        return result

    return send


# ------------------------------------------------------------------------ lost ack answers
def _wrap_ack(real: Callable[..., Any]) -> Callable[..., Any]:
    def ack_and_claim_next(store: Any, *args: Any, thread_id: str, **kwargs: Any) -> Any:
        out = real(store, *args, thread_id=thread_id, **kwargs)
        keys, client = CONFIG.keys, CONFIG.client()
        if keys is None or client is None:
            return out
        try:
            lost = client.srem(keys.lost_acks, thread_id)
            if lost:
                client.rpush(keys.hits, json.dumps({
                    "pid": os.getpid(), "thread_id": thread_id, "fault": "lost_ack",
                    "claimed": out.next is not None, "at": time.time()}))
        except redis.RedisError:
            return out
        if lost:
            from mailbox.errors import StoreUnavailableError

            raise StoreUnavailableError("injected: the connection dropped after COMMIT")
        return out

    ack_and_claim_next.__wrapped__ = real  # type: ignore[attr-defined]
    return ack_and_claim_next


# ----------------------------------------------------------------------------- install
def install(redis_url: str, namespace: str) -> None:
    """Wrap the phase functions, the settle's ack and the app's publish path of this
    process (idempotent)."""
    from mailbox import phases
    from mailbox.store.runs import RunStore
    from tasks.app import app

    CONFIG.configure(redis_url, namespace)
    if _originals:
        return
    for phase in PHASES:
        real = getattr(phases, phase)
        _originals[phase] = real
        setattr(phases, phase, _wrap_phase(phase, real))
    real_send = app.amqp.send_task_message
    _originals["send_task_message"] = real_send
    app.amqp.send_task_message = _wrap_send(real_send)
    _originals["ack_and_claim_next"] = RunStore.ack_and_claim_next
    RunStore.ack_and_claim_next = _wrap_ack(  # type: ignore[method-assign]
        RunStore.ack_and_claim_next)


def uninstall() -> None:
    from mailbox import phases
    from tasks.app import app

    for phase in PHASES:
        if phase in _originals:
            setattr(phases, phase, _originals.pop(phase))
    if "send_task_message" in _originals:
        app.amqp.send_task_message = _originals.pop("send_task_message")
    if "ack_and_claim_next" in _originals:
        from mailbox.store.runs import RunStore

        RunStore.ack_and_claim_next = _originals.pop(  # type: ignore[method-assign]
            "ack_and_claim_next")
    CONFIG.redis_url = CONFIG.keys = None


@contextlib.contextmanager
def installed(redis_url: str, namespace: str) -> Iterator[None]:
    """The hooks in the test process for the duration of the block."""
    install(redis_url, namespace)
    try:
        yield
    finally:
        uninstall()


# ------------------------------------------------------------------- the test's controls
class Faults:
    """What a test uses to arm faults and read what happened (same Redis as the stack)."""

    def __init__(self, client: redis.Redis[bytes], namespace: str) -> None:
        self.client = client
        self.keys = Keys(namespace)

    def trap(self, thread_id: str, phase: str, when: str, hold_s: float = DEFAULT_HOLD_S
             ) -> None:
        assert phase in PHASES and when in WHENS, (phase, when)
        self.client.hset(self.keys.traps, thread_id, f"{phase}:{when}:{hold_s:g}")

    def armed_traps(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.keys.traps).items()}

    def next_hit(self, timeout_s: float) -> dict[str, Any] | None:
        """The next trap taken, waiting up to `timeout_s` (BLPOP in slices shorter than the
        client's socket timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            reply = self.client.blpop([self.keys.hits], timeout=max(1, min(3, int(left))))
            if reply is not None:
                return dict(json.loads(reply[1]))

    def publish_rule(self, task_name: str, copies: int = 1, *, attempt: int | None = None,
                     thread_prefix: str | None = None, not_from: str | None = None,
                     priority: int | None = None) -> None:
        """Add a rule for `task_name` after those already set (the first match applies)."""
        rule: dict[str, Any] = {"copies": copies}
        if not_from is not None:
            rule["not_from"] = not_from
        if priority is not None:
            rule["priority"] = priority
        if attempt is not None:
            rule["attempt"] = attempt
        if thread_prefix is not None:
            rule["thread_prefix"] = thread_prefix
        raw = self.client.hget(self.keys.publish, task_name)
        rules = [*(json.loads(raw) if raw else []), rule]
        self.client.hset(self.keys.publish, task_name, json.dumps(rules))

    def lose_ack_answer(self, thread_id: str) -> None:
        """The next worker's ack on this thread commits and loses its answer (`lost-acks`)."""
        self.client.sadd(self.keys.lost_acks, thread_id)

    def clear_publish_rules(self) -> None:
        self.client.delete(self.keys.publish)

    def counters(self) -> dict[str, dict[str, int]]:
        def read(key: str) -> dict[str, int]:
            return {k.decode(): int(v) for k, v in self.client.hgetall(key).items()}

        return {"dropped": read(self.keys.dropped), "duplicated": read(self.keys.duplicated)}


# ----------------------------------------------------------------------- workload driver
@dataclass(frozen=True)
class Item:
    """One submission of a workload plan."""

    thread_id: str
    agent: str
    input: Any
    max_attempts: int = 5
    interrupt: bool = False  # "latest wins": supersede the thread's queued work first


class Driver:
    """Submits a plan through `dispatch.delay` from a background thread, in order, and records
    each dispatch in a WorkloadAudit — through Redis and database outages.

    A steady load rather than one burst: the driver waits while `max_outstanding` of its
    dispatches are not terminal, not counting up to `max_exempt` of those in `exempt` (a test
    adds a dispatch whose pool process it killed: it waits for its lease, loading nothing
    meanwhile — but the sweep will reclaim and restart such dispatches together, so only a
    few may be pending at once). Every submission carries its own dedupe key, so when a call
    fails without saying whether it stored the dispatch (the database went away mid-call), the
    driver looks the key up in SQL and either records what was stored or submits again;
    `WakeNotPublishedError` (stored, broker down) is recorded as it is.

    Only the documented errors of `dispatch.delay` are survived: `WakeNotPublishedError` and
    `StoreUnavailableError` (and, for the driver's own SQL look-ups, the database being
    unreachable). Any other exception stops the driver, and `join()` / `wait_submitted()`
    raise it in the test: an undocumented error under a fault is a finding, not noise.
    """

    def __init__(self, audit: Any, box: Any, plan: list[Item], *, max_outstanding: int = 10,
                 max_exempt: int = 6, give_up_s: float = 120.0) -> None:
        self.audit, self.box, self.plan = audit, box, plan
        self.max_outstanding = max_outstanding
        self.max_exempt = max_exempt
        self.exempt: set[str] = set()
        self.give_up_s = give_up_s
        self.submitted = 0
        self.retried = 0
        self.not_published = 0
        self.unavailable: list[str] = []  # the StoreUnavailableErrors survived
        self.error: BaseException | None = None
        self._live: list[str] = []  # not terminal yet
        self._thread = threading.Thread(target=self._run, name="workload-driver", daemon=True)

    def start(self) -> Driver:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"driver still submitting after {timeout_s}s "
                                 f"({self.submitted} of {len(self.plan)})")
        if self.error is not None:
            raise AssertionError(f"driver failed after {self.submitted} submissions: "
                                 f"{self.error!r}") from self.error

    def wait_submitted(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.submitted < count:
            if self.error is not None or time.monotonic() > deadline:
                raise AssertionError(f"only {self.submitted} of {count} submitted "
                                     f"({self.error!r})") from self.error
            time.sleep(0.02)

    def _run(self) -> None:
        try:
            for index, item in enumerate(self.plan):
                self._throttle()
                dispatch_id = self._submit(index, item)
                self.audit.record(item.thread_id, dispatch_id)
                self._live.append(dispatch_id)
                self.submitted += 1
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _throttle(self) -> None:
        deadline = time.monotonic() + self.give_up_s
        while self._loading() >= self.max_outstanding:
            try:
                statuses = self._statuses(self._live)
            except Exception as exc:
                if not _database_unreachable(exc):
                    raise
                statuses = {}  # the database is restarting: ask again
            self._live = [d for d in self._live
                          if statuses.get(d, "Queued") in ("Queued", "Claimed")]
            if self._loading() < self.max_outstanding:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._loading()} dispatches stayed live for "
                                   f"{self.give_up_s}s: {self._live[:5]}")
            time.sleep(0.05)

    def _loading(self) -> int:
        exempt = set(self.exempt)
        waiting = sum(1 for dispatch_id in self._live if dispatch_id in exempt)
        return len(self._live) - min(waiting, self.max_exempt)

    def _statuses(self, ids: list[str]) -> dict[str, str]:
        import sqlalchemy as sa

        from mailbox.schema import dispatches

        with self.box.store.engine.connect() as conn:
            return {str(d): str(s) for d, s in conn.execute(
                sa.select(dispatches.c.dispatch_id, dispatches.c.status)
                .where(dispatches.c.dispatch_id.in_(ids)))}

    def _stored(self, item: Item, key: str) -> str | None:
        import sqlalchemy as sa

        from mailbox.schema import dispatches

        with self.box.store.engine.connect() as conn:
            found = conn.execute(sa.select(dispatches.c.dispatch_id).where(
                dispatches.c.thread_id == item.thread_id,
                dispatches.c.dedupe_key == key)).scalar_one_or_none()
        return None if found is None else str(found)

    def _submit(self, index: int, item: Item) -> str:
        from mailbox import StoreUnavailableError
        from tasks import WakeNotPublishedError, dispatch

        key = f"driver-{index}"
        deadline = time.monotonic() + self.give_up_s
        while True:
            try:
                return str(dispatch.delay(item.thread_id, item.agent, item.input,
                                          dedupe_key=key, max_attempts=item.max_attempts,
                                          interrupt=item.interrupt).id)
            except WakeNotPublishedError as exc:
                self.not_published += 1
                return exc.dispatch_id
            except StoreUnavailableError as exc:
                self.unavailable.append(repr(exc)[:200])
                if time.monotonic() > deadline:
                    raise
            # Did the failed call store it? Ask SQL (retrying while it is unreachable).
            while True:
                try:
                    found = self._stored(item, key)
                    break
                except Exception as exc:
                    if not _database_unreachable(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            if found is not None:
                return found
            self.retried += 1
            time.sleep(0.1)


def _database_unreachable(exc: BaseException) -> bool:
    """The driver's own SQL failed because the database is away (restarting, locked), not
    because of a bug: SQLAlchemy's wrappers of the driver's connection errors."""
    import sqlalchemy as sa

    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated)


if os.environ.get("FAULT_HOOKS") == "1":  # a worker started with the hooks
    install(os.environ["MAILBOX_REDIS_URL"], os.environ.get("MAILBOX_NAMESPACE", "mailbox"))

