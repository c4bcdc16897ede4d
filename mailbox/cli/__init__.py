"""`python -m mailbox`: operator commands (docs/architecture.md#facade).

Run from the project root (or with it on PYTHONPATH) so that `mailbox` is this package.

Commands::

    submit THREAD AGENT INPUT   queue a run (INPUT is JSON, else a plain string)
    submit --from-file F.jsonl  queue many (one JSON object per line; bulk, chunked)
    show ID                     a dispatch or a run, with its counterpart
    list THREAD                 a thread's dispatches in claim order
    thread THREAD               a thread's conversation (user, assistant, tool messages)
    follow RUN_ID               a run's live events
    cancel ID                   cancel a queued dispatch / stop a running one
    interrupt THREAD            "latest wins": supersede queued work, stop the running one
    resume RUN_ID DECISION      answer a run waiting for a human decision
    dlq list|replay|purge       the dead letter
    stats                       counts, queue age, waiting runs
    audit                       check the invariants on the live system
    db upgrade                  run the migrations
    serve                       the HTTP API (/v1) and the dashboard (/ui)

Every command takes `--json` (before or after the command name) for machine output.

Exit codes:
    0  ok
    1  the operation failed (a MailboxError: validation, conflict, store unavailable, timeout)
    2  usage error (bad option, argument or value)
    3  `audit` found invariant violations
    4  not found (unknown dispatch or run id) or an expired event cursor
    5  `submit`/`resume --wait`: the dispatch ended, but not Acked (Cancelled, Superseded,
       DeadLetter); the result is printed as usual and stderr says how it ended

Errors are one line on stderr (`error: ...`, or a JSON object with `--json`), never a
traceback. Nothing here imports Celery at module import: a wake-up after a submit imports
`tasks.runtime` lazily, and a failed publish is only a warning — the dispatch is already
durable and the sweep of a running worker delivers it.

The commands live in modules by group, each attaching to the root group when imported (this
package imports them all, so `main` is complete once `mailbox.cli` is)::

    group.py         the root group `main`: connection options, failures -> exit codes
    common.py        what the commands share: state, exit codes, argument types, --json,
                     output helpers, publishing wake-ups
    runs.py          submit, show, list, follow, cancel, interrupt, resume
    bulk_submit.py   submit --from-file (JSON lines through Mailbox.submit_many)
    dead_letters.py  dlq list|replay|purge
    operations.py    stats, audit, db upgrade
    dev_stack.py     up, demo
    serve.py         serve (the HTTP API and dashboard, mailbox/http)
"""

from __future__ import annotations

import sys

import click

# The command modules attach their commands to `main` when imported.
from mailbox.cli import dead_letters, dev_stack, operations, runs, serve  # noqa: F401
from mailbox.cli.common import EXIT_FAILURE
from mailbox.cli.group import main
from mailbox.errors import MailboxError

__all__ = ["main", "run"]


def run() -> None:
    """Entry point of `python -m mailbox`."""
    try:
        main(standalone_mode=True, prog_name="python -m mailbox")
    except MailboxError as exc:  # the group converts these; a last line of defence
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
