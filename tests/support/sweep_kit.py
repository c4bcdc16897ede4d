"""What the sweep's tests share: a broker stand-in that records the sweep's wake-ups, a
backlog stored without wake-ups, and this process's `tasks.runtime` bound to a test's
Mailbox (so the Celery task bodies run here as in a worker)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

from mailbox import Mailbox


class Published:
    """A broker stand-in: records each sweep wake-up (thread, wake id); nothing consumes."""

    def __init__(self) -> None:
        self.wakes: list[tuple[str, str]] = []

    def __call__(self, thread_id: str, wake_id: str) -> None:
        self.wakes.append((thread_id, wake_id))

    def threads(self) -> list[str]:
        return [t for t, _ in self.wakes]

    def last(self, thread_id: str) -> str:
        return [w for t, w in self.wakes if t == thread_id][-1]


def backlog(box: Mailbox, threads: Sequence[str], per_thread: int = 2) -> None:
    """Stored without wake-ups, as after lost publishes: only the sweep can start them."""
    for thread_id in threads:
        for i in range(per_thread):
            box.submit(thread_id, "echo", f"{thread_id}-{i}", wake=False)


def no_inline_wake(thread_id: str, delay_ms: int) -> None:
    raise AssertionError(f"a publishing sweep woke {thread_id} with rt.wake")


@contextlib.contextmanager
def task_runtime_of(mailbox: Mailbox) -> Iterator[Mailbox]:
    """`tasks.runtime` of this process bound to `mailbox`, with a worker's wake (a due
    thread claimed right here), until the block ends."""
    import tasks.runtime as task_runtime
    from tasks.publishing import worker_wake

    rt = mailbox.runtime()
    rt = replace(rt, wake=lambda thread_id, delay_ms: worker_wake(rt, thread_id, delay_ms))
    previous = task_runtime.install(mailbox, rt)
    try:
        yield mailbox
    finally:
        if previous is not None:
            task_runtime.install(*previous)
        else:
            task_runtime.reset(close=False)
