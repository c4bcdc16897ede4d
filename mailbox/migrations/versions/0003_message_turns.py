"""Thread messages carry their run's turn: the conversation order.

Inputs are appended when they are submitted and answers when their run completes, so with
several inputs queued on a thread the log order interleaves runs. `turn` (the seq of the run's
first message) lets a conversation list each run's messages together, runs in the order their
input arrived, with an index that bounds the read to the window an agent sees.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("thread_messages", sa.Column("turn", sa.BigInteger, nullable=True))
    op.execute("UPDATE thread_messages SET turn = (SELECT MIN(m.seq) FROM thread_messages m "
               "WHERE m.run_id = thread_messages.run_id)")
    op.create_index("ix_messages_turn", "thread_messages", ["thread_id", "turn", "seq"])


def downgrade() -> None:
    op.drop_index("ix_messages_turn", "thread_messages")
    with op.batch_alter_table("thread_messages") as batch:
        batch.drop_column("turn")
