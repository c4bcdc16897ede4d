"""`python -m mailbox`: operator commands (DESIGN.md §7).

Run from the project root (or with it on PYTHONPATH) so that `mailbox` is this package.

Commands::

    submit THREAD AGENT INPUT   queue a run (INPUT is JSON, else a plain string)
    show ID                     a dispatch or a run, with its counterpart
    list THREAD                 a thread's dispatches in claim order
    follow RUN_ID               a run's live events
    cancel ID                   cancel a queued dispatch / stop a running one
    interrupt THREAD            "latest wins": supersede queued work, stop the running one
    resume RUN_ID DECISION      answer a run waiting for a human decision
    dlq list|replay|purge       the dead letter
    stats                       counts, queue age, waiting runs
    audit                       check the invariants of DESIGN.md §4.1 on the live system
    db upgrade                  run the migrations

Every command takes `--json` (before or after the command name) for machine output.

Exit codes:
    0  ok
    1  the operation failed (a MailboxError: validation, conflict, store unavailable, timeout)
    2  usage error (bad option, argument or value)
    3  `audit` found invariant violations
    4  not found (unknown dispatch or run id) or an expired event cursor

Errors are one line on stderr (`error: ...`, or a JSON object with `--json`), never a
traceback. Nothing here imports Celery at module import: a wake-up after a submit imports
`tasks.runtime` lazily, and a failed publish is only a warning — the dispatch is already
durable and the sweep of a running worker delivers it.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import exc as sa_exc

from mailbox.audit import AuditReport, Finding, audit, collect_stats, iso_ms, now_ms
from mailbox.errors import MailboxError, NotFoundError, StoreUnavailableError, ValidationError
from mailbox.events import CursorExpiredError, Event
from mailbox.facade import Mailbox, Receipt, check_text
from mailbox.model import MAX_MS, DispatchStatus, RunDispatch, RunRecord
from mailbox.schema import current_revision
from mailbox.settings import Settings, normalize_database_url

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_VIOLATIONS = 3
EXIT_NOT_FOUND = 4

FOLLOW_MAX_RECONNECTS = 10
SHOW_ITEMS = 20

F = TypeVar("F", bound=Callable[..., Any])

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
"""


# ================================================================================ plumbing
@dataclass
class _State:
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


def _state(ctx: click.Context) -> _State:
    obj = ctx.find_root().obj
    assert isinstance(obj, _State)
    return obj


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _hint(message: str) -> str:
    if "no such table" in message or ("relation" in message and "does not exist" in message):
        return f"{message} (is the schema created? run `python -m mailbox db upgrade`)"
    return message


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
        as_json = isinstance(ctx.obj, _State) and ctx.obj.json
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
            raise CliFailure(f"redis: {_first_line(exc)}", EXIT_FAILURE, "redis",
                             _json_mode(ctx, as_json)) from None
        except sa_exc.SQLAlchemyError as exc:
            raise CliFailure(_hint(f"database: {_first_line(exc)}"), EXIT_FAILURE, "database",
                             _json_mode(ctx, as_json)) from None


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


def _json_mode(ctx: click.Context, default: bool) -> bool:
    obj = ctx.find_root().obj
    return obj.json if isinstance(obj, _State) else default


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        _state(ctx).json = True
    return value


def json_option(func: F) -> F:
    """`--json` after the command name too (`python -m mailbox stats --json`)."""
    return click.option("--json", "json_output", is_flag=True, expose_value=False,
                        callback=_set_json, is_eager=True,
                        help="Machine output (JSON) instead of tables.")(func)


def _box(ctx: click.Context) -> Mailbox:
    """Connect on first use; closed when the command ends."""
    state = _state(ctx)
    if state.box is None:
        try:
            box = Mailbox.connect(state.database_url, state.redis_url,
                                  namespace=state.namespace)
        except (ValueError, sa_exc.ArgumentError) as exc:
            raise CliFailure(f"bad database URL: {_first_line(exc)}", EXIT_USAGE, "usage",
                             state.json) from None
        state.box = box
        ctx.find_root().call_on_close(box.close)
    return state.box


def _usage(ctx: click.Context, message: str) -> NoReturn:
    raise click.UsageError(message, ctx)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _parse_value(text: str) -> tuple[Any, bool]:
    """INPUT and DECISION arguments: JSON when they parse, else the plain string."""
    try:
        return json.loads(text), True
    except json.JSONDecodeError:
        return text, False


def _age(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms // 1000
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{ms / 1000:.1f}s"


def _cell(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and (
            key.endswith("_at") or key.endswith("_until")):
        return iso_ms(value) or "-"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _record_table(title: str, record: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in record.items():
        if value is not None:
            table.add_row(key, _cell(key, value))
    return table


# ---------------------------------------------------------------------------- wake-ups
def _publish_wakes(box: Mailbox, wakes: Iterable[tuple[str, int]]) -> str | None:
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
        from tasks.runtime import publish_wake

        for thread_id, delay_ms in wakes:
            publish_wake(thread_id, delay_ms)
    except Exception as exc:  # kombu/celery raise many types for an unreachable broker
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _wake_or_warn(box: Mailbox, wakes: Iterable[tuple[str, int]], what: str
                  ) -> dict[str, Any]:
    problem = _publish_wakes(box, wakes)
    if problem is not None:
        _warn(f"wake-up not published ({problem}); {what} stored durably and the sweep of "
              f"a running worker will deliver it")
    return {"published": problem is None, "warning": problem}


# ============================================================================ root group
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
    ctx.obj = _State(database_url, redis_url, namespace, as_json)


# ================================================================================ submit
def _wait_and_collect(box: Mailbox, dispatch_id: str, timeout_s: float) -> dict[str, Any]:
    dispatch = box.wait(dispatch_id, timeout_s)
    run = box.get_run(dispatch.run_id)
    return {"dispatch": dispatch.to_json(), "run": run.to_json() if run else None}


def _print_receipt(receipt: Receipt, verb: str) -> None:
    click.echo(f"{verb} dispatch {receipt.dispatch_id}")
    note = "  (resumed the run waiting for a decision)" if receipt.resumed else ""
    click.echo(f"  run     {receipt.run_id}{note}")
    click.echo(f"  thread  {receipt.thread_id}")


def _print_result(result: dict[str, Any]) -> None:
    console = _console()
    console.print(_record_table("dispatch", result["dispatch"]))
    if result.get("run"):
        console.print(_record_table("run", result["run"]))


@main.command(help="Queue a run of AGENT on THREAD. INPUT is parsed as JSON, falling back to "
                   "a plain string ('hello' and '\"hello\"' are the same input).")
@click.argument("thread", type=THREAD)
@click.argument("agent")
@click.argument("input_text", metavar="INPUT")
@click.option("--priority", type=click.IntRange(0, 255), default=128, show_default=True,
              help="0 is the highest.")
@click.option("--dedupe-key", default=None,
              help="Refuse the submit while a live dispatch of the thread holds this key.")
@click.option("--delay-ms", type=click.IntRange(min=0), default=0, show_default=True,
              help="Not claimable before this many milliseconds.")
@click.option("--max-attempts", type=click.IntRange(1, 1000), default=None,
              help="Attempt budget (default: MAILBOX_MAX_ATTEMPTS).")
@click.option("--interrupt", is_flag=True,
              help="Latest wins: supersede the thread's queued work and stop its running "
                   "run first.")
@click.option("--wait", "wait_s", type=SECONDS, default=None,
              metavar="SECONDS", help="Wait this long for the result and show it.")
@json_option
@click.pass_context
def submit(ctx: click.Context, thread: str, agent: str, input_text: str, priority: int,
           dedupe_key: str | None, delay_ms: int, max_attempts: int | None, interrupt: bool,
           wait_s: float | None) -> None:
    box = _box(ctx)
    value, parsed = _parse_value(input_text)
    try:
        receipt = box.submit(thread, agent, value, priority=priority, dedupe_key=dedupe_key,
                             delay_ms=delay_ms, max_attempts=max_attempts, interrupt=interrupt)
    except MailboxError as exc:
        if not parsed and input_text.lstrip()[:1] in ("{", "["):
            raise CliFailure(f"{exc} (INPUT is not valid JSON, so it was taken as a plain "
                             f"string)", EXIT_FAILURE, type(exc).__name__,
                             _state(ctx).json) from None
        raise
    wake = _wake_or_warn(box, [(receipt.thread_id, delay_ms)], f"dispatch "
                         f"{receipt.dispatch_id} is")
    _finish_submit(ctx, box, receipt, wake, wait_s, "queued")


def _finish_submit(ctx: click.Context, box: Mailbox, receipt: Receipt, wake: dict[str, Any],
                   wait_s: float | None, verb: str) -> None:
    out: dict[str, Any] = {"dispatch_id": receipt.dispatch_id, "run_id": receipt.run_id,
                           "thread_id": receipt.thread_id, "resumed": receipt.resumed,
                           "wake": wake}
    if not _state(ctx).json:
        _print_receipt(receipt, verb)
    if wait_s is not None:
        out.update(_wait_and_collect(box, receipt.dispatch_id, wait_s))
        if not _state(ctx).json:
            _print_result(out)
    if _state(ctx).json:
        _emit_json(out)


# ================================================================================== reads
def _load_pair(box: Mailbox, ident: str
               ) -> tuple[RunDispatch | None, RunRecord | None]:
    dispatch = box.get_dispatch(ident)
    if dispatch is not None:
        return dispatch, box.get_run(dispatch.run_id)
    run = box.get_run(ident)
    if run is None:
        raise NotFoundError(f"no dispatch or run with id {ident!r}")
    return (box.get_dispatch(run.dispatch_id) if run.dispatch_id else None), run


@main.command(help="Show a dispatch or a run (by either id) with its counterpart and the "
                   "run's input messages.")
@click.argument("ident", metavar="ID", type=ID)
@json_option
@click.pass_context
def show(ctx: click.Context, ident: str) -> None:
    box = _box(ctx)
    dispatch, run = _load_pair(box, ident)
    messages = box.runs.run_messages(run.run_id) if run is not None else []
    out = {
        "dispatch": dispatch.to_json() if dispatch else None,
        "run": run.to_json() if run else None,
        "messages": [{"seq": m.seq, "role": m.role, "content": m.content,
                      "created_at": m.created_at} for m in messages],
    }
    if _state(ctx).json:
        _emit_json(out)
        return
    console = _console()
    if dispatch is not None:
        console.print(_record_table("dispatch", dispatch.to_json()))
    else:
        console.print("dispatch: none (purged after retention)")
    console.print()
    if run is not None:
        console.print(_record_table("run", run.to_json()))
    else:
        console.print("run: none")
    if messages:
        console.print()
        table = Table(title="messages", title_justify="left")
        for col in ("seq", "role", "at", "content"):
            table.add_column(col, overflow="fold")
        for m in messages:
            table.add_row(str(m.seq), m.role, iso_ms(m.created_at) or "-",
                          m.content if isinstance(m.content, str) else json.dumps(m.content))
        console.print(table)


_STATUS_CHOICE = click.Choice([s.value for s in DispatchStatus], case_sensitive=False)


def _dispatch_table(title: str, rows: Sequence[RunDispatch]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("dispatch", "run", "status", "pri", "attempts", "epoch", "available",
                "updated", "last error"):
        table.add_column(col, overflow="fold")
    for d in rows:
        table.add_row(d.dispatch_id, d.run_id, d.status.value, str(d.priority),
                      f"{d.attempt_count}/{d.max_attempts}", str(d.dispatch_epoch),
                      iso_ms(d.available_at) or "-", iso_ms(d.updated_at) or "-",
                      d.last_error or "")
    return table


@main.command("list", help="A thread's dispatches in claim order (priority, then FIFO).")
@click.argument("thread", type=THREAD)
@click.option("--status", "statuses", multiple=True, type=_STATUS_CHOICE,
              help="Only these statuses (repeat the option for several).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@json_option
@click.pass_context
def list_(ctx: click.Context, thread: str, statuses: tuple[str, ...], limit: int,
          offset: int) -> None:
    box = _box(ctx)
    wanted = [DispatchStatus(s) for s in statuses] or None
    rows = box.store.list_dispatches(thread, wanted, limit=limit, offset=offset)
    if _state(ctx).json:
        _emit_json([d.to_json() for d in rows])
        return
    if not rows:
        click.echo(f"no dispatches on thread {thread}")
        return
    _console().print(_dispatch_table(f"thread {thread}", rows))


_CURSOR_RE = re.compile(r"^\d+(-\d+)?$")


def _check_cursor(_ctx: click.Context, _param: click.Parameter, value: str | None
                  ) -> str | None:
    if value is not None and not _CURSOR_RE.match(value):
        raise click.BadParameter(f"{value!r} is not an event id (like 1712345678901-0)")
    return value


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(event.to_json(), default=str))
        return
    data = "" if event.data is None else json.dumps(event.data, default=str)
    click.echo(f"{iso_ms(event.ts)}  {event.id:<17} {event.type:<15} {data}".rstrip())


def _is_final(event: Event) -> bool:
    """The run_finish that ends the run (or suspends it for a decision). A failed attempt
    that will be retried also ends with run_finish, marked `retrying`: keep following."""
    if event.type != "run_finish":
        return False
    return not (isinstance(event.data, dict) and event.data.get("status") == "retrying")


@main.command(help="Print a run's events as they come (from the start, or after --after). "
                   "Stops after the run's last run_finish (not a retried attempt's) unless "
                   "--no-stop; a dropped connection is resumed from the last event seen.")
@click.argument("run_id", type=RUN_ID)
@click.option("--after", "cursor", default=None, callback=_check_cursor, metavar="CURSOR",
              help="Resume after this event id.")
@click.option("--timeout", "timeout_s", type=SECONDS, default=None,
              metavar="SECONDS", help="Give up after this long (default: never).")
@click.option("--stop/--no-stop", default=True, show_default=True,
              help="Stop after the run's final run_finish event.")
@json_option
@click.pass_context
def follow(ctx: click.Context, run_id: str, cursor: str | None, timeout_s: float | None,
           stop: bool) -> None:
    box = _box(ctx)
    as_json = _state(ctx).json
    if box.get_run(run_id) is None:
        raise NotFoundError(f"no run with id {run_id!r}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last, failures, finished = cursor, 0, False
    try:
        while not finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                block_ms = 1000 if remaining is None else max(1, min(1000,
                                                                     int(remaining * 1000)))
                for event in box.events.follow(run_id, last, timeout_s=remaining,
                                               block_ms=block_ms, stop_after_finish=False):
                    _print_event(event, as_json)
                    last, failures = event.id, 0
                    if stop and _is_final(event):
                        finished = True
                        break
                if not finished:
                    break  # the timeout ended the stream
            except (redis.ConnectionError, redis.TimeoutError, StoreUnavailableError) as exc:
                failures += 1
                if failures > FOLLOW_MAX_RECONNECTS:
                    raise StoreUnavailableError(
                        f"event stream of run {run_id} unreachable after {failures - 1} "
                        f"reconnects ({_first_line(exc)}); resume with --after "
                        f"{last or '0-0'}") from None
                _warn(f"connection lost ({_first_line(exc)}); reconnecting after "
                      f"{last or 'the start'}")
                time.sleep(min(2.0, 0.05 * 2 ** failures))
    except KeyboardInterrupt:
        click.echo(f"stopped; resume with --after {last}" if last else "stopped", err=True)
        ctx.exit(130)
    if not finished and timeout_s is not None and not as_json:
        click.echo(f"timed out after {timeout_s:g}s" +
                   (f"; resume with --after {last}" if last else ""), err=True)


# ======================================================================== thread control
@main.command(help="Cancel a Queued dispatch (it ends Cancelled, its run done/cancelled), or "
                   "ask the worker running a Claimed one to stop. ID may be a run id: its "
                   "current dispatch is cancelled.")
@click.argument("ident", metavar="ID", type=ID)
@json_option
@click.pass_context
def cancel(ctx: click.Context, ident: str) -> None:
    box = _box(ctx)
    dispatch, _run = _load_pair(box, ident)
    if dispatch is None:
        raise MailboxError(f"run {ident} has no dispatch left to cancel")
    before = dispatch.status
    if not box.cancel(dispatch.dispatch_id):
        now = box.get_dispatch(dispatch.dispatch_id)
        status = now.status.value if now else "purged"
        raise MailboxError(f"dispatch {dispatch.dispatch_id} is {status}: nothing to cancel")
    after = box.get_dispatch(dispatch.dispatch_id)
    action = "cancelled" if after is not None and after.status == DispatchStatus.Cancelled \
        else "stop_requested"
    out = {"dispatch_id": dispatch.dispatch_id, "run_id": dispatch.run_id, "action": action,
           "status_before": before.value, "status": after.status.value if after else None}
    if _state(ctx).json:
        _emit_json(out)
    elif action == "cancelled":
        click.echo(f"cancelled dispatch {dispatch.dispatch_id} (run {dispatch.run_id})")
    else:
        click.echo(f"asked the worker running dispatch {dispatch.dispatch_id} to stop (run "
                   f"{dispatch.run_id} will end cancelled)")


@main.command(help="Latest wins: raise THREAD's epoch, supersede its queued dispatches (their "
                   "runs end cancelled) and stop the one running.")
@click.argument("thread", type=THREAD)
@json_option
@click.pass_context
def interrupt(ctx: click.Context, thread: str) -> None:
    box = _box(ctx)
    if not box.store.list_dispatches(thread, limit=1):
        raise NotFoundError(f"no thread {thread!r} (it has no dispatches)")
    result = box.interrupt(thread)
    active = result.active_dispatch.dispatch_id if result.active_dispatch else None
    out = {"thread_id": thread, "new_dispatch_epoch": result.new_dispatch_epoch,
           "superseded": [d.dispatch_id for d in result.superseded],
           "active_dispatch": active}
    if _state(ctx).json:
        _emit_json(out)
        return
    click.echo(f"thread {thread} now at epoch {result.new_dispatch_epoch}: "
               f"{len(result.superseded)} queued dispatch(es) superseded")
    if active:
        click.echo(f"asked the worker running dispatch {active} to stop")


@main.command(help="Answer a run waiting for a decision. DECISION is parsed as JSON, falling "
                   "back to a plain string.")
@click.argument("run_id", type=RUN_ID)
@click.argument("decision_text", metavar="DECISION")
@click.option("--wait", "wait_s", type=SECONDS, default=None,
              metavar="SECONDS", help="Wait this long for the result and show it.")
@json_option
@click.pass_context
def resume(ctx: click.Context, run_id: str, decision_text: str, wait_s: float | None) -> None:
    box = _box(ctx)
    decision, _ = _parse_value(decision_text)
    receipt = box.resume(run_id, decision)
    wake = _wake_or_warn(box, [(receipt.thread_id, 0)], f"dispatch {receipt.dispatch_id} is")
    _finish_submit(ctx, box, receipt, wake, wait_s, "resumed with")


# ========================================================================== dead letters
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_time(text: str) -> int:
    """A point in time: Unix milliseconds, ISO 8601 (naive means UTC), or an age such as
    `90s`, `15m`, `2h`, `3d` (that long ago). ValueError otherwise, also for a time before
    1970 or past what the store keeps (an age of 1e400 seconds is not a time)."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        ms = int(text)
    elif match := _RELATIVE.match(text):
        age = float(match.group(1)) * _UNIT_MS[match.group(2)]
        if not math.isfinite(age):
            raise ValueError(f"age {text!r} is too large")
        ms = now_ms() - int(age)
    else:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ms = int(parsed.timestamp() * 1000)
    if not 0 <= ms <= MAX_MS:
        raise ValueError(f"{text!r} is outside 0..{MAX_MS} Unix milliseconds")
    return ms


def _time_option(_ctx: click.Context, _param: click.Parameter, value: str | None
                 ) -> int | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a time: use Unix ms, ISO 8601 or an age "
                                 f"like 15m, 2h, 3d") from None


@dataclass(frozen=True)
class _Filters:
    thread: str | None
    agent: str | None
    error: str | None
    since: int | None
    until: int | None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.thread, self.agent, self.error, self.since,
                                           self.until))

    def query(self) -> dict[str, Any]:
        return {"thread_id": self.thread, "agent": self.agent, "error_contains": self.error,
                "since": self.since, "until": self.until}


def dlq_filters(func: F) -> F:
    for option in reversed([
        click.option("--thread", default=None, type=THREAD, help="Only this thread."),
        click.option("--agent", default=None, help="Only runs of this agent (name)."),
        click.option("--error", default=None, help="Only errors containing this text."),
        click.option("--since", default=None, callback=_time_option, metavar="TIME",
                     help="Died at or after (Unix ms, ISO 8601, or an age like 2h)."),
        click.option("--until", default=None, callback=_time_option, metavar="TIME",
                     help="Died before (same forms)."),
    ]):
        func = option(func)
    return func


def _filters(thread: str | None, agent: str | None, error: str | None, since: int | None,
             until: int | None) -> _Filters:
    return _Filters(thread, agent, error, since, until)


def _dlq_table(rows: Sequence[RunDispatch]) -> Table:
    table = Table(title="dead letters", title_justify="left")
    for col in ("dispatch", "thread", "run", "attempts", "died", "error"):
        table.add_column(col, overflow="fold")
    for d in rows:
        table.add_row(d.dispatch_id, d.thread_id, d.run_id,
                      f"{d.attempt_count}/{d.max_attempts}", iso_ms(d.completed_at) or "-",
                      d.last_error or d.run_error or "")
    return table


@main.group(help="The dead letter: list, replay, purge.")
def dlq() -> None:
    pass


@dlq.command("list", help="Dead letters, newest first.")
@dlq_filters
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@json_option
@click.pass_context
def dlq_list(ctx: click.Context, thread: str | None, agent: str | None, error: str | None,
             since: int | None, until: int | None, limit: int, offset: int) -> None:
    box = _box(ctx)
    rows = box.dead_letters(**_filters(thread, agent, error, since, until).query(),
                            limit=limit, offset=offset)
    if _state(ctx).json:
        _emit_json([d.to_json() for d in rows])
        return
    if not rows:
        click.echo("no dead letters match")
        return
    _console().print(_dlq_table(rows))


def _select_all(box: Mailbox, filters: _Filters, batch_size: int) -> list[str]:
    """Every matching dead letter's id, read in pages before anything changes.

    `until` is pinned to now, so what dies meanwhile (a replay that fails again) cannot slide
    into the pages and be taken twice.
    """
    query = filters.query()
    if query["until"] is None:
        query["until"] = now_ms() + 1
    ids: list[str] = []
    while True:
        page = box.dead_letters(**query, limit=batch_size, offset=len(ids))
        ids.extend(d.dispatch_id for d in page)
        if len(page) < batch_size:
            return list(dict.fromkeys(ids))


def _selection(ctx: click.Context, box: Mailbox, ids: tuple[str, ...], all_: bool,
               filters: _Filters, batch_size: int) -> list[str]:
    if ids and all_:
        _usage(ctx, "give dispatch ids or --all, not both")
    if not ids and not all_:
        _usage(ctx, "give dispatch ids, or --all (with optional filters)")
    if filters.any and not all_:
        _usage(ctx, "filters (--thread, --agent, --error, --since, --until) go with --all")
    return _select_all(box, filters, batch_size) if all_ else list(dict.fromkeys(ids))


def _progress(total: int, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=_console(stderr=True),
                    disable=not enabled or total < 2)


def _finish_bulk(ctx: click.Context, failures: list[dict[str, str]], done: int,
                 verb: str) -> None:
    """Report what failed; exit 4 when every failure is an unknown id, else 1."""
    if not failures:
        return
    code = EXIT_NOT_FOUND if all(f["kind"] == "not_found" for f in failures) else EXIT_FAILURE
    as_json = _state(ctx).json
    if not as_json and done == 0 and len(failures) == 1:
        raise CliFailure(failures[0]["error"], code, failures[0]["kind"], False)
    if not as_json:
        for failure in failures[:SHOW_ITEMS]:
            click.echo(f"{verb} {failure['dispatch_id']}: {failure['error']}", err=True)
        if len(failures) > SHOW_ITEMS:
            click.echo(f"... and {len(failures) - SHOW_ITEMS} more", err=True)
    ctx.exit(code)


@dlq.command("replay", help="Run dead letters again: each becomes a new run with a fresh "
                            "dispatch and attempt budget. Refused when the thread was "
                            "interrupted since, unless --force.")
@click.argument("ids", nargs=-1, type=DISPATCH_ID)
@click.option("--all", "all_", is_flag=True, help="Every dead letter matching the filters.")
@dlq_filters
@click.option("--force", is_flag=True, help="Replay even where the thread moved on.")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Rows per page when selecting, wake-ups per publish round.")
@json_option
@click.pass_context
def dlq_replay(ctx: click.Context, ids: tuple[str, ...], all_: bool, thread: str | None,
               agent: str | None, error: str | None, since: int | None, until: int | None,
               force: bool, batch_size: int) -> None:
    box = _box(ctx)
    as_json = _state(ctx).json
    selected = _selection(ctx, box, ids, all_, _filters(thread, agent, error, since, until),
                          batch_size)
    replayed: list[dict[str, str]] = []
    failures: list[dict[str, str]] = []
    wake_problem: str | None = None
    with _progress(len(selected), not as_json) as progress:
        task = progress.add_task("replaying", total=len(selected))
        for start in range(0, len(selected), batch_size):
            threads: dict[str, None] = {}
            for dispatch_id in selected[start:start + batch_size]:
                try:
                    receipt = box.replay(dispatch_id, force=force)
                except NotFoundError:
                    failures.append({"dispatch_id": dispatch_id, "kind": "not_found",
                                     "error": f"no dispatch with id {dispatch_id!r}"})
                except MailboxError as exc:
                    failures.append({"dispatch_id": dispatch_id, "kind": type(exc).__name__,
                                     "error": str(exc)})
                else:
                    replayed.append({"dispatch_id": dispatch_id,
                                     "new_dispatch_id": receipt.dispatch_id,
                                     "run_id": receipt.run_id,
                                     "thread_id": receipt.thread_id})
                    threads[receipt.thread_id] = None
                progress.advance(task)
            if wake_problem is None and threads:
                wake_problem = _publish_wakes(box, [(t, 0) for t in threads])
    if wake_problem is not None:
        _warn(f"wake-ups not published ({wake_problem}); the replayed dispatches are stored "
              f"durably and the sweep of a running worker will deliver them")
    if as_json:
        _emit_json({"selected": len(selected), "replayed": replayed, "failed": failures,
                    "wake": {"published": wake_problem is None, "warning": wake_problem}})
    else:
        for item in replayed[:SHOW_ITEMS]:
            click.echo(f"replayed {item['dispatch_id']} as dispatch {item['new_dispatch_id']}"
                       f" (run {item['run_id']})")
        if len(replayed) > SHOW_ITEMS:
            click.echo(f"... and {len(replayed) - SHOW_ITEMS} more")
        if not selected:
            click.echo("no dead letters match")
        elif len(selected) > 1:
            click.echo(f"replayed {len(replayed)} of {len(selected)} dead letter(s)")
    _finish_bulk(ctx, failures, len(replayed), "not replayed")


@dlq.command("purge", help="Delete dead letters for good (their runs stay, done). Needs "
                           "--yes.")
@click.argument("ids", nargs=-1, type=DISPATCH_ID)
@click.option("--all", "all_", is_flag=True, help="Every dead letter matching the filters.")
@dlq_filters
@click.option("--yes", is_flag=True, help="Really delete.")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Rows per page when selecting and per delete.")
@json_option
@click.pass_context
def dlq_purge(ctx: click.Context, ids: tuple[str, ...], all_: bool, thread: str | None,
              agent: str | None, error: str | None, since: int | None, until: int | None,
              yes: bool, batch_size: int) -> None:
    box = _box(ctx)
    as_json = _state(ctx).json
    selected = _selection(ctx, box, ids, all_, _filters(thread, agent, error, since, until),
                          batch_size)
    failures: list[dict[str, str]] = []
    if not all_:
        keep: list[str] = []
        for dispatch_id in selected:
            found = box.get_dispatch(dispatch_id)
            if found is None:
                failures.append({"dispatch_id": dispatch_id, "kind": "not_found",
                                 "error": f"no dispatch with id {dispatch_id!r}"})
            elif found.status != DispatchStatus.DeadLetter:
                failures.append({"dispatch_id": dispatch_id, "kind": "ValidationError",
                                 "error": f"dispatch is {found.status.value}, not a dead "
                                          f"letter"})
            else:
                keep.append(dispatch_id)
        selected = keep
    if selected and not yes:
        if sys.stdin.isatty() and not as_json:
            click.confirm(f"delete {len(selected)} dead letter(s) for good?", abort=True,
                          err=True)
        else:
            _usage(ctx, f"refusing to delete {len(selected)} dead letter(s) without --yes")
    purged = 0
    with _progress(len(selected), not as_json) as progress:
        task = progress.add_task("purging", total=len(selected))
        for start in range(0, len(selected), batch_size):
            chunk = selected[start:start + batch_size]
            purged += box.purge_dead_letters(chunk)
            progress.advance(task, len(chunk))
    if as_json:
        _emit_json({"selected": len(selected) + len(failures), "purged": purged,
                    "failed": failures})
    else:
        click.echo(f"purged {purged} dead letter(s)" if selected or not failures
                   else "purged nothing")
    _finish_bulk(ctx, failures, purged, "not purged")


# ============================================================================ operations
@main.command(help="Counts by status, the oldest queued dispatch, threads with queued work, "
                   "runs waiting for a decision.")
@json_option
@click.pass_context
def stats(ctx: click.Context) -> None:
    box = _box(ctx)
    result = collect_stats(box)
    if _state(ctx).json:
        _emit_json(result.to_json())
        return
    console = _console()
    table = Table(title=f"dispatches ({box.settings.namespace})", title_justify="left")
    table.add_column("status")
    table.add_column("count", justify="right")
    for status, n in result.counts.items():
        table.add_row(status, str(n))
    console.print(table)
    oldest = (f"{_age(result.oldest_queued_age_ms)} (queued {iso_ms(result.oldest_queued_at)})"
              if result.oldest_queued_at is not None else "-")
    summary = {
        "oldest queued": oldest,
        "threads with queued work": str(result.threads_with_queued),
        "queued and due now": str(result.due_now),
        "runs waiting for a decision": str(result.runs_waiting),
        "runs by status": ", ".join(f"{k} {v}" for k, v in result.runs_by_status.items()),
    }
    console.print(_record_table("", summary))


def _findings_table(title: str, findings: Sequence[Finding], style: str) -> Table:
    table = Table(title=title, title_justify="left", title_style=style)
    for col in ("check", "count", "what", "sample"):
        table.add_column(col, overflow="fold")
    for f in findings:
        table.add_row(f.check, str(f.count), f.message, "\n".join(f.sample))
    return table


def _print_audit(report: AuditReport) -> None:
    console = _console()
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    console.print(f"audit of namespace {report.namespace} at {iso_ms(report.checked_at)}: "
                  f"{counts}")
    if report.violations:
        console.print(_findings_table("violations", report.violations, "bold red"))
    if report.warnings:
        console.print(_findings_table("warnings", report.warnings, "yellow"))
    verdict = "ok: no invariant violations" if report.ok else \
        f"FAILED: {len(report.violations)} invariant violation(s)"
    console.print(f"{verdict}, {len(report.warnings)} warning(s) ({len(report.checks)} checks)")


@main.command("audit", help="Check the invariants of DESIGN.md §4.1 on the live database and "
                            "Redis (read-only). Exit 3 when any is violated; warnings (work "
                            "the sweep repairs) keep exit 0.")
@click.option("--stuck-after", "stuck_after_s", type=SECONDS, default=None,
              metavar="SECONDS",
              help="A lease expired this long ago is stuck (default: two sweep intervals).")
@click.option("--sample", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Ids listed per finding.")
@json_option
@click.pass_context
def audit_cmd(ctx: click.Context, stuck_after_s: float | None, sample: int) -> None:
    box = _box(ctx)
    report = audit(box, stuck_after_s=stuck_after_s, sample=sample)
    if _state(ctx).json:
        _emit_json(report.to_json())
    else:
        _print_audit(report)
    if not report.ok:
        ctx.exit(EXIT_VIOLATIONS)


# ===================================================================================== up
@main.command(help="Run the development stack in the foreground: an embedded Redis (unless "
                   "MAILBOX_REDIS_URL is set), the database under var/ (or MAILBOX_DATABASE_URL), "
                   "a worker, beat and Flower. Ctrl-C stops everything it started.")
@click.option("-c", "--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
def up(concurrency: int, no_flower: bool) -> None:
    from mailbox.dev.stack import DevStack

    stack = DevStack(concurrency=concurrency, flower=not no_flower)
    try:
        stack.start(say=click.echo)
        for name, url in stack.urls().items():
            if name != "flower" or not no_flower:
                click.echo(f"{name:<20}{url}")
        click.echo("running; press Ctrl-C to stop")
        stack.wait_forever()
    finally:
        stack.stop()


@main.command(help="Start the dev stack, push a demo workload through dispatch.delay(), show "
                   "a summary (what `make demo` runs).")
def demo() -> None:
    from mailbox.dev.demo import run as run_demo

    sys.exit(run_demo())


# ===================================================================================== db
@main.group(help="Database schema commands.")
def db() -> None:
    pass


@db.command("upgrade", help="Run the Alembic migrations up to head.")
@json_option
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    from mailbox.database import create_engine
    from mailbox.schema import upgrade

    state = _state(ctx)
    url = state.database_url or Settings.from_env().database_url
    try:
        engine = create_engine(url)
    except (ValueError, sa_exc.ArgumentError) as exc:
        raise CliFailure(f"bad database URL: {_first_line(exc)}", EXIT_USAGE, "usage",
                         state.json) from None
    try:
        upgrade(engine)
        revision = current_revision(engine)
    finally:
        engine.dispose()
    if state.json:
        _emit_json({"revision": revision})
    else:
        click.echo(f"database at revision {revision}")


def run() -> None:
    """Entry point of `python -m mailbox`."""
    try:
        main(standalone_mode=True, prog_name="python -m mailbox")
    except MailboxError as exc:  # the group converts these; a last line of defence
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
