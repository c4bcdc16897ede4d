"""What the phases need from the process that runs them (docs/architecture.md#pipeline).

A worker process builds one `Runtime` (tasks/runtime.py); a test builds its own with a
synthetic clock and a recorded waker. The phase functions take it as their first argument
and hold no other state.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from mailbox.context import PhaseContext
from mailbox.events import EventStreams
from mailbox.settings import Settings
from mailbox.store import MailboxStore, RunStore


def now_ms() -> int:
    return int(time.time() * 1000)


def uuid7_ms(text: str | None) -> int | None:
    """When a UUIDv7 was minted, in Unix milliseconds (ids minted by `uuid6.uuid7()` carry
    it: instance ids, dispatch ids, wake-up ids); None for any other text."""
    try:
        value = uuid.UUID(text or "")
    except (ValueError, TypeError):
        return None
    return value.int >> 80 if value.version == 7 else None


@dataclass
class Runtime:
    """The store, the run records, the event streams and the settings of this process, and
    how it wakes a thread and hears a cancel signal."""

    store: MailboxStore
    runs: RunStore
    events: EventStreams
    settings: Settings
    consumer_id: str
    wake: Callable[[str, int], None] = lambda thread_id, delay_ms: None
    start: Callable[[PhaseContext], None] | None = None
    """Publish the chain of a dispatch this process claimed. Given, a settle claims the
    thread's next dispatch in its ack's own transaction and starts it here (a worker's
    runtime: tasks.publishing.start_claimed); without it, a settle wakes the thread when
    its ack saw something due, and the waker claims."""
    clock: Callable[[], int] = now_ms
    cancel_check: Callable[[str, str], str | None] | None = None
    """(thread_id, token) -> reason when a cancel signal for this attempt arrived."""
    active: dict[str, threading.Event] = field(default_factory=dict)
    stuck: Callable[[str, bool], None] = lambda dispatch_id, stuck: None
    """(dispatch_id, True) when an abandoned agent still runs in this process, (…, False)
    once its code has ended (a plain agent returned, an async agent's coroutine finished):
    the worker's health check reports the process stuck meanwhile."""
    recycle: Callable[[str], None] = lambda reason: None
    """(reason) when this process can no longer be trusted to run agents: an abandoned
    coroutine still runs on the shared agent loop a grace after its abandonment
    (docs/behaviour.md#abandonment). A worker ends the process once it is idle, and Celery
    or the orchestrator starts another (tasks/health.py); elsewhere (tests, tools) it is
    only logged."""
