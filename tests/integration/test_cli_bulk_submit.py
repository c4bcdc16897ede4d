"""`python -m mailbox submit --from-file ITEMS.jsonl` against real Redis and SQL.

Like tests/integration/test_cli.py: click's CliRunner with the test's database, Redis and
namespace as options and the MAILBOX_* environment cleared (so wake-ups are skipped with a
warning: the dispatches are durable anyway).
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from mailbox import Mailbox
from mailbox.cli import main
from mailbox.schema import dispatches

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV: dict[str, str | None] = {
    "MAILBOX_DATABASE_URL": None, "MAILBOX_REDIS_URL": None, "MAILBOX_NAMESPACE": None,
    "CELERY_BROKER_URL": None,
}
Cli = Callable[..., Result]


@pytest.fixture
def cli(mailbox: Mailbox) -> Cli:
    s = mailbox.settings
    assert s.redis_url is not None
    base = ["--database-url", s.database_url, "--redis-url", s.redis_url,
            "--namespace", s.namespace]

    def invoke(*args: str, stdin: str | None = None) -> Result:
        return CliRunner(env=CLEAN_ENV).invoke(main, [*base, *args], input=stdin,
                                               catch_exceptions=False)

    return invoke


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                              for line in lines) + "\n")
    return path


def stored(box: Mailbox) -> int:
    with box.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(dispatches))
                   .scalar_one())


def test_every_line_is_queued_with_its_line_number(cli: Cli, mailbox: Mailbox,
                                                   tmp_path: Path) -> None:
    lines: list[Any] = ["# a batch evaluation", ""]
    lines += [{"thread_id": f"eval-{i % 3}", "agent": "echo", "input": {"case": i}}
              for i in range(30)]
    path = write_lines(tmp_path / "items.jsonl", lines)
    result = cli("--json", "submit", "--from-file", str(path), "--chunk-size", "7")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["submitted"] == 30 and out["threads"] == 3
    assert [d["line"] for d in out["dispatches"]] == list(range(3, 33))
    assert out["wake"]["published"] is False  # environment cleared: the sweep delivers them
    for entry in out["dispatches"]:
        dispatch = mailbox.get_dispatch(entry["dispatch_id"])
        assert dispatch is not None and dispatch.thread_id == entry["thread_id"]
    inputs = [m.content for m in mailbox.thread_messages("eval-1", limit=100)]
    assert inputs == [{"case": i} for i in range(30) if i % 3 == 1]


def test_text_mode_prints_a_summary(cli: Cli, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "items.jsonl",
                       [{"thread_id": f"t-{i}", "agent": "echo", "input": i} for i in range(5)])
    result = cli("submit", "--from-file", str(path))
    assert result.exit_code == 0, result.output
    assert "queued 5 dispatches on 5 threads" in result.stdout


def test_stdin_and_option_defaults(cli: Cli, mailbox: Mailbox) -> None:
    text = "\n".join(json.dumps(item) for item in [
        {"thread_id": "d", "agent": "echo", "input": "default priority"},
        {"thread_id": "d", "agent": "echo", "input": "own priority", "priority": 9}])
    result = cli("--json", "submit", "--from-file", "-", "--priority", "3",
                 "--max-attempts", "2", stdin=text)
    out = json.loads(result.stdout)
    first, second = (mailbox.get_dispatch(d["dispatch_id"]) for d in out["dispatches"])
    assert first is not None and second is not None
    assert (first.priority, second.priority) == (3, 9)
    assert first.max_attempts == second.max_attempts == 2


@pytest.mark.parametrize(("line", "says"), [
    ('{"thread_id": "x", "agent": "echo", "input": ', "line 4: not valid JSON"),
    ('["x", "echo", 1]', "line 4: expected a JSON object"),
    ('{"thread_id": "x", "agent": "no-such-agent", "input": 1}', "line 4 (item 3):"),
    ('{"thread_id": "x", "agent": "echo"}', "line 4 (item 3): validation error: input is missing"),
    ('{"thread_id": "x", "agent": "echo", "input": 1, "interrupt": true}', "unknown fields"),
])
def test_a_bad_line_is_named_and_nothing_is_written(cli: Cli, mailbox: Mailbox,
                                                     tmp_path: Path, line: str,
                                                     says: str) -> None:
    good = [json.dumps({"thread_id": f"t-{i}", "agent": "echo", "input": i}) for i in range(6)]
    path = write_lines(tmp_path / "items.jsonl", [*good[:3], line, *good[3:]])
    result = cli("submit", "--from-file", str(path))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert says in result.stderr and "nothing was written" in result.stderr
    assert stored(mailbox) == 0


def test_a_refused_chunk_says_what_was_stored_before_it(cli: Cli, mailbox: Mailbox,
                                                        tmp_path: Path) -> None:
    mailbox.submit("held", "echo", "first", dedupe_key="k")
    items: list[Any] = [{"thread_id": f"t-{i}", "agent": "echo", "input": i} for i in range(4)]
    items.append({"thread_id": "held", "agent": "echo", "input": "x", "dedupe_key": "k"})
    path = write_lines(tmp_path / "items.jsonl", items)
    result = cli("submit", "--from-file", str(path), "--chunk-size", "2")
    assert result.exit_code == 1
    assert "line 5 (item 4): already exists: dedupe_key=k" in result.stderr
    assert "the 4 items before its chunk are stored" in result.stderr
    assert stored(mailbox) == 1 + 4


@pytest.mark.parametrize("args", [
    ["t", "echo", "hi", "--from-file", "-"],
    ["--from-file", "-", "--wait", "5"],
    ["--from-file", "-", "--dedupe-key", "k"],
    [],
])
def test_usage_errors(cli: Cli, args: list[str]) -> None:
    result = cli("submit", *args, stdin="")
    assert result.exit_code == 2, result.output


def test_an_empty_file_is_an_error(cli: Cli, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "items.jsonl", ["# nothing here"])
    result = cli("submit", "--from-file", str(path))
    assert result.exit_code == 1 and "no items" in result.stderr


def test_a_terminal_sees_the_progress_bar(mailbox: Mailbox, tmp_path: Path) -> None:
    """`python -m mailbox submit --from-file` with stderr on a pseudo-terminal, as an
    operator runs it: the bar counts the items written, chunk by chunk."""
    s = mailbox.settings
    assert s.redis_url is not None
    path = write_lines(tmp_path / "items.jsonl", [
        {"thread_id": f"t-{i % 10}", "agent": "echo", "input": i} for i in range(1200)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBOX_", "CELERY_"))}
    env.update({"MAILBOX_DATABASE_URL": s.database_url, "MAILBOX_REDIS_URL": s.redis_url,
                "MAILBOX_NAMESPACE": s.namespace, "CELERY_BROKER_URL": s.redis_url,
                "COLUMNS": "100", "TERM": "xterm"})
    primary, secondary = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "mailbox", "submit", "--from-file",
                               str(path), "--chunk-size", "400"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=secondary, timeout=120)
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the pseudo-terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
    assert done.returncode == 0, shown.decode(errors="replace")
    assert b"queued 1200 dispatches on 10 threads" in done.stdout
    text = shown.decode(errors="replace")
    assert "submitting" in text and "1200/1200" in text
    assert stored(mailbox) == 1200
