"""Alembic environment: runs on the connection handed over by `mailbox.schema.upgrade`, or on
MAILBOX_DATABASE_URL when invoked as `alembic -c mailbox/migrations/alembic.ini upgrade head`."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from mailbox.schema import metadata
from mailbox.settings import Settings

config = context.config
connection = config.attributes.get("connection")


def run(conn: sa.Connection) -> None:
    context.configure(connection=conn, target_metadata=metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = sa.create_engine(Settings.from_env().database_url)
    with engine.begin() as conn:
        run(conn)
