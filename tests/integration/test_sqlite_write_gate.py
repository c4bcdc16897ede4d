"""The SQLite writers' gate (mailbox.write_gate.SqliteWriteGate): real processes, real files.

SQLite writers queue on a flock beside the database instead of sleeping in the busy handler.
These tests prove what that must never break: one writer at a time across processes and
across a fork, a bounded wait that ends in StoreUnavailableError with nothing written, and
threads of one process taking turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailbox import Mailbox, StoreUnavailableError
from mailbox.write_gate import (
    SqliteWriteGate,
    WriteGateError,
    WriteGateTimeoutError,
    write_gate,
)
from tests.support.racers import race

pytestmark = pytest.mark.usefixtures("sqlite_only")


@pytest.fixture
def sqlite_only(mailbox: Mailbox) -> None:
    if mailbox.store.engine.dialect.name != "sqlite":
        pytest.skip("the write gate exists for SQLite only")


def _hold_and_log(lock_base: str, log_path: str, rounds: int, start: Any) -> None:
    gate = SqliteWriteGate(lock_base, timeout_s=30)
    start.wait(60)  # all together, so that their turns really compete
    for _ in range(rounds):
        with gate.held():
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"enter {os.getpid()}\n".encode())
            time.sleep(0.001)
            os.write(fd, f"exit {os.getpid()}\n".encode())
            os.close(fd)


def test_one_writer_at_a_time_across_processes(tmp_path: Path) -> None:
    log = tmp_path / "turns.log"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_hold_and_log,
                         args=(str(tmp_path / "db.sqlite"), str(log), 40, start))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 3 * 40 * 2
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        # Every turn is entered and left by the same process before anyone else enters.
        assert enter.startswith("enter ") and leave == f"exit {enter.split()[1]}", (enter, leave)
    entered_by = [line.split()[1] for line in lines[::2]]
    handovers = sum(a != b for a, b in itertools.pairwise(entered_by))
    assert handovers > 2, "the processes never competed for the turn: nothing was proven"


def test_a_forked_child_does_not_share_its_parents_turn(tmp_path: Path) -> None:
    """A prefork pool forks children from a parent that may have written already: parent
    and child must still exclude each other (a shared open file would let both in)."""
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=0.3)
    with gate.held():
        pass  # the parent has its lock file open
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes a turn and keeps it for a while
        try:
            with gate.held():
                os.write(ready_w, b"in")
                time.sleep(1.5)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 2) == b"in"
        with pytest.raises(WriteGateTimeoutError), gate.held():
            pytest.fail("the parent entered while its forked child held the turn")
    finally:
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=10)
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(50):
            with gate.held():
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.0002)
                with guard:
                    inside -= 1

    race(*[work] * 4, start_together=True)
    assert most == 1


def _turn_taken(path: str) -> bool:
    """Whether some writer holds the gate's lock: another open file cannot take it."""
    probe = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(probe)  # closing the probe's file gives back what it took
    return False


def test_a_waiting_writer_is_let_in_once_the_holder_leaves(tmp_path: Path) -> None:
    """A writer that finds the turn taken stays out while another holds it, is let in once
    it is free, and leaves nothing locked behind."""
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=10)
    with gate.held():
        pass
    holder = os.open(gate.path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process's writer
    entered = threading.Event()

    def writer() -> None:
        with gate.held():
            entered.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert not entered.wait(0.3), "the writer entered while another held the turn"
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    assert entered.wait(5), "the writer was not let in after the holder left"
    thread.join(5)
    assert not _turn_taken(gate.path), "the writer kept the turn after its block"


class _PausedAfterBlockingLock:
    """`fcntl` for mailbox.write_gate whose blocking LOCK_EX, once the kernel grants it, waits
    for `proceed` before returning: the waiting thread holds the lock and has not decided
    yet what to do with it."""

    def __init__(self) -> None:
        self.granted = threading.Event()
        self.proceed = threading.Event()

    def flock(self, fd: int, operation: int) -> None:
        fcntl.flock(fd, operation)
        if operation == fcntl.LOCK_EX:
            self.granted.set()
            self.proceed.wait(10)

    def __getattr__(self, name: str) -> object:
        return getattr(fcntl, name)


def test_a_wait_given_up_never_gives_away_a_later_writers_turn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that times out leaves its wait behind; the lock that wait gets is the same
    open file's as the process's next writer, so the next writer must take that wait over,
    never take the lock itself while the wait could still give it back."""
    import mailbox.write_gate

    paused = _PausedAfterBlockingLock()
    monkeypatch.setattr(mailbox.write_gate, "fcntl", paused)
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=0.3)
    holder = os.open(gate.path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    with pytest.raises(WriteGateTimeoutError), gate.held():
        pytest.fail("entered while another writer held the turn")
    fcntl.flock(holder, fcntl.LOCK_UN)  # the wait left behind gets the lock, and pauses
    os.close(holder)
    assert paused.granted.wait(5)
    gate.timeout_s = 5
    inside = threading.Event()
    leave = threading.Event()

    def next_writer() -> None:
        with gate.held():
            inside.set()
            leave.wait(10)

    writer = threading.Thread(target=next_writer)
    writer.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not inside.is_set():
            pending = gate._waiter._pending if gate._waiter is not None else None
            if pending is not None and pending.owned:
                break  # the next writer has taken the wait over
            time.sleep(0.01)
        paused.proceed.set()  # the wait decides what to do with the lock
        assert inside.wait(5), "the next writer never got its turn"
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert _turn_taken(gate.path), "the next writer's turn was given away"
            time.sleep(0.01)
    finally:
        paused.proceed.set()
        leave.set()
        writer.join(5)
    assert not writer.is_alive()
    assert not _turn_taken(gate.path)


class _Interrupted(Exception):
    pass


def test_a_wait_interrupted_by_an_exception_leaves_the_turn_to_others(
        tmp_path: Path) -> None:
    """An exception that arrives while a writer waits (Celery's soft time limit is raised
    from a signal handler) must not leave this process holding the lock with nobody inside
    once the holder lets go."""
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=10)
    holder = os.open(gate.path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)

    def interrupt(_signum: int, _frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Interrupted), gate.held():
            pytest.fail("entered while another writer held the turn")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    deadline = time.monotonic() + 5
    while gate._waiter is not None and gate._waiter.busy() and time.monotonic() < deadline:
        time.sleep(0.01)  # the wait left behind gets the lock, and gives it back
    assert not _turn_taken(gate.path), "the interrupted wait kept the lock"
    with gate.held():  # and the process still writes
        assert _turn_taken(gate.path)


def test_a_stuck_holder_costs_one_wait_not_one_per_timed_out_writer(tmp_path: Path) -> None:
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=0.05)
    holder = os.open(gate.path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        for _ in range(10):
            with pytest.raises(WriteGateTimeoutError), gate.held():
                pytest.fail("entered while another writer held the turn")
        # The gate's own file, the holder's, and the one wait left behind.
        assert _open_files_of(gate.path) == 3
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    gate.timeout_s = 5
    with gate.held():
        assert _turn_taken(gate.path)
    assert not _turn_taken(gate.path)


class _NoNewThreads:
    """`threading` for mailbox.write_gate in which no thread starts (an interpreter that is
    shutting down, a process at its thread limit)."""

    class Thread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    def __getattr__(self, name: str) -> object:
        return getattr(threading, name)


def test_a_wait_with_no_thread_to_wait_in_fails_cleanly_and_the_next_write_goes_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next writer takes the wait over and must start a thread for it: a wait that
    nothing serves would fail every later write of the process."""
    import mailbox.write_gate

    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=5)
    holder = os.open(gate.path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setattr(mailbox.write_gate, "threading", _NoNewThreads())
    with pytest.raises(WriteGateError, match="no thread to wait in"), gate.held():
        pytest.fail("entered while another writer held the turn")
    monkeypatch.undo()
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    with gate.held():
        assert _turn_taken(gate.path)
    assert not _turn_taken(gate.path)


@pytest.mark.serial
def test_a_writer_waits_no_longer_than_its_timeout_in_all(tmp_path: Path) -> None:
    """Queued behind another thread of its process and then behind another process, a
    writer still gives up after one timeout, not one for each."""
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=0.6)
    holder = os.open(gate.path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)

    def first_writer() -> None:
        with pytest.raises(WriteGateTimeoutError), gate.held():
            pytest.fail("entered while another writer held the turn")

    first = threading.Thread(target=first_writer)
    try:
        first.start()
        time.sleep(0.1)  # the first writer holds the process's turn and waits
        started = time.monotonic()
        with pytest.raises(WriteGateTimeoutError), gate.held():
            pytest.fail("entered while another writer held the turn")
        assert time.monotonic() - started < 0.6 + 0.3
    finally:
        first.join(5)
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)


def _open_files_of(path: str) -> int:
    """How many descriptors of this process are open on `path`."""
    real = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == real
    return count


def test_a_child_forked_during_a_wait_keeps_none_of_its_parents_lock_files(
        tmp_path: Path) -> None:
    """A prefork pool may fork while a writer of the parent waits for its turn. The child
    must not keep the parent's open lock file (the wait's own descriptor included): a lock
    the parent takes would live on in the child after the parent died."""
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=10)
    with gate.held():
        pass
    holder = os.open(gate.path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)

    def writer() -> None:
        with gate.held():
            pass

    waiting = threading.Thread(target=writer)
    waiting.start()
    deadline = time.monotonic() + 5
    while not (gate._waiter is not None and gate._waiter.busy()) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _open_files_of(gate.path) == 3  # the gate's file, the holder's, the wait's own
    counted_r, counted_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(counted_w, bytes([_open_files_of(gate.path)]))
        finally:
            os._exit(0)
    os.close(counted_w)  # a child that dies first makes the read return, not hang
    try:
        # The child's own gate file and the holder's inherited one: nothing of the wait.
        assert os.read(counted_r, 1) == bytes([2])
    finally:
        os.waitpid(pid, 0)
        os.close(counted_r)
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
        waiting.join(5)
    assert not waiting.is_alive()


def test_a_turn_taken_inside_a_turn_is_refused_at_once(tmp_path: Path) -> None:
    """A write inside a write of the same thread would share the open file's lock and
    unlock the outer turn on leaving: it is a bug, refused at once rather than let in."""
    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=5)
    started = time.monotonic()
    with gate.held():
        with pytest.raises(RuntimeError, match="does not nest"), gate.held():
            pytest.fail("a nested turn was let in")
        assert _turn_taken(gate.path), "the refused nested turn unlocked the outer one"
    assert time.monotonic() - started < 2
    assert not _turn_taken(gate.path)


def test_a_child_without_a_lock_file_of_its_own_refuses_to_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked child that cannot open its own lock file (no descriptors left) must not
    write through its parent's open file, which would share the parent's turn."""
    import mailbox.write_gate

    gate = SqliteWriteGate(str(tmp_path / "db.sqlite"), timeout_s=5)

    def no_descriptors(*_: object) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(mailbox.write_gate.os, "open", no_descriptors)
    gate.reopen_after_fork()  # what the fork hook runs in a child
    monkeypatch.undo()
    with pytest.raises(WriteGateError, match="no lock file of this process"), gate.held():
        pytest.fail("wrote without a lock file of its own")


def test_a_writer_that_cannot_get_its_turn_fails_cleanly(mailbox: Mailbox) -> None:
    gate = mailbox.store._gate
    assert gate is not None, "a file-backed SQLite store must have a write gate"
    gate.timeout_s = 0.3
    holder = os.open(gate.path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process's writer, stuck in its turn
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="database is locked"):
            mailbox.submit("thread-gate", "echo", "x")
        assert time.monotonic() - started < 5
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    assert mailbox.store.list_dispatches("thread-gate") == [], "a refused write wrote"
    receipt = mailbox.submit("thread-gate", "echo", "x")
    assert mailbox.get_dispatch(receipt.dispatch_id) is not None


def test_only_file_backed_sqlite_has_a_gate(mailbox: Mailbox) -> None:
    import sqlalchemy as sa

    assert write_gate(sa.create_engine("sqlite://")) is None
    assert write_gate(sa.create_engine("postgresql+psycopg://u@h/db")) is None
    gate = write_gate(mailbox.store.engine)
    assert gate is not None and gate.path.endswith("-writers.lock")
