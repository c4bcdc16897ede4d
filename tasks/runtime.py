"""The per-process Mailbox and phase runtime, created on first use.

Per process, not per import: a prefork pool forks children after the app loads, and database
and Redis connections must never be shared across a fork. Their wakers publish through
`tasks.publishing`.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from mailbox.facade import Mailbox
from mailbox.runtime import Runtime
from tasks import health, publishing

_lock = threading.Lock()
_state: dict[int, tuple[Mailbox, Runtime]] = {}


def _create() -> tuple[Mailbox, Runtime]:
    box = Mailbox.connect()
    coordinator, settings = box.store.coordinator, box.settings

    def waker(thread_id: str, delay_ms: int) -> None:
        publishing.wake_thread(coordinator, settings, thread_id, delay_ms)

    box.waker = waker
    rt = dataclasses.replace(box.runtime(), stuck=health.mark_stuck, recycle=health.recycle)
    # The worker's waker claims with this very runtime: bound after it exists.
    rt = dataclasses.replace(rt, wake=lambda thread_id, delay_ms: publishing.worker_wake(
        rt, thread_id, delay_ms), start=lambda ctx: publishing.start_claimed(rt, ctx))
    return box, rt


def current() -> tuple[Mailbox, Runtime]:
    pid = os.getpid()
    with _lock:
        if pid not in _state:
            _state[pid] = _create()
        return _state[pid]


def mailbox() -> Mailbox:
    return current()[0]


def runtime() -> Runtime:
    return current()[1]


def reset(*, close: bool = True) -> None:
    """Forget this process's Mailbox (closing its connections unless `close` is false: one a
    caller `install`ed is the caller's): the next use connects anew, from the environment as
    it is then (tools and tests that repoint a process use this)."""
    with _lock:
        state = _state.pop(os.getpid(), None)
    if state is not None and close:
        state[0].close()


def install(box: Mailbox, rt: Runtime) -> tuple[Mailbox, Runtime] | None:
    """Make `box` and `rt` this process's Mailbox and runtime (a test that drives the task
    bodies in its own process); returns what they replace, for `install` to put back."""
    with _lock:
        previous = _state.pop(os.getpid(), None)
        _state[os.getpid()] = (box, rt)
    return previous


def queue() -> str:
    """Every message goes to the queue named after the namespace, so tenants and tests that
    share a broker never take each other's work."""
    return mailbox().settings.namespace
