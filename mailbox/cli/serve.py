"""`python -m mailbox serve`: the HTTP API and the dashboard (mailbox/http).

Unlike the other commands it runs a server rather than one operation, and it writes through
the process's Mailbox that `dispatch.delay()` uses (tasks/runtime.py), which reads the
MAILBOX_* environment: the root group's connection options are exported to it first, so
`--database-url` and friends mean the same here as for every command.
"""

from __future__ import annotations

import os
from dataclasses import replace

import click

from mailbox.cli.common import cli_state
from mailbox.cli.group import main
from mailbox.settings import Settings


@main.command(help="Run the HTTP API (/v1) and the dashboard (/ui) on uvicorn. Needs "
                   "MAILBOX_API_TOKENS (comma-separated bearer tokens); "
                   "MAILBOX_API_HOST/MAILBOX_API_PORT say where (default 127.0.0.1:8000).")
@click.option("--host", default=None, help="Interface to listen on (default: MAILBOX_API_HOST, "
                                           "else 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port (default: MAILBOX_API_PORT, else 8000).")
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve without tokens, on a loopback address only (local development; "
                   "same as MAILBOX_API_INSECURE_NO_AUTH=1).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None,
          insecure_no_auth: bool) -> None:
    state = cli_state(ctx)
    for name, value in (("MAILBOX_DATABASE_URL", state.database_url),
                        ("MAILBOX_REDIS_URL", state.redis_url),
                        ("MAILBOX_NAMESPACE", state.namespace)):
        if value:
            os.environ[name] = value
    settings = Settings.from_env()
    if insecure_no_auth:
        settings = replace(settings, api_insecure_no_auth=True)
    from mailbox.http.server import serve as run_server

    run_server(settings, host or settings.api_host,
               settings.api_port if port is None else port, say=click.echo)
