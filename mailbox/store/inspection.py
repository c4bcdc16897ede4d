"""Read-only queries for audits, statistics and workload checks (docs/architecture.md#store).

The invariant audit (`mailbox/audit.py`), `python -m mailbox stats` and the workload audit of
the fault and load runs (`mailbox/dev/workload_audit.py`) read the database through these
named queries, on one read-only connection per check run (a deferred BEGIN on SQLite: they
never take the write lock, so they cannot slow the workers down). They are global scans, off
the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from mailbox.model import TERMINAL_STATUSES, DispatchStatus, RunRecord, RunStatus
from mailbox.store import statements as q
from mailbox.store.dispatches import MailboxStore

IN_CHUNK = 500  # ids per `IN (...)` list
THROUGHPUT_WINDOWS_S = (60, 300, 3600)  # the dashboard's "last minute, 5 minutes, hour"


def _chunks(items: Sequence[str], size: int = IN_CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


@dataclass(frozen=True)
class ThreadSummary:
    """One row of the dashboard's thread list."""

    thread_id: str
    last_activity: int
    queued: int
    claimed: int
    dispatches: int

    def to_json(self) -> dict[str, Any]:
        return {"thread_id": self.thread_id, "last_activity": self.last_activity,
                "queued": self.queued, "claimed": self.claimed,
                "dispatches": self.dispatches}


class Inspection:
    """Named read-only queries over one connection (see `Inspection.open`)."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    @classmethod
    @contextmanager
    def open(cls, store: MailboxStore) -> Iterator[Inspection]:
        with store.read() as conn:
            yield cls(conn)

    # ------------------------------------------------------------------------------ counts
    def status_counts(self) -> dict[str, int]:
        """Counts per status value, every DispatchStatus present (0 when none), plus any
        unknown value as stored (the store's own `counts_by_status` would raise on one)."""
        counts = {s.value: 0 for s in DispatchStatus}
        for status, n in self.conn.execute(q.COUNTS_BY_STATUS):
            counts[str(status)] = int(n)
        return counts

    def run_status_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in RunStatus}
        for status, n in self.conn.execute(q.ALL_RUNS_BY_STATUS):
            counts[str(status)] = int(n)
        return counts

    def queue_summary(self, now: int) -> tuple[int | None, int, int]:
        """(created_at of the oldest Queued dispatch, threads with Queued work, dispatches
        due at `now`)."""
        oldest = self.conn.execute(q.SELECT_OLDEST_QUEUED_CREATED).scalar_one_or_none()
        threads = self.conn.execute(q.COUNT_QUEUED_THREADS).scalar_one()
        due = self.conn.execute(q.COUNT_DUE, {"now": now}).scalar_one()
        return None if oldest is None else int(oldest), int(threads), int(due)

    def claimed_by_thread(self) -> dict[str, int]:
        """Claimed dispatches per thread (more than one is a breach of thread exclusivity)."""
        return {str(t): int(n) for t, n in self.conn.execute(q.CLAIMED_BY_THREAD)}

    # ---------------------------------------------------------------------- invariant checks
    def check(self, name: str, sample: int, **params: Any) -> tuple[int, tuple[str, ...]]:
        """How many rows break the named check (`statements.CHECKS`), and the first `sample`
        of their ids."""
        count = self.conn.execute(q.count_check(name), params).scalar_one()
        if not count:
            return 0, ()
        ids = self.conn.execute(q.sample_check(name, sample), params).scalars().all()
        return int(count), tuple(str(i) for i in ids)

    def oldest_claimed_lease_until(self) -> int | None:
        value = self.conn.execute(q.SELECT_OLDEST_CLAIMED_LEASE).scalar_one_or_none()
        return None if value is None else int(value)

    # ----------------------------------------------------------------------- lookups by id
    def claims_of(self, dispatch_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """dispatch_id -> (status, claim_token) for those that exist."""
        found: dict[str, tuple[str, str | None]] = {}
        for chunk in _chunks(dispatch_ids):
            for d, s, t in self.conn.execute(q.SELECT_CLAIMS_OF, {"dispatch_ids": chunk}):
                found[str(d)] = (str(s), None if t is None else str(t))
        return found

    def statuses_of(self, dispatch_ids: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for chunk in _chunks(dispatch_ids):
            found.update({str(d): str(s) for d, s in self.conn.execute(
                q.SELECT_STATUSES_OF, {"dispatch_ids": chunk})})
        return found

    def epochs_of(self, thread_ids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(thread_ids):
            found.update({str(t): int(e) for t, e in self.conn.execute(
                q.SELECT_EPOCHS_OF, {"thread_ids": chunk})})
        return found

    def outcomes_of(self, dispatch_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The columns the workload audit checks, by dispatch id."""
        rows: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(dispatch_ids):
            for row in self.conn.execute(q.SELECT_OUTCOMES_OF,
                                         {"dispatch_ids": chunk}).mappings():
                rows[str(row["dispatch_id"])] = dict(row)
        return rows

    def run_outcomes_of(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(run_ids):
            for row in self.conn.execute(q.SELECT_RUN_OUTCOMES_OF,
                                         {"run_ids": chunk}).mappings():
                rows[str(row["run_id"])] = dict(row)
        return rows

    # ------------------------------------------------------------------------- dashboard
    def thread_summaries(self, *, limit: int, offset: int = 0, prefix: str | None = None
                         ) -> list[ThreadSummary]:
        """Threads with dispatches, the most recently active first (the dashboard's list)."""
        rows = self.conn.execute(q.thread_summaries_query(prefix),
                                 {"limit": limit, "offset": offset})
        return [ThreadSummary(str(t), int(last), int(queued), int(claimed), int(total))
                for t, last, queued, claimed, total in rows]

    def throughput(self, now: int, windows_s: tuple[int, int, int] = THROUGHPUT_WINDOWS_S
                   ) -> dict[int, dict[str, int]]:
        """Dispatches settled in each window before `now` (seconds, widest last), by
        terminal status: {60: {"Acked": 12, ...}, ...}, every terminal status present."""
        short, medium, long = windows_s
        found = {w: {s.value: 0 for s in TERMINAL_STATUSES} for w in windows_s}
        params = {"short": now - short * 1000, "medium": now - medium * 1000,
                  "long": now - long * 1000}
        for status, n_short, n_medium, n_long in self.conn.execute(q.SETTLED_SINCE, params):
            for window, n in ((short, n_short), (medium, n_medium), (long, n_long)):
                found[window][str(status)] = int(n)
        return found

    def waiting_runs(self, limit: int) -> list[RunRecord]:
        """Runs waiting for a human decision, the most recently suspended first."""
        return [q.run_from_row(row)
                for row in self.conn.execute(q.SELECT_WAITING_RUNS, {"limit": limit})]

    def ping(self) -> None:
        """One round trip (`/healthz`): raises when the database does not answer."""
        self.conn.execute(q.PING).scalar_one()
