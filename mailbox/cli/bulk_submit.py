"""`submit --from-file ITEMS.jsonl`: many submissions at once through `Mailbox.submit_many`.

One JSON object per line with `delay()`'s arguments by name (blank lines and lines starting
with `#` are skipped; `-` reads stdin). The whole file is parsed and every item validated
before anything is written, so a typo on line 9,000 costs nothing; then each chunk is one
transaction and the progress bar advances per chunk. Errors name the line, not the item
index, because the line is what the operator opens in an editor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import IO, Any

import click

from mailbox.cli.common import (
    EXIT_FAILURE,
    CliFailure,
    cli_state,
    emit_json,
    progress_bar,
    wake_or_warn,
)
from mailbox.errors import ValidationError
from mailbox.facade import BulkSubmitError, Mailbox, Receipt, wakes_for


def read_items(stream: IO[str], defaults: Mapping[str, Any]) -> tuple[list[dict[str, Any]],
                                                                      list[int]]:
    """The file's items (with `defaults` for the fields a line leaves out) and the line
    number of each. A line that is not a JSON object is a ValidationError naming it."""
    items: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(stream, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"line {number}: not valid JSON ({exc.msg} at column "
                                  f"{exc.colno}); nothing was written") from None
        if not isinstance(value, dict):
            raise ValidationError(f"line {number}: expected a JSON object of submit's "
                                  f"arguments, got {type(value).__name__}; nothing was "
                                  f"written")
        items.append({**defaults, **value})
        lines.append(number)
    if not items:
        raise ValidationError("the file holds no items")
    return items, lines


def submit_file(ctx: click.Context, box: Mailbox, stream: IO[str], defaults: dict[str, Any],
                chunk_size: int) -> None:
    """Submit every item of the file, report the receipts (all of them with --json, a
    summary otherwise) and wake each thread once."""
    as_json = cli_state(ctx).json
    items, lines = read_items(stream, defaults)
    with progress_bar(len(items), not as_json) as bar:
        task = bar.add_task("submitting", total=len(items))
        try:
            receipts = box.submit_many(items, chunk_size=chunk_size, wake=False,
                                       progress=lambda done: bar.update(task, completed=done))
        except BulkSubmitError as exc:
            _wake(box, items, exc.submitted)
            stored = (f"; the {len(exc.submitted)} items before its chunk are stored and "
                      f"queued" if exc.submitted else "; nothing was written")
            raise CliFailure(f"line {lines[exc.index]} (item {exc.index}): {exc.error}{stored}",
                             EXIT_FAILURE, type(exc.error).__name__, as_json) from None
    wake = _wake(box, items, receipts)
    threads = len({r.thread_id for r in receipts})
    if as_json:
        emit_json({"submitted": len(receipts), "threads": threads, "wake": wake,
                   "dispatches": [{"line": line, "dispatch_id": r.dispatch_id,
                                   "run_id": r.run_id, "thread_id": r.thread_id,
                                   "resumed": r.resumed} for line, r in zip(lines, receipts,
                                                                             strict=True)]})
        return
    resumed = sum(r.resumed for r in receipts)
    note = f" ({resumed} resumed a run waiting for a decision)" if resumed else ""
    click.echo(f"queued {len(receipts)} dispatches on {threads} threads{note}")
    click.echo(f"  first {receipts[0].dispatch_id}  last {receipts[-1].dispatch_id}")


def _wake(box: Mailbox, items: list[dict[str, Any]], receipts: list[Receipt]) -> dict[str, Any]:
    wakes = [(w.thread_id, w.delay_ms) for w in wakes_for(items, receipts)]
    return wake_or_warn(box, wakes, f"{len(receipts)} dispatches are")
