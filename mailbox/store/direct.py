"""The store's statements run on the database driver's cursor, inside SQLAlchemy's transaction.

Why: SQLAlchemy's `Connection.execute` costs about 20 µs of CPU per statement above the
driver's own work (cache key, execution context, events, the Result and its rows), measured
on a primary-key SELECT of a dispatch: 28.6 µs through `Connection.execute`, 7.7 µs here. A
dispatch runs about 27 statements between its claim and its settle, so that overhead was the
largest single item of the mailbox's own CPU (docs/architecture.md#store).

What stays SQLAlchemy's: the statement (built in `statements.py` and compiled by SQLAlchemy,
once per statement, database dialect and set of parameter names), each value's conversion (the
column type's own bind and result processors for that dialect, e.g. JSON), the connection, its
transaction and its pool, and every driver error (handed to the same handler `execute` uses:
translated into `sqlalchemy.exc`, a disconnect invalidating the connection).

What is skipped is only the per-execution machinery, and so are the execute events
(`before_execute`, `after_execute`, `before_cursor_execute`, `after_cursor_execute`): while
anything listens to one of them (a statement counter such as the benchmark's,
OpenTelemetry's SQLAlchemy instrumentation), every statement goes through
`Connection.execute` instead, so the listener sees all of them. So does a statement this
module cannot plan (an expanding IN list, a value rendered into the SQL at execution, a
Python-side column default) and an executemany (a list of more than one parameter set).

It leans on parts of SQLAlchemy below its documented API — `Connection._handle_dbapi_exception`
and the compiler's `positiontup` and `binds` — which kept their shape through 2.0 and 2.1:
tests/integration/test_direct_execution.py and the store's suites passed on 2.0.28 (the
lowest pyproject.toml allows) and on 2.1.9.
"""

from __future__ import annotations

import collections
import functools
import keyword
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler

Processor = Callable[[Any], Any] | None


class Row(tuple[Any, ...]):
    """A result row: a tuple with attribute access by column name and `_mapping`, the parts
    of `sqlalchemy.Row` the store uses. Subclassed per column list by `_row_type`."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))

    if TYPE_CHECKING:  # the columns, by name (the namedtuple of `_row_type`)
        def __getattr__(self, name: str) -> Any: ...


@functools.lru_cache(maxsize=256)
def _row_type(fields: tuple[str, ...]) -> type[Row]:
    """A `Row` class for these column names (a namedtuple's fields with `_mapping`)."""
    base = collections.namedtuple("_Fields", fields)  # type: ignore[misc]
    return type("Row", (base, Row), {"__slots__": (), "_fields": fields})


AnyRow = Row | sa.Row[*tuple[Any, ...]]
"""A row of `execute`'s answer, whichever way the statement ran."""


class Rows:
    """What a statement returned: its rows (fetched at once, as a buffered SQLAlchemy result
    would) and its rowcount, with the `Result` methods the store uses, same semantics."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows)

    def all(self) -> list[Row]:
        return list(self._rows)

    def first(self) -> Row | None:
        return self._rows[0] if self._rows else None

    def one_or_none(self) -> Row | None:
        if len(self._rows) > 1:
            raise sa.exc.MultipleResultsFound(
                "Multiple rows were found when one or none was required")
        return self.first()

    def one(self) -> Row:
        row = self.one_or_none()
        if row is None:
            raise sa.exc.NoResultFound("No row was found when one was required")
        return row

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else row[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> Scalars:
        return Scalars(row[0] for row in self._rows)


class Scalars(list[Any]):
    """The first column of each row (`Result.scalars()`)."""

    def all(self) -> list[Any]:
        return list(self)


@dataclass(frozen=True, slots=True)
class _Bind:
    key: str | None  # the parameter's name in the caller's dict; None: a value of the statement
    value: Any  # the statement's own value (key None)
    process: Processor


@dataclass(frozen=True, slots=True)
class _Plan:
    """One statement compiled for one dialect and one set of parameter names."""

    sql: str
    positional: bool
    names: tuple[str, ...]  # the parameters' names in the SQL (named paramstyles)
    binds: tuple[_Bind, ...]
    row_type: type[Row] | None
    result_processors: tuple[Processor, ...]

    def parameters(self, params: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        values = [b.value if b.key is None else params[b.key] for b in self.binds]
        values = [v if b.process is None else b.process(v)
                  for b, v in zip(self.binds, values, strict=True)]
        return tuple(values) if self.positional else dict(zip(self.names, values, strict=True))

    def rows(self, fetched: list[Any]) -> list[Row]:
        assert self.row_type is not None
        make = self.row_type._make  # type: ignore[attr-defined]
        if not any(self.result_processors):
            return [make(r) for r in fetched]
        return [make([v if p is None else p(v)
                      for p, v in zip(self.result_processors, r, strict=True)])
                for r in fetched]


_NOT_PLANNABLE = object()
MAX_PLANS = 1000
"""Plans kept per dialect. The store passes its module-level statements, a few hundred
plans at most; a statement built per call would never be found again, so past this many
the rest run through `Connection.execute` rather than fill the cache."""
# dialect -> (statement, parameter names) -> plan, or _NOT_PLANNABLE. Weak on the dialect,
# which lives as long as its engine (tests create and drop many).
_plans: weakref.WeakKeyDictionary[sa.Dialect, dict[tuple[Any, tuple[str, ...]], Any]] = (
    weakref.WeakKeyDictionary())


def _plan(statement: sa.Executable, keys: tuple[str, ...], dialect: sa.Dialect) -> Any:
    compiled = cast(SQLCompiler, cast(sa.ClauseElement, statement).compile(
        dialect=dialect, column_keys=list(keys)))
    if (compiled.literal_execute_params or compiled.post_compile_params
            or getattr(compiled, "escaped_bind_names", None)
            or getattr(compiled, "insert_prefetch", None)
            or getattr(compiled, "update_prefetch", None)):
        return _NOT_PLANNABLE
    order = compiled.positiontup if compiled.positional else list(compiled.binds)
    assert order is not None
    binds = []
    for name in order:
        bind = compiled.binds[name]
        if bind.expanding or bind.literal_execute:
            return _NOT_PLANNABLE
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if bind.key in keys:
            binds.append(_Bind(bind.key, None, process))
        elif bind.callable is None and not bind.required:
            binds.append(_Bind(None, bind.value, process))
        else:  # a value the caller did not give: SQLAlchemy's execute says so
            return _NOT_PLANNABLE
    columns = list(statement.exported_columns) if isinstance(statement, sa.ReturnsRows) \
        else []
    fields = tuple(c.key for c in columns)
    if not all(isinstance(f, str) and f.isidentifier() and not keyword.iskeyword(f)
               for f in fields) or len(set(fields)) != len(fields):
        return _NOT_PLANNABLE  # an unnamed expression: SQLAlchemy names it
    return _Plan(
        sql=compiled.string, positional=compiled.positional, names=tuple(order),
        binds=tuple(binds),
        row_type=_row_type(fields) if fields else None,
        result_processors=tuple(c.type.dialect_impl(dialect).result_processor(dialect, None)
                                for c in columns))


def _cached_plan(statement: sa.Executable, keys: tuple[str, ...], dialect: sa.Dialect) -> Any:
    by_statement = _plans.get(dialect)
    if by_statement is None:
        by_statement = _plans.setdefault(dialect, {})
    plan = by_statement.get((statement, keys))
    if plan is None:
        if len(by_statement) >= MAX_PLANS:
            return _NOT_PLANNABLE
        plan = by_statement[(statement, keys)] = _plan(statement, keys, dialect)
    return plan


def _watched(conn: sa.Connection) -> bool:
    """Whether a listener waits for this connection's statements (engine's or its own)."""
    events = conn.dispatch
    return bool(events.before_cursor_execute or events.after_cursor_execute
                or events.before_execute or events.after_execute)


def execute(conn: sa.Connection, statement: sa.Executable,
            params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
            ) -> Rows | sa.CursorResult[*tuple[Any, ...]]:
    """`conn.execute(statement, params)`, on the driver's cursor when it can be (see the
    module's docstring); the answer has the same methods either way."""
    if params is None:
        params = {}
    elif not isinstance(params, Mapping) and len(params) == 1:
        params = params[0]  # one parameter set: one execute, as SQLAlchemy does too
    if not isinstance(params, Mapping) or _watched(conn):
        return conn.execute(statement, params)
    plan = _cached_plan(statement, tuple(params), conn.dialect)
    if plan is _NOT_PLANNABLE:
        return conn.execute(statement, params)
    if not conn.in_transaction():
        conn.begin()  # what execute's autobegin does (and the begin event with it)
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    values: Any = params  # what a failure reports until the driver's values exist
    cursor = None
    try:
        values = plan.parameters(params)  # a value its processor refuses: StatementError
        cursor = dbapi_connection.cursor()
        cursor.execute(plan.sql, values)
        fetched = cursor.fetchall() if cursor.description is not None else None
        rowcount = cursor.rowcount
        cursor.close()
    except BaseException as exc:  # as Connection.execute catches: translated, or re-raised
        conn._handle_dbapi_exception(exc, plan.sql, values, cursor, None)  # noqa: SLF001
        # (the handler `Connection.execute` itself uses: translation, invalidation, events)
    return Rows(plan.rows(fetched) if fetched is not None and plan.row_type is not None
                else [], rowcount)
