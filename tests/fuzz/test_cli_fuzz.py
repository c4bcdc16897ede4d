"""Hypothesis over `python -m mailbox` argument vectors, through click's CliRunner, plus a
few real `python -m mailbox` processes (argv bytes that are not UTF-8 only exist there).

Argument vectors are built from every command's grammar with each slot filled from ids that
exist, plausible values and hostile ones (blank, NUL, lone surrogates, 300-character ids,
"nan", "inf", 1e999, negative numbers, stray options, --json anywhere). The property, as
README and cli.py document it:

- the exit code is one of 0 ok, 1 failed, 2 usage, 3 audit violations, 4 not found;
- a failure is one line on stderr (`error: ...`, or one JSON object with --json, whose
  exit_code is the process's), besides `warning:` lines; no Python traceback, ever;
- nothing is written unless the command did its work: a refused command leaves SQL and the
  namespace's Redis keys as they were. Two outcomes write and still exit non-zero, by
  design: `submit/resume --wait` that stored the dispatch and then timed out waiting, and a
  bulk `dlq replay/purge` in which some ids succeeded (it reports each failure on a line).

Commands run with the test's database, Redis and namespace as options and the MAILBOX_*
environment cleared, so a submit's wake-up is not published (a `warning:` line says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailbox import DispatchStatus, Mailbox, RunStatus
from mailbox.cli import main
from mailbox.phases import claim_next, run_chain
from tests.fuzz.support import snapshot

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV: dict[str, str | None] = {
    "MAILBOX_DATABASE_URL": None, "MAILBOX_REDIS_URL": None, "MAILBOX_NAMESPACE": None,
    "CELERY_BROKER_URL": None,
}
EXIT_CODES = {0, 1, 2, 3, 4}

hostile = st.one_of(
    st.sampled_from(["", " ", "\x00", "a\udcff", "x" * 300, "-", "--", "-x", "--json",
                     "--nope", "nan", "inf", "-inf", "-1", "1e999", "9" * 400,
                     "99999999999999999999", "0", "1.5", "[1,", '{"ms": -1}', "null",
                     "9" * 400 + "s", "2h", "1999-13-01", "0001-01-01", "2024-01-01T00:00Z",
                     "Queued", "queued", "1712345678901-0", "99999999999999999999999-0"]),
    st.text(max_size=12),
)
numbers = st.one_of(st.sampled_from(["0", "1", "3", "255", "256", "1000", "10001"]), hostile)
small_seconds = st.sampled_from(["0", "0.01", "0.05"])
seconds = st.one_of(small_seconds, st.sampled_from(["nan", "inf", "-1", "abc", "1e999", ""]))
times = st.one_of(st.sampled_from(["90s", "2h", "3d", "0", "1712345678901",
                                   "2024-01-01T00:00:00Z"]), hostile)


def world_of(box: Mailbox) -> dict[str, list[str]]:
    """A queued, an acked and a dead-lettered dispatch and a waiting run, built once per
    backend with the phase functions (what a worker does, without Celery)."""
    rt = box.runtime()
    made = {}
    for thread, agent, value in (("cf-acked", "echo", "hi"), ("cf-dead", "fail", "x"),
                                 ("cf-ask", "ask", "deploy?"), ("cf-queued", "echo", "q")):
        made[thread] = box.submit(thread, agent, value)
        if thread != "cf-queued":
            ctx = claim_next(rt, thread)
            assert ctx is not None
            run_chain(rt, ctx)
    dead = box.get_dispatch(made["cf-dead"].dispatch_id)
    assert dead is not None and dead.status == DispatchStatus.DeadLetter
    waiting = box.get_run(made["cf-ask"].run_id)
    assert waiting is not None and waiting.status == RunStatus.waiting
    return {"dispatches": [r.dispatch_id for r in made.values()],
            "runs": [r.run_id for r in made.values()], "threads": list(made),
            "dead": [made["cf-dead"].dispatch_id], "waiting": [made["cf-ask"].run_id]}


_WORLDS: dict[str, dict[str, list[str]]] = {}


def options(draw: Any, spec: dict[str, st.SearchStrategy[str] | None]) -> list[str]:
    """Some of the command's options, each with a value (None: a flag)."""
    chosen = draw(st.lists(st.sampled_from(sorted(spec)), max_size=3, unique=True))
    out: list[str] = []
    for name in chosen:
        strategy = spec[name]
        out += [name] if strategy is None else [name, draw(strategy)]
    return out


FILTERS: dict[str, st.SearchStrategy[str] | None] = {
    "--thread": st.one_of(st.sampled_from(["cf-dead", "cf-acked"]), hostile),
    "--agent": st.one_of(st.sampled_from(["fail", "echo"]), hostile),
    "--error": st.one_of(st.just("requested"), hostile), "--since": times, "--until": times,
}


@st.composite
def argv(draw: Any, world: dict[str, list[str]]) -> list[str]:
    """One command line: a command from the CLI's grammar, every slot fuzzed."""
    ident = st.one_of(st.sampled_from(world["dispatches"] + world["runs"]), hostile)
    thread = st.one_of(st.sampled_from(world["threads"]), hostile)
    run = st.one_of(st.sampled_from(world["waiting"] + world["runs"]), hostile)
    dead = st.one_of(st.sampled_from(world["dead"] + world["dispatches"]), hostile)
    value = st.one_of(st.sampled_from(['"hi"', "hi", '{"ms": 1}', '{"fail_times": 0}']),
                      hostile)
    command = draw(st.sampled_from([
        "submit", "show", "list", "follow", "cancel", "interrupt", "resume", "dlq list",
        "dlq replay", "dlq purge", "stats", "audit", "garbage"]))
    if command == "submit":
        args = ["submit", draw(thread), draw(st.one_of(st.sampled_from(
            ["echo", "sleep", "flaky", "fail", "ask"]), hostile)), draw(value)]
        args += options(draw, {"--priority": numbers, "--dedupe-key": hostile,
                               "--delay-ms": numbers, "--max-attempts": numbers,
                               "--interrupt": None, "--wait": seconds})
    elif command in ("show", "cancel"):
        args = [command, draw(ident)]
    elif command == "list":
        statuses = st.one_of(st.sampled_from([s.value for s in DispatchStatus]), hostile)
        args = ["list", draw(thread), *options(draw, {
            "--status": statuses, "--limit": numbers, "--offset": numbers})]
    elif command == "follow":
        # Always bounded: a run that never finishes is followed until --timeout.
        args = ["follow", draw(run), *options(draw, {
            "--after": st.one_of(st.just("0-0"), hostile), "--no-stop": None}),
            "--timeout", draw(seconds)]
        if args[-1] not in ("0", "0.01", "0.05"):
            args += ["--timeout", "0.05"] if draw(st.booleans()) else []
    elif command == "interrupt":
        args = ["interrupt", draw(thread)]
    elif command == "resume":
        args = ["resume", draw(run), draw(value), *options(draw, {"--wait": seconds})]
    elif command == "dlq list":
        args = ["dlq", "list", *options(draw, {**FILTERS, "--limit": numbers,
                                                 "--offset": numbers})]
    elif command in ("dlq replay", "dlq purge"):
        ids = draw(st.lists(dead, max_size=3))
        extra = {"--all": None, "--batch-size": numbers, **FILTERS}
        extra.update({"--force": None} if command == "dlq replay" else {"--yes": None})
        args = ["dlq", command.split()[1], *ids, *options(draw, extra)]
    elif command == "stats":
        args = ["stats"]
    elif command == "audit":
        args = ["audit", *options(draw, {"--stuck-after": seconds, "--sample": numbers})]
    else:
        args = draw(st.lists(hostile, min_size=1, max_size=4))
    if draw(st.integers(0, 3)) == 0:  # --json before or after the command name
        args.insert(draw(st.integers(0, len(args))), "--json")
    return args


def stderr_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def check_outcome(args: list[str], result: Result, wrote: bool) -> None:
    """The documented contract of one invocation (see the module docstring)."""
    shown = f"argv={args!r}\nexit={result.exit_code}\nstdout={result.stdout[-2000:]}\n" \
            f"stderr={result.stderr[-2000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"uncaught {result.exception!r}\n{shown}"
    assert "Traceback" not in result.output, shown
    assert result.exit_code in EXIT_CODES, shown
    bulk = args[:2] in (["dlq", "replay"], ["dlq", "purge"]) or \
        args[1:3] in (["dlq", "replay"], ["dlq", "purge"])
    # Besides errors, stderr carries `warning:` lines and a bulk command's progress bar.
    noise = ("warning:", "replaying ", "purging ") if bulk else ("warning:",)
    lines = [line for line in stderr_lines(result) if not line.startswith(noise)]
    if result.exit_code == 0:
        assert not any(line.startswith("error:") for line in lines), shown
        return
    if bulk and "--json" in args and not lines:  # the failures are in the JSON result
        assert json.loads(result.stdout)["failed"], shown
    elif bulk and lines and lines[0].startswith(("not replayed ", "not purged ")):
        # Some ids done: one line per id that failed, then maybe "... and N more".
        assert all(line.startswith(("not replayed ", "not purged ", "... and ")) for line in
                   lines), shown
    else:
        assert len(lines) == 1, f"a failure must be one line on stderr\n{shown}"
        line = lines[0]
        if line.startswith("{"):
            body = json.loads(line)
            assert body["exit_code"] == result.exit_code and body["error"], shown
        else:
            assert line.startswith("error: ") and len(line) > len("error: ") + 3, shown
    if wrote:
        timed_out = "timed out" in result.stderr and "--wait" in args
        assert timed_out or bulk, f"a failed command wrote something\n{shown}"


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_cli_exits_with_a_documented_code_and_one_clear_line(mailbox: Mailbox,
                                                             data: st.DataObject) -> None:
    key = mailbox.settings.namespace
    if key not in _WORLDS:
        _WORLDS[key] = world_of(mailbox)
    args = data.draw(argv(_WORLDS[key]), label="argv")
    s = mailbox.settings
    assert s.redis_url is not None
    base = ["--database-url", s.database_url, "--redis-url", s.redis_url,
            "--namespace", s.namespace]
    before = snapshot(mailbox)
    result = CliRunner(env=CLEAN_ENV).invoke(main, [*base, *args], prog_name="python -m mailbox")
    event(f"exit {result.exit_code}")
    check_outcome(args, result, snapshot(mailbox) != before)


def test_real_processes_with_hostile_argv(mailbox: Mailbox) -> None:
    """`python -m mailbox` as an operator runs it: argv bytes that are not UTF-8 (Python
    hands them over as lone surrogates), an unknown id, an age past what a float holds,
    a NaN wait (which must be refused before the submit writes anything)."""
    s = mailbox.settings
    assert s.redis_url is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBOX_", "CELERY_"))}
    env.update({"MAILBOX_DATABASE_URL": s.database_url, "MAILBOX_REDIS_URL": s.redis_url,
                "MAILBOX_NAMESPACE": s.namespace, "PYTHONPATH": str(ROOT)})
    before = snapshot(mailbox)
    cases: list[tuple[list[bytes], int, str]] = [
        ([b"show", b"\xff\xfe-not-utf8"], 2, "error: "),
        ([b"--json", b"show", b"no-such-id"], 4, '{"error"'),
        ([b"dlq", b"list", b"--since", b"9" * 400 + b"s"], 2, "error: "),
        ([b"submit", b"t-proc", b"echo", b"hi", b"--wait", b"nan"], 2, "error: "),
    ]
    for args, code, prefix in cases:
        done = subprocess.run([os.fsencode(sys.executable), b"-m", b"mailbox", *args],
                              cwd=ROOT, env=env, capture_output=True, timeout=60)
        stderr = done.stderr.decode(errors="replace")
        shown = f"argv={args!r} exit={done.returncode} stderr={stderr!r}"
        assert done.returncode == code, shown
        assert "Traceback" not in stderr + done.stdout.decode(errors="replace"), shown
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(prefix), shown
    assert snapshot(mailbox) == before, "a refused command wrote something"
