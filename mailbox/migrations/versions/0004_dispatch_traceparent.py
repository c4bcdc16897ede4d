"""Dispatches keep the W3C traceparent of their submit span (tracing on): whichever process
claims a dispatch starts its spans in the submit's trace (mailbox/tracing.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("run_dispatches", sa.Column("traceparent", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_dispatches") as batch:
        batch.drop_column("traceparent")
