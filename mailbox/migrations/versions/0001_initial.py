"""Initial schema: dispatches, thread epochs, runs, the thread message log, resolutions.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

CLAIMED_ONLY = sa.text("status = 'Claimed'")
LIVE_DEDUPE = sa.text("status IN ('Queued', 'Claimed') AND dedupe_key IS NOT NULL")
TERMINAL_ONLY = sa.text("status IN ('Acked', 'Cancelled', 'Superseded', 'DeadLetter')")


def upgrade() -> None:
    op.create_table(
        "run_dispatches",
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
        sa.Column("termination", sa.JSON),
        sa.Column("run_response", sa.Text),
        sa.Column("run_error", sa.Text),
        sa.Column("completed_at", sa.BigInteger),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_dispatch_claim_order", "run_dispatches",
                    ["thread_id", "status", "priority", "created_at", "dispatch_id"])
    op.create_index("ix_dispatch_status_thread", "run_dispatches", ["status", "thread_id"])
    op.create_index("ix_dispatch_claimed_lease", "run_dispatches", ["lease_until"],
                    postgresql_where=CLAIMED_ONLY, sqlite_where=CLAIMED_ONLY)
    op.create_index("ix_dispatch_terminal_updated", "run_dispatches",
                    ["updated_at", "created_at", "dispatch_id"],
                    postgresql_where=TERMINAL_ONLY, sqlite_where=TERMINAL_ONLY)
    op.create_index("uq_dispatch_one_claimed_per_thread", "run_dispatches", ["thread_id"],
                    unique=True, postgresql_where=CLAIMED_ONLY, sqlite_where=CLAIMED_ONLY)
    op.create_index("uq_dispatch_live_dedupe", "run_dispatches", ["thread_id", "dedupe_key"],
                    unique=True, postgresql_where=LIVE_DEDUPE, sqlite_where=LIVE_DEDUPE)

    op.create_table(
        "thread_dispatch_epochs",
        sa.Column("thread_id", sa.String(255), primary_key=True),
        sa.Column("current_epoch", sa.BigInteger, nullable=False),
    )

    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(255), primary_key=True),
        sa.Column("thread_id", sa.String(255), nullable=False),
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("resolution_id", sa.String(255)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("termination", sa.JSON),
        sa.Column("response", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("waiting", sa.JSON),
        sa.Column("dispatch_id", sa.String(255)),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger),
    )
    op.create_index("ix_runs_thread_updated", "runs", ["thread_id", "updated_at"])
    op.create_index("ix_runs_status", "runs", ["status"])

    op.create_table(
        "thread_messages",
        sa.Column("thread_id", sa.String(255), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("message_id", sa.String(255), nullable=False, unique=True),
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("content", sa.JSON, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_messages_run", "thread_messages", ["run_id"])

    op.create_table(
        "agent_resolutions",
        sa.Column("resolution_id", sa.String(255), primary_key=True),
        sa.Column("agent_name", sa.String(255), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("agent_resolutions", "thread_messages", "runs", "thread_dispatch_epochs",
                  "run_dispatches"):
        op.drop_table(table)
