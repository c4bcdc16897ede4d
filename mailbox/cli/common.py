"""What every command of `python -m mailbox` shares, kept apart from the commands themselves.

The command modules (`runs`, `dead_letters`, `operations`, `dev_stack`) all need the same
plumbing: the exit codes and the one-line failure they end with, the per-invocation state
the root group creates (connection options, `--json`, the Mailbox connected on first use),
the argument types that refuse bad ids and durations before anything connects, the
`--json` option, the output helpers, and the wake-up publishing after a write. It lives
here, importing no command module and no Celery (`tasks.runtime` is imported lazily when a
wake-up is published), so any command module can import it without a cycle.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import exc as sa_exc

from mailbox.audit import iso_ms
from mailbox.errors import MailboxError, ValidationError
from mailbox.facade import Mailbox
from mailbox.model import check_text
from mailbox.settings import Settings, normalize_database_url

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_VIOLATIONS = 3
EXIT_NOT_FOUND = 4
EXIT_NOT_ACKED = 5  # `--wait`: the dispatch ended, but not Acked (how: on stderr)

F = TypeVar("F", bound=Callable[..., Any])


# ======================================================================= state and errors
@dataclass
class CliState:
    """One invocation's settings, kept as the root context's `obj`."""

    database_url: str | None
    redis_url: str | None
    namespace: str
    json: bool = False
    box: Mailbox | None = None


class CliFailure(click.ClickException):
    """A failure shown as one line on stderr (a JSON object in --json mode)."""

    def __init__(self, message: str, exit_code: int, kind: str, as_json: bool) -> None:
        super().__init__(message)
        # click declares exit_code per class; click's main reads it from the instance.
        self.__dict__["exit_code"] = exit_code
        self.kind = kind
        self.as_json = as_json

    def show(self, file: Any = None) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": self.message, "kind": self.kind,
                                   "exit_code": self.exit_code}), err=True)
        else:
            click.echo(f"error: {self.message}", err=True)


def cli_state(ctx: click.Context) -> CliState:
    """The invocation's state, set by the root group."""
    obj = ctx.find_root().obj
    assert isinstance(obj, CliState)
    return obj


def first_line(exc: BaseException) -> str:
    """An exception (or the driver error it wraps) as one line."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def usage_error(ctx: click.Context, message: str) -> NoReturn:
    raise click.UsageError(message, ctx)


# ========================================================================== param types
class Seconds(click.ParamType):  # type: ignore[type-arg]
    """A duration in seconds: a finite number >= 0. click's FloatRange lets "nan" and "inf"
    through (NaN compares false with every bound), and either breaks the loops that turn
    seconds into deadlines and milliseconds — or, for `submit --wait`, would be refused only
    after the dispatch was written."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a finite number of seconds >= 0", param, ctx)
        return seconds


SECONDS = Seconds()


class Ident(click.ParamType):  # type: ignore[type-arg]
    """A dispatch, run or thread id argument, checked before anything connects.

    The facade refuses the same values (blank, over 255 characters, NUL, a lone surrogate —
    which is what argv bytes that are not UTF-8 arrive as), but some commands read the store
    directly first, where the driver would raise its own error; here they are usage errors.
    Dispatch and run ids are the mailbox's own (UUIDs), so control characters are refused
    too: they could only garble the one-line error that echoes the id. Thread ids are the
    application's and may hold any text.
    """

    def __init__(self, what: str, printable: bool) -> None:
        self.name = what
        self.printable = printable

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            text = str(check_text(self.name, value))
        except ValidationError as exc:
            self.fail(exc.message, param, ctx)
        if self.printable and not text.isprintable():
            self.fail(f"{self.name} {text!r} holds control characters", param, ctx)
        return text


ID = Ident("id", printable=True)
RUN_ID = Ident("run id", printable=True)
DISPATCH_ID = Ident("dispatch id", printable=True)
THREAD = Ident("thread", printable=False)


# ========================================================================= --json option
def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        cli_state(ctx).json = True
    return value


def json_option(func: F) -> F:
    """`--json` after the command name too (`python -m mailbox stats --json`)."""
    return click.option("--json", "json_output", is_flag=True, expose_value=False,
                        callback=_set_json, is_eager=True,
                        help="Machine output (JSON) instead of tables.")(func)


# ============================================================================ connection
def mailbox_for(ctx: click.Context) -> Mailbox:
    """Connect on first use; closed when the command ends."""
    state = cli_state(ctx)
    if state.box is None:
        try:
            box = Mailbox.connect(state.database_url, state.redis_url,
                                  namespace=state.namespace)
        except (ValueError, sa_exc.ArgumentError) as exc:
            raise CliFailure(f"bad database URL: {first_line(exc)}", EXIT_USAGE, "usage",
                             state.json) from None
        state.box = box
        ctx.find_root().call_on_close(box.close)
    return state.box


# ================================================================================ output
def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def make_console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr), 160 columns wide when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _cell(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and (
            key.endswith("_at") or key.endswith("_until")):
        return iso_ms(value) or "-"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def record_table(title: str, record: dict[str, Any]) -> Table:
    """A record as key/value rows (None values left out, `*_at` times as ISO 8601)."""
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in record.items():
        if value is not None:
            table.add_row(key, _cell(key, value))
    return table


# ============================================================================== wake-ups
def publish_wakes(box: Mailbox, wakes: Iterable[tuple[str, int]]) -> str | None:
    """Publish wake-ups through the Celery app; the reason when they were not published.

    `tasks.runtime` sends to the queue of the namespace that the MAILBOX_* environment names
    (the Celery app reads nothing else), so a command pointed elsewhere by its options would
    wake the wrong workers: then we publish nothing and say so.
    """
    wakes = list(wakes)
    if not wakes:
        return None
    try:
        env = Settings.from_env()
    except MailboxError as exc:
        return f"the MAILBOX_* environment is invalid ({exc})"
    ours = (box.settings.namespace, box.settings.redis_url,
            normalize_database_url(box.settings.database_url))
    theirs = (env.namespace, env.redis_url, normalize_database_url(env.database_url))
    if ours != theirs:
        return ("the --namespace/--redis-url/--database-url options differ from the MAILBOX_* "
                "environment the Celery app reads, so a wake-up would reach the wrong workers")
    try:
        from tasks.publishing import publish_wakes

        # grouped, over one broker connection (a bulk submit wakes every thread once)
        publish_wakes(box.settings.namespace, wakes)
    except Exception as exc:  # kombu/celery raise many types for an unreachable broker
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


def progress_bar(total: int, enabled: bool) -> Progress:
    """A progress bar on stderr for long bulk commands: off in --json mode, for one item,
    and when stderr is not a terminal (a log file would keep only its last frame)."""
    console = make_console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console,
                    disable=not enabled or total < 2 or not console.is_terminal)


def wake_or_warn(box: Mailbox, wakes: Iterable[tuple[str, int]], what: str
                 ) -> dict[str, Any]:
    """Publish the wake-ups, or warn that `what` is durable anyway; the `wake` JSON field."""
    problem = publish_wakes(box, wakes)
    if problem is not None:
        warn(f"wake-up not published ({problem}); {what} stored durably and the sweep of "
             f"a running worker will deliver it")
    return {"published": problem is None, "warning": problem}
