"""Invariant audit and operator statistics of a live mailbox (docs/architecture.md#invariants).

`audit(mailbox)` reads the SQL truth and the Redis hot copies and reports what breaks the
invariants (violations: something the store promises never happens) apart from what
is only unhealthy and self-healing (warnings: the sweep repairs it, or it shows that the sweep
is not running). It never writes.

Why its own queries (`mailbox.store.Inspection`): the store's readers turn every row into a
validated `RunDispatch`, so a corrupt row would make them raise — and corrupt rows are exactly
what an audit looks for. Every check is one aggregate (a COUNT) plus a short, ordered sample
of ids, so the cost does not grow
with what the tables hold beyond the index scans; Redis is walked with SCAN in pages. Each
check is a single statement, so it sees one consistent snapshot of the rows it joins (an
interrupt's epoch bump and the supersede of its queued work commit together).

What is checked:

violations
  two_claimed_per_thread  a thread with more than one Claimed dispatch
  claimed_without_lease   a Claimed row missing claim_token, claimed_by or lease_until
  claim_fields_on_idle    a row that is not Claimed but still carries claim fields
  stale_queued            a Queued dispatch older than its thread's epoch: the interrupt that
                          raised the epoch must have superseded it
  epoch_regressed         a dispatch stamped with an epoch above its thread's: the thread's
                          epoch went backwards
  redis_epoch_ahead       a Redis epoch cache above the SQL epoch: SQL went backwards (restored
                          from a backup?), and verify would fence current work as stale
  missing_epoch           a dispatch whose thread has no epoch row. Garbage collection drops
                          an epoch row only for a thread with no dispatch and no run left,
                          under the thread's lock, so a dispatch beside no epoch row means a
                          row lost some other way (docs/behaviour.md#gc)
  orphan_run              a created/running run with no dispatch at all: nothing will ever run
                          it. Waiting and done runs are exempt: garbage collection
                          (T18) purges their old terminal dispatches and keeps the runs.
  unknown_status          a dispatch status outside DispatchStatus
warnings
  unreconciled_run        a Cancelled/Superseded/DeadLetter dispatch whose run still points at
                          it and is not done (a crash between two writes; the sweep repairs it)
  stuck_claim             a Claimed dispatch whose lease expired more than `stuck_after_s` ago
                          (the sweep should have reclaimed it: is beat running?)
  stale_lease             a Redis lease naming a dispatch that SQL does not hold Claimed with
                          that token (it delays the thread until its lease_until, no longer)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from mailbox import clock, redis_policy
from mailbox.clock import ClockOffset
from mailbox.model import DispatchStatus, RunStatus
from mailbox.store import Inspection

if TYPE_CHECKING:
    from mailbox.facade import Mailbox

Severity = Literal["violation", "warning"]

DEFAULT_SAMPLE = 10
DEFAULT_PAGE = 500


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(ms: int | None) -> str | None:
    """Milliseconds since the epoch as an ISO 8601 UTC timestamp (None stays None)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds"
                                                                ).replace("+00:00", "Z")


@dataclass(frozen=True)
class Finding:
    """One failed check: how many rows (or keys) break it and a few of their ids."""

    check: str
    severity: Severity
    message: str
    count: int
    sample: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "severity": self.severity, "message": self.message,
                "count": self.count, "sample": list(self.sample)}


@dataclass
class AuditReport:
    """What `audit` found. `ok` means no invariant is broken (warnings may remain)."""

    checked_at: int
    namespace: str
    counts: dict[str, int]
    violations: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, finding: Finding) -> None:
        (self.violations if finding.severity == "violation" else self.warnings).append(finding)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked_at": self.checked_at,
            "checked_at_iso": iso_ms(self.checked_at),
            "namespace": self.namespace,
            "counts": dict(self.counts),
            "violations": [f.to_json() for f in self.violations],
            "warnings": [f.to_json() for f in self.warnings],
            "checks": list(self.checks),
        }


@dataclass(frozen=True)
class MailboxStats:
    """The operator's summary (`python -m mailbox stats`)."""

    at: int
    counts: dict[str, int]
    oldest_queued_at: int | None
    threads_with_queued: int
    due_now: int
    runs_by_status: dict[str, int]
    clock: ClockOffset | None = None
    """This host's clock against Redis's (None: Redis did not answer)."""
    clock_limit_ms: float | None = None

    @property
    def clock_beyond_limit(self) -> bool:
        return (self.clock is not None and self.clock_limit_ms is not None
                and self.clock.beyond(self.clock_limit_ms))

    @property
    def oldest_queued_age_ms(self) -> int | None:
        return None if self.oldest_queued_at is None else max(0, self.at - self.oldest_queued_at)

    @property
    def runs_waiting(self) -> int:
        return self.runs_by_status.get(RunStatus.waiting.value, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "at_iso": iso_ms(self.at),
            "counts": dict(self.counts),
            "oldest_queued_at": self.oldest_queued_at,
            "oldest_queued_at_iso": iso_ms(self.oldest_queued_at),
            "oldest_queued_age_ms": self.oldest_queued_age_ms,
            "threads_with_queued": self.threads_with_queued,
            "due_now": self.due_now,
            "runs_by_status": dict(self.runs_by_status),
            "runs_waiting": self.runs_waiting,
            "clock_offset_ms": None if self.clock is None else round(self.clock.offset_ms, 3),
            "clock_round_trip_ms": (None if self.clock is None
                                    else round(self.clock.round_trip_ms, 3)),
            "clock_limit_ms": self.clock_limit_ms,
            "clock_beyond_limit": self.clock_beyond_limit,
        }


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------- stats
def collect_stats(mailbox: Mailbox, now: int | None = None) -> MailboxStats:
    """Counts by status, the oldest queued dispatch, threads with queued work, runs by status
    — each one aggregate query."""
    at = now_ms() if now is None else now
    with Inspection.open(mailbox.store) as inspect:
        counts = inspect.status_counts()
        oldest, threads, due = inspect.queue_summary(at)
        by_run = inspect.run_status_counts()
    return MailboxStats(at, counts, oldest, threads, due, by_run,
                        clock.read(mailbox.store.coordinator.client),
                        clock.limit_ms(mailbox.settings.lease_ms))


# ----------------------------------------------------------------------------------- audit
# check name -> (severity, what a finding means); the queries are `statements.CHECKS`.
SQL_CHECKS: dict[str, tuple[Severity, str]] = {
    "claimed_without_lease": ("violation", "Claimed dispatches missing claim_token, "
                                           "claimed_by or lease_until"),
    "claim_fields_on_idle": ("violation", "dispatches that are not Claimed but still carry "
                                          "claim fields"),
    "stale_queued": ("violation", "Queued dispatches older than their thread's epoch: the "
                                  "interrupt that raised the epoch should have superseded them"),
    "epoch_regressed": ("violation", "dispatches stamped with an epoch above their thread's "
                                     "current epoch: the thread's epoch went backwards"),
    "missing_epoch": ("violation", "dispatches whose thread has no epoch row (garbage "
                                   "collection drops only the epoch row of a thread with no "
                                   "dispatch and no run)"),
    "unreconciled_run": ("warning", "Cancelled/Superseded/DeadLetter dispatches whose run is "
                                    "not done yet (the sweep reconciles them)"),
    "orphan_run": ("violation", "created/running runs without any dispatch: nothing will ever "
                                "run them"),
}


def audit(mailbox: Mailbox, *, now: int | None = None, stuck_after_s: float | None = None,
          sample: int = DEFAULT_SAMPLE, page_size: int = DEFAULT_PAGE) -> AuditReport:
    """Check the invariants (docs/architecture.md#invariants) on the live database and Redis
    (read-only).

    `stuck_after_s` defaults to two sweep intervals: a lease expired longer than that means
    no sweep ran since. `sample` bounds the ids listed per finding; `page_size` the Redis
    SCAN page and the SQL `IN` lists that check it.
    """
    at = now_ms() if now is None else now
    stuck_s = (2 * mailbox.settings.sweep_interval_s if stuck_after_s is None
               else stuck_after_s)
    with Inspection.open(mailbox.store) as inspect:
        report = AuditReport(at, mailbox.settings.namespace, inspect.status_counts())
        _check_statuses(report)
        _check_two_claimed(inspect, report, sample)
        for name, (severity, message) in SQL_CHECKS.items():
            report.checks.append(name)
            n, ids = inspect.check(name, sample)
            if n:
                if name == "missing_epoch":
                    ids = tuple(dict.fromkeys(ids))  # thread ids, one per dispatch
                report.add(Finding(name, severity, message, n, ids))
        _check_stuck(inspect, report, at, stuck_s, sample)
    _check_leases(mailbox, report, sample, page_size)
    _check_redis_epochs(mailbox, report, sample, page_size)
    _check_deployment(mailbox, report)
    return report


def _check_deployment(mailbox: Mailbox, report: AuditReport) -> None:
    """What the invariants need of the servers: a Redis that does not evict the mailbox's
    keys and a Redis broker that does not evict queued messages (`mailbox.redis_policy`),
    and clocks that agree (`mailbox.clock`; this host's only: each worker warns about its
    own when it runs the sweep)."""
    client = mailbox.store.coordinator.client
    report.checks.append("redis_evicts")
    evicting = redis_policy.unsafe(redis_policy.eviction_policies(client))
    if evicting:
        report.add(Finding("redis_evicts", "warning",
                           "the coordination Redis may evict keys when full (maxmemory-policy "
                           "is not noeviction): event streams and cancel signals it drops are "
                           "lost", len(evicting),
                           tuple(f"{server}: {p}" for server, p in sorted(evicting.items()))))
    broker = redis_policy.separate_broker_url(mailbox.settings.broker_url,
                                              mailbox.settings.redis_url)
    if broker is not None:
        report.checks.append("broker_evicts")
        broker_evicting = redis_policy.broker_evicting(redis_policy.broker_policies(broker))
        if broker_evicting:
            report.add(Finding("broker_evicts", "warning",
                               "the Redis broker may evict queued messages when full "
                               "(maxmemory-policy allkeys-*): a dropped phase message costs "
                               "its dispatch an attempt", 1,
                               tuple(f"broker: {p}" for p in broker_evicting.values())))
    report.checks.append("clock_offset")
    limit = clock.limit_ms(mailbox.settings.lease_ms)
    reading = clock.read(client)
    if reading is not None and reading.beyond(limit):
        report.add(Finding("clock_offset", "warning",
                           f"this host's clock is more than {limit / 1000:g} s off Redis's "
                           "(MAILBOX_LEASE_MS / 6): a sweep here may reclaim live claims",
                           1, (reading.describe(),)))


def _check_statuses(report: AuditReport) -> None:
    report.checks.append("unknown_status")
    known = {s.value for s in DispatchStatus}
    unknown = {s: n for s, n in report.counts.items() if s not in known and n}
    if unknown:
        report.add(Finding("unknown_status", "violation",
                           f"dispatch rows with a status outside DispatchStatus: {unknown}",
                           sum(unknown.values()), tuple(sorted(unknown))))


def _check_two_claimed(inspect: Inspection, report: AuditReport, sample: int) -> None:
    report.checks.append("two_claimed_per_thread")
    doubled = {t: n for t, n in inspect.claimed_by_thread().items() if n > 1}
    if doubled:
        threads = sorted(doubled)
        report.add(Finding(
            "two_claimed_per_thread", "violation",
            "threads with more than one Claimed dispatch (thread exclusivity)",
            len(threads), tuple(f"{t} ({doubled[t]})" for t in threads[:sample])))


def _check_stuck(inspect: Inspection, report: AuditReport, at: int, stuck_s: float,
                 sample: int) -> None:
    report.checks.append("stuck_claim")
    n, ids = inspect.check("stuck_claim", sample, cutoff=at - int(stuck_s * 1000))
    if n:
        oldest = inspect.oldest_claimed_lease_until()
        since = "" if oldest is None else f"; oldest lease ended {iso_ms(oldest)}"
        report.add(Finding("stuck_claim", "warning",
                           f"Claimed dispatches whose lease expired more than {stuck_s:g}s "
                           f"ago: is the sweep (celery beat) running?{since}", n, ids))


def _check_leases(mailbox: Mailbox, report: AuditReport, sample: int, page_size: int) -> None:
    """Walk the namespace's lease keys with SCAN; compare each bound lease with SQL."""
    report.checks.append("stale_lease")
    client = mailbox.store.coordinator.client
    scheme = mailbox.store.coordinator.keys
    stale: list[str] = []
    for keys in _scan_pages(client, scheme.pattern("lease"), page_size):
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        leases: dict[str, tuple[str, str]] = {}  # lease key -> (dispatch_id, token)
        for key, raw in zip(keys, pipe.execute(), strict=True):
            fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
            if fields.get("dispatch_id"):  # pending leases (claim in flight) have none
                leases[_text(key)] = (fields["dispatch_id"], fields.get("token", ""))
        if not leases:
            continue
        with Inspection.open(mailbox.store) as inspect:
            rows = {d: (s, t or "") for d, (s, t) in inspect.claims_of(
                sorted({d for d, _ in leases.values()})).items()}
        suspects = [k for k, (d, token) in leases.items()
                    if rows.get(d) != (DispatchStatus.Claimed.value, token)]
        if not suspects:
            continue
        # Re-read: a release that follows its SQL commit may have landed meanwhile.
        pipe = client.pipeline(transaction=False)
        for key in suspects:
            pipe.hget(key, "token")
        for key, token in zip(suspects, pipe.execute(), strict=True):
            dispatch_id, expected = leases[key]
            if _text(token) == expected:
                state = rows[dispatch_id][0] if dispatch_id in rows else "missing"
                stale.append(f"{scheme.thread_of(key, 'lease')} -> {dispatch_id} ({state})")
    if stale:
        report.add(Finding("stale_lease", "warning",
                           "Redis leases naming dispatches that SQL does not hold Claimed "
                           "with that token (they delay the thread until lease_until)",
                           len(stale), tuple(sorted(stale)[:sample])))


def _check_redis_epochs(mailbox: Mailbox, report: AuditReport, sample: int,
                        page_size: int) -> None:
    """A cached epoch above SQL would fence current work as stale: SQL went backwards."""
    report.checks.append("redis_epoch_ahead")
    coordinator = mailbox.store.coordinator
    ahead: list[str] = []
    for keys in _scan_pages(coordinator.client, coordinator.keys.pattern("epoch"), page_size):
        threads = [t for t in (coordinator.keys.thread_of(_text(k), "epoch") for k in keys)
                   if t is not None]
        cached = coordinator.cached_epochs(threads)
        if not cached:
            continue
        with Inspection.open(mailbox.store) as inspect:
            sql = inspect.epochs_of(list(cached))
        for thread, redis_epoch in cached.items():
            if redis_epoch > sql.get(thread, 0):
                ahead.append(f"{thread} (redis {redis_epoch} > sql {sql.get(thread, 0)})")
    if ahead:
        report.add(Finding("redis_epoch_ahead", "violation",
                           "Redis epoch cache above the SQL epoch: SQL epochs went backwards "
                           "(current work would be fenced as stale)", len(ahead),
                           tuple(sorted(ahead)[:sample])))


def _scan_pages(client: Any, pattern: str, page_size: int) -> Iterator[list[Any]]:
    """SCAN in pages (never KEYS): each yielded page holds at most `page_size` keys. SCAN
    may return a key twice; each key is yielded once. On a Redis Cluster `scan_iter` walks
    every master in turn."""
    seen: set[bytes | str] = set()
    page: list[Any] = []
    for key in client.scan_iter(match=pattern, count=page_size):
        if key in seen:
            continue
        seen.add(key)
        page.append(key)
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


__all__ = ["AuditReport", "Finding", "MailboxStats", "audit", "collect_stats", "iso_ms"]
