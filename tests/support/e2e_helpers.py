"""Helpers for end-to-end and fault tests that drive real `celery -A tasks worker` processes.

Everything here observes the system from the outside, the way an operator would: dispatch
rows and run records in SQL, per-run event streams and the broker's queue in Redis, and the
workers' log files. Nothing is mocked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from mailbox import DispatchStatus, Mailbox, RunDispatch
from mailbox.events import Event
from tests.support.workers import Stack

T = TypeVar("T")

# kombu's Redis transport keeps one list per priority step: the queue's own name for step 0,
# `<queue>\x06\x16<step>` for the others (kombu.transport.redis.PRIORITY_STEPS, Channel.sep).
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_SEP = "\x06\x16"
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"


def worker_logs(stack: Stack) -> str:
    """The tail of every worker/beat log, for assertion messages."""
    return f"\n===== worker logs =====\n{stack.logs()}"


def wait_until(predicate: Callable[[], T | None], timeout_s: float, what: str,
               stack: Stack, interval_s: float = 0.05) -> T:
    """Poll until `predicate` returns something truthy; fail with the logs otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                                 f"{worker_logs(stack)}")
        time.sleep(interval_s)


def wait_all_terminal(box: Mailbox, dispatch_ids: Iterable[str], timeout_s: float,
                      stack: Stack) -> dict[str, RunDispatch]:
    """Block until every dispatch is terminal; returns them by id. Fails with the counts
    per status, the ids still live and the worker logs."""
    ids = list(dispatch_ids)
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    final: dict[str, RunDispatch] = {}
    while pending:
        for dispatch_id in list(pending):
            current = box.get_dispatch(dispatch_id)
            assert current is not None, f"dispatch {dispatch_id} disappeared"
            if current.is_terminal:
                final[dispatch_id] = current
                pending.discard(dispatch_id)
        if not pending:
            break
        if time.monotonic() >= deadline:
            live = {d: box.get_dispatch(d) for d in sorted(pending)[:10]}
            detail = "\n".join(f"  {d}: {x.status.value if x else None} attempts="
                               f"{x.attempt_count if x else None} thread="
                               f"{x.thread_id if x else None}" for d, x in live.items())
            raise AssertionError(
                f"{len(pending)} of {len(ids)} dispatches not terminal after {timeout_s}s; "
                f"counts={status_counts(box)}\n{detail}{worker_logs(stack)}")
        time.sleep(0.1)
    return final


def status_counts(box: Mailbox) -> dict[str, int]:
    return {s.value: n for s, n in box.store.counts_by_status().items() if n}


def events_of(box: Mailbox, run_id: str, type_: str | None = None) -> list[Event]:
    events = box.events.read(run_id)
    return [e for e in events if type_ is None or e.type == type_]


def wait_for_events(box: Mailbox, run_id: str, type_: str, count: int, stack: Stack,
                    timeout_s: float = 30) -> list[Event]:
    """The run's events of `type_` once at least `count` arrived. Events are emitted after
    the SQL write they describe (`run_finish` follows the ack), so a test that saw the
    dispatch terminal must still wait for them."""
    def enough() -> list[Event] | None:
        found = events_of(box, run_id, type_)
        return found if len(found) >= count else None

    try:
        return wait_until(enough, timeout_s, f"{count} {type_} event(s) of run {run_id}",
                          stack)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe_events(box, run_id)}") from None


def describe_events(box: Mailbox, run_id: str) -> str:
    return "\n".join(f"  {e.id} {e.type} ts={e.ts} dispatch={e.dispatch_id} data={e.data}"
                     for e in events_of(box, run_id))


# ------------------------------------------------------------------------------- broker
def queue_keys(namespace: str) -> list[str]:
    """The Redis lists kombu uses for the Celery queue named `namespace`."""
    return [namespace if step == 0 else f"{namespace}{KOMBU_SEP}{step}"
            for step in KOMBU_PRIORITY_STEPS]


def broker_client(stack: Stack) -> redis.Redis[bytes]:
    """A client of the stack's broker (the coordination Redis, unless that is a Redis
    Cluster: MAILBOX_TEST_REDIS_CLUSTER)."""
    return redis.Redis.from_url(stack.broker)


def queued_messages(client: redis.Redis[bytes], namespace: str) -> int:
    return sum(int(client.llen(key)) for key in queue_keys(namespace))


def drop_queue(client: redis.Redis[bytes], namespace: str) -> dict[str, int]:
    """Lose every broker message of the queue `namespace`, as a broker without persistence
    would: the queue's lists, its exchange binding, and any unacked entries routed to it.
    Returns what was dropped. Mailbox keys (`<namespace>:...`) are left alone."""
    dropped = {"messages": queued_messages(client, namespace), "bindings": 0, "unacked": 0}
    client.delete(*queue_keys(namespace))
    dropped["bindings"] = int(client.delete(f"_kombu.binding.{namespace}"))
    for tag, raw in client.hgetall(KOMBU_UNACKED).items():
        try:
            message, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        info = message.get("properties", {}).get("delivery_info", {}) if isinstance(
            message, dict) else {}
        if namespace in (exchange, routing_key, info.get("routing_key")):
            client.hdel(KOMBU_UNACKED, tag)
            client.zrem(KOMBU_UNACKED_INDEX, tag)
            dropped["unacked"] += 1
    return dropped


def received_count(stack: Stack, task_name: str) -> int:
    """How many `task_name` messages the stack's workers logged as received (INFO level)."""
    marker = f"Task {task_name}["
    return sum(1 for log in sorted(stack.workdir.glob("worker*.log"))
               for line in log.read_text(errors="replace").splitlines()
               if marker in line and line.rstrip().endswith("received"))


# ------------------------------------------------------------------------------ sampler
@dataclass
class ClaimSampler:
    """Samples the store from a background thread while workers run: any thread with more
    than one Claimed dispatch (invariant 3) is recorded, with the most Claimed dispatches seen
    at once (proof that work really ran in parallel across threads)."""

    box: Mailbox
    interval_s: float = 0.02
    samples: int = 0
    max_claimed: int = 0
    violations: list[dict[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ClaimSampler:
        self._thread = threading.Thread(target=self._run, name="claim-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                breach = self.box.store.claimed_per_thread()
                claimed = self.box.store.count_dispatches_by_status(DispatchStatus.Claimed)
            except Exception as exc:  # a sample lost to a busy database is only noted
                self.errors.append(repr(exc))
            else:
                self.samples += 1
                self.max_claimed = max(self.max_claimed, claimed)
                if breach:
                    self.violations.append(breach)
            self._stop.wait(self.interval_s)


def as_json(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)


def point_app_at_broker(url: str) -> None:
    """Make this process's Celery app publish to `url`. Setting `broker_url` alone is not
    enough once the app has published: its connection and producer pools keep the broker
    they were made for (an earlier test in the same process may have used another). Only the
    references are dropped: kombu keeps pools in a registry keyed by the connection, so a
    closed one would be handed back to the next test publishing to that broker."""
    from tasks import app as celery_app

    celery_app.conf.broker_url = url
    celery_app._pool = None
    celery_app.amqp._producer_pool = None
