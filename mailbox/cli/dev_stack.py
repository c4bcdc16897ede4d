"""The development stack commands: `up` and `demo`.

Unlike the other commands they start processes (an embedded Redis, a worker, beat, Flower)
rather than connect to a running mailbox, so they need no Mailbox and print no JSON. They
import `mailbox.dev` only when run: the other commands never load the dev tooling.
"""

from __future__ import annotations

import sys

import click

from mailbox.cli.group import main


@main.command(help="Run the development stack in the foreground: an embedded Redis (unless "
                   "MAILBOX_REDIS_URL is set), the database under var/ (or MAILBOX_DATABASE_URL), "
                   "a worker, beat, Flower and the HTTP API with its dashboard (its token is "
                   "printed, and kept in var/api.token). Ctrl-C stops everything it started.")
@click.option("-c", "--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option("--no-api", is_flag=True, help="Do not start the HTTP API and dashboard.")
def up(concurrency: int, no_flower: bool, no_api: bool) -> None:
    from mailbox.dev.stack import DevStack

    stack = DevStack(concurrency=concurrency, flower=not no_flower, api=not no_api)
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

