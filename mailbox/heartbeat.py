"""Lease renewal and cancel checks while an agent runs (docs/behaviour.md#heartbeat).

A thread of its own renews the lease every lease/3, so a CPU-bound or blocked agent never
starves it (the BullMQ stalled-job trap), and reads the attempt's cancel signal every 100 ms.

Nothing but `stop()` or a decision ends this thread. Every error of a renewal or a cancel
check — Redis or SQL, expected or not — is caught, counted and logged, and the loop goes on.
(A heartbeat that died of one ConnectionError stopped renewing without a word; the lease ran
out under the still-running agent and the sweep gave the attempt to another worker, so one
attempt ran twice at once.)

It stops the agent, cooperatively (`ctx.cancelled()` turns true), for one of four reasons
(`StopKind`):
- `requested`: a cancel signal arrived (`Mailbox.cancel`, `Mailbox.interrupt`);
- `timeout`: the attempt ran past its agent's `timeout_s` (docs/behaviour.md#time-limits);
- `lease_lost`: a renewal was refused — the claim was reclaimed, or fenced by an interrupt —
  so nothing this attempt writes any more can land;
- `unsafe`: renewals, or cancel checks, kept failing for a whole lease. Past that point
  another worker may own the dispatch, or a cancel may have gone unheard, and the attempt
  must not run on silently. The execute phase turns such a stop into a transient failure
  (retried with backoff), not a cancellation: nobody asked the run to stop.

A stop does not end the renewals: the claim stays ours while the agent winds down, so an
agent slow to notice is never reclaimed and run a second time beside itself (only a lost
lease ends them: there is nothing left to renew). An agent that has not returned `grace_ms`
after its first stop is abandoned: `on_abandon` ends the attempt in the store for it (the
execute phase records what the stop means), renewals end, and the process is reported stuck
until the agent returns or the process is ended. A lost lease does not stop that clock,
whether it was the first stop or came after another: the attempt is over for the mailbox
then, but an agent that ignores it still runs — beside the claim's new owner — and must be
reported and bounded like any other.

`end()` marks the moment the handler ended (returned, raised, suspended). From then on no
stop is decided and no abandonment happens: what the handler did stands against a stop that
came after it, and an attempt is never abandoned after it was over. The handler's ending and
the heartbeat's decisions are ordered by one lock, so exactly one of them came first.

The thread starts at the heartbeat's first tick, not with the attempt (`_Launcher`): until
then it would only have waited, and most attempts of a busy mailbox (an echo, a cached
answer, a refusal) are over before it. One launcher thread per process starts the heartbeat
threads of the attempts still running at their first tick; an attempt that ends first takes
its heartbeat off the launcher's queue, and never had a thread. Starting and joining a
thread per attempt cost about 0.2 ms of CPU per dispatch, for nothing.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

from mailbox import metrics
from mailbox.store import MailboxStore

log = logging.getLogger(__name__)

CANCEL_CHECK_INTERVAL_S = 0.1


class StopKind(enum.Enum):
    requested = "requested"
    timeout = "timeout"
    lease_lost = "lease_lost"
    unsafe = "unsafe"


OnStop = Callable[[str, StopKind], None]
OnAbandon = Callable[[str, StopKind], None]
CancelCheck = Callable[[], str | None]


class _Streak:
    """Consecutive failures of one kind of call: logged once when they start and once when
    they end, counted every time (a cancel check fails ten times a second during an
    outage; a warning per failure would bury the log)."""

    def __init__(self, what: str, dispatch_id: str, clock: Callable[[], int]) -> None:
        self.what = what
        self.dispatch_id = dispatch_id
        self.clock = clock
        self.last_ok = clock()
        self.failures = 0

    def ok(self) -> None:
        if self.failures:
            log.warning("%s of %s works again after %d failures", self.what, self.dispatch_id,
                        self.failures)
        self.failures = 0
        self.last_ok = self.clock()

    def failed(self, exc: BaseException) -> int:
        """Count a failure; return how long (ms) this call has not succeeded."""
        if not self.failures:
            log.warning("%s of %s failed (%s: %s); retrying", self.what, self.dispatch_id,
                        type(exc).__name__, exc)
        self.failures += 1
        return self.clock() - self.last_ok


class Heartbeat:
    def __init__(self, store: MailboxStore, *, dispatch_id: str, token: str, lease_ms: int,
                 clock: Callable[[], int], on_stop: OnStop, interval_s: float | None = None,
                 cancel_check: CancelCheck | None = None, timeout_ms: int | None = None,
                 grace_ms: int | None = None, on_abandon: OnAbandon | None = None) -> None:
        self.store = store
        self.dispatch_id = dispatch_id
        self.token = token
        self.lease_ms = lease_ms
        self.clock = clock
        self.on_stop = on_stop
        self.interval_s = interval_s if interval_s is not None else lease_ms / 3000
        self.cancel_check = cancel_check
        self.timeout_ms = timeout_ms
        self.grace_ms = grace_ms
        self.on_abandon = on_abandon
        self.renewals = 0
        self.stop_reason: str | None = None
        self.stop_kind: StopKind | None = None
        self.abandoned = False
        self.lease_lost = False
        self._ended = False
        self._lock = threading.Lock()  # orders the handler's end against stops, abandonment
        self._stopped_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{dispatch_id}",
                                        daemon=True)
        self._started_at = 0.0
        self._launch_lock = threading.Lock()  # orders `launch` against `stop`
        self._launched = False

    @property
    def first_tick_s(self) -> float:
        """How long the loop waits before it first looks: the cancel-check interval when it
        checks cancels or a time limit, else the renewal interval."""
        fast = self.cancel_check is not None or self.timeout_ms is not None
        return min(self.interval_s, CANCEL_CHECK_INTERVAL_S) if fast else self.interval_s

    def start(self) -> Heartbeat:
        """Start the clock; the thread follows at the first tick (`_Launcher`). Without a
        launcher thread (none could be started) the heartbeat's own starts now, and if that
        fails too, this raises: the agent does not run."""
        self._started_at = time.monotonic()
        if not _launcher.schedule(self, self._started_at + self.first_tick_s):
            with self._launch_lock:
                self._thread.start()
                self._launched = True
        return self

    def launch(self) -> None:
        """On the launcher's thread, at the first tick: start the heartbeat's thread, unless
        the heartbeat was stopped first. A thread that cannot be started ("can't start new
        thread": the process is out of threads) stops the agent (`unsafe`), since without
        renewals its lease would run out under it and the sweep would give the attempt to
        another worker; the launcher tries again every tick, and once the grace after the
        stop has passed without a thread it abandons the attempt, as the heartbeat's own loop
        would have."""
        with self._launch_lock:
            if self._stop.is_set() or self._launched:
                return
            try:
                self._thread.start()
            except RuntimeError as exc:
                failure = exc
            else:
                self._launched = True
                return
        # Callbacks run outside the launch lock (a stop() waiting on it must not wait on them).
        if self.stop_kind is None:  # the first failure; the retries are not new decisions
            log.error("heartbeat of %s could not start its thread: %s", self.dispatch_id,
                      failure)
            self._decide(f"heartbeat could not start: {failure}", StopKind.unsafe)
        if self._abandon_due(time.monotonic()):
            self._abandon()
        elif not self._stop.is_set() and not self.abandoned:
            _launcher.schedule(self, time.monotonic() + self.first_tick_s)

    def stop(self) -> None:
        self._stop.set()
        with self._launch_lock:
            launched = self._launched
        if launched:
            self._thread.join(timeout=5)
        else:
            _launcher.forget(self)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def launched(self) -> bool:
        """Whether its thread was started (an attempt over before the first tick: never)."""
        return self._launched

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def end(self) -> bool:
        """The handler has ended. From now on `stop_kind` stays as it is — a stop decided
        later is only counted — and the attempt is never abandoned. (A stop decided in the
        moments between the handler's return and `stop()` used to override a finished
        result: a completed answer became `cancelled` or "timed out".) False when the
        attempt had already been abandoned: the ending came too late to count."""
        with self._lock:
            if not self.abandoned:
                self._ended = True
            return self._ended

    def _decide(self, reason: str, kind: StopKind) -> None:
        """Stop the agent (the first decision stands; later ones, and any after the handler
        ended, are only counted)."""
        metrics.count_operation("heartbeat_stop", kind.value)
        with self._lock:
            if self.stop_kind is not None or self._ended:
                return
            self.stop_reason, self.stop_kind = reason, kind
            self._stopped_at = time.monotonic()
        try:
            self.on_stop(reason, kind)
        except Exception:  # the callback is the caller's; its bug must not look like ours
            log.exception("stopping the agent of %s failed", self.dispatch_id)

    def _loop(self) -> None:
        checks = _Streak("cancel check", self.dispatch_id, self.clock)
        renewals = _Streak("lease renewal", self.dispatch_id, self.clock)
        tick = self.first_tick_s
        started = self._started_at or time.monotonic()
        next_renewal = started + self.interval_s
        # Launched at the first tick (or late, on a busy machine): look at once, then every
        # tick, as a thread started with the attempt would have.
        wait = max(0.0, started + tick - time.monotonic())
        while not self._stop.wait(wait):
            wait = tick
            now = time.monotonic()
            if self.stop_kind is None:
                if self.timeout_ms is not None and (now - started) * 1000 >= self.timeout_ms:
                    self._decide(f"timed out after {self.timeout_ms / 1000:g} s",
                                 StopKind.timeout)
                elif self.cancel_check is not None:
                    self._check_cancel(checks)
            if self._abandon_due(now):
                self._abandon()
                return
            if not self.lease_lost and now >= next_renewal:
                next_renewal = now + self.interval_s
                if self._renew(renewals):
                    # Nothing left to renew. Without an abandonment clock to keep there is
                    # nothing left to do either; with one, the loop goes on until the agent
                    # returns or is abandoned (a lost lease ends the attempt for the
                    # mailbox, not the agent's run in this process).
                    self.lease_lost = True
                    if self.grace_ms is None or self.on_abandon is None:
                        return

    def _abandon_due(self, now: float) -> bool:
        return (self._stopped_at is not None and self.grace_ms is not None
                and self.on_abandon is not None
                and (now - self._stopped_at) * 1000 >= self.grace_ms
                and not self._stop.is_set())

    def _abandon(self) -> None:
        """The agent did not return within the grace after its stop: end the attempt for it
        (`on_abandon`), stop renewing. Its late return, if any, is discarded by the caller.
        Nothing happens when the handler ended meanwhile (`end()`): that attempt is over."""
        assert self.on_abandon is not None and self.stop_kind is not None
        with self._lock:
            if self._ended:
                return
            self.abandoned = True
        metrics.count_operation("heartbeat_abandon", self.stop_kind.value)
        log.error("agent of %s did not stop within %s ms of its stop (%s): attempt abandoned",
                  self.dispatch_id, self.grace_ms, self.stop_reason)
        try:
            self.on_abandon(self.stop_reason or "", self.stop_kind)
        except Exception:
            log.exception("abandoning the attempt of %s failed; its lease runs out and the "
                          "sweep reclaims it", self.dispatch_id)

    def _check_cancel(self, streak: _Streak) -> None:
        """Stop the agent when a cancel arrived, or when the signal was unreadable for a
        whole lease."""
        assert self.cancel_check is not None
        try:
            reason = self.cancel_check()
        except Exception as exc:
            metrics.count_operation("cancel_check", "error")
            blind_ms = streak.failed(exc)
            if blind_ms >= self.lease_ms:
                self._decide(f"cancel signal unreadable for {blind_ms} ms (lease {self.lease_ms}"
                             f" ms): {type(exc).__name__}: {exc}", StopKind.unsafe)
            return
        streak.ok()
        if reason:
            self._decide(reason, StopKind.requested)

    def _renew(self, streak: _Streak) -> bool:
        """True when the lease is lost: nothing is left to renew."""
        started = time.perf_counter()
        try:
            renewed = self.store.extend_lease(self.dispatch_id, self.token, self.lease_ms,
                                              self.clock())
        except Exception as exc:
            metrics.record_operation("lease_renewal", "error", time.perf_counter() - started)
            unrenewed_ms = streak.failed(exc)
            if unrenewed_ms >= self.lease_ms:
                self._decide(f"lease renewal failing for {unrenewed_ms} ms (lease "
                             f"{self.lease_ms} ms): {type(exc).__name__}: {exc}",
                             StopKind.unsafe)
            return False
        if not renewed:
            metrics.record_operation("lease_renewal", "lost", time.perf_counter() - started)
            self._decide("lease lost", StopKind.lease_lost)
            return True
        streak.ok()
        self.renewals += 1
        metrics.record_operation("lease_renewal", "ok", time.perf_counter() - started)
        return False


class _Launcher:
    """One thread per process that starts each heartbeat's thread at its first tick, for the
    attempts still running then (`Heartbeat.start`). Per process, started on first use: a
    prefork child forked from a process that had one starts its own (threads do not survive
    a fork)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Heartbeat]] = []
        self._order = itertools.count()  # ties on the time: first scheduled, first started

    def schedule(self, heartbeat: Heartbeat, at: float) -> bool:
        """Start `heartbeat` at monotonic time `at`; False when no launcher thread could be
        started (the caller starts the heartbeat's own thread at once)."""
        with self._cond:
            # None yet; or gone: in a forked child (the parent's thread did not come along),
            # or ended by something nobody caught.
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name="heartbeat-launcher",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:
                    log.warning("heartbeat launcher could not start (%s): this heartbeat "
                                "starts its own thread", exc)
                    return False
                self._thread = thread
            heapq.heappush(self._due, (at, next(self._order), heartbeat))
            if self._due[0][2] is heartbeat:
                self._cond.notify()
        return True

    def forget(self, heartbeat: Heartbeat) -> None:
        """A heartbeat stopped before its first tick: its launch is dropped, so the launcher
        does not wake for it (the queue holds the attempts of the last tick, a few)."""
        with self._cond:
            for i, entry in enumerate(self._due):
                if entry[2] is heartbeat:
                    self._due[i] = self._due[-1]
                    self._due.pop()
                    heapq.heapify(self._due)
                    return

    def after_fork(self) -> None:
        """In a forked child (run by `os.register_at_fork`, before any other thread exists
        there): the parent's condition may have been held by a thread that is not here, and
        its queue is the parent's."""
        self._cond = threading.Condition()
        self._due = []
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._cond.wait(None if not self._due
                                    else max(0.0, self._due[0][0] - time.monotonic()))
                heartbeat = heapq.heappop(self._due)[2]
            try:
                heartbeat.launch()
            except BaseException:  # one heartbeat's failure must never stop the others
                log.exception("starting the heartbeat of %s failed", heartbeat.dispatch_id)


_launcher = _Launcher()
os.register_at_fork(after_in_child=_launcher.after_fork)
