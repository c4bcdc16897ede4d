"""The Alembic migrations create exactly the tables the store queries, on both databases."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from mailbox import Mailbox
from mailbox.schema import current_revision, metadata


def test_migrations_match_the_store_tables(mailbox: Mailbox) -> None:
    with mailbox.store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_create_schema_is_idempotent_and_at_head(mailbox: Mailbox) -> None:
    mailbox.create_schema()
    assert current_revision(mailbox.store.engine) == "0001"


def test_partial_unique_indexes_exist(mailbox: Mailbox) -> None:
    indexes = {ix["name"]: ix for ix in sa.inspect(mailbox.store.engine
                                                   ).get_indexes("run_dispatches")}
    assert indexes["uq_dispatch_one_claimed_per_thread"]["unique"]
    assert indexes["uq_dispatch_live_dedupe"]["unique"]


def test_sqlite_runs_in_wal_mode(mailbox: Mailbox) -> None:
    engine = mailbox.store.engine
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
