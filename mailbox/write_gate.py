"""The SQLite writers' gate: this machine's SQLite writers take turns on a file lock.

SQLite has one write lock per database; `SqliteWriteGate` queues the writers of every process
on a flock beside the database, and `_TurnWaiter` makes a contended writer wait in the kernel
while keeping the busy timeout (docs/behaviour.md#d-sqlite-gate). `MailboxStore.write` takes
a turn around every write transaction on a file-backed SQLite database (`write_gate`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from mailbox.database import SQLITE_BUSY_TIMEOUT_MS


class WriteGateError(Exception):
    """A writer could not take its turn on the writers' gate."""


class WriteGateTimeoutError(WriteGateError):
    """Another writer held the gate longer than the busy timeout."""


class SqliteWriteGate:
    """Queues this machine's SQLite writers on a file lock beside the database.

    SQLite has one write lock per database, and a writer that finds it taken sleeps in the
    busy handler (1, 2, 5, 10, 15, 20, 25… ms between polls), so two busy processes spend
    more time asleep than writing: measured here, two processes ran fewer dispatches per
    second than one. Taking a flock first makes writers wait on something that frees up the
    moment the holder commits. Threads of one process queue on a lock of their own (one
    open file per process: flock does not exclude two threads sharing it), and a forked
    child opens the file anew, because it would otherwise share its parent's open file and
    with it the parent's turn. The busy timeout still bounds the wait.

    A writer that finds the turn taken waits in the kernel (`_TurnWaiter`), which wakes it
    the moment the holder unlocks. It used to poll (50 µs doubling to 1 ms): two processes
    writing at once then slept and woke about 24 times per dispatch, which cost CPU and left
    the lock idle between a release and the next poll.
    """

    def __init__(self, database_path: str, timeout_s: float) -> None:
        self.path = f"{database_path}-writers.lock"
        self.timeout_s = timeout_s
        self._threads = threading.RLock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._reopen_error: OSError | None = None
        self._waiter: _TurnWaiter | None = None
        _GATES.add(self)

    def reopen_after_fork(self) -> None:
        """In a forked child: take a lock file of its own (see the class docstring)."""
        inherited = self._fd
        self._threads = threading.RLock()
        if self._waiter is not None:  # its thread did not come along; its file did
            self._waiter.close_inherited()
        self._waiter = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # no file of its own: this process cannot write
            self._fd, self._reopen_error = -1, exc
        # Closing our copy never releases the parent's lock: it still holds its own.
        if inherited >= 0:
            os.close(inherited)

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit that module may be gone already.
        try:  # noqa: SIM105
            os.close(self._fd)
        except Exception:
            pass

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        fd, threads = self._fd, self._threads
        if fd < 0:
            raise WriteGateError(f"no lock file of this process: {self._reopen_error}")
        # A nested turn would unlock the outer one's on leaving (RLock: no public owner test).
        if threads._is_owned():  # type: ignore[attr-defined]  # noqa: SLF001
            raise RuntimeError("SqliteWriteGate.held() does not nest")
        deadline = time.monotonic() + self.timeout_s
        try:
            if not threads.acquire(timeout=self.timeout_s):
                raise WriteGateTimeoutError(f"no turn to write within {self.timeout_s}s")
            try:
                self._lock(fd, deadline)
                yield
            finally:  # also when _lock failed or was interrupted: a no-op when this file
                # holds nothing (a wait still blocked on it is not touched)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            # Not `if threads._is_owned()`: an exception could land between the two.
            with contextlib.suppress(RuntimeError):  # not ours: acquire failed or never ran
                threads.release()

    def _lock(self, fd: int, deadline: float) -> None:
        """Take the turn (the caller holds `_threads`: one writer of this process)."""
        waiter = self._waiter
        # Not while a wait given up is still blocked on this open file: the lock it gets
        # would be this one too, and it would give it back (`_TurnWaiter`).
        if waiter is None or not waiter.busy():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise WriteGateError(f"cannot lock {self.path}: {exc}") from exc
        if waiter is None:
            waiter = self._waiter = _TurnWaiter(self.path)
        if not waiter.wait_for_turn(fd, max(0.0, deadline - time.monotonic())):
            raise WriteGateTimeoutError(
                f"another process held {self.path} for {self.timeout_s}s")


WAITING, GRANTED, GIVEN_BACK, FAILED = "waiting", "granted", "given back", "failed"


class _TurnRequest:
    """A blocking wait for the lock, made by the waiting thread for its process's writers.
    It locks a duplicate of the gate's descriptor (the same open file, so the same lock),
    which stays valid whatever happens to the gate's own while the thread is blocked."""

    __slots__ = ("decided", "done", "error", "fd", "owned", "state")

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self.done = threading.Event()
        self.decided = threading.Lock()  # guards state and owned
        self.state = WAITING
        self.owned = True  # a writer waits for it; False: given up, the lock goes back
        self.error: OSError | None = None


class _TurnWaiter:
    """A thread that waits in a blocking flock for the writers of its process.

    flock has no timeout, so the blocking call runs here while the writer waits on an event
    that has one. At most one wait is out at a time: a writer that gives up (its timeout, or
    an exception such as Celery's soft time limit arriving meanwhile) leaves the wait
    unowned, and the lock it gets goes straight back; the process's next writer takes the
    wait over instead of starting another or taking the lock itself (the lock that wait
    gets is the same open file's, and giving it back would give the next writer's turn
    away). So a peer stuck in its turn costs one descriptor, not one per timed-out write.
    The thread ends after IDLE_S without a wait and starts again with the next one."""

    IDLE_S = 30.0

    def __init__(self, path: str) -> None:
        self._name = f"sqlite-write-gate {Path(path).name}"
        self._requests: queue.SimpleQueue[_TurnRequest] = queue.SimpleQueue()
        self._guard = threading.Lock()
        self._running = False
        self._pending: _TurnRequest | None = None  # the wait out now, if any
        self._open_fds: set[int] = set()
        with _WAITERS_CHANGING:
            _WAITERS.add(self)

    def busy(self) -> bool:
        """True while a wait is still blocked on (or giving back) the lock."""
        with self._guard:
            return self._pending is not None and not self._pending.done.is_set()

    def close_inherited(self) -> None:
        """In a forked child: close the descriptors of the parent's waits, which would keep
        the parent's open file, and with it a lock the parent holds, alive in this process.
        The parent's `_guard` is held across the fork (`_hold_guards_for_fork`)."""
        for fd in self._open_fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def wait_for_turn(self, fd: int, timeout_s: float) -> bool:
        """True once this process holds the lock on `fd`; False after `timeout_s`."""
        try:
            request = self._request(fd)
            request.done.wait(timeout_s)
            with request.decided:
                if request.state == GRANTED:
                    return True
                request.owned = False
                if request.state == FAILED:
                    assert request.error is not None
                    raise WriteGateError(f"cannot lock: {request.error}") from request.error
                return False
        except BaseException:  # whatever interrupted the wait: nobody of ours goes in
            with self._guard:
                pending = self._pending  # ours, if any (the caller holds _threads)
            if pending is not None:
                with pending.decided:
                    pending.owned = False
                    if pending.state == GRANTED:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                        pending.state = GIVEN_BACK
            raise

    def _request(self, fd: int) -> _TurnRequest:
        """The wait out now, taken over (still blocked), or a new one; either way with a
        thread to serve it."""
        with self._guard:
            pending = self._pending
            request = None
            if pending is not None:
                with pending.decided:
                    if pending.state == WAITING:
                        pending.owned = True
                        request = pending
            if request is None:
                request = _TurnRequest(fd)
                self._open_fds.add(request.fd)
                self._pending = request
                self._requests.put(request)
            if not self._running:  # adopted or new: something must serve it
                try:
                    threading.Thread(target=self._serve, name=self._name, daemon=True).start()
                except RuntimeError as exc:
                    request.owned = False
                    raise WriteGateError(f"no thread to wait in: {exc}") from exc
                self._running = True
            return request

    def _serve(self) -> None:
        try:
            while True:
                try:
                    request = self._requests.get(timeout=self.IDLE_S)
                except queue.Empty:
                    with self._guard:
                        if self._requests.empty():
                            self._running = False
                            return
                    continue
                self._serve_one(request)
        except BaseException:
            with self._guard:
                self._running = False
            raise

    def _serve_one(self, request: _TurnRequest) -> None:
        try:
            fcntl.flock(request.fd, fcntl.LOCK_EX)
        except OSError as exc:
            with request.decided:
                request.state, request.error = FAILED, exc
        else:
            with request.decided:
                if request.owned:
                    request.state = GRANTED
                else:
                    fcntl.flock(request.fd, fcntl.LOCK_UN)
                    request.state = GIVEN_BACK
        request.done.set()
        with self._guard:
            if self._pending is request:
                self._pending = None
            os.close(request.fd)
            self._open_fds.discard(request.fd)


_WAITERS: weakref.WeakSet[_TurnWaiter] = weakref.WeakSet()
_WAITERS_CHANGING = threading.Lock()  # a fork's list of waiters never meets an addition


_held_across_fork: list[_TurnWaiter] = []


def _hold_guards_for_fork() -> None:
    """Before a fork: no waiter between duplicating a descriptor and recording it, or
    between forgetting one and closing it, so a child knows every descriptor of its
    parent's waits."""
    _WAITERS_CHANGING.acquire()  # held across the fork: a child's copy is never left held
    _held_across_fork[:] = list(_WAITERS)
    for waiter in _held_across_fork:
        waiter._guard.acquire()  # noqa: SLF001  (this module's own class)


def _release_guards_after_fork() -> None:
    """After the fork, in the parent and in the child (whose gates then drop the waiters)."""
    for waiter in _held_across_fork:
        waiter._guard.release()  # noqa: SLF001
    _held_across_fork.clear()
    _WAITERS_CHANGING.release()


_GATES: weakref.WeakSet[SqliteWriteGate] = weakref.WeakSet()


def _reopen_gates_in_child() -> None:
    _release_guards_after_fork()
    for gate in list(_GATES):
        gate.reopen_after_fork()


os.register_at_fork(before=_hold_guards_for_fork, after_in_parent=_release_guards_after_fork,
                    after_in_child=_reopen_gates_in_child)


def write_gate(engine: sa.Engine) -> SqliteWriteGate | None:
    """The writers' gate of a file-backed SQLite database; None for other databases."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return SqliteWriteGate(str(Path(database).resolve()), SQLITE_BUSY_TIMEOUT_MS / 1000)
