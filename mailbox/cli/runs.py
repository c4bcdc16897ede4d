"""The commands on runs and threads: submit, show, list, follow, cancel, interrupt, resume.

They are the day-to-day of an operator (docs/architecture.md#facade): queue a run, look at a
dispatch or a
run, a thread's queue, a run's live events, and steer a thread (cancel, "latest wins",
answer a run waiting for a decision). Their helpers (receipts, the dispatch table, the
event cursor) serve only them, so they stay private here; what other command groups share
comes from `common`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import IO, Any

import click
import redis
from rich.table import Table

from mailbox.audit import iso_ms
from mailbox.cli.bulk_submit import submit_file
from mailbox.cli.common import (
    EXIT_FAILURE,
    EXIT_NOT_ACKED,
    ID,
    RUN_ID,
    SECONDS,
    THREAD,
    CliFailure,
    cli_state,
    emit_json,
    first_line,
    json_option,
    mailbox_for,
    make_console,
    record_table,
    usage_error,
    wake_or_warn,
    warn,
)
from mailbox.cli.group import main
from mailbox.errors import MailboxError, NotFoundError, StoreUnavailableError
from mailbox.events import Event
from mailbox.facade import MAX_LIST_LIMIT, Mailbox, Receipt
from mailbox.model import DispatchStatus, RunDispatch, RunRecord

FOLLOW_MAX_RECONNECTS = 10


def _parse_value(text: str) -> tuple[Any, bool]:
    """INPUT and DECISION arguments: JSON when they parse, else the plain string."""
    try:
        return json.loads(text), True
    except json.JSONDecodeError:
        return text, False


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
    console = make_console()
    console.print(record_table("dispatch", result["dispatch"]))
    if result.get("run"):
        console.print(record_table("run", result["run"]))


@main.command(help="Queue a run of AGENT on THREAD. INPUT is parsed as JSON, falling back to "
                   "a plain string ('hello' and '\"hello\"' are the same input). With "
                   "--from-file, queue every line of a JSON-lines file instead.")
@click.argument("thread", type=THREAD, required=False)
@click.argument("agent", required=False)
@click.argument("input_text", metavar="INPUT", required=False)
@click.option("--from-file", "from_file", type=click.File("r", encoding="utf-8"),
              default=None, metavar="ITEMS.jsonl",
              help="One JSON object per line with thread_id, agent, input and optional "
                   "priority, dedupe_key, delay_ms, max_attempts ('-' reads stdin). Every "
                   "line is checked before anything is written; then each chunk is one "
                   "transaction, and each thread gets one wake-up. --priority, --delay-ms "
                   "and --max-attempts give defaults for lines that leave them out.")
@click.option("--chunk-size", type=click.IntRange(1, MAX_LIST_LIMIT), default=500,
              show_default=True, help="With --from-file: items per transaction.")
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
def submit(ctx: click.Context, thread: str | None, agent: str | None, input_text: str | None,
           from_file: IO[str] | None, chunk_size: int, priority: int, dedupe_key: str | None,
           delay_ms: int, max_attempts: int | None, interrupt: bool,
           wait_s: float | None) -> None:
    if from_file is not None:
        if thread is not None or dedupe_key or interrupt or wait_s is not None:
            usage_error(ctx, "--from-file takes no THREAD AGENT INPUT, --dedupe-key, "
                             "--interrupt or --wait (put dedupe_key in the lines)")
        defaults = {"priority": priority, "delay_ms": delay_ms,
                    **({"max_attempts": max_attempts} if max_attempts is not None else {})}
        submit_file(ctx, mailbox_for(ctx), from_file, defaults, chunk_size)
        return
    if thread is None or agent is None or input_text is None:
        usage_error(ctx, "give THREAD AGENT INPUT, or --from-file ITEMS.jsonl")
    box = mailbox_for(ctx)
    value, parsed = _parse_value(input_text)
    try:
        receipt = box.submit(thread, agent, value, priority=priority, dedupe_key=dedupe_key,
                             delay_ms=delay_ms, max_attempts=max_attempts, interrupt=interrupt)
    except MailboxError as exc:
        if not parsed and input_text.lstrip()[:1] in ("{", "["):
            raise CliFailure(f"{exc} (INPUT is not valid JSON, so it was taken as a plain "
                             f"string)", EXIT_FAILURE, type(exc).__name__,
                             cli_state(ctx).json) from None
        raise
    wake = wake_or_warn(box, [(receipt.thread_id, delay_ms)], f"dispatch "
                        f"{receipt.dispatch_id} is")
    _finish_submit(ctx, box, receipt, wake, wait_s, "queued")


def _finish_submit(ctx: click.Context, box: Mailbox, receipt: Receipt, wake: dict[str, Any],
                   wait_s: float | None, verb: str) -> None:
    out: dict[str, Any] = {"dispatch_id": receipt.dispatch_id, "run_id": receipt.run_id,
                           "thread_id": receipt.thread_id, "resumed": receipt.resumed,
                           "wake": wake}
    if not cli_state(ctx).json:
        _print_receipt(receipt, verb)
    if wait_s is not None:
        out.update(_wait_and_collect(box, receipt.dispatch_id, wait_s))
        if not cli_state(ctx).json:
            _print_result(out)
    if cli_state(ctx).json:
        emit_json(out)
    if wait_s is not None and out["dispatch"]["status"] != DispatchStatus.Acked.value:
        dispatch = out["dispatch"]
        why = f": {dispatch['last_error']}" if dispatch.get("last_error") else ""
        raise CliFailure(f"dispatch {receipt.dispatch_id} ended {dispatch['status']}{why}",
                         EXIT_NOT_ACKED, "not_acked", cli_state(ctx).json)


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
                   "run's messages (its input, its answer).")
@click.argument("ident", metavar="ID", type=ID)
@json_option
@click.pass_context
def show(ctx: click.Context, ident: str) -> None:
    box = mailbox_for(ctx)
    dispatch, run = _load_pair(box, ident)
    messages = box.runs.run_messages(run.run_id) if run is not None else []
    out = {
        "dispatch": dispatch.to_json() if dispatch else None,
        "run": run.to_json() if run else None,
        "messages": [{"seq": m.seq, "role": m.role, "content": m.content,
                      "created_at": m.created_at} for m in messages],
    }
    if cli_state(ctx).json:
        emit_json(out)
        return
    console = make_console()
    if dispatch is not None:
        console.print(record_table("dispatch", dispatch.to_json()))
    else:
        console.print("dispatch: none (purged after retention)")
    console.print()
    if run is not None:
        console.print(record_table("run", run.to_json()))
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
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=50,
              show_default=True,
              help=f"Rows to show (at most {MAX_LIST_LIMIT}; page with --offset).")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@json_option
@click.pass_context
def list_(ctx: click.Context, thread: str, statuses: tuple[str, ...], limit: int,
          offset: int) -> None:
    box = mailbox_for(ctx)
    wanted = [DispatchStatus(s) for s in statuses] or None
    rows = box.store.list_dispatches(thread, wanted, limit=limit, offset=offset)
    if cli_state(ctx).json:
        emit_json([d.to_json() for d in rows])
        return
    if not rows:
        click.echo(f"no dispatches on thread {thread}")
        return
    make_console().print(_dispatch_table(f"thread {thread}", rows))


@main.command(help="A thread's conversation, oldest first: each run's messages together, runs "
                   "in the order their input arrived. Page back with --before (the first "
                   "seq shown).")
@click.argument("thread", type=THREAD)
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=50,
              show_default=True, help=f"Messages to show (at most {MAX_LIST_LIMIT}).")
@click.option("--before", type=click.IntRange(min=1), default=None, metavar="SEQ",
              help="Show the messages before this one.")
@json_option
@click.pass_context
def thread(ctx: click.Context, thread: str, limit: int, before: int | None) -> None:
    box = mailbox_for(ctx)
    page = box.thread_messages(thread, limit=limit, before=before)
    if cli_state(ctx).json:
        emit_json([m.to_json() for m in page])
        return
    if not page:
        click.echo(f"no messages on thread {thread}")
        return
    table = Table(title=f"thread {thread}", title_justify="left")
    for col in ("seq", "when", "role", "run", "content"):
        table.add_column(col, overflow="fold")
    for m in page:
        content = m.content if isinstance(m.content, str) else json.dumps(m.content)
        table.add_row(str(m.seq), iso_ms(m.created_at) or "-", m.role, m.run_id, content)
    make_console().print(table)
    if len(page) == limit:
        click.echo(f"older messages: --before {page[0].seq}")


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
    box = mailbox_for(ctx)
    as_json = cli_state(ctx).json
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
                        f"reconnects ({first_line(exc)}); resume with --after "
                        f"{last or '0-0'}") from None
                warn(f"connection lost ({first_line(exc)}); reconnecting after "
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
    box = mailbox_for(ctx)
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
    if cli_state(ctx).json:
        emit_json(out)
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
    box = mailbox_for(ctx)
    if not box.store.list_dispatches(thread, limit=1):
        raise NotFoundError(f"no thread {thread!r} (it has no dispatches)")
    result = box.interrupt(thread)
    active = result.active_dispatch.dispatch_id if result.active_dispatch else None
    out = {"thread_id": thread, "new_dispatch_epoch": result.new_dispatch_epoch,
           "superseded": [d.dispatch_id for d in result.superseded],
           "active_dispatch": active}
    if cli_state(ctx).json:
        emit_json(out)
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
    box = mailbox_for(ctx)
    decision, _ = _parse_value(decision_text)
    receipt = box.resume(run_id, decision)
    wake = wake_or_warn(box, [(receipt.thread_id, 0)], f"dispatch {receipt.dispatch_id} is")
    _finish_submit(ctx, box, receipt, wake, wait_s, "resumed with")

