"""The root group `main` of `python -m mailbox`, alone so that commands can attach to it.

Each command module decorates its commands with `@main.command` / `@main.group`, and the
package `__init__` imports those modules to register them: this module imports none of
them, so there is no cycle. The group's class is also where every expected failure of any
command becomes one line on stderr and its exit code (the table in the package docstring).
"""

from __future__ import annotations

from typing import Any

import click
import redis
from sqlalchemy import exc as sa_exc

from mailbox.cli.common import (
    EXIT_FAILURE,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CliFailure,
    CliState,
    first_line,
)
from mailbox.errors import MailboxError, NotFoundError
from mailbox.events import CursorExpiredError

HELP = """Dispatch Mailbox: a durable mailbox for AI-agent runs on Celery.

\b
Connection settings come from the options or the environment (MAILBOX_DATABASE_URL,
MAILBOX_REDIS_URL, MAILBOX_NAMESPACE). Every command takes --json for machine output.

\b
Exit codes:
  0  ok
  1  the operation failed (validation, conflict, store unavailable, timeout)
  2  usage error (bad option, argument or value)
  3  audit found invariant violations
  4  not found (unknown dispatch or run id) or expired event cursor
  5  --wait: the dispatch ended Cancelled, Superseded or DeadLetter
"""


def _hint(message: str) -> str:
    if "no such table" in message or ("relation" in message and "does not exist" in message):
        return f"{message} (is the schema created? run `python -m mailbox db upgrade`)"
    return message


def _json_mode(ctx: click.Context, default: bool) -> bool:
    obj = ctx.find_root().obj
    return obj.json if isinstance(obj, CliState) else default


class MailboxGroup(click.Group):
    """The root group: turns every expected failure into one line and its exit code."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        """The root's own options are parsed here, before `invoke`: a bad one (`--nope`)
        would otherwise get click's three-line usage message."""
        as_json = "--json" in args  # read now: parsing consumes the list
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # no command at all: the help, as click shows it
        except click.UsageError as exc:
            raise CliFailure(f"{exc.format_message()} (see `{info_name or 'mailbox'} --help`)",
                             EXIT_USAGE, "usage", as_json) from None

    def invoke(self, ctx: click.Context) -> Any:
        as_json = isinstance(ctx.obj, CliState) and ctx.obj.json
        try:
            return super().invoke(ctx)
        except (CliFailure, click.exceptions.Exit, click.Abort,
                click.exceptions.NoArgsIsHelpError):
            raise  # the last: a group without its command (`dlq`) shows its help
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise CliFailure(f"{exc.format_message()} (see `{where} --help`)", EXIT_USAGE,
                             "usage", _json_mode(ctx, as_json)) from None
        except (NotFoundError, CursorExpiredError) as exc:
            raise CliFailure(str(exc), EXIT_NOT_FOUND, "not_found",
                             _json_mode(ctx, as_json)) from None
        except MailboxError as exc:
            raise CliFailure(_hint(str(exc)), EXIT_FAILURE, type(exc).__name__,
                             _json_mode(ctx, as_json)) from None
        except redis.RedisError as exc:
            raise CliFailure(f"redis: {first_line(exc)}", EXIT_FAILURE, "redis",
                             _json_mode(ctx, as_json)) from None
        except sa_exc.SQLAlchemyError as exc:
            raise CliFailure(_hint(f"database: {first_line(exc)}"), EXIT_FAILURE, "database",
                             _json_mode(ctx, as_json)) from None


@click.group(cls=MailboxGroup, help=HELP)
@click.option("--database-url", envvar="MAILBOX_DATABASE_URL", default=None,
              help="SQLAlchemy URL (default: MAILBOX_DATABASE_URL, else SQLite under var/).")
@click.option("--redis-url", envvar="MAILBOX_REDIS_URL", default=None,
              help="Redis URL (default: MAILBOX_REDIS_URL, else the dev stack's Redis).")
@click.option("--namespace", envvar="MAILBOX_NAMESPACE", default="mailbox", show_default=True,
              help="Prefix of every Redis key and Celery queue.")
@click.option("--json", "as_json", is_flag=True, help="Machine output (JSON) for every command.")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, redis_url: str | None,
         namespace: str, as_json: bool) -> None:
    ctx.obj = CliState(database_url, redis_url, namespace, as_json)
