"""`python -m mailbox`: operator commands (DESIGN.md §7).

Run from the project root (or with it on PYTHONPATH) so that `mailbox` is this package.
"""

from __future__ import annotations

import sys

import click

from mailbox.errors import MailboxError
from mailbox.facade import Mailbox
from mailbox.schema import current_revision

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@click.group(help="Dispatch Mailbox: a durable mailbox for AI-agent runs on Celery.")
@click.option("--database-url", envvar="MAILBOX_DATABASE_URL", default=None,
              help="SQLAlchemy URL (default: MAILBOX_DATABASE_URL, else SQLite under var/).")
@click.option("--redis-url", envvar="MAILBOX_REDIS_URL", default=None,
              help="Redis URL (default: MAILBOX_REDIS_URL).")
@click.option("--namespace", envvar="MAILBOX_NAMESPACE", default="mailbox", show_default=True)
@click.pass_context
def main(ctx: click.Context, database_url: str | None, redis_url: str | None,
         namespace: str) -> None:
    ctx.obj = {"database_url": database_url, "redis_url": redis_url, "namespace": namespace}


def _connect(ctx: click.Context) -> Mailbox:
    opts = ctx.obj
    return Mailbox.connect(opts["database_url"], opts["redis_url"], namespace=opts["namespace"])


@main.group(help="Database schema commands.")
def db() -> None:
    pass


@db.command("upgrade", help="Run the Alembic migrations up to head.")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    from mailbox.database import create_engine
    from mailbox.schema import upgrade
    from mailbox.settings import Settings

    url = ctx.obj["database_url"] or Settings.from_env().database_url
    engine = create_engine(url)
    upgrade(engine)
    click.echo(f"database at revision {current_revision(engine)}")
    engine.dispose()


def run() -> None:
    try:
        main(standalone_mode=True)
    except MailboxError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
