"""One long-lived event loop per worker process for `async def` agents
(docs/behaviour.md#async-agents).

Every current LLM SDK streams through asyncio. An `async def` agent runs here, on a loop
owned by a daemon thread of the process, rather than on a new loop per run: clients and
connection pools an agent keeps between runs stay bound to one loop, and several threads of a
`-P threads` worker share it. The execute phase waits for the agent's future from its own
thread (the heartbeat runs beside it, as for sync agents); a stop cancels the future, which
cancels the task on the loop: the agent sees `asyncio.CancelledError` at its next await.

A prefork child never inherits a running loop (threads do not survive fork): the loop is
created on first use in each process, and again in a child forked after it existed.

A coroutine that swallows its cancellation and outlives the grace is let go when its attempt
is abandoned (`AgentLoop.let_go`): the execute thread returns, and a watchdog thread keeps
the process reported stuck until the coroutine ends. Nothing can end a coroutine from outside
but its loop, and the loop is the whole process's: so a let-go coroutine still running a
bound later poisons the loop, and the watchdog asks for the process to be recycled
(docs/behaviour.md#abandonment).

`BufferedEmitter` keeps `ctx.emit` from blocking the loop on Redis: events go through a
queue to a thread of their own, which writes them in order, a batch per round trip; the
execute phase drains it before it records the outcome, so a run's `run_finish` always follows
its output.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from mailbox.events import EventStreams

log = logging.getLogger(__name__)


class AgentLoop:
    """The process's agent event loop, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if self._loop is None or self._pid != os.getpid() or not alive:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._run, args=(loop,), name="agent-loop",
                                          daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            assert self._loop is not None
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def start(self, coroutine: Coroutine[Any, Any, Any],
              on_end: Callable[[], object] | None = None) -> AgentTask:
        """Run `coroutine` as a task on the loop; the handle cancels it and waits for it.
        `on_end()` is called on the loop the moment the task ends, before any waiter
        hears of it (the execute phase marks there when the agent's handler ended)."""
        loop = self._running_loop()
        handle = AgentTask(loop, on_end)
        loop.call_soon_threadsafe(handle.begin, coroutine)
        return handle

    @staticmethod
    def let_go(task: AgentTask, bound_s: float, *, name: str, on_end: Callable[[], None],
               on_overdue: Callable[[], None]) -> threading.Thread:
        """An abandoned coroutine that still runs: cancel it once more (one that swallowed
        a cancellation may heed the next) and watch it from a thread of its own, since the
        loop may be the very thing it blocks. `on_overdue()` once if it still runs `bound_s`
        later — the loop is poisoned, the process should go — and `on_end()` when it has
        ended, whenever that is."""
        task.cancel()

        def watch() -> None:
            try:
                if not task.wait(bound_s):
                    on_overdue()
                    task.wait(None)
            finally:
                on_end()

        watchdog = threading.Thread(target=watch, name=f"abandoned-{name}", daemon=True)
        watchdog.start()
        return watchdog

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run `coroutine` on the loop (a plain future: for tools and tests)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._running_loop())

    @property
    def loop_id(self) -> int:
        """Which loop runs the agents now (tests check that runs share one)."""
        return id(self._running_loop())


class AgentTask:
    """An agent's coroutine running on the loop, seen from the thread that waits for it.

    `cancel()` cancels the task (the agent sees CancelledError at its next await); `wait()`
    returns when the task has really ended — after whatever clean-up the agent does once
    cancelled — not merely when it was asked to stop."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_end: Callable[[], object] | None = None) -> None:
        self._loop = loop
        self._on_end = on_end
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def begin(self, coroutine: Coroutine[Any, Any, Any]) -> None:  # on the loop
        self._task = self._loop.create_task(coroutine)
        self._task.add_done_callback(self._finished)
        if self._cancel_requested:
            self._task.cancel()

    def _finished(self, task: asyncio.Task[Any]) -> None:  # on the loop
        if task.cancelled():
            self._error = asyncio.CancelledError()
        else:
            self._error = task.exception()
            if self._error is None:
                self._value = task.result()
        try:
            if self._on_end is not None:
                self._on_end()
        except Exception:  # the caller's; the waiter must still hear of the end
            log.exception("on_end of an agent task failed")
        finally:
            self._done.set()

    def cancel(self) -> None:
        self._cancel_requested = True

        def cancel_on_loop() -> None:
            if self._task is not None:
                self._task.cancel()

        self._loop.call_soon_threadsafe(cancel_on_loop)

    def wait(self, timeout_s: float | None) -> bool:
        """True once the task has ended; None waits as long as that takes."""
        return self._done.wait(timeout_s)

    def result(self) -> Any:
        """What the coroutine returned; what it raised (asyncio.CancelledError if it ended
        cancelled) is raised here."""
        assert self._done.is_set()
        if self._error is not None:
            raise self._error
        return self._value


AGENT_LOOP = AgentLoop()

_DONE = object()
MAX_BATCH = 256


class BufferedEmitter:
    """`ctx.emit` for an async agent: never waits on Redis in the caller's thread."""

    def __init__(self, events: EventStreams, run_id: str, dispatch_id: str,
                 clock: Any, *, thread_id: str | None = None) -> None:
        self.events = events
        self.run_id = run_id
        self.dispatch_id = dispatch_id
        self.thread_id = thread_id  # names the stream on a Redis Cluster
        self.clock = clock
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def emit(self, type_: str, data: Any) -> None:
        """Queue an event; dropped once closed (the attempt's outcome, and its run_finish,
        may already be out: nothing of the attempt may follow them)."""
        if self._closed:
            return
        self._queue.put((type_, data, self.clock()))
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._drain, daemon=True,
                                                    name=f"emit-{self.run_id}")
                    self._thread.start()

    def _drain(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = any(item is _DONE for item in batch)
            items = [item for item in batch if item is not _DONE]
            if items:
                self.events.emit_many(self.run_id, self.dispatch_id, items,
                                      thread_id=self.thread_id)
            if done:
                return

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, in order, before returning (bounded: a Redis that does not
        answer must not hold the attempt forever; its events are advisory). Later emits
        are dropped."""
        with self._lock:
            self._closed = True
        if self._thread is None:
            return
        self._queue.put(_DONE)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("events of run %s still being written after %.0f s", self.run_id,
                        timeout_s)
