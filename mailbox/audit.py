"""Invariant audit and operator statistics of a live mailbox (DESIGN.md §4.1, §7).

`audit(mailbox)` reads the SQL truth and the Redis hot copies and reports what breaks the
invariants of §4.1 (violations: something the store promises never happens) apart from what
is only unhealthy and self-healing (warnings: the sweep repairs it, or it shows that the sweep
is not running). It never writes.

Why its own SQL: the store's readers turn every row into a validated `RunDispatch`, so a corrupt
row would make them raise — and corrupt rows are exactly what an audit looks for. Here every
check is one aggregate (a COUNT) plus a short, ordered sample of ids, so the cost does not grow
with what the tables hold beyond the index scans; Redis is walked with SCAN in pages. Each
check is a single statement, so it sees one consistent snapshot of the rows it joins (an
interrupt's epoch bump and the supersede of its queued work commit together).

What is checked:

violations
  two_claimed_per_thread  a thread with more than one Claimed dispatch (§4.1.3)
  claimed_without_lease   a Claimed row missing claim_token, claimed_by or lease_until
  claim_fields_on_idle    a row that is not Claimed but still carries claim fields
  stale_queued            a Queued dispatch older than its thread's epoch: the interrupt that
                          raised the epoch must have superseded it (§4.1.5)
  epoch_regressed         a dispatch stamped with an epoch above its thread's: the thread's
                          epoch went backwards (§4.1.5)
  redis_epoch_ahead       a Redis epoch cache above the SQL epoch: SQL went backwards (restored
                          from a backup?), and verify would fence current work as stale
  missing_epoch           a dispatch whose thread has no epoch row (epochs are never dropped)
  orphan_run              a created/running run with no dispatch at all: nothing will ever run
                          it (§4.1.6). Waiting and done runs are exempt: garbage collection
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from mailbox.database import READ_ONLY
from mailbox.model import DispatchStatus, RunStatus
from mailbox.schema import dispatches, runs, thread_epochs

if TYPE_CHECKING:
    from mailbox.facade import Mailbox

Severity = Literal["violation", "warning"]

DEFAULT_SAMPLE = 10
DEFAULT_PAGE = 500
_TERMINAL_RECONCILED = [DispatchStatus.Cancelled.value, DispatchStatus.Superseded.value,
                        DispatchStatus.DeadLetter.value]
_LIVE_RUN_STATUSES = [RunStatus.created.value, RunStatus.running.value]
# "not done", spelled as an IN list so the few open runs drive the join (ix_runs_status).
_OPEN_RUN_STATUSES = [*_LIVE_RUN_STATUSES, RunStatus.waiting.value]


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
        }


# ------------------------------------------------------------------------------ SQL helpers
def _reader(mailbox: Mailbox) -> sa.Connection:
    """A read-only connection (on SQLite a deferred BEGIN: the audit never takes the write
    lock, so it cannot slow the workers down)."""
    return mailbox.store.engine.execution_options(**{READ_ONLY: True}).connect()


def _status_counts(conn: sa.Connection) -> dict[str, int]:
    """Counts per status value, every DispatchStatus present (0 when none), plus any unknown
    value as stored — the store's own `counts_by_status` would raise on one."""
    counts = {s.value: 0 for s in DispatchStatus}
    query = sa.select(dispatches.c.status, sa.func.count()).group_by(dispatches.c.status)
    for status, n in conn.execute(query):
        counts[str(status)] = int(n)
    return counts


def _count_and_sample(conn: sa.Connection, id_column: sa.ColumnElement[Any],
                      from_: sa.FromClause, where: sa.ColumnElement[bool], sample: int
                      ) -> tuple[int, tuple[str, ...]]:
    count = conn.execute(sa.select(sa.func.count()).select_from(from_).where(where)
                         ).scalar_one()
    if not count:
        return 0, ()
    ids = conn.execute(sa.select(id_column).select_from(from_).where(where)
                       .order_by(id_column).limit(sample)).scalars().all()
    return int(count), tuple(str(i) for i in ids)


def _blank(column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    return sa.or_(column.is_(None), column == "")


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------- stats
def collect_stats(mailbox: Mailbox, now: int | None = None) -> MailboxStats:
    """Counts by status, the oldest queued dispatch, threads with queued work, runs by status
    — each one aggregate query."""
    at = now_ms() if now is None else now
    queued = dispatches.c.status == DispatchStatus.Queued.value
    with _reader(mailbox) as conn:
        counts = _status_counts(conn)
        oldest = conn.execute(sa.select(sa.func.min(dispatches.c.created_at)).where(queued)
                              ).scalar_one_or_none()
        threads = conn.execute(sa.select(sa.func.count(sa.distinct(dispatches.c.thread_id)))
                               .where(queued)).scalar_one()
        due = conn.execute(sa.select(sa.func.count()).select_from(dispatches)
                           .where(queued, dispatches.c.available_at <= at)).scalar_one()
        by_run = {s.value: 0 for s in RunStatus}
        for status, n in conn.execute(sa.select(runs.c.status, sa.func.count())
                                      .group_by(runs.c.status)):
            by_run[str(status)] = int(n)
    return MailboxStats(at, counts, None if oldest is None else int(oldest), int(threads),
                        int(due), by_run)


# ----------------------------------------------------------------------------------- audit
def audit(mailbox: Mailbox, *, now: int | None = None, stuck_after_s: float | None = None,
          sample: int = DEFAULT_SAMPLE, page_size: int = DEFAULT_PAGE) -> AuditReport:
    """Check the invariants of DESIGN.md §4.1 on the live database and Redis (read-only).

    `stuck_after_s` defaults to two sweep intervals: a lease expired longer than that means
    no sweep ran since. `sample` bounds the ids listed per finding; `page_size` the Redis
    SCAN page and the SQL `IN` lists that check it.
    """
    at = now_ms() if now is None else now
    stuck_s = (2 * mailbox.settings.sweep_interval_s if stuck_after_s is None
               else stuck_after_s)
    with _reader(mailbox) as conn:
        report = AuditReport(at, mailbox.settings.namespace, _status_counts(conn))
        _check_statuses(report)
        _check_claims(mailbox, conn, report, sample)
        _check_epochs(conn, report, sample)
        _check_runs(conn, report, sample)
        _check_stuck(conn, report, at, stuck_s, sample)
    _check_leases(mailbox, report, sample, page_size)
    _check_redis_epochs(mailbox, report, sample, page_size)
    return report


def _check_statuses(report: AuditReport) -> None:
    report.checks.append("unknown_status")
    known = {s.value for s in DispatchStatus}
    unknown = {s: n for s, n in report.counts.items() if s not in known and n}
    if unknown:
        report.add(Finding("unknown_status", "violation",
                           f"dispatch rows with a status outside DispatchStatus: {unknown}",
                           sum(unknown.values()), tuple(sorted(unknown))))


def _check_claims(mailbox: Mailbox, conn: sa.Connection, report: AuditReport,
                  sample: int) -> None:
    report.checks.append("two_claimed_per_thread")
    doubled = mailbox.store.claimed_per_thread()
    if doubled:
        threads = sorted(doubled)
        report.add(Finding(
            "two_claimed_per_thread", "violation",
            "threads with more than one Claimed dispatch (thread exclusivity, §4.1.3)",
            len(threads), tuple(f"{t} ({doubled[t]})" for t in threads[:sample])))

    c = dispatches.c
    claimed = c.status == DispatchStatus.Claimed.value
    report.checks.append("claimed_without_lease")
    n, ids = _count_and_sample(conn, c.dispatch_id, dispatches, sa.and_(
        claimed, sa.or_(_blank(c.claim_token), _blank(c.claimed_by), c.lease_until.is_(None))),
        sample)
    if n:
        report.add(Finding("claimed_without_lease", "violation",
                           "Claimed dispatches missing claim_token, claimed_by or lease_until",
                           n, ids))
    report.checks.append("claim_fields_on_idle")
    n, ids = _count_and_sample(conn, c.dispatch_id, dispatches, sa.and_(
        sa.not_(claimed), sa.or_(c.claim_token.is_not(None), c.claimed_by.is_not(None),
                                 c.lease_until.is_not(None))), sample)
    if n:
        report.add(Finding("claim_fields_on_idle", "violation",
                           "dispatches that are not Claimed but still carry claim fields",
                           n, ids))


def _check_epochs(conn: sa.Connection, report: AuditReport, sample: int) -> None:
    c, e = dispatches.c, thread_epochs.c
    joined = dispatches.join(thread_epochs, e.thread_id == c.thread_id)
    report.checks.append("stale_queued")
    n, ids = _count_and_sample(conn, c.dispatch_id, joined, sa.and_(
        c.status == DispatchStatus.Queued.value, c.dispatch_epoch < e.current_epoch), sample)
    if n:
        report.add(Finding("stale_queued", "violation",
                           "Queued dispatches older than their thread's epoch: the interrupt "
                           "that raised the epoch should have superseded them", n, ids))
    report.checks.append("epoch_regressed")
    n, ids = _count_and_sample(conn, c.dispatch_id, joined,
                               c.dispatch_epoch > e.current_epoch, sample)
    if n:
        report.add(Finding("epoch_regressed", "violation",
                           "dispatches stamped with an epoch above their thread's current "
                           "epoch: the thread's epoch went backwards", n, ids))
    report.checks.append("missing_epoch")
    outer = dispatches.join(thread_epochs, e.thread_id == c.thread_id, isouter=True)
    n, ids = _count_and_sample(conn, c.thread_id, outer, e.thread_id.is_(None), sample)
    if n:
        report.add(Finding("missing_epoch", "violation",
                           "dispatches whose thread has no epoch row (epochs are never "
                           "dropped)", n, tuple(dict.fromkeys(ids))))


def _check_runs(conn: sa.Connection, report: AuditReport, sample: int) -> None:
    c, r = dispatches.c, runs.c
    report.checks.append("unreconciled_run")
    joined = dispatches.join(runs, sa.and_(r.run_id == c.run_id, r.dispatch_id == c.dispatch_id))
    n, ids = _count_and_sample(conn, c.dispatch_id, joined, sa.and_(
        c.status.in_(_TERMINAL_RECONCILED), r.status.in_(_OPEN_RUN_STATUSES)), sample)
    if n:
        report.add(Finding("unreconciled_run", "warning",
                           "Cancelled/Superseded/DeadLetter dispatches whose run is not done "
                           "yet (the sweep reconciles them)", n, ids))
    report.checks.append("orphan_run")
    # Correlated on thread_id too, so the lookup rides the (thread_id, status, ...) index.
    has_dispatch = sa.exists().where(c.thread_id == r.thread_id, c.run_id == r.run_id)
    n, ids = _count_and_sample(conn, r.run_id, runs, sa.and_(
        r.status.in_(_LIVE_RUN_STATUSES), sa.not_(has_dispatch)), sample)
    if n:
        report.add(Finding("orphan_run", "violation",
                           "created/running runs without any dispatch: nothing will ever run "
                           "them", n, ids))


def _check_stuck(conn: sa.Connection, report: AuditReport, at: int, stuck_s: float,
                 sample: int) -> None:
    c = dispatches.c
    report.checks.append("stuck_claim")
    cutoff = at - int(stuck_s * 1000)
    n, ids = _count_and_sample(conn, c.dispatch_id, dispatches, sa.and_(
        c.status == DispatchStatus.Claimed.value, c.lease_until < cutoff), sample)
    if n:
        oldest = conn.execute(sa.select(sa.func.min(c.lease_until)).where(
            c.status == DispatchStatus.Claimed.value)).scalar_one_or_none()
        since = "" if oldest is None else f"; oldest lease ended {iso_ms(int(oldest))}"
        report.add(Finding("stuck_claim", "warning",
                           f"Claimed dispatches whose lease expired more than {stuck_s:g}s "
                           f"ago: is the sweep (celery beat) running?{since}", n, ids))


def _check_leases(mailbox: Mailbox, report: AuditReport, sample: int, page_size: int) -> None:
    """Walk the namespace's lease keys with SCAN; compare each bound lease with SQL."""
    report.checks.append("stale_lease")
    client = mailbox.store.coordinator.client
    prefix = mailbox.store.coordinator.lease_key("")
    stale: list[str] = []
    for keys in _scan_pages(client, prefix + "*", page_size):
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
        wanted = sorted({d for d, _ in leases.values()})
        with _reader(mailbox) as conn:
            rows = {str(d): (str(s), _text(t)) for d, s, t in conn.execute(
                sa.select(dispatches.c.dispatch_id, dispatches.c.status,
                          dispatches.c.claim_token)
                .where(dispatches.c.dispatch_id.in_(wanted)))}
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
                stale.append(f"{key[len(prefix):]} -> {dispatch_id} ({state})")
    if stale:
        report.add(Finding("stale_lease", "warning",
                           "Redis leases naming dispatches that SQL does not hold Claimed "
                           "with that token (they delay the thread until lease_until)",
                           len(stale), tuple(sorted(stale)[:sample])))


def _check_redis_epochs(mailbox: Mailbox, report: AuditReport, sample: int,
                        page_size: int) -> None:
    """A cached epoch above SQL would fence current work as stale: SQL went backwards."""
    report.checks.append("redis_epoch_ahead")
    client = mailbox.store.coordinator.client
    prefix = mailbox.store.coordinator.epoch_key("")
    ahead: list[str] = []
    for keys in _scan_pages(client, prefix + "*", page_size):
        cached = {_text(k)[len(prefix):]: v for k, v in zip(keys, client.mget(keys),
                                                            strict=True) if v is not None}
        if not cached:
            continue
        with _reader(mailbox) as conn:
            sql = {str(t): int(v) for t, v in conn.execute(
                sa.select(thread_epochs.c.thread_id, thread_epochs.c.current_epoch)
                .where(thread_epochs.c.thread_id.in_(list(cached))))}
        for thread, value in cached.items():
            try:
                redis_epoch = int(value)
            except ValueError:
                continue
            if redis_epoch > sql.get(thread, 0):
                ahead.append(f"{thread} (redis {redis_epoch} > sql {sql.get(thread, 0)})")
    if ahead:
        report.add(Finding("redis_epoch_ahead", "violation",
                           "Redis epoch cache above the SQL epoch: SQL epochs went backwards "
                           "(current work would be fenced as stale)", len(ahead),
                           tuple(sorted(ahead)[:sample])))


def _scan_pages(client: Any, pattern: str, page_size: int) -> Iterator[list[Any]]:
    """SCAN in pages (never KEYS): each yielded page holds at most about `page_size` keys.
    SCAN may return a key twice; each key is yielded once."""
    cursor: int = 0
    seen: set[bytes | str] = set()
    while True:
        cursor, keys = client.scan(cursor=cursor, match=pattern, count=page_size)
        fresh = [k for k in keys if k not in seen]
        seen.update(fresh)
        if fresh:
            yield fresh
        if int(cursor) == 0:
            return


__all__ = ["AuditReport", "Finding", "MailboxStats", "audit", "collect_stats", "iso_ms"]
