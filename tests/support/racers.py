"""Threads that race inside a test, and every one of them is heard.

A bare `threading.Thread` swallows its exception (the thread prints it and dies), and a
`join(timeout)` that runs out says nothing: a test whose racer crashed or hung can still pass
on what the other racers did. Every test that races threads goes through here instead:

    results = race(lambda: sweep(a), lambda: sweep(b))          # both at once, both results

    with racing(run_agent) as racers:                           # the body runs meanwhile
        ...
    [out] = racers.results

- each racer's exception is re-raised in the test (the first one raised, with the racer's own
  traceback; the others are attached as notes), so a crashed racer fails the test;
- a racer still running after `timeout_s` fails the test with the stack it is stuck in;
- `start_together=True` releases the racers from one barrier, so they really overlap (a
  racer whose barrier breaks fails like any other).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0


class RacerTimeoutError(AssertionError):
    """A racer did not finish in time (an AssertionError: the test fails, it does not err)."""


@dataclass
class Racer(Generic[T]):
    """One thread of a race and what became of it."""

    name: str
    target: Callable[[], T]
    thread: threading.Thread | None = None
    result: T | None = None
    error: BaseException | None = None
    failed_at: float | None = None  # time.monotonic() when it raised
    done: bool = False


@dataclass
class Race(Generic[T]):
    """Racers started together; `join()` waits for them and raises what went wrong."""

    racers: list[Racer[T]]
    timeout_s: float = DEFAULT_TIMEOUT_S
    start_together: bool = False
    _barrier: threading.Barrier | None = field(default=None, repr=False)

    def start(self) -> Race[T]:
        if self.start_together:
            self._barrier = threading.Barrier(len(self.racers), timeout=self.timeout_s)
        for racer in self.racers:
            racer.thread = threading.Thread(target=self._run, args=(racer,), name=racer.name,
                                            daemon=True)
            racer.thread.start()
        return self

    def _run(self, racer: Racer[T]) -> None:
        started = self._barrier is None
        try:
            if self._barrier is not None:
                self._barrier.wait()
                started = True
            racer.result = racer.target()
        except BaseException as exc:  # re-raised in the test by join()
            racer.error, racer.failed_at = exc, time.monotonic()
            if not started and self._barrier is not None:
                self._barrier.abort()  # the others must not wait for a racer that is gone
        finally:
            racer.done = True

    @property
    def results(self) -> list[T]:
        """Each racer's return value, in the order the targets were given (after join)."""
        return [racer.result for racer in self.racers]  # type: ignore[misc]

    def join(self) -> list[T]:
        deadline = time.monotonic() + self.timeout_s
        for racer in self.racers:
            assert racer.thread is not None, "race not started"
            racer.thread.join(max(0.0, deadline - time.monotonic()))
        self.raise_failures()
        return self.results

    def raise_failures(self) -> None:
        hung = [racer for racer in self.racers if racer.thread is not None
                and racer.thread.is_alive()]
        failed = sorted((racer for racer in self.racers if racer.error is not None),
                        key=lambda racer: racer.failed_at or 0.0)
        if failed:
            first = failed[0]
            assert first.error is not None
            first.error.add_note(f"raised in racer thread {first.name!r} "
                                 f"({len(failed)} of {len(self.racers)} racers failed)")
            for other in failed[1:]:
                first.error.add_note(f"racer {other.name!r} also failed:\n"
                                     + "".join(traceback.format_exception(other.error)))
            if hung:
                first.error.add_note(_describe_hung(hung, self.timeout_s))
            raise first.error
        if hung:
            raise RacerTimeoutError(_describe_hung(hung, self.timeout_s))


def _describe_hung(hung: Sequence[Racer[Any]], timeout_s: float) -> str:
    frames = sys._current_frames()
    parts = [f"{len(hung)} racer(s) still running after {timeout_s}s:"]
    for racer in hung:
        thread = racer.thread
        frame = frames.get(thread.ident) if thread is not None and thread.ident else None
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "  (gone)\n"
        parts.append(f"--- {racer.name}\n{stack}")
    return "\n".join(parts)


def _race(targets: Sequence[Callable[[], T]], timeout_s: float, start_together: bool,
          name: str) -> Race[T]:
    assert targets, "a race needs at least one racer"
    return Race([Racer(f"{name}-{i}", target) for i, target in enumerate(targets)],
                timeout_s=timeout_s, start_together=start_together)


def race(*targets: Callable[[], T], timeout_s: float = DEFAULT_TIMEOUT_S,
         start_together: bool = False, name: str = "racer") -> list[T]:
    """Run every target in a thread of its own, all at once; their results in order. The
    first exception a racer raised is raised here; a racer still running after `timeout_s`
    fails the test."""
    return _race(targets, timeout_s, start_together, name).start().join()


@contextmanager
def racing(*targets: Callable[[], T], timeout_s: float = DEFAULT_TIMEOUT_S,
           start_together: bool = False, name: str = "racer") -> Iterator[Race[T]]:
    """Start the racers, run the body meanwhile, then wait for them as `race` does. When the
    body itself fails, its exception wins and the racers' failures are attached to it."""
    running = _race(targets, timeout_s, start_together, name).start()
    try:
        yield running
    except BaseException as body_error:
        try:
            running.join()
        except BaseException as racer_error:
            body_error.add_note("while the racers: " + "".join(
                traceback.format_exception(racer_error)))
        raise
    running.join()
