"""Invariant checker for a whole workload: what fault tests, load tests and soaks end with.

`mailbox.audit.audit` looks at one moment of a live system. A workload needs more: every
dispatch it submitted must end (none lost), and some invariants can only be seen *while* it
runs — two Claimed dispatches on one thread, or an epoch going back, leave no trace once the
workload is over. So the checker has three parts:

* `record(thread_id, dispatch_id)` — the workload tells it what it submitted, per thread in
  submission order (that order is what "per-thread order kept" is checked against);
* `sampling()` — a background thread that, every `sample_interval_s`, reads the SQL truth and
  the Redis hot copies and notes any breach of "at most one Claimed per thread" and "epochs
  never go back" (per recorded thread: the SQL epoch row and the Redis epoch cache);
* `check()` — the final audit, a `WorkloadReport` whose `violations` are invariant breaches.

What `check()` verifies, and why it is the strongest check the store allows:

none lost
    Every recorded dispatch still has its row and the row is terminal. The ids come from the
    workload itself, so a row that vanished is caught, not just one stuck in a live status.
thread exclusivity
    No sample ever saw two Claimed dispatches on one thread, nor does the final state.
    (PostgreSQL and SQLite back this with a partial unique index; the sample is what proves
    it also held under the faults the workload injected.)
epochs monotonic
    Per thread, across samples: the SQL epoch never decreased, the Redis cache never
    decreased (an absent key — after a flush — is skipped, not a decrease), and the cache was
    never above SQL (Redis is read first, SQL second, and SQL only grows, so cache > SQL
    means the cache went wrong). Durably: Acked dispatches carry the epoch they were queued
    under, which must not decrease in submission order.
one recorded result per attempt
    SQL keeps only the *last* attempt's outcome on the dispatch row (attempt_count counts
    the failed ones), and the run record keeps the run's single outcome; the per-attempt
    history lives in the run's event stream (`run_started` with the attempt number when an
    attempt starts the agent, one `run_finish` when an attempt ends — emitted after the SQL
    write it describes, by the worker or, for a crashed attempt, by the sweep). So:
    - durably (SQL): an Acked dispatch has its result projection (instance id, a final run
      status, completed_at) and its run is decided by that same result (run response and
      termination equal the dispatch projection, finished no later than the ack); a
      DeadLetter's run ends done (with its error, or — a warning — with the outcome an
      earlier attempt recorded before it lost its claim);
    - per attempt (events): no attempt number started twice (one execution per attempt), no
      start beyond attempt_count; an Acked dispatch has exactly attempt_count `retrying`
      finishes followed by exactly one `acked` finish, nothing after it; a DeadLetter has
      exactly one `dead_letter` finish, last, after attempt_count - 1 `retrying` ones when
      the budget was spent (attempt_count >= max_attempts) or attempt_count when a
      permanent error ended it early.
    A stream is only judged when it is complete, i.e. it still holds the dispatch's
    `run_queued` event. With `redis_data_loss=True` (the workload flushed or restarted
    Redis) an incomplete stream is counted as unverifiable; otherwise it is a violation.
per-thread order kept
    Within a thread and a priority, a dispatch that stayed due from its submission on (never
    put back with a retry backoff, i.e. no `last_error`, and recorded with `ordered=True`,
    the default — pass False for delayed submissions) must be acked before any later
    submission is acked (completed_at), and before any later submission even started an
    attempt (`run_started` ts, when the streams are complete). Claim order is priority, then
    FIFO among due dispatches, one at a time per thread, so a later one can only overtake an
    earlier one that was not due. Timestamps come from one host's wall clock (the stack's
    processes), which is what every store time is.
the store's own audit
    `mailbox.audit.audit(mailbox)` reports no violation (its warnings are kept as warnings).

Conditions that settle a moment after the dispatch turns terminal (the `run_finish` event
follows the ack; the sweep reconciles a dead letter's run) are re-read for up to `grace_s`
before they count.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailbox.audit import audit as store_audit
from mailbox.events import Event
from mailbox.model import TERMINAL_STATUSES, DispatchStatus
from mailbox.store import Inspection

if TYPE_CHECKING:
    from mailbox.facade import Mailbox

TERMINAL = frozenset(s.value for s in TERMINAL_STATUSES)
MISSING = "missing"
CHUNK = 500
MAX_SAMPLE_VIOLATIONS = 200
RESULT_RUN_STATUSES = frozenset({"done", "waiting"})

def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class WorkloadReport:
    """The outcome of `WorkloadAudit.check()`. `ok` when no invariant was broken."""

    dispatches: int
    threads: int
    by_status: dict[str, int]
    samples: int
    violations: list[str]
    warnings: list[str] = field(default_factory=list)
    sample_errors: int = 0
    max_claimed: int = 0
    events_unverified: int = 0
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "dispatches": self.dispatches, "threads": self.threads,
                "by_status": dict(self.by_status), "samples": self.samples,
                "sample_errors": self.sample_errors, "max_claimed": self.max_claimed,
                "events_unverified": self.events_unverified,
                "violations": list(self.violations), "warnings": list(self.warnings),
                "checks": list(self.checks)}

    def raise_if_failed(self) -> None:
        """AssertionError naming the first 20 violations (and the totals), if any."""
        if self.ok:
            return
        shown = "\n  ".join(self.violations[:20])
        more = len(self.violations) - 20
        raise AssertionError(
            f"workload audit failed: {len(self.violations)} violation(s) over "
            f"{self.dispatches} dispatches on {self.threads} threads "
            f"(by status {self.by_status}, {self.samples} samples)\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else ""))


@dataclass
class _Sampled:
    """What the sampler thread accumulates (guarded by WorkloadAudit._lock)."""

    samples: int = 0
    errors: int = 0
    last_error: str = ""
    max_claimed: int = 0
    violations: list[str] = field(default_factory=list)
    sql_epoch: dict[str, int] = field(default_factory=dict)
    redis_epoch: dict[str, int] = field(default_factory=dict)
    started: bool = False


class WorkloadAudit:
    """Records what a workload submitted, samples invariants while it runs, audits the end.

    Thread-safe: several submitting threads may `record` at once (each thread's own
    dispatches in its submission order).
    """

    def __init__(self, mailbox: Mailbox, *, sample_interval_s: float = 0.05,
                 redis_data_loss: bool = False, grace_s: float = 10.0) -> None:
        self.mailbox = mailbox
        self.sample_interval_s = sample_interval_s
        self.redis_data_loss = redis_data_loss
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._order: list[str] = []
        self._by_thread: dict[str, list[str]] = defaultdict(list)
        self._thread_of: dict[str, str] = {}
        self._unordered: set[str] = set()
        self._sampled = _Sampled()

    # --------------------------------------------------------------------------- recording
    def record(self, thread_id: str, dispatch_id: str, *, ordered: bool = True) -> None:
        """Note a submitted dispatch. Call in submission order per thread. `ordered=False`
        leaves it out of the order check (a delayed submission may be overtaken)."""
        with self._lock:
            if dispatch_id in self._thread_of:
                raise ValueError(f"dispatch {dispatch_id} recorded twice")
            self._order.append(dispatch_id)
            self._by_thread[thread_id].append(dispatch_id)
            self._thread_of[dispatch_id] = thread_id
            if not ordered:
                self._unordered.add(dispatch_id)

    @property
    def dispatch_ids(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def by_thread(self) -> dict[str, list[str]]:
        """The recorded dispatch ids per thread, in submission order."""
        with self._lock:
            return {t: list(ids) for t, ids in self._by_thread.items()}

    def _threads(self) -> list[str]:
        with self._lock:
            return list(self._by_thread)

    # ---------------------------------------------------------------------------- sampling
    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample "at most one Claimed per thread" and "epochs never go back" in a background
        thread for the duration of the block (one last sample is taken on exit)."""
        stop = threading.Event()
        with self._lock:
            self._sampled.started = True
        worker = threading.Thread(target=self._sample_loop, args=(stop,),
                                  name="workload-audit-sampler", daemon=True)
        worker.start()
        try:
            yield
        finally:
            stop.set()
            worker.join(timeout=30)
            self.sample_once()

    def _sample_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample_once()
            stop.wait(self.sample_interval_s)

    def sample_once(self) -> bool:
        """One sample; False when Redis or SQL could not be read (counted, never raised: a
        workload that restarts its servers makes some samples fail)."""
        threads = self._threads()
        try:
            redis_epochs = self._read_redis_epochs(threads)
            claimed, doubled = self._read_claims()
            sql_epochs = self._read_sql_epochs(threads)
        except Exception as exc:  # a sample lost to a server being restarted is only noted
            with self._lock:
                self._sampled.errors += 1
                self._sampled.last_error = repr(exc)
            return False
        at = int(time.time() * 1000)
        with self._lock:
            s = self._sampled
            s.samples += 1
            s.max_claimed = max(s.max_claimed, claimed)
            found: list[str] = []
            for thread_id, n in sorted(doubled.items()):
                found.append(f"two_claimed: thread {thread_id} had {n} Claimed dispatches "
                             f"at {at}")
            for thread_id, epoch in sql_epochs.items():
                before = s.sql_epoch.get(thread_id)
                if before is not None and epoch < before:
                    found.append(f"epoch_went_back: SQL epoch of thread {thread_id} went "
                                 f"from {before} to {epoch} at {at}")
                s.sql_epoch[thread_id] = max(epoch, before or 0)
            for thread_id, cached in redis_epochs.items():
                before = s.redis_epoch.get(thread_id)
                if before is not None and cached < before:
                    found.append(f"epoch_went_back: Redis epoch cache of thread {thread_id} "
                                 f"went from {before} to {cached} at {at}")
                s.redis_epoch[thread_id] = max(cached, before or 0)
                sql = sql_epochs.get(thread_id, 0)
                if cached > sql:
                    found.append(f"epoch_cache_ahead: Redis epoch cache of thread "
                                 f"{thread_id} is {cached}, above the SQL epoch {sql} read "
                                 f"after it, at {at}")
            room = MAX_SAMPLE_VIOLATIONS - len(s.violations)
            s.violations.extend(found[:max(room, 0)])
        return True

    def _read_claims(self) -> tuple[int, dict[str, int]]:
        """(Claimed dispatches in all, threads holding more than one) in one snapshot."""
        with Inspection.open(self.mailbox.store) as inspect:
            per_thread = inspect.claimed_by_thread()
        return sum(per_thread.values()), {t: n for t, n in per_thread.items() if n > 1}

    def _read_sql_epochs(self, threads: Sequence[str]) -> dict[str, int]:
        with Inspection.open(self.mailbox.store) as inspect:
            return inspect.epochs_of(threads)

    def _read_redis_epochs(self, threads: Sequence[str]) -> dict[str, int]:
        coordinator = self.mailbox.store.coordinator
        found: dict[str, int] = {}
        for chunk in _chunks(threads):
            found.update(coordinator.cached_epochs(chunk))
        return found

    # ------------------------------------------------------------------------------ waiting
    def _statuses(self, ids: Sequence[str]) -> dict[str, str]:
        with Inspection.open(self.mailbox.store) as inspect:
            return inspect.statuses_of(ids)

    def wait_terminal(self, timeout_s: float,
                      progress: Callable[[int, int], None] | None = None, *,
                      only: Sequence[str] | None = None) -> None:
        """Block until every recorded dispatch (or those in `only`) is terminal.
        `progress(done, total)` is called after each poll. On timeout: AssertionError with
        the counts per status and the first dispatches still live. Read errors (a server
        restarting) are retried until then."""
        deadline = time.monotonic() + timeout_s
        pending = self.dispatch_ids if only is None else list(only)
        watched = list(pending)
        total = len(pending)
        last: dict[str, str] = {}
        last_error = ""
        while True:
            try:
                last = self._statuses(pending)
            except Exception as exc:  # the database may be restarting: keep polling
                last_error = repr(exc)
            else:
                pending = [d for d in pending if last.get(d) not in TERMINAL]
                if progress is not None:
                    progress(total - len(pending), total)
                if not pending:
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        counts = dict(Counter(last.get(d, MISSING) for d in watched))
        with contextlib.suppress(Exception):  # the last poll's statuses will do
            counts = self._count_statuses(watched)
        live = ", ".join(f"{d} ({last.get(d, MISSING)}, thread {self._thread_of.get(d)})"
                         for d in pending[:10])
        raise AssertionError(
            f"{len(pending)} of {total} dispatches not terminal after {timeout_s}s; by status "
            f"{counts}; first live: {live}" + (f"; last read error {last_error}"
                                                if last_error else ""))

    def _count_statuses(self, ids: Sequence[str]) -> dict[str, int]:
        statuses = self._statuses(ids)
        return dict(Counter(statuses.get(d, MISSING) for d in ids))

    # -------------------------------------------------------------------------------- check
    def check(self, *, require_sampling: bool = True) -> WorkloadReport:
        """The final audit (see the module docstring). Conditions that settle just after a
        dispatch turns terminal are re-read for up to `grace_s` before they count."""
        deadline = time.monotonic() + self.grace_s
        while True:
            report, settling = self._check_once(require_sampling)
            if not settling or time.monotonic() >= deadline:
                return report
            time.sleep(0.2)

    def _check_once(self, require_sampling: bool) -> tuple[WorkloadReport, bool]:
        with self._lock:
            order = list(self._order)
            by_thread = {t: list(ids) for t, ids in self._by_thread.items()}
            unordered = set(self._unordered)
            sampled = _Sampled(self._sampled.samples, self._sampled.errors,
                               self._sampled.last_error, self._sampled.max_claimed,
                               list(self._sampled.violations), started=self._sampled.started)
        violations: list[str] = []
        late: list[str] = []  # may still settle: re-read within the grace period
        warnings: list[str] = []
        checks = ["none_lost", "terminal", "two_claimed_sampled", "epochs_sampled",
                  "epochs_queued_order", "result_per_attempt", "thread_order", "store_audit"]

        rows = self._load_rows(order)
        run_rows = self._load_runs(sorted({str(r["run_id"]) for r in rows.values()}))
        by_status = dict(Counter(str(rows[d]["status"]) if d in rows else MISSING
                                 for d in order))

        # none lost, all terminal
        for dispatch_id in order:
            row = rows.get(dispatch_id)
            if row is None:
                violations.append(f"lost: dispatch {dispatch_id} (thread "
                                  f"{self._thread_of.get(dispatch_id)}) has no row")
            elif str(row["status"]) not in TERMINAL:
                violations.append(f"not_terminal: dispatch {dispatch_id} is {row['status']} "
                                  f"(attempts {row['attempt_count']})")

        # sampled invariants
        if require_sampling and not sampled.started:
            violations.append("not_sampled: sampling() was never used, so thread exclusivity "
                              "and epoch monotonicity were not observed during the workload")
        elif require_sampling and sampled.samples == 0:
            violations.append(f"not_sampled: no sample succeeded ({sampled.errors} failed, "
                              f"last {sampled.last_error})")
        violations.extend(sampled.violations)
        if sampled.errors:
            warnings.append(f"{sampled.errors} sample(s) failed (servers restarting?); last: "
                            f"{sampled.last_error}")
        _, doubled = self._read_claims()
        for thread_id, n in sorted(doubled.items()):
            violations.append(f"two_claimed: thread {thread_id} has {n} Claimed dispatches "
                              f"at the end")

        # per attempt: durable SQL part, then the event streams
        events = self._load_events(sorted({str(r["run_id"]) for r in rows.values()}))
        unverified = 0
        started_at: dict[str, list[int]] = {}
        for dispatch_id in order:
            row = rows.get(dispatch_id)
            if row is None or str(row["status"]) not in TERMINAL:
                continue
            run = run_rows.get(str(row["run_id"]))
            found, lagging = self._check_results(row, run)
            (late if lagging else violations).extend(found)
            if (run is not None and str(row["status"]) == DispatchStatus.DeadLetter.value
                    and str(run["status"]) == "done" and run["error"] is None):
                warnings.append(f"dispatch {dispatch_id} is dead-lettered although its run "
                                f"{run['run_id']} finished without error: an earlier attempt "
                                f"recorded the outcome, none acked it")
            stream = events.get(str(row["run_id"]))
            mine = [e for e in stream or [] if e.dispatch_id == dispatch_id]
            if not any(e.type == "run_queued" for e in mine):
                if self.redis_data_loss:
                    unverified += 1
                else:
                    violations.append(f"events_lost: the event stream of dispatch "
                                      f"{dispatch_id} (run {row['run_id']}) lacks its "
                                      f"run_queued event")
                continue
            started_at[dispatch_id] = [e.ts for e in mine if e.type == "run_started"]
            found, lagging = self._check_attempt_events(row, mine)
            (late if lagging else violations).extend(found)

        # per-thread order and queued epochs
        for thread_id, ids in by_thread.items():
            violations.extend(self._check_order(thread_id, ids, rows, unordered, started_at))

        # the store's own audit
        report = store_audit(self.mailbox)
        for finding in report.violations:
            violations.append(f"store_audit: {finding.check}: {finding.message} "
                              f"({finding.count}: {', '.join(finding.sample)})")
        for finding in report.warnings:
            warnings.append(f"store_audit: {finding.check}: {finding.message} "
                            f"({finding.count}: {', '.join(finding.sample)})")

        settling = bool(late) and not violations
        return WorkloadReport(len(order), len(by_thread), by_status, sampled.samples,
                              violations + late, warnings, sampled.errors,
                              sampled.max_claimed, unverified, checks), settling

    # ------------------------------------------------------------------------ check helpers
    def _load_rows(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with Inspection.open(self.mailbox.store) as inspect:
            return inspect.outcomes_of(ids)

    def _load_runs(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with Inspection.open(self.mailbox.store) as inspect:
            return inspect.run_outcomes_of(run_ids)

    def _load_events(self, run_ids: Sequence[str]) -> dict[str, list[Event]]:
        return {run_id: self.mailbox.events.read(run_id) for run_id in run_ids}

    @staticmethod
    def _check_results(row: dict[str, Any], run: dict[str, Any] | None
                       ) -> tuple[list[str], bool]:
        """The durable part of "one recorded result per attempt". Returns (violations,
        whether they may still settle)."""
        found: list[str] = []
        dispatch_id, status = row["dispatch_id"], str(row["status"])
        if run is None:
            return [f"result: run {row['run_id']} of dispatch {dispatch_id} has no record"], False
        if status == DispatchStatus.Acked.value:
            if (row["dispatch_instance_id"] is None or row["completed_at"] is None
                    or row["run_status"] not in RESULT_RUN_STATUSES):
                found.append(f"result: Acked dispatch {dispatch_id} has no recorded result "
                             f"(instance {row['dispatch_instance_id']}, run_status "
                             f"{row['run_status']}, completed_at {row['completed_at']})")
            if str(run["status"]) not in RESULT_RUN_STATUSES:
                found.append(f"result: run {run['run_id']} of Acked dispatch {dispatch_id} is "
                             f"{run['status']}, not decided")
            elif run["dispatch_id"] == dispatch_id:
                if (run["response"] != row["run_response"]
                        or run["termination"] != row["termination"]):
                    found.append(
                        f"result: run {run['run_id']} recorded a result other than its acked "
                        f"dispatch {dispatch_id}: run ({run['termination']}, "
                        f"{run['response']!r}) vs dispatch ({row['termination']}, "
                        f"{row['run_response']!r})")
                finished = run["finished_at"]
                if (finished is not None and row["completed_at"] is not None
                        and int(finished) > int(row["completed_at"])):
                    found.append(f"result: run {run['run_id']} finished at {finished}, after "
                                 f"its dispatch {dispatch_id} was acked at "
                                 f"{row['completed_at']}: recorded twice?")
            return found, False
        if (status == DispatchStatus.DeadLetter.value and str(run["status"]) != "done"
                and run["dispatch_id"] in (None, dispatch_id)):
            return [f"result: run {run['run_id']} of dead-lettered dispatch {dispatch_id} is "
                    f"{run['status']}, not done (unreconciled)"], True
        return found, False

    @staticmethod
    def _check_attempt_events(row: dict[str, Any], mine: list[Event]
                              ) -> tuple[list[str], bool]:
        """Per attempt, from the run's event stream (see the module docstring)."""
        found: list[str] = []
        dispatch_id, status = row["dispatch_id"], str(row["status"])
        attempts = int(row["attempt_count"])
        started = [e.data.get("attempt") if isinstance(e.data, dict) else None
                   for e in mine if e.type == "run_started"]
        for attempt, n in Counter(started).items():
            if n > 1:
                found.append(f"attempt_twice: attempt {attempt} of dispatch {dispatch_id} "
                             f"started {n} times")
        beyond = [a for a in started if not isinstance(a, int) or not 0 <= a <= attempts]
        if beyond:
            found.append(f"attempt_unknown: dispatch {dispatch_id} (attempt_count {attempts}) "
                         f"started attempts {beyond}")
        finishes = [(e.data.get("status") if isinstance(e.data, dict) else None)
                    for e in mine if e.type == "run_finish"]
        if status == DispatchStatus.Acked.value:
            expected = ["retrying"] * attempts + ["acked"]
        elif status == DispatchStatus.DeadLetter.value:
            spent = attempts >= int(row["max_attempts"])
            expected = ["retrying"] * (attempts - 1 if spent else attempts) + ["dead_letter"]
        else:
            retrying = [f for f in finishes if f == "retrying"]
            other = [f for f in finishes if f != "retrying"]
            if len(retrying) > attempts or len(other) > 1:
                found.append(f"result_per_attempt: {status} dispatch {dispatch_id} "
                             f"(attempt_count {attempts}) has run_finish statuses {finishes}")
            return found, False
        if finishes != expected:
            # A missing final run_finish may only lag the SQL write it follows.
            lagging = finishes == expected[:-1]
            found.append(f"result_per_attempt: {status} dispatch {dispatch_id} (attempt_count "
                         f"{attempts}) has run_finish statuses {finishes}, expected "
                         f"{expected}")
            return found, lagging
        return found, False

    def _check_order(self, thread_id: str, ids: Sequence[str],
                     rows: dict[str, dict[str, Any]], unordered: set[str],
                     started_at: dict[str, list[int]]) -> list[str]:
        """Per thread: queued epochs never decrease; FIFO among due dispatches of a priority
        (see the module docstring)."""
        found: list[str] = []
        acked = [rows[d] for d in ids
                 if d in rows and str(rows[d]["status"]) == DispatchStatus.Acked.value]
        top_epoch: tuple[int, str] | None = None
        for row in acked:
            epoch = int(row["dispatch_epoch"])
            if top_epoch is not None and epoch < top_epoch[0]:
                found.append(f"epoch_went_back: thread {thread_id}: dispatch "
                             f"{row['dispatch_id']} was queued under epoch {epoch} after "
                             f"{top_epoch[1]} was queued under {top_epoch[0]}")
            if top_epoch is None or epoch > top_epoch[0]:
                top_epoch = (epoch, str(row["dispatch_id"]))
        latest: dict[int, tuple[int, str]] = {}  # priority -> (latest ack of a due one, id)
        for row in acked:
            dispatch_id = str(row["dispatch_id"])
            priority = int(row["priority"])
            completed = _int_or_none(row["completed_at"])
            before = latest.get(priority)
            if before is not None and completed is not None:
                if completed < before[0]:
                    found.append(f"order: thread {thread_id}: dispatch {dispatch_id} was acked "
                                 f"at {completed}, before the earlier submitted {before[1]} "
                                 f"(acked at {before[0]})")
                early = [ts for ts in started_at.get(dispatch_id, []) if ts < before[0]]
                if early:
                    found.append(f"order: thread {thread_id}: dispatch {dispatch_id} started "
                                 f"at {early[0]}, before the earlier submitted {before[1]} was "
                                 f"acked (at {before[0]})")
            stayed_due = row["last_error"] is None and dispatch_id not in unordered
            if stayed_due and completed is not None and (before is None
                                                         or completed > before[0]):
                latest[priority] = (completed, dispatch_id)
        return found


__all__ = ["WorkloadAudit", "WorkloadReport"]
