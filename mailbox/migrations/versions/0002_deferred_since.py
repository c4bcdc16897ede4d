"""Dispatches remember since when their pinned agent version was missing (T19).

A worker that lacks a run's pinned agent version puts the dispatch back without spending an
attempt, for a grace period counted from the first time this happened: `deferred_since`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("run_dispatches", sa.Column("deferred_since", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_dispatches") as batch:  # SQLite cannot drop in place
        batch.drop_column("deferred_since")
