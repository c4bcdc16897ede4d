"""The operator's health commands: `stats`, `audit` and `db upgrade`.

They look at (or, for the schema, prepare) the whole system rather than one run or thread:
counts and queue age, the invariants checked on the live database and
Redis (exit 3 when one is violated), and the Alembic migrations. `db upgrade` works without
a Mailbox, straight on the database engine, since the schema may not exist yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import click
from rich.table import Table
from sqlalchemy import exc as sa_exc

from mailbox.audit import AuditReport, Finding, MailboxStats, audit, collect_stats, iso_ms
from mailbox.cli.common import (
    EXIT_USAGE,
    EXIT_VIOLATIONS,
    SECONDS,
    CliFailure,
    cli_state,
    emit_json,
    first_line,
    json_option,
    mailbox_for,
    make_console,
    record_table,
)
from mailbox.cli.group import main
from mailbox.schema import current_revision
from mailbox.settings import Settings


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


# ================================================================================== stats
@main.command(help="Counts by status, the oldest queued dispatch, threads with queued work, "
                   "runs waiting for a decision.")
@json_option
@click.pass_context
def stats(ctx: click.Context) -> None:
    box = mailbox_for(ctx)
    result = collect_stats(box)
    if cli_state(ctx).json:
        emit_json(result.to_json())
        return
    console = make_console()
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
        "this host's clock": _clock_line(result),
    }
    console.print(record_table("", summary))


def _clock_line(result: MailboxStats) -> str:
    if result.clock is None:
        return "- (Redis did not answer)"
    line = result.clock.describe()
    if result.clock_beyond_limit and result.clock_limit_ms is not None:
        return (f"[bold red]{line}: more than the {result.clock_limit_ms / 1000:g} s a host may "
                f"be off (MAILBOX_LEASE_MS / 6); synchronise the clocks[/]")
    return line


# ================================================================================== audit
def _findings_table(title: str, findings: Sequence[Finding], style: str) -> Table:
    table = Table(title=title, title_justify="left", title_style=style)
    for col in ("check", "count", "what", "sample"):
        table.add_column(col, overflow="fold")
    for f in findings:
        table.add_row(f.check, str(f.count), f.message, "\n".join(f.sample))
    return table


def _print_audit(report: AuditReport) -> None:
    console = make_console()
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


@main.command("audit", help="Check the invariants on the live database and "
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
    box = mailbox_for(ctx)
    report = audit(box, stuck_after_s=stuck_after_s, sample=sample)
    if cli_state(ctx).json:
        emit_json(report.to_json())
    else:
        _print_audit(report)
    if not report.ok:
        ctx.exit(EXIT_VIOLATIONS)


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

    state = cli_state(ctx)
    url = state.database_url or Settings.from_env().database_url
    try:
        engine = create_engine(url)
    except (ValueError, sa_exc.ArgumentError) as exc:
        raise CliFailure(f"bad database URL: {first_line(exc)}", EXIT_USAGE, "usage",
                         state.json) from None
    try:
        upgrade(engine)
        revision = current_revision(engine)
    finally:
        engine.dispose()
    if state.json:
        emit_json({"revision": revision})
    else:
        click.echo(f"database at revision {revision}")

