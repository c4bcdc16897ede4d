"""SQL tables of the mailbox (SQLAlchemy Core) and the Alembic entry point that creates them.

The tables here are what the store queries; the Alembic revisions under `migrations/` are what
creates and evolves them. A test compares the two so they cannot drift apart.

Two partial unique indexes carry invariants even when Redis is empty or two processes race:
at most one Claimed dispatch per thread, and at most one live (Queued or Claimed) dispatch per
thread and dedupe key. SQLite and PostgreSQL both support partial indexes, so both get them.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from mailbox.model import LIVE_STATUSES, TERMINAL_STATUSES, DispatchStatus

metadata = sa.MetaData()


def _status_in(statuses: tuple[DispatchStatus, ...]) -> str:
    return "status IN (" + ", ".join(f"'{s.value}'" for s in statuses) + ")"


CLAIMED_ONLY = sa.text(f"status = '{DispatchStatus.Claimed.value}'")
LIVE_DEDUPE = sa.text(f"{_status_in(LIVE_STATUSES)} AND dedupe_key IS NOT NULL")
TERMINAL_ONLY = sa.text(_status_in(TERMINAL_STATUSES))

dispatches = sa.Table(
    "run_dispatches",
    metadata,
    sa.Column("dispatch_id", sa.String(255), primary_key=True),
    sa.Column("thread_id", sa.String(255), nullable=False),
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("dedupe_key", sa.String(255)),
    sa.Column("dispatch_epoch", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("available_at", sa.BigInteger, nullable=False),
    sa.Column("attempt_count", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("claim_token", sa.String(64)),
    sa.Column("claimed_by", sa.String(255)),
    sa.Column("lease_until", sa.BigInteger),
    sa.Column("dispatch_instance_id", sa.String(255)),
    sa.Column("run_status", sa.String(16)),
    sa.Column("termination", sa.JSON(none_as_null=True)),
    sa.Column("run_response", sa.Text),
    sa.Column("run_error", sa.Text),
    sa.Column("completed_at", sa.BigInteger),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("deferred_since", sa.BigInteger),
    sa.Column("traceparent", sa.String(64)),
    # Claim order within a thread: priority, then FIFO, then id for determinism.
    sa.Index("ix_dispatch_claim_order", "thread_id", "status", "priority", "created_at",
             "dispatch_id"),
    # Global scans: counts by status, queued thread ids.
    sa.Index("ix_dispatch_status_thread", "status", "thread_id"),
    # The sweep's scan for expired leases.
    sa.Index("ix_dispatch_claimed_lease", "lease_until", postgresql_where=CLAIMED_ONLY,
             sqlite_where=CLAIMED_ONLY),
    # Terminal listing (reconciliation, dead letters) and purge.
    sa.Index("ix_dispatch_terminal_updated", "updated_at", "created_at", "dispatch_id",
             postgresql_where=TERMINAL_ONLY, sqlite_where=TERMINAL_ONLY),
    sa.Index("uq_dispatch_one_claimed_per_thread", "thread_id", unique=True,
             postgresql_where=CLAIMED_ONLY, sqlite_where=CLAIMED_ONLY),
    sa.Index("uq_dispatch_live_dedupe", "thread_id", "dedupe_key", unique=True,
             postgresql_where=LIVE_DEDUPE, sqlite_where=LIVE_DEDUPE),
)

thread_epochs = sa.Table(
    "thread_dispatch_epochs",
    metadata,
    sa.Column("thread_id", sa.String(255), primary_key=True),
    sa.Column("current_epoch", sa.BigInteger, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("thread_id", sa.String(255), nullable=False),
    sa.Column("agent_id", sa.String(255), nullable=False),
    sa.Column("resolution_id", sa.String(255)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("termination", sa.JSON(none_as_null=True)),
    sa.Column("response", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("waiting", sa.JSON(none_as_null=True)),
    sa.Column("dispatch_id", sa.String(255)),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("finished_at", sa.BigInteger),
    sa.Index("ix_runs_thread_updated", "thread_id", "updated_at"),
    sa.Index("ix_runs_status", "status"),
)

messages = sa.Table(
    "thread_messages",
    metadata,
    sa.Column("thread_id", sa.String(255), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("message_id", sa.String(255), nullable=False, unique=True),
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("content", sa.JSON, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # The seq of its run's first message: a conversation lists each run's messages together,
    # runs in the order their input arrived (docs/behaviour.md#conversation).
    sa.Column("turn", sa.BigInteger),
    sa.Index("ix_messages_run", "run_id"),
    sa.Index("ix_messages_turn", "thread_id", "turn", "seq"),
)

resolutions = sa.Table(
    "agent_resolutions",
    metadata,
    sa.Column("resolution_id", sa.String(255), primary_key=True),
    sa.Column("agent_name", sa.String(255), nullable=False),
    sa.Column("agent_version", sa.String(64), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config that needs no alembic.ini: the scripts ship inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the database to `revision` (idempotent: a current database is left alone)."""
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
