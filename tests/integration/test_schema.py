"""The Alembic migrations create exactly the tables the store queries, on both databases.

Every test here runs once per database of MAILBOX_TEST_BACKENDS: on SQLite, and on
PostgreSQL when MAILBOX_TEST_POSTGRES_URL is set (CI requires it: a PostgreSQL pass that
skipped these would fail instead, see tests/support/services.py). Two checks of drift:

- Alembic's own comparison of the migrated database with `mailbox.schema.metadata` (tables,
  columns, types, nullability, indexes by name and columns);
- the database's catalog of the migrated schema against the catalog of the same tables made
  from the metadata (`create_all`): every index with its columns, uniqueness and partial
  predicate as the database itself stores it. Alembic does not compare predicates, and the
  invariants (one Claimed per thread, one live dispatch per dedupe key) live in them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from mailbox import Mailbox
from mailbox.database import create_engine, scratch_postgres_schema
from mailbox.model import LIVE_STATUSES, DispatchStatus
from mailbox.schema import alembic_config, current_revision, metadata
from tests.conftest import POSTGRES_URL


@dataclass(frozen=True)
class IndexShape:
    table: str
    columns: tuple[str, ...]
    unique: bool
    predicate: str | None  # as the database stores it, whitespace and case normalized


def _normalize(sql: str | None) -> str | None:
    return None if sql is None else re.sub(r"\s+", " ", sql).strip().lower()


def catalog(engine: sa.Engine) -> dict[str, IndexShape]:
    """Every index of the mailbox's tables, read from the database's own catalog."""
    tables = sorted(metadata.tables)
    shapes: dict[str, IndexShape] = {}
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            rows = conn.execute(sa.text(
                "SELECT t.relname, i.relname, ix.indisunique, ix.indisprimary, "
                "       pg_get_expr(ix.indpred, ix.indrelid), "
                "       array(SELECT a.attname FROM unnest(ix.indkey) WITH ORDINALITY k(n, o) "
                "             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.n "
                "             ORDER BY k.o) "
                "FROM pg_index ix JOIN pg_class t ON t.oid = ix.indrelid "
                "JOIN pg_class i ON i.oid = ix.indexrelid "
                "WHERE t.relnamespace = current_schema()::regnamespace "
                "AND t.relname = ANY(:tables)"), {"tables": tables})
            for table, name, unique, primary, predicate, columns in rows:
                key = f"{table}:primary" if primary else str(name)  # pkey names may differ
                shapes[key] = IndexShape(table, tuple(columns), bool(unique),
                                         _normalize(predicate))
        else:
            for table in tables:
                for row in conn.exec_driver_sql(f'PRAGMA index_list("{table}")'):
                    name, unique, origin = row[1], bool(row[2]), row[3]
                    columns = tuple(r[2] for r in conn.exec_driver_sql(
                        f'PRAGMA index_info("{name}")'))
                    sql = conn.execute(sa.text(
                        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :n"),
                        {"n": name}).scalar()
                    predicate = None
                    if sql and re.search(r"\bwhere\b", sql, re.IGNORECASE):
                        predicate = re.split(r"\bwhere\b", sql, maxsplit=1,
                                             flags=re.IGNORECASE)[1]
                    key = (f"{table}:{origin}:{','.join(columns)}" if origin != "c"
                           else str(name))  # automatic indexes (pk, unique) have made-up names
                    shapes[key] = IndexShape(table, columns, unique, _normalize(predicate))
    return shapes


@pytest.fixture
def from_metadata(database_url: str, tmp_path: Path) -> Iterator[sa.Engine]:
    """A second, empty database of the same kind, with the tables made from the metadata."""
    if database_url.startswith("sqlite"):
        engine = create_engine(f"sqlite:///{tmp_path / 'from-metadata.sqlite3'}")
        metadata.create_all(engine)
        yield engine
        engine.dispose()
        return
    assert POSTGRES_URL
    with scratch_postgres_schema(POSTGRES_URL, "m") as url:
        engine = create_engine(url)
        metadata.create_all(engine)
        yield engine
        engine.dispose()


def test_the_backend_is_the_one_asked_for(mailbox: Mailbox,
                                          request: pytest.FixtureRequest) -> None:
    """The PostgreSQL parameter really runs on PostgreSQL (not a SQLite fallback)."""
    expected = {"sqlite": "sqlite", "postgres": "postgresql"}[request.node.callspec.params[
        "database_url"]]
    assert mailbox.store.engine.dialect.name == expected


def test_migrations_match_the_store_tables(mailbox: Mailbox) -> None:
    with mailbox.store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_migrated_indexes_match_the_metadata_with_their_predicates(
        mailbox: Mailbox, from_metadata: sa.Engine) -> None:
    migrated, expected = catalog(mailbox.store.engine), catalog(from_metadata)
    assert migrated, "no index found: the catalog query reads the wrong schema"
    assert set(migrated) == set(expected), (sorted(migrated), sorted(expected))
    for name, shape in expected.items():
        assert migrated[name] == shape, (name, migrated[name], shape)


def test_create_schema_is_idempotent_and_at_head(mailbox: Mailbox) -> None:
    mailbox.create_schema()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None and current_revision(mailbox.store.engine) == head


def test_partial_unique_indexes_exist(mailbox: Mailbox) -> None:
    indexes = catalog(mailbox.store.engine)
    one_claimed = indexes["uq_dispatch_one_claimed_per_thread"]
    assert one_claimed.unique and one_claimed.columns == ("thread_id",)
    assert one_claimed.predicate is not None
    assert f"'{DispatchStatus.Claimed.value.lower()}'" in one_claimed.predicate
    live_dedupe = indexes["uq_dispatch_live_dedupe"]
    assert live_dedupe.unique and live_dedupe.columns == ("thread_id", "dedupe_key")
    assert live_dedupe.predicate is not None and "dedupe_key is not null" in \
        live_dedupe.predicate
    for status in LIVE_STATUSES:
        assert f"'{status.value.lower()}'" in live_dedupe.predicate, live_dedupe.predicate
    lease_scan = indexes["ix_dispatch_claimed_lease"]
    assert not lease_scan.unique and lease_scan.predicate == one_claimed.predicate


def test_sqlite_runs_in_wal_mode(mailbox: Mailbox) -> None:
    engine = mailbox.store.engine
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
