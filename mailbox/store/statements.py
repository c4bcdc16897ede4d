"""Every SQL statement of the mailbox, and the row converters (docs/architecture.md#store).

The SQL text of the project lives here and nowhere else, like a query file: the stores
(`dispatches.py`, `runs.py`) and the read-only inspection queries (`inspection.py`) execute
these statements, and no other module imports a table. A test holds that line.

Hot-path statements are built once, with bound parameters: building and cache-keying a
statement per call cost more than executing it (about 3x on SQLite, measured), and
SQLAlchemy's compiled cache then serves every call. Statements whose shape depends on the
call (optional filters) are built by the functions below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from mailbox.errors import MailboxError, ValidationError
from mailbox.model import (
    LIVE_STATUSES,
    RECONCILED_STATUSES,
    TERMINAL_STATUSES,
    DispatchStatus,
    RunDispatch,
    RunRecord,
    RunStatus,
    Termination,
)
from mailbox.schema import dispatches, messages, resolutions, runs, thread_epochs
from mailbox.store.direct import AnyRow

_D = dispatches.c
_E = thread_epochs.c
_R = runs.c
_M = messages.c

TERMINAL_VALUES = [s.value for s in TERMINAL_STATUSES]
LIVE_VALUES = [s.value for s in LIVE_STATUSES]
RECONCILED_VALUES = [s.value for s in RECONCILED_STATUSES]
OPEN_RUN_VALUES = [RunStatus.created.value, RunStatus.running.value, RunStatus.waiting.value]
LIVE_RUN_VALUES = [RunStatus.created.value, RunStatus.running.value]


def _status_literal(value: str) -> sa.ColumnElement[Any]:
    """A status value rendered into the SQL text: with a bound parameter, a prepared
    statement's generic plan cannot use the status indexes and scans the thread's whole
    history (and SQLite uses a partial index only when the query repeats its own status
    terms). Rendered once, when the statement is compiled: a `literal_execute` parameter was
    rendered into the text again at every execution, a quarter of a hot statement's time."""
    if not value.isalnum():  # a status name: never anything that needs quoting
        raise ValueError(f"not a status name: {value!r}")
    return sa.literal_column(f"'{value}'", sa.String())


_CLAIMED = _status_literal(DispatchStatus.Claimed.value)
_QUEUED = _status_literal(DispatchStatus.Queued.value)


def insert_ignoring_conflict(table: sa.Table, postgres: bool) -> sa.Executable:
    """`INSERT … ON CONFLICT DO NOTHING` for this database, values bound at execution."""
    if postgres:
        return pg_insert(table).on_conflict_do_nothing()
    return sqlite_insert(table).on_conflict_do_nothing()


# ============================================================================ dispatch rows
DISPATCH_COLUMNS = [c.name for c in dispatches.columns]


def dispatch_row(d: RunDispatch) -> dict[str, Any]:
    row = {name: getattr(d, name) for name in DISPATCH_COLUMNS}
    row["status"] = d.status.value
    row["run_status"] = d.run_status.value if d.run_status is not None else None
    row["termination"] = d.termination.to_json() if d.termination is not None else None
    return row


def dispatch_from_row(row: AnyRow) -> RunDispatch:
    values = dict(row._mapping)
    if values.get("termination") is not None:
        values["termination"] = Termination.from_json(values["termination"])
    if values.get("run_status") is not None:
        values["run_status"] = RunStatus(values["run_status"])
    values["status"] = DispatchStatus(values["status"])
    try:
        return RunDispatch(**values).validate_for_persist()
    except ValidationError as exc:
        raise MailboxError(f"stored dispatch {values.get('dispatch_id')!r} is invalid: "
                           f"{exc.message}") from exc


def dispatch_changes(before: RunDispatch, after: RunDispatch) -> dict[str, Any]:
    old, new = dispatch_row(before), dispatch_row(after)
    return {k: v for k, v in new.items() if old[k] != v}


# ============================================================================ thread epochs
SELECT_EPOCH_FOR_UPDATE = (sa.select(_E.current_epoch)
                           .where(_E.thread_id == sa.bindparam("thread_id"))
                           .with_for_update())
SELECT_EPOCH = sa.select(_E.current_epoch).where(_E.thread_id == sa.bindparam("thread_id"))
UPDATE_EPOCH = (thread_epochs.update().where(_E.thread_id == sa.bindparam("guard_thread_id"))
                .values(current_epoch=sa.bindparam("current_epoch")))


# Several threads locked in one transaction (bulk submission): in thread-id order, so two
# such transactions can never wait on each other in a cycle.
SELECT_EPOCHS_FOR_UPDATE = (sa.select(_E.thread_id, _E.current_epoch)
                            .where(_E.thread_id.in_(sa.bindparam("thread_ids", expanding=True)))
                            .order_by(_E.thread_id)
                            .with_for_update())


def insert_epoch_if_missing(postgres: bool) -> sa.Executable:
    """Its rowcount says whether it created the row (`MailboxStore.lock_thread`):
    SQLAlchemy keeps an INSERT's rowcount only when asked (psycopg's is gone with the cursor
    otherwise, and reads -1)."""
    return insert_ignoring_conflict(thread_epochs, postgres).execution_options(
        preserve_rowcount=True)


# =============================================================================== dispatches
SELECT_THREAD_OF = sa.select(_D.thread_id).where(_D.dispatch_id == sa.bindparam("dispatch_id"))
SELECT_DISPATCH = sa.select(dispatches).where(_D.dispatch_id == sa.bindparam("dispatch_id"))
SELECT_DISPATCH_ID = sa.select(_D.dispatch_id).where(
    _D.dispatch_id == sa.bindparam("dispatch_id"))
SELECT_LIVE_DEDUPE_KEYS = sa.select(_D.thread_id, _D.dedupe_key).where(
    _D.thread_id.in_(sa.bindparam("thread_ids", expanding=True)),
    _D.dedupe_key.in_(sa.bindparam("dedupe_keys", expanding=True)),
    _D.status.in_(LIVE_VALUES))
SELECT_LIVE_DEDUPE = sa.select(_D.dispatch_id).where(
    _D.thread_id == sa.bindparam("thread_id"), _D.dedupe_key == sa.bindparam("dedupe_key"),
    _D.status.in_(LIVE_VALUES))
INSERT_DISPATCH = dispatches.insert()
# SET comes from the parameters named after columns; the guard names are not columns.
UPDATE_DISPATCHES = dispatches.update().where(
    _D.dispatch_id.in_(sa.bindparam("guard_ids", expanding=True)),
    _D.status == sa.bindparam("guard_status"))
# One dispatch (every transition of a claimed one): no IN list to render per execution.
UPDATE_DISPATCH = dispatches.update().where(
    _D.dispatch_id == sa.bindparam("guard_id"), _D.status == sa.bindparam("guard_status"))
SELECT_BLOCKERS = sa.select(dispatches).where(
    _D.thread_id == sa.bindparam("thread_id"), _D.status.in_([_CLAIMED, _QUEUED]),
    sa.or_(_D.status == _CLAIMED, _D.dispatch_epoch < sa.bindparam("epoch")))
_CLAIM_ORDER = (_D.priority, _D.created_at, _D.dispatch_id)
SELECT_HEAD = (sa.select(dispatches)
               .where(_D.thread_id == sa.bindparam("thread_id"), _D.status == _QUEUED,
                      _D.available_at <= sa.bindparam("now"))
               .order_by(*_CLAIM_ORDER)
               .limit(1))
SELECT_ANY_DUE = (sa.select(_D.dispatch_id)
                  .where(_D.thread_id == sa.bindparam("thread_id"), _D.status == _QUEUED,
                         _D.available_at <= sa.bindparam("now"))
                  .limit(1))
# When the thread next needs a wake-up (docs/behaviour.md#future-wakes): the earliest
# `available_at` of its Queued dispatches, and whether one of its dispatches is Claimed (then
# the claim's holder wakes it when it lets the thread go).
NEXT_QUEUED_AT, CLAIMED_NOW = "next_queued_at", "claimed_now"
SELECT_THREAD_WAKE_STATE = sa.select(
    sa.func.min(sa.case((_D.status == _QUEUED, _D.available_at))).label(NEXT_QUEUED_AT),
    sa.func.count(sa.case((_D.status == _CLAIMED, sa.literal_column("1")))).label(CLAIMED_NOW),
).where(_D.thread_id == sa.bindparam("thread_id"), _D.status.in_([_CLAIMED, _QUEUED]))
SELECT_QUEUED_BY_ID = sa.select(dispatches).where(
    _D.dispatch_id == sa.bindparam("dispatch_id"), _D.status == _QUEUED)
SELECT_LIVE_OF_THREAD = (sa.select(dispatches)
                         .where(_D.thread_id == sa.bindparam("thread_id"),
                                _D.status.in_(LIVE_VALUES))
                         .order_by(*_CLAIM_ORDER))
SELECT_EXPIRED_CLAIMS = (sa.select(_D.dispatch_id)
                         .where(_D.status == DispatchStatus.Claimed.value,
                                _D.lease_until < sa.bindparam("now"))
                         .order_by(_D.lease_until).limit(sa.bindparam("limit")))
COUNT_WITH_STATUS = sa.select(sa.func.count()).select_from(dispatches).where(
    _D.status == sa.bindparam("status"))
COUNTS_BY_STATUS = sa.select(_D.status, sa.func.count()).group_by(_D.status)
QUEUED_THREAD_IDS = (sa.select(_D.thread_id).distinct()
                     .where(_D.status == DispatchStatus.Queued.value)
                     .order_by(_D.thread_id))
CLAIMED_BY_THREAD = (sa.select(_D.thread_id, sa.func.count())
                     .where(_D.status == DispatchStatus.Claimed.value)
                     .group_by(_D.thread_id))
SELECT_OLDEST_DUE_QUEUED_AT = sa.select(sa.func.min(_D.available_at)).where(
    _D.status == DispatchStatus.Queued.value, _D.available_at <= sa.bindparam("now"))
DELETE_TERMINAL_BEFORE = sa.delete(dispatches).where(
    _D.status.in_(TERMINAL_VALUES), _D.updated_at < sa.bindparam("older_than"))
DELETE_DEAD_LETTERS = sa.delete(dispatches).where(
    _D.dispatch_id.in_(sa.bindparam("dispatch_ids", expanding=True)),
    _D.status == DispatchStatus.DeadLetter.value)


def list_dispatches_query(thread_id: str, statuses: Sequence[str] | None, limit: int,
                          offset: int) -> sa.Select[Any]:
    """A thread's dispatches in claim order (priority, created_at, dispatch_id)."""
    query = sa.select(dispatches).where(_D.thread_id == thread_id)
    if statuses is not None:
        query = query.where(_D.status.in_(list(statuses)))
    return query.order_by(*_CLAIM_ORDER).limit(limit).offset(offset)


def list_terminal_query(limit: int, offset: int) -> sa.Select[Any]:
    """Terminal dispatches of every thread, oldest change first."""
    return (sa.select(dispatches).where(_D.status.in_(TERMINAL_VALUES))
            .order_by(_D.updated_at, _D.created_at, _D.dispatch_id)
            .limit(limit).offset(offset))


def due_thread_ids_query(now: int, limit: int, after: str | None) -> sa.Select[Any]:
    """Threads with a Queued dispatch due at `now` and no Claimed dispatch, by thread id."""
    claimed = sa.select(_D.thread_id).where(_D.status == DispatchStatus.Claimed.value)
    query = (sa.select(_D.thread_id).distinct()
             .where(_D.status == DispatchStatus.Queued.value, _D.available_at <= now,
                    _D.thread_id.not_in(claimed))
             .order_by(_D.thread_id).limit(limit))
    if after is not None:
        query = query.where(_D.thread_id > after)
    return query


def dead_letters_query(*, thread_id: str | None, agent: str | None,
                       error_contains: str | None, since: int | None, until: int | None,
                       limit: int, offset: int) -> sa.Select[Any]:
    """Dead letters, newest first; `agent` filters on the run's agent."""
    query = (sa.select(dispatches)
             .join(runs, _R.run_id == _D.run_id, isouter=True)
             .where(_D.status == DispatchStatus.DeadLetter.value))
    if thread_id is not None:
        query = query.where(_D.thread_id == thread_id)
    if agent is not None:
        query = query.where(_R.agent_id == agent)
    if error_contains:
        query = query.where(_D.last_error.contains(error_contains, autoescape=True))
    if since is not None:
        query = query.where(_D.completed_at >= since)
    if until is not None:
        query = query.where(_D.completed_at < until)
    return (query.order_by(_D.completed_at.desc(), _D.dispatch_id)
            .limit(limit).offset(offset))


# ===================================================================================== runs
HAS_INPUT = "has_input"
LAST_SEQ = "last_seq"
WAITING_TURN = "waiting_turn"


def run_row(run: RunRecord) -> dict[str, Any]:
    row = run.to_json()
    row["status"] = run.status.value
    return row


def run_from_row(row: AnyRow) -> RunRecord:
    values = dict(row._mapping)
    values.pop(HAS_INPUT, None)
    if values.get("termination") is not None:
        values["termination"] = Termination.from_json(values["termination"])
    return RunRecord(**values)


SELECT_RUN = sa.select(runs).where(_R.run_id == sa.bindparam("run_id"))
# A read-modify-write of a run locks its row first: two writers that both read the same
# status (say the caller of interrupt() and the worker, each reconciling the superseded run)
# must not both decide from it. On PostgreSQL the second waits and then reads the first's
# result; SQLite renders no FOR UPDATE, its write transactions are serialised already.
SELECT_RUN_FOR_UPDATE = SELECT_RUN.with_for_update()
INSERT_RUN = runs.insert()
# SET from the parameters named after columns; the guards are not column names.
UPDATE_RUN = runs.update().where(_R.run_id == sa.bindparam("guard_run_id"))
UPDATE_RUN_GUARDED = runs.update().where(_R.run_id == sa.bindparam("guard_run_id"),
                                         _R.status == sa.bindparam("guard_status"))
SELECT_LATEST_WAITING = (sa.select(runs)
                         .where(_R.thread_id == sa.bindparam("thread_id"),
                                _R.status == RunStatus.waiting.value)
                         .order_by(_R.updated_at.desc()).limit(1))
# What a submit reads once it holds the thread lock, in one statement: the thread's last
# message seq (the new input's is the next), and its latest run waiting for a decision (the
# input resumes it), with that run's turn (the seq of its first message). One row always;
# the run's columns are NULL when none waits.
_WAITING = SELECT_LATEST_WAITING.subquery("waiting")
SELECT_SUBMIT_STATE = (
    sa.select(
        sa.select(sa.func.coalesce(sa.func.max(_M.seq), 0))
        .where(_M.thread_id == sa.bindparam("thread_id")).scalar_subquery().label(LAST_SEQ),
        sa.select(sa.func.min(_M.seq)).where(_M.run_id == _WAITING.c.run_id)
        .scalar_subquery().label(WAITING_TURN),
        *_WAITING.c)
    .select_from(sa.select(sa.literal(1).label("one")).subquery("one")
                 .outerjoin(_WAITING, sa.true())))


def submit_state_from_row(row: AnyRow) -> tuple[int, RunRecord | None, int | None]:
    """(last seq of the thread, its latest waiting run or None, that run's turn)."""
    values = dict(row._mapping)
    last_seq, turn = int(values.pop(LAST_SEQ)), values.pop(WAITING_TURN)
    values.pop("one", None)
    if values.get("run_id") is None:
        return last_seq, None, None
    if values.get("termination") is not None:
        values["termination"] = Termination.from_json(values["termination"])
    return last_seq, RunRecord(**values), None if turn is None else int(turn)


SELECT_WAITING_OF_THREADS = (sa.select(runs)
                             .where(_R.thread_id.in_(sa.bindparam("thread_ids",
                                                                  expanding=True)),
                                    _R.status == RunStatus.waiting.value)
                             .order_by(_R.thread_id, _R.updated_at.desc()))
SELECT_RUN_WITH_INPUT = sa.select(
    runs, sa.exists().where(_M.run_id == _R.run_id, _M.role == "user").label(HAS_INPUT)
).where(_R.run_id == sa.bindparam("run_id"))
RUNS_BY_STATUS = (sa.select(_R.status, sa.func.count())
                  .where(_R.status.in_(sa.bindparam("statuses", expanding=True)))
                  .group_by(_R.status))
ALL_RUNS_BY_STATUS = sa.select(_R.status, sa.func.count()).group_by(_R.status)

# ================================================================================= messages
SELECT_LAST_SEQS = (sa.select(_M.thread_id, sa.func.max(_M.seq))
                    .where(_M.thread_id.in_(sa.bindparam("thread_ids", expanding=True)))
                    .group_by(_M.thread_id))
# Labelled: a named column runs on the driver's cursor (direct.py), an unnamed one does not.
SELECT_LAST_SEQ = sa.select(sa.func.coalesce(sa.func.max(_M.seq), 0).label(LAST_SEQ)).where(
    _M.thread_id == sa.bindparam("thread_id"))
INSERT_MESSAGE = messages.insert()
SELECT_RUN_MESSAGES = (sa.select(messages).where(_M.run_id == sa.bindparam("run_id"))
                       .order_by(_M.seq))
SELECT_THREAD_TAIL = (sa.select(messages).where(_M.thread_id == sa.bindparam("thread_id"))
                      .order_by(_M.seq.desc()).limit(sa.bindparam("limit")))
SELECT_RUN_TURN = sa.select(sa.func.min(_M.seq).label("turn")).where(
    _M.run_id == sa.bindparam("run_id"))
# What an append to a run's turn reads under the thread lock, in one statement: the thread's
# last seq (the entries take the next ones) and the run's turn (None: the run has no message).
SELECT_LAST_SEQ_AND_TURN = sa.select(
    SELECT_LAST_SEQ.scalar_subquery().label(LAST_SEQ),
    SELECT_RUN_TURN.scalar_subquery().label(WAITING_TURN))
SELECT_TURN_AT = sa.select(_M.turn).where(_M.thread_id == sa.bindparam("thread_id"),
                                          _M.seq == sa.bindparam("seq"))


def conversation_tail_query(*, before: tuple[int, int] | None, up_to_turn: int | None
                            ) -> sa.Select[Any]:
    """The newest `:limit` messages of `:thread_id` in conversation order (turn, seq),
    newest first: strictly before the (turn, seq) position `before`, and only of turns up to
    `up_to_turn` (an agent's window ends at its own run). Rides ix_messages_turn."""
    query = sa.select(messages).where(_M.thread_id == sa.bindparam("thread_id"))
    if before is not None:
        turn, seq = before
        query = query.where(sa.or_(_M.turn < turn, sa.and_(_M.turn == turn, _M.seq < seq)))
    if up_to_turn is not None:
        query = query.where(_M.turn <= up_to_turn)
    return query.order_by(_M.turn.desc(), _M.seq.desc()).limit(sa.bindparam("limit"))

# ============================================================================== resolutions
SELECT_RESOLUTION = sa.select(resolutions).where(
    resolutions.c.resolution_id == sa.bindparam("resolution_id"))


def insert_resolution_if_missing(postgres: bool) -> sa.Executable:
    return insert_ignoring_conflict(resolutions, postgres)


# ============================================================== inspection (audits, stats)
# Each check is a (what, from, where) triple: `inspection.py` counts the rows and samples
# their ids. Read-only, global scans: fine off the hot path (docs/architecture.md#sharding).
def _blank(column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    return sa.or_(column.is_(None), column == "")


_IS_CLAIMED = _D.status == DispatchStatus.Claimed.value
_WITH_EPOCH = dispatches.join(thread_epochs, _E.thread_id == _D.thread_id)
_WITH_RUN = dispatches.join(runs, sa.and_(_R.run_id == _D.run_id,
                                          _R.dispatch_id == _D.dispatch_id))
Check = tuple[sa.ColumnElement[Any], sa.FromClause, sa.ColumnElement[bool]]
CHECKS: dict[str, Check] = {
    "claimed_without_lease": (_D.dispatch_id, dispatches, sa.and_(
        _IS_CLAIMED, sa.or_(_blank(_D.claim_token), _blank(_D.claimed_by),
                            _D.lease_until.is_(None)))),
    "claim_fields_on_idle": (_D.dispatch_id, dispatches, sa.and_(
        sa.not_(_IS_CLAIMED), sa.or_(_D.claim_token.is_not(None), _D.claimed_by.is_not(None),
                                     _D.lease_until.is_not(None)))),
    "stale_queued": (_D.dispatch_id, _WITH_EPOCH, sa.and_(
        _D.status == DispatchStatus.Queued.value, _D.dispatch_epoch < _E.current_epoch)),
    "epoch_regressed": (_D.dispatch_id, _WITH_EPOCH, _D.dispatch_epoch > _E.current_epoch),
    "missing_epoch": (_D.thread_id, dispatches.join(thread_epochs,
                                                    _E.thread_id == _D.thread_id,
                                                    isouter=True), _E.thread_id.is_(None)),
    "unreconciled_run": (_D.dispatch_id, _WITH_RUN, sa.and_(
        _D.status.in_(RECONCILED_VALUES), _R.status.in_(OPEN_RUN_VALUES))),
    # Correlated on thread_id too, so the lookup rides the (thread_id, status, ...) index.
    "orphan_run": (_R.run_id, runs, sa.and_(
        _R.status.in_(LIVE_RUN_VALUES),
        sa.not_(sa.exists().where(_D.thread_id == _R.thread_id, _D.run_id == _R.run_id)))),
    "stuck_claim": (_D.dispatch_id, dispatches, sa.and_(
        _IS_CLAIMED, _D.lease_until < sa.bindparam("cutoff"))),
}


def count_check(name: str) -> sa.Select[Any]:
    _, from_, where = CHECKS[name]
    return sa.select(sa.func.count()).select_from(from_).where(where)


def sample_check(name: str, sample: int) -> sa.Select[Any]:
    column, from_, where = CHECKS[name]
    return sa.select(column).select_from(from_).where(where).order_by(column).limit(sample)


SELECT_OLDEST_CLAIMED_LEASE = sa.select(sa.func.min(_D.lease_until)).where(_IS_CLAIMED)
_QUEUED_ROWS = _D.status == DispatchStatus.Queued.value
SELECT_OLDEST_QUEUED_CREATED = sa.select(sa.func.min(_D.created_at)).where(_QUEUED_ROWS)
COUNT_QUEUED_THREADS = sa.select(sa.func.count(sa.distinct(_D.thread_id))).where(_QUEUED_ROWS)
COUNT_DUE = sa.select(sa.func.count()).select_from(dispatches).where(
    _QUEUED_ROWS, _D.available_at <= sa.bindparam("now"))
SELECT_CLAIMS_OF = sa.select(_D.dispatch_id, _D.status, _D.claim_token).where(
    _D.dispatch_id.in_(sa.bindparam("dispatch_ids", expanding=True)))
SELECT_STATUSES_OF = sa.select(_D.dispatch_id, _D.status).where(
    _D.dispatch_id.in_(sa.bindparam("dispatch_ids", expanding=True)))
SELECT_EPOCHS_OF = sa.select(_E.thread_id, _E.current_epoch).where(
    _E.thread_id.in_(sa.bindparam("thread_ids", expanding=True)))
# What the workload audit compares with what it submitted.
SELECT_OUTCOMES_OF = sa.select(
    _D.dispatch_id, _D.thread_id, _D.run_id, _D.status, _D.priority, _D.dispatch_epoch,
    _D.attempt_count, _D.max_attempts, _D.last_error, _D.dispatch_instance_id, _D.run_status,
    _D.termination, _D.run_response, _D.completed_at, _D.created_at, _D.available_at,
).where(_D.dispatch_id.in_(sa.bindparam("dispatch_ids", expanding=True)))
SELECT_RUN_OUTCOMES_OF = sa.select(
    _R.run_id, _R.status, _R.dispatch_id, _R.response, _R.termination, _R.error,
    _R.finished_at,
).where(_R.run_id.in_(sa.bindparam("run_ids", expanding=True)))


# ============================================================ retention (docs/behaviour.md#gc)
# Garbage collection and the dead-letter purge (`mailbox/store/retention.py`). Every delete
# takes its rows by key from a page read first and re-states its conditions, so a batch
# deletes at most one page and never a row that stopped qualifying in between. Terminal
# statuses are rendered as literals: SQLite uses a partial index only when the query repeats
# the index's own `status IN (...)` term, which bound parameters never match.
def _literals(values: Sequence[str]) -> list[sa.ColumnElement[Any]]:
    return [_status_literal(v) for v in values]


_TERMINAL_LITERALS = _literals(TERMINAL_VALUES)
_DEAD = DispatchStatus.DeadLetter.value
_TERMINAL_ORDER = (_D.updated_at, _D.created_at, _D.dispatch_id)


def expired_terminal_page(before: int, after: tuple[int, int, str] | None, limit: int, *,
                          postgres: bool) -> sa.Executable:
    """Terminal dispatches last changed before `before` (the later of the two cut-offs), in
    the order of the terminal index, after a keyset cursor: the caller decides per row which
    retention applies, and the cursor walks past the rows it keeps."""
    params: dict[str, Any] = {"before": before, "limit": limit}
    if after is not None:
        params.update(after_updated=after[0], after_created=after[1], after_id=after[2])
    if not postgres:
        # SQLite would rather take the status index and sort every terminal row for each
        # page; SQLAlchemy renders no index hint for it, so this one is text.
        cursor = ("" if after is None else " AND (updated_at, created_at, dispatch_id) > "
                  "(:after_updated, :after_created, :after_id)")
        statuses = ", ".join(f"'{v}'" for v in TERMINAL_VALUES)
        return sa.text(
            "SELECT dispatch_id, status, updated_at, created_at FROM run_dispatches "
            "INDEXED BY ix_dispatch_terminal_updated "
            f"WHERE status IN ({statuses}) AND updated_at < :before{cursor} "
            "ORDER BY updated_at, created_at, dispatch_id LIMIT :limit").bindparams(**params)
    query = (sa.select(_D.dispatch_id, _D.status, *_TERMINAL_ORDER[:2])
             .where(_D.status.in_(_TERMINAL_LITERALS), _D.updated_at < params["before"]))
    if after is not None:
        query = query.where(sa.tuple_(*_TERMINAL_ORDER) > sa.tuple_(*after))
    return query.order_by(*_TERMINAL_ORDER).limit(limit)


DELETE_EXPIRED_DISPATCHES = sa.delete(dispatches).where(
    _D.dispatch_id.in_(sa.bindparam("dispatch_ids", expanding=True)),
    sa.or_(sa.and_(_D.status == _DEAD, _D.updated_at < sa.bindparam("dead_before")),
           sa.and_(_D.status.in_(_literals([v for v in TERMINAL_VALUES if v != _DEAD])),
                   _D.updated_at < sa.bindparam("before"))))

# Threads, paged by id: every run, message and dispatch belongs to a thread with an epoch row.
SELECT_THREAD_PAGE = (sa.select(_E.thread_id).where(_E.thread_id > sa.bindparam("after"))
                      .order_by(_E.thread_id).limit(sa.bindparam("limit")))
# Correlated on thread_id as well, so the lookup rides the (thread_id, status, ...) index.
_RUN_REFERENCED = sa.exists().where(_D.thread_id == _R.thread_id, _D.run_id == _R.run_id)
_RUN_EXPIRED = sa.and_(_R.status == RunStatus.done.value,
                       _R.updated_at < sa.bindparam("before"), sa.not_(_RUN_REFERENCED))
# Finished runs of the given threads last changed before the cut-off, by (thread_id, run_id)
# after a cursor. Whether a dispatch still references them is asked separately, for the whole
# page at once (`SELECT_REFERENCED_RUNS`): an anti-join per run would read every dispatch of
# the run's thread once per run (there is no index on run_id), or worse without statistics.
SELECT_OLD_DONE_RUNS = (
    sa.select(_R.run_id, _R.thread_id)
    .where(_R.thread_id.in_(sa.bindparam("thread_ids", expanding=True)),
           _R.status == RunStatus.done.value, _R.updated_at < sa.bindparam("before"),
           sa.tuple_(_R.thread_id, _R.run_id) > sa.tuple_(sa.bindparam("after_thread"),
                                                         sa.bindparam("after_run")))
    .order_by(_R.thread_id, _R.run_id).limit(sa.bindparam("limit")))
SELECT_REFERENCED_RUNS = sa.select(_D.run_id).distinct().where(
    _D.thread_id.in_(sa.bindparam("thread_ids", expanding=True)),
    _D.run_id.in_(sa.bindparam("run_ids", expanding=True)))
DELETE_EXPIRED_RUNS = (sa.delete(runs)
                       .where(_R.run_id.in_(sa.bindparam("run_ids", expanding=True)),
                              _RUN_EXPIRED)
                       .returning(_R.run_id))
SELECT_DEAD_LETTER_IDS_OF_THREADS = sa.select(_D.dispatch_id).where(
    _D.thread_id.in_(sa.bindparam("thread_ids", expanding=True)), _D.status == _DEAD)
# Messages go a page at a time (a run's or a thread's log can be long), by their unique id.
DELETE_MESSAGES_OF_RUNS = sa.delete(messages).where(_M.message_id.in_(
    sa.select(_M.message_id).where(_M.run_id.in_(sa.bindparam("run_ids", expanding=True)))
    .limit(sa.bindparam("limit")).scalar_subquery()))
SELECT_A_MESSAGE_OF_RUNS = sa.select(_M.message_id).where(
    _M.run_id.in_(sa.bindparam("run_ids", expanding=True))).limit(1)
DELETE_MESSAGES_OF_THREAD = sa.delete(messages).where(_M.message_id.in_(
    sa.select(_M.message_id).where(_M.thread_id == sa.bindparam("thread_id"))
    .limit(sa.bindparam("limit")).scalar_subquery()))
# A thread is collectable when nothing of it is left but its epoch row (and stray messages):
# no dispatch at all — so no epoch can matter any more — and no run, live or kept.
_THREAD_HAS_DISPATCH = sa.exists().where(_D.thread_id == _E.thread_id)
_THREAD_HAS_RUN = sa.exists().where(_R.thread_id == _E.thread_id)
SELECT_EMPTY_THREADS = sa.select(_E.thread_id).where(
    _E.thread_id.in_(sa.bindparam("thread_ids", expanding=True)),
    sa.not_(_THREAD_HAS_DISPATCH), sa.not_(_THREAD_HAS_RUN))
SELECT_THREAD_HAS_DISPATCH = sa.select(_D.dispatch_id).where(
    _D.thread_id == sa.bindparam("thread_id")).limit(1)
SELECT_THREAD_HAS_RUN = sa.select(_R.run_id).where(
    _R.thread_id == sa.bindparam("thread_id")).limit(1)
DELETE_EPOCH = sa.delete(thread_epochs).where(_E.thread_id == sa.bindparam("thread_id"))
# The dead-letter purge: the dead letters among the ids, then the runs no other dispatch needs.
SELECT_DEAD_LETTERS_OF = sa.select(_D.dispatch_id, _D.thread_id, _D.run_id).where(
    _D.dispatch_id.in_(sa.bindparam("dispatch_ids", expanding=True)), _D.status == _DEAD)
DELETE_UNREFERENCED_RUNS = (sa.delete(runs)
                            .where(_R.run_id.in_(sa.bindparam("run_ids", expanding=True)),
                                   sa.not_(_RUN_REFERENCED))
                            .returning(_R.run_id))
SELECT_UNREFERENCED_RUNS = sa.select(_R.run_id).where(
    _R.run_id.in_(sa.bindparam("run_ids", expanding=True)), sa.not_(_RUN_REFERENCED))


def unreconciled_terminal_page(limit: int, after: tuple[int, str] | None) -> sa.Select[Any]:
    """Terminal dispatches (Cancelled, Superseded, DeadLetter) whose run still points at them
    and is not done, after a keyset cursor (updated_at, dispatch_id): the sweep pages through
    all of them, and a row it could not reconcile does not come back in the same sweep."""
    query = (sa.select(dispatches)
             .join(runs, sa.and_(_R.run_id == _D.run_id, _R.dispatch_id == _D.dispatch_id))
             .where(_D.status.in_(RECONCILED_VALUES), _R.status != RunStatus.done.value))
    if after is not None:
        query = query.where(sa.tuple_(_D.updated_at, _D.dispatch_id) > sa.tuple_(*after))
    return query.order_by(_D.updated_at, _D.dispatch_id).limit(limit)


# ========================================================= the dashboard (mailbox/http/ui)
# Global reads for the dashboard's overview and thread list (`Inspection.thread_summaries`,
# `.throughput`, `.waiting_runs`): off the hot path, like the audit's
# (docs/architecture.md#sharding). A thread is listed while it has dispatches, that is while
# its newest dispatch is younger than retention; its conversation stays readable by id.
def _count_when(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


_LAST_ACTIVITY = sa.func.max(_D.updated_at).label("last_activity")


def thread_summaries_query(prefix: str | None) -> sa.Select[Any]:
    """Threads by their latest dispatch change, newest first, with how many of their
    dispatches are Queued, Claimed and in all; `prefix` keeps thread ids that start with it.
    One GROUP BY over the dispatches (the thread id index's order), paged by :limit/:offset.
    """
    query = (sa.select(_D.thread_id, _LAST_ACTIVITY,
                       _count_when(_D.status == DispatchStatus.Queued.value).label("queued"),
                       _count_when(_D.status == DispatchStatus.Claimed.value).label("claimed"),
                       sa.func.count().label("dispatches"))
             .group_by(_D.thread_id)
             .order_by(_LAST_ACTIVITY.desc(), _D.thread_id)
             .limit(sa.bindparam("limit")).offset(sa.bindparam("offset")))
    if prefix:
        query = query.where(_D.thread_id.startswith(prefix, autoescape=True))
    return query


# Dispatches that reached each terminal status within the last :short, :medium and :long
# milliseconds (:long the widest): the terminal-status literals let SQLite use the partial
# index on (updated_at, ...) that garbage collection scans, and a terminal row's updated_at
# is when it settled.
SETTLED_SINCE = (sa.select(_D.status,
                           _count_when(_D.updated_at >= sa.bindparam("short")).label("short"),
                           _count_when(_D.updated_at >= sa.bindparam("medium")).label("medium"),
                           sa.func.count().label("long"))
                 .where(_D.status.in_(_literals(TERMINAL_VALUES)),
                        _D.updated_at >= sa.bindparam("long"))
                 .group_by(_D.status))
# Runs waiting for a human decision, the most recently suspended first.
SELECT_WAITING_RUNS = (sa.select(runs).where(_R.status == RunStatus.waiting.value)
                       .order_by(_R.updated_at.desc(), _R.run_id)
                       .limit(sa.bindparam("limit")))
# `/healthz`: the database answers at all.
PING = sa.select(sa.literal(1, literal_execute=True))
