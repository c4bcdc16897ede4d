"""The dead letter commands: `dlq list`, `dlq replay`, `dlq purge`.

Dispatches that used up their attempts wait in the dead letter until an operator looks at
them, runs them again or deletes them. The three commands share a filter grammar (thread,
agent, error text, a time window given as Unix ms, ISO 8601 or an age) and, for the bulk
`replay` and `purge`, one way to select ids (given ids, or `--all` read in pages before
anything changes) and to report partial failures (exit 4 when every failure is an unknown
id, else 1). That machinery serves only them, so it lives here with them.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
from rich.table import Table

from mailbox.audit import iso_ms, now_ms
from mailbox.cli.common import (
    DISPATCH_ID,
    EXIT_FAILURE,
    EXIT_NOT_FOUND,
    THREAD,
    CliFailure,
    F,
    cli_state,
    emit_json,
    json_option,
    mailbox_for,
    make_console,
    progress_bar,
    publish_wakes,
    usage_error,
    warn,
)
from mailbox.cli.group import main
from mailbox.errors import MailboxError, NotFoundError
from mailbox.facade import MAX_LIST_LIMIT, Mailbox
from mailbox.model import MAX_MS, DispatchStatus, RunDispatch

SHOW_ITEMS = 20

# ================================================================================= filters
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


# ================================================================================ commands
@main.group(help="The dead letter: list, replay, purge.")
def dlq() -> None:
    pass


@dlq.command("list", help="Dead letters, newest first.")
@dlq_filters
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=50,
              show_default=True,
              help=f"Rows to show (at most {MAX_LIST_LIMIT}; page with --offset).")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@json_option
@click.pass_context
def dlq_list(ctx: click.Context, thread: str | None, agent: str | None, error: str | None,
             since: int | None, until: int | None, limit: int, offset: int) -> None:
    box = mailbox_for(ctx)
    rows = box.dead_letters(**_filters(thread, agent, error, since, until).query(),
                            limit=limit, offset=offset)
    if cli_state(ctx).json:
        emit_json([d.to_json() for d in rows])
        return
    if not rows:
        click.echo("no dead letters match")
        return
    make_console().print(_dlq_table(rows))


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
        usage_error(ctx, "give dispatch ids or --all, not both")
    if not ids and not all_:
        usage_error(ctx, "give dispatch ids, or --all (with optional filters)")
    if filters.any and not all_:
        usage_error(ctx, "filters (--thread, --agent, --error, --since, --until) go with --all")
    return _select_all(box, filters, batch_size) if all_ else list(dict.fromkeys(ids))


def _finish_bulk(ctx: click.Context, failures: list[dict[str, str]], done: int,
                 verb: str) -> None:
    """Report what failed; exit 4 when every failure is an unknown id, else 1."""
    if not failures:
        return
    code = EXIT_NOT_FOUND if all(f["kind"] == "not_found" for f in failures) else EXIT_FAILURE
    as_json = cli_state(ctx).json
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
@click.option("--batch-size", type=click.IntRange(1, MAX_LIST_LIMIT), default=100,
              show_default=True,
              help="Rows per page when selecting, wake-ups per publish round.")
@json_option
@click.pass_context
def dlq_replay(ctx: click.Context, ids: tuple[str, ...], all_: bool, thread: str | None,
               agent: str | None, error: str | None, since: int | None, until: int | None,
               force: bool, batch_size: int) -> None:
    box = mailbox_for(ctx)
    as_json = cli_state(ctx).json
    selected = _selection(ctx, box, ids, all_, _filters(thread, agent, error, since, until),
                          batch_size)
    replayed: list[dict[str, str]] = []
    failures: list[dict[str, str]] = []
    wake_problem: str | None = None
    with progress_bar(len(selected), not as_json) as progress:
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
                wake_problem = publish_wakes(box, [(t, 0) for t in threads])
    if wake_problem is not None:
        warn(f"wake-ups not published ({wake_problem}); the replayed dispatches are stored "
              f"durably and the sweep of a running worker will deliver them")
    if as_json:
        emit_json({"selected": len(selected), "replayed": replayed, "failed": failures,
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


@dlq.command("purge", help="Delete dead letters for good, each with its run, the run's input "
                           "and its event stream (unless another dispatch still needs the "
                           "run). Needs --yes.")
@click.argument("ids", nargs=-1, type=DISPATCH_ID)
@click.option("--all", "all_", is_flag=True, help="Every dead letter matching the filters.")
@dlq_filters
@click.option("--yes", is_flag=True, help="Really delete.")
@click.option("--batch-size", type=click.IntRange(1, MAX_LIST_LIMIT), default=100,
              show_default=True,
              help="Rows per page when selecting and per delete.")
@json_option
@click.pass_context
def dlq_purge(ctx: click.Context, ids: tuple[str, ...], all_: bool, thread: str | None,
              agent: str | None, error: str | None, since: int | None, until: int | None,
              yes: bool, batch_size: int) -> None:
    box = mailbox_for(ctx)
    as_json = cli_state(ctx).json
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
            usage_error(ctx, f"refusing to delete {len(selected)} dead letter(s) without --yes")
    purged = 0
    with progress_bar(len(selected), not as_json) as progress:
        task = progress.add_task("purging", total=len(selected))
        for start in range(0, len(selected), batch_size):
            chunk = selected[start:start + batch_size]
            purged += box.purge_dead_letters(chunk)
            progress.advance(task, len(chunk))
    if as_json:
        emit_json({"selected": len(selected) + len(failures), "purged": purged,
                    "failed": failures})
    else:
        click.echo(f"purged {purged} dead letter(s)" if selected or not failures
                   else "purged nothing")
    _finish_bulk(ctx, failures, purged, "not purged")

