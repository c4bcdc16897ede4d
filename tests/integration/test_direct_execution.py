"""`mailbox.store.direct.execute` answers as `Connection.execute` does, on the real database
(SQLite; PostgreSQL when MAILBOX_TEST_POSTGRES_URL is set): the same rows and values (JSON
through the column type's processors), the same rowcount, the same errors (translated,
parameters hidden, a lost connection invalidated), and SQLAlchemy's own execute whenever a
listener watches executions or the statement cannot be planned."""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from mailbox.database import create_engine
from mailbox.store import direct
from mailbox.store.direct import Rows, execute

SECRET = "payload-that-must-not-be-logged"


@pytest.fixture
def probe(database_url: str) -> Iterator[tuple[sa.Engine, sa.Table]]:
    engine = create_engine(database_url)
    table = sa.Table(f"direct_probe_{uuid.uuid4().hex[:8]}", sa.MetaData(),
                     sa.Column("id", sa.String(64), primary_key=True),
                     sa.Column("n", sa.BigInteger, nullable=False),
                     sa.Column("doc", sa.JSON(none_as_null=True)))
    table.create(engine)
    try:
        yield engine, table
    finally:
        table.drop(engine)
        engine.dispose()


def _statements(table: sa.Table) -> dict[str, Any]:
    c = table.c
    return {
        "insert": table.insert(),
        "select": sa.select(table).where(c.id == sa.bindparam("id")),
        "by_n": sa.select(c.id, c.doc).where(c.n == sa.bindparam("n")).order_by(c.id),
        "update": table.update().where(c.id == sa.bindparam("guard_id")),
        "count": sa.select(sa.func.count()).select_from(table),
        "in": sa.select(c.id).where(c.id.in_(sa.bindparam("ids", expanding=True))),
    }


def test_rows_values_and_rowcounts_are_sqlalchemys(probe: tuple[sa.Engine, sa.Table]) -> None:
    engine, table = probe
    st = _statements(table)
    doc = {"reason": "cancelled", "nested": [1, 2.5, None, "é"], "flag": True}
    with engine.begin() as conn:
        inserted = execute(conn, st["insert"], {"id": "a", "n": 7, "doc": doc})
        assert isinstance(inserted, Rows) and inserted.rowcount == 1
        execute(conn, st["insert"], [{"id": "b", "n": 7, "doc": None}])  # one set: one execute
        execute(conn, st["insert"], {"id": "c", "n": 8, "doc": [1, 2]})
    with engine.connect() as conn:
        mine = execute(conn, st["select"], {"id": "a"})
        assert isinstance(mine, Rows), "no listener, a plannable statement: the driver's cursor"
        assert conn.in_transaction(), "began its transaction as execute's autobegin does"
        row = mine.one()
        theirs = conn.execute(st["select"], {"id": "a"}).one()
        assert tuple(row) == tuple(theirs) and row._mapping == dict(theirs._mapping)
        assert row.doc == doc and row.n == 7 and row.id == "a"
        # none_as_null: a None document is SQL NULL, as SQLAlchemy writes it
        nulls = conn.execute(sa.select(sa.func.count()).select_from(table)
                             .where(table.c.doc.is_(None))).scalar_one()
        assert nulls == 1
        both = execute(conn, st["by_n"], {"n": 7})
        assert [tuple(r) for r in both] == [("a", doc), ("b", None)]
        assert both.scalars() == ["a", "b"] and both.scalars().all() == ["a", "b"]
        assert both.scalar() == "a" and both.first() is not None
        with pytest.raises(sa.exc.MultipleResultsFound):
            execute(conn, st["by_n"], {"n": 7}).one_or_none()
        none = execute(conn, st["by_n"], {"n": 99})
        assert none.one_or_none() is None and none.scalar_one_or_none() is None
        assert none.all() == [] and none.first() is None and none.scalar() is None
        with pytest.raises(sa.exc.NoResultFound):
            execute(conn, st["by_n"], {"n": 99}).one()
        assert execute(conn, st["select"], {"id": "c"}).one().doc == [1, 2]
    with engine.begin() as conn:
        changed = execute(conn, st["update"], {"n": 9, "guard_id": "a"})
        assert isinstance(changed, Rows) and changed.rowcount == 1
        assert execute(conn, st["update"], {"n": 9, "guard_id": "zz"}).rowcount == 0
        assert execute(conn, st["select"], {"id": "a"}).one().n == 9


def test_a_driver_error_is_sqlalchemys_with_parameters_hidden(
        probe: tuple[sa.Engine, sa.Table]) -> None:
    engine, table = probe
    st = _statements(table)
    with engine.begin() as conn:
        execute(conn, st["insert"], {"id": "a", "n": 1, "doc": None})
    with pytest.raises(sa.exc.IntegrityError) as failed, engine.begin() as conn:
        execute(conn, st["insert"], {"id": "a", "n": 2, "doc": {"secret": SECRET}})
    text = "".join(traceback.format_exception(failed.value))
    assert "INSERT INTO" in text and "hidden due to hide_parameters" in text
    assert SECRET not in text and SECRET not in repr(failed.value)
    with engine.connect() as conn:  # rolled back whole; the pool's connection still works
        assert execute(conn, st["select"], {"id": "a"}).one().n == 1
    # a value the column type refuses fails the statement, names why and writes nothing,
    # either way (SQLAlchemy's own execute raises psycopg's serializing TypeError unwrapped)
    for run in (execute, sa.Connection.execute):
        with pytest.raises((sa.exc.StatementError, TypeError), match="not JSON serializable"), \
                engine.begin() as conn:
            run(conn, st["insert"], {"id": "b", "n": 3, "doc": {"at": object()}})
    with engine.connect() as conn:
        assert execute(conn, st["select"], {"id": "b"}).one_or_none() is None


@pytest.mark.parametrize("name", ["before_cursor_execute", "after_cursor_execute",
                                  "before_execute", "after_execute"])
def test_an_execute_listener_sees_every_statement(probe: tuple[sa.Engine, sa.Table],
                                                  name: str) -> None:
    engine, table = probe
    st = _statements(table)
    seen: list[str] = []

    def listener(_conn: Any, statement: Any, *_: Any) -> None:
        # cursor events pass (conn, cursor, statement, ...), the others (conn, clause, ...)
        text = str(_[0] if name.endswith("cursor_execute") else statement)
        seen.append(text.split()[0])

    event.listen(engine, name, listener)
    try:
        with engine.begin() as conn:
            answer = execute(conn, st["insert"], {"id": "a", "n": 1, "doc": None})
            assert not isinstance(answer, Rows), "went through Connection.execute"
            assert execute(conn, st["select"], {"id": "a"}).one().n == 1
    finally:
        event.remove(engine, name, listener)
    assert "INSERT" in seen and "SELECT" in seen
    with engine.connect() as conn:
        assert isinstance(execute(conn, st["select"], {"id": "a"}), Rows)


def test_what_cannot_be_planned_runs_through_sqlalchemy(
        probe: tuple[sa.Engine, sa.Table], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, table = probe
    st = _statements(table)
    with engine.begin() as conn:
        for i in range(3):
            execute(conn, st["insert"], {"id": f"r{i}", "n": i, "doc": None})
        # an expanding IN list and an unnamed column: SQLAlchemy's execute, same answers
        ids = execute(conn, st["in"], {"ids": ["r0", "r2", "nope"]})
        assert not isinstance(ids, Rows) and sorted(ids.scalars()) == ["r0", "r2"]
        assert execute(conn, st["count"]).scalar_one() == 3
        # a parameter the statement needs and the caller left out: SQLAlchemy says so
        with pytest.raises(sa.exc.StatementError, match="guard_id"):
            execute(conn, st["update"], {"n": 5})
        # more than one parameter set: an executemany
        many = execute(conn, st["insert"], [{"id": "m1", "n": 10, "doc": None},
                                            {"id": "m2", "n": 10, "doc": None}])
        assert not isinstance(many, Rows)
        assert execute(conn, st["by_n"], {"n": 10}).scalars() == ["m1", "m2"]
    # statements built per call are never found again: past MAX_PLANS they are not cached
    monkeypatch.setattr(direct, "MAX_PLANS", len(direct._plans.get(engine.dialect, {})) + 2)
    with engine.connect() as conn:
        answers = [execute(conn, sa.select(table.c.id).where(table.c.n == sa.bindparam("n")),
                           {"n": i}) for i in range(3)]
    assert [type(a) is Rows for a in answers] == [True, True, False]
    assert [list(a.scalars()) for a in answers] == [["r0"], ["r1"], ["r2"]]
    assert len(direct._plans[engine.dialect]) == direct.MAX_PLANS


def test_a_lost_postgresql_connection_is_invalidated(
        probe: tuple[sa.Engine, sa.Table], database_url: str) -> None:
    engine, table = probe
    if engine.dialect.name != "postgresql":
        pytest.skip("a SQLite database is a file: no connection to lose")
    st = _statements(table)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.rollback()
        killer = create_engine(database_url)
        try:
            with killer.begin() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            killer.dispose()
        with pytest.raises(sa.exc.OperationalError) as lost:
            execute(conn, st["select"], {"id": "a"})
        assert lost.value.connection_invalidated and conn.invalidated
    with engine.connect() as conn:  # the pool hands out a fresh connection
        assert execute(conn, st["select"], {"id": "a"}).one_or_none() is None
