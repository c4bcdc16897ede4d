"""`python -m mailbox` against real Redis and SQL (DESIGN.md §7).

Commands run through click's CliRunner with the test's database, Redis and namespace passed
as options, and the MAILBOX_* environment cleared: so the wake-up a submit publishes is
skipped (the Celery app would read another namespace) and the CLI must say the dispatch is
durable anyway. Runs are executed in-process with the phase functions (`claim_next` +
`run_chain`), which is what a worker does, without Celery. One test publishes a real wake
through `tasks.runtime`, and one runs `python -m mailbox` as a subprocess from the root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner, Result

from mailbox import DispatchStatus, Mailbox, RunStatus
from mailbox.cli import main
from mailbox.events import EventStreams
from mailbox.phases import claim_next, run_chain
from mailbox.schema import thread_epochs
from tests.support.racers import racing

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV: dict[str, str | None] = {
    "MAILBOX_DATABASE_URL": None, "MAILBOX_REDIS_URL": None, "MAILBOX_NAMESPACE": None,
    "CELERY_BROKER_URL": None,
}

Cli = Callable[..., Result]


@pytest.fixture
def cli(mailbox: Mailbox) -> Cli:
    """Invoke the CLI pointed at the test's database, Redis and namespace."""
    s = mailbox.settings
    assert s.redis_url is not None
    base = ["--database-url", s.database_url, "--redis-url", s.redis_url,
            "--namespace", s.namespace]

    def invoke(*args: str) -> Result:
        return CliRunner(env=CLEAN_ENV).invoke(main, [*base, *args], catch_exceptions=False)

    return invoke


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.exit_code, result.output)
    return json.loads(result.stdout)


def one_error_line(result: Result) -> str:
    """Failures print exactly one line on stderr and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def process(box: Mailbox, thread_id: str) -> None:
    """What a worker does with one wake-up: claim the thread's next dispatch, run the chain."""
    rt = box.runtime()
    ctx = claim_next(rt, thread_id)
    assert ctx is not None, f"nothing claimable on {thread_id}"
    run_chain(rt, ctx)


def submit(box: Mailbox, thread_id: str, agent: str, value: Any, *, run: bool = False
           ) -> tuple[str, str]:
    receipt = box.submit(thread_id, agent, value)
    if run:
        process(box, thread_id)
    return receipt.dispatch_id, receipt.run_id


# ================================================================================= submit
def test_submit_is_durable_when_the_wake_cannot_be_published(cli: Cli, mailbox: Mailbox
                                                             ) -> None:
    result = cli("--json", "submit", "t-submit", "echo", "hello")
    out = as_json(result)
    assert out["wake"]["published"] is False and out["wake"]["warning"]
    assert "stored durably" in result.stderr and "sweep" in result.stderr
    assert result.stderr.startswith("warning:")
    dispatch = mailbox.get_dispatch(out["dispatch_id"])
    assert dispatch is not None and dispatch.status == DispatchStatus.Queued
    assert dispatch.run_id == out["run_id"] and out["thread_id"] == "t-submit"
    assert [m.content for m in mailbox.runs.run_messages(out["run_id"])] == ["hello"]

    human = cli("submit", "t-submit", "echo", "again")
    assert human.exit_code == 0
    assert "queued dispatch" in human.stdout and "warning: wake-up not published" in \
        human.stderr


def test_submit_parses_json_input_and_passes_every_option(cli: Cli, mailbox: Mailbox) -> None:
    out = as_json(cli("submit", "t-opts", "sleep", '{"ms": 5}', "--priority", "3",
                      "--dedupe-key", "k1", "--delay-ms", "60000", "--max-attempts", "2",
                      "--json"))
    dispatch = mailbox.get_dispatch(out["dispatch_id"])
    assert dispatch is not None
    assert (dispatch.priority, dispatch.dedupe_key, dispatch.max_attempts) == (3, "k1", 2)
    assert dispatch.available_at - dispatch.created_at == 60_000
    assert mailbox.runs.run_messages(out["run_id"])[0].content == {"ms": 5}

    duplicate = cli("submit", "t-opts", "sleep", '{"ms": 5}', "--dedupe-key", "k1")
    assert duplicate.exit_code == 1
    assert "already exists" in one_error_line(duplicate)

    plain = as_json(cli("--json", "submit", "t-str", "echo", "hello"))
    quoted = as_json(cli("--json", "submit", "t-str", "echo", '"hello"'))
    number = as_json(cli("--json", "submit", "t-str", "echo", "42"))
    contents = [mailbox.runs.run_messages(o["run_id"])[0].content
                for o in (plain, quoted, number)]
    assert contents == ["hello", "hello", 42]


def test_submit_interrupt_supersedes_the_queued_work(cli: Cli, mailbox: Mailbox) -> None:
    first = as_json(cli("--json", "submit", "t-int", "echo", "one"))
    second = as_json(cli("--json", "submit", "t-int", "echo", "two", "--interrupt"))
    old, new = (mailbox.get_dispatch(first["dispatch_id"]),
                mailbox.get_dispatch(second["dispatch_id"]))
    assert old is not None and old.status == DispatchStatus.Superseded
    assert new is not None and new.status == DispatchStatus.Queued and new.dispatch_epoch == 1


def test_submit_errors_are_one_line_and_write_nothing(cli: Cli, mailbox: Mailbox) -> None:
    unknown = cli("submit", "t-err", "no-such-agent", "x")
    assert unknown.exit_code == 1
    assert one_error_line(unknown).startswith("error: validation error: unknown agent")

    bad = cli("submit", "t-err", "sleep", "{ms: 5}")
    assert bad.exit_code == 1
    line = one_error_line(bad)
    assert '"ms"' in line and "not valid JSON" in line

    wrong_type = cli("submit", "t-err", "sleep", '{"ms": "soon"}')
    assert wrong_type.exit_code == 1 and "not valid JSON" not in one_error_line(wrong_type)

    usage = cli("submit", "t-err", "echo", "x", "--priority", "300")
    assert usage.exit_code == 2
    assert "--priority" in one_error_line(usage)

    js = cli("--json", "submit", "t-err", "no-such-agent", "x")
    assert js.exit_code == 1
    err = json.loads(js.stderr)
    assert err["exit_code"] == 1 and "unknown agent" in err["error"]
    assert mailbox.store.list_dispatches("t-err") == []


def test_submit_wait_shows_the_result(cli: Cli, make_mailbox: Callable[..., Mailbox],
                                      mailbox: Mailbox) -> None:
    worker_box = make_mailbox()
    stop = threading.Event()

    def worker() -> None:  # a one-shot worker: run the first dispatch that shows up
        while not stop.is_set():
            rt = worker_box.runtime()
            ctx = claim_next(rt, "t-wait")
            if ctx is not None:
                run_chain(rt, ctx)
                return
            time.sleep(0.02)

    with racing(worker, timeout_s=30):
        try:
            out = as_json(cli("--json", "submit", "t-wait", "echo", "hi there", "--wait",
                              "20"))
        finally:
            stop.set()
    assert out["dispatch"]["status"] == "Acked"
    assert out["run"]["status"] == "done" and out["run"]["response"] == "hi there"


def test_submit_wait_times_out_but_the_dispatch_is_durable(cli: Cli, mailbox: Mailbox) -> None:
    result = cli("submit", "t-wait2", "echo", "x", "--wait", "0.2")
    assert result.exit_code == 1
    assert "timed out" in result.stderr and "Traceback" not in result.output
    [dispatch] = mailbox.store.list_dispatches("t-wait2")
    assert dispatch.status == DispatchStatus.Queued


def test_submit_publishes_the_wake_when_configured_like_the_workers(mailbox: Mailbox) -> None:
    """With the options coming from the same MAILBOX_* environment the Celery app reads, the
    wake-up goes through `tasks.publishing.publish_wake` to the namespace's queue."""
    s = mailbox.settings
    assert s.redis_url is not None
    env: dict[str, str | None] = {"MAILBOX_DATABASE_URL": s.database_url,
                                  "MAILBOX_REDIS_URL": s.redis_url,
                                  "MAILBOX_NAMESPACE": s.namespace,
                                  "CELERY_BROKER_URL": s.redis_url}
    client = mailbox.store.coordinator.client
    try:
        result = CliRunner(env=env).invoke(main, ["--json", "submit", "t-pub", "echo", "x"],
                                           catch_exceptions=False)
        out = as_json(result)
        assert out["wake"] == {"published": True, "warning": None}, result.stderr
        from tasks.app import app

        if app.conf.broker_url == s.redis_url:
            lists = [k for k in client.scan_iter(f"*{s.namespace}*")
                     if client.type(k) == b"list"]
            assert sum(client.llen(k) for k in lists) == 1
    finally:
        for key in client.scan_iter(f"*{s.namespace}*"):
            client.delete(key)
    assert mailbox.get_dispatch(out["dispatch_id"]) is not None


# =================================================================================== show
def test_show_finds_a_dispatch_or_a_run_by_either_id(cli: Cli, mailbox: Mailbox) -> None:
    dispatch_id, run_id = submit(mailbox, "t-show", "echo", "hello", run=True)
    by_dispatch = as_json(cli("--json", "show", dispatch_id))
    by_run = as_json(cli("show", run_id, "--json"))
    assert by_dispatch == by_run
    assert by_dispatch["dispatch"]["status"] == "Acked"
    assert by_dispatch["run"]["run_id"] == run_id and by_dispatch["run"]["response"] == "hello"
    assert [(m["role"], m["content"]) for m in by_dispatch["messages"]] == [
        ("user", "hello"), ("assistant", "hello")]

    human = cli("show", dispatch_id)
    assert human.exit_code == 0
    assert dispatch_id in human.stdout and "Acked" in human.stdout
    assert "natural_end" in human.stdout
    assert "Z" in human.stdout and "created_at" in human.stdout  # ms shown as ISO times


def test_show_unknown_id_exits_4(cli: Cli) -> None:
    result = cli("show", "no-such-id")
    assert result.exit_code == 4
    assert "no-such-id" in one_error_line(result)
    js = cli("--json", "show", "no-such-id")
    assert js.exit_code == 4 and json.loads(js.stderr)["kind"] == "not_found"


# =================================================================================== list
def test_list_filters_by_status_and_pages(cli: Cli, mailbox: Mailbox) -> None:
    done_id, _ = submit(mailbox, "t-list", "echo", "a", run=True)
    queued = [submit(mailbox, "t-list", "echo", str(i))[0] for i in range(3)]
    everything = as_json(cli("--json", "list", "t-list"))
    assert {d["dispatch_id"] for d in everything} == {done_id, *queued}
    only_queued = as_json(cli("--json", "list", "t-list", "--status", "Queued"))
    assert [d["dispatch_id"] for d in only_queued] == queued
    both = as_json(cli("--json", "list", "t-list", "--status", "queued", "--status", "acked"))
    assert len(both) == 4
    page = as_json(cli("--json", "list", "t-list", "--status", "Queued", "--limit", "2",
                       "--offset", "1"))
    assert [d["dispatch_id"] for d in page] == queued[1:]
    human = cli("list", "t-list")
    assert human.exit_code == 0 and "Acked" in human.stdout and "Queued" in human.stdout
    assert as_json(cli("--json", "list", "t-nothing")) == []


def test_list_bad_status_is_a_usage_error(cli: Cli) -> None:
    result = cli("list", "t-list", "--status", "Running")
    assert result.exit_code == 2
    assert "--status" in one_error_line(result)


# ================================================================================= follow
def test_follow_prints_events_until_run_finish(cli: Cli, mailbox: Mailbox) -> None:
    _, run_id = submit(mailbox, "t-follow", "echo", "hello", run=True)
    result = cli("--json", "follow", run_id, "--timeout", "5")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    types = [e["type"] for e in events]
    assert types[0] == "run_queued" and types[-1] == "run_finish" and "run_started" in types
    assert all(e["run_id"] == run_id for e in events)

    after = as_json_lines(cli("follow", run_id, "--after", events[0]["id"], "--json"))
    assert [e["id"] for e in after] == [e["id"] for e in events[1:]]

    human = cli("follow", run_id)
    assert human.exit_code == 0 and "run_finish" in human.stdout
    assert human.stdout.splitlines()[0].split()[0].endswith("Z")  # ISO time first


def test_follow_keeps_going_through_a_retried_attempt(cli: Cli, mailbox: Mailbox) -> None:
    _, run_id = submit(mailbox, "t-retry", "flaky", {"fail_times": 1}, run=True)
    deadline = time.monotonic() + 10
    while True:  # the retry becomes due after the backoff (250 ms by default)
        rt = mailbox.runtime()
        ctx = claim_next(rt, "t-retry")
        if ctx is not None:
            run_chain(rt, ctx)
            break
        assert time.monotonic() < deadline, "the retry never became due"
        time.sleep(0.05)
    events = as_json_lines(cli("--json", "follow", run_id, "--timeout", "5"))
    finishes = [e["data"]["status"] for e in events if e["type"] == "run_finish"]
    assert finishes == ["retrying", "acked"]
    assert events[-1]["type"] == "run_finish"
    assert "run_rescheduled" in [e["type"] for e in events]


def as_json_lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_follow_times_out_on_a_run_still_waiting_for_a_worker(cli: Cli, mailbox: Mailbox
                                                              ) -> None:
    _, run_id = submit(mailbox, "t-follow2", "echo", "hello")
    started = time.monotonic()
    result = cli("follow", run_id, "--timeout", "0.5")
    assert result.exit_code == 0
    assert "run_queued" in result.stdout and "timed out" in result.stderr
    assert "--after" in result.stderr
    assert time.monotonic() - started < 10


def test_follow_expired_cursor_and_unknown_run_exit_4(cli: Cli, mailbox: Mailbox) -> None:
    _, run_id = submit(mailbox, "t-follow3", "echo", "hello", run=True)
    client = mailbox.store.coordinator.client
    client.delete(f"{mailbox.settings.namespace}:events:{run_id}",
                  f"{mailbox.settings.namespace}:events:{run_id}:meta")  # retention expired
    expired = cli("follow", run_id, "--after", "1-0", "--timeout", "1")
    assert expired.exit_code == 4
    assert "cursor expired" in one_error_line(expired)

    unknown = cli("follow", "no-such-run", "--timeout", "0.1")
    assert unknown.exit_code == 4 and "no-such-run" in one_error_line(unknown)

    malformed = cli("follow", run_id, "--after", "yesterday")
    assert malformed.exit_code == 2 and "--after" in one_error_line(malformed)


def test_follow_reconnects_from_the_last_event_after_a_dropped_connection(
        cli: Cli, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    _, run_id = submit(mailbox, "t-follow4", "echo", "hello", run=True)
    real_follow = EventStreams.follow
    cursors: list[str | None] = []

    def flaky_follow(self: EventStreams, run: str, after: str | None = None,
                     **kwargs: Any) -> Iterator[Any]:
        cursors.append(after)
        stream = real_follow(self, run, after, **kwargs)
        if len(cursors) == 1:  # the first connection drops after one event
            yield next(stream)
            raise redis.ConnectionError("connection reset by peer")
        yield from stream

    monkeypatch.setattr(EventStreams, "follow", flaky_follow)
    result = cli("--json", "follow", run_id, "--timeout", "10")
    events = as_json_lines(result)
    assert cursors == [None, events[0]["id"]]
    assert len({e["id"] for e in events}) == len(events), "no event twice"
    assert events[-1]["type"] == "run_finish"
    assert "reconnecting" in result.stderr


# ========================================================================= thread control
def test_cancel_a_queued_dispatch(cli: Cli, mailbox: Mailbox) -> None:
    dispatch_id, run_id = submit(mailbox, "t-cancel", "echo", "x")
    out = as_json(cli("--json", "cancel", dispatch_id))
    assert out["action"] == "cancelled" and out["status"] == "Cancelled"
    run = mailbox.get_run(run_id)
    assert run is not None and run.status == RunStatus.done

    again = cli("cancel", dispatch_id)
    assert again.exit_code == 1 and "Cancelled" in one_error_line(again)
    unknown = cli("cancel", "no-such-id")
    assert unknown.exit_code == 4

    by_run_id = submit(mailbox, "t-cancel", "echo", "y")
    human = cli("cancel", by_run_id[1])
    assert human.exit_code == 0 and f"cancelled dispatch {by_run_id[0]}" in human.stdout


def test_cancel_a_claimed_dispatch_asks_its_worker_to_stop(cli: Cli, mailbox: Mailbox) -> None:
    dispatch_id, _ = submit(mailbox, "t-cancel2", "echo", "x")
    rt = mailbox.runtime()
    ctx = claim_next(rt, "t-cancel2")
    assert ctx is not None
    out = as_json(cli("--json", "cancel", dispatch_id))
    assert out["action"] == "stop_requested" and out["status"] == "Claimed"
    assert mailbox._cancel_signal("t-cancel2", ctx.token) is not None


def test_interrupt_supersedes_queued_work(cli: Cli, mailbox: Mailbox) -> None:
    queued = [submit(mailbox, "t-intr", "echo", str(i))[0] for i in range(2)]
    out = as_json(cli("--json", "interrupt", "t-intr"))
    assert out["new_dispatch_epoch"] == 1 and sorted(out["superseded"]) == sorted(queued)
    assert out["active_dispatch"] is None
    for dispatch_id in queued:
        d = mailbox.get_dispatch(dispatch_id)
        assert d is not None and d.status == DispatchStatus.Superseded
    human = cli("interrupt", "t-intr")
    assert human.exit_code == 0 and "epoch 2" in human.stdout
    unknown = cli("interrupt", "t-never-used")
    assert unknown.exit_code == 4


def test_resume_a_waiting_run(cli: Cli, mailbox: Mailbox) -> None:
    _, run_id = submit(mailbox, "t-ask", "ask", "ship it?", run=True)
    run = mailbox.get_run(run_id)
    assert run is not None and run.status == RunStatus.waiting
    out = as_json(cli("--json", "resume", run_id, "yes"))
    assert out["resumed"] is True and out["run_id"] == run_id
    assert out["wake"]["published"] is False
    process(mailbox, "t-ask")
    run = mailbox.get_run(run_id)
    assert run is not None and run.status == RunStatus.done and run.response == "yes"

    not_waiting = cli("resume", run_id, "again")
    assert not_waiting.exit_code == 1 and "not waiting" in one_error_line(not_waiting)
    unknown = cli("resume", "no-such-run", "yes")
    assert unknown.exit_code == 4


# =========================================================================== dead letters
def dead_letter(box: Mailbox, thread_id: str, value: Any = "x") -> str:
    dispatch_id, _ = submit(box, thread_id, "fail", value, run=True)
    d = box.get_dispatch(dispatch_id)
    assert d is not None and d.status == DispatchStatus.DeadLetter
    return dispatch_id


def test_dlq_list_with_filters(cli: Cli, mailbox: Mailbox) -> None:
    a = dead_letter(mailbox, "t-dl-a")
    b = dead_letter(mailbox, "t-dl-b")
    submit(mailbox, "t-dl-a", "echo", "fine", run=True)
    listed = as_json(cli("--json", "dlq", "list"))
    assert [d["dispatch_id"] for d in listed] == [b, a]  # newest first
    assert [d["dispatch_id"] for d in as_json(cli("--json", "dlq", "list", "--thread",
                                                  "t-dl-a"))] == [a]
    assert len(as_json(cli("--json", "dlq", "list", "--agent", "fail", "--error",
                           "requested", "--since", "1h"))) == 2
    assert as_json(cli("--json", "dlq", "list", "--agent", "echo")) == []
    assert as_json(cli("--json", "dlq", "list", "--until", "2000-01-01T00:00:00Z")) == []
    assert len(as_json(cli("--json", "dlq", "list", "--limit", "1"))) == 1
    human = cli("dlq", "list")
    assert human.exit_code == 0 and a in human.stdout and "requested failure" in human.stdout

    bad = cli("dlq", "list", "--since", "last tuesday")
    assert bad.exit_code == 2 and "--since" in one_error_line(bad)


def test_dlq_replay_by_id_and_refusal_after_interrupt(cli: Cli, mailbox: Mailbox) -> None:
    dead = dead_letter(mailbox, "t-replay", {"q": 1})
    out = as_json(cli("--json", "dlq", "replay", dead))
    [item] = out["replayed"]
    assert item["dispatch_id"] == dead and out["failed"] == []
    fresh = mailbox.get_dispatch(item["new_dispatch_id"])
    assert fresh is not None and fresh.status == DispatchStatus.Queued
    assert mailbox.runs.run_messages(item["run_id"])[0].content == {"q": 1}

    mailbox.interrupt("t-replay")
    refused = cli("dlq", "replay", dead)
    assert refused.exit_code == 1 and "moved on" in one_error_line(refused)
    forced = cli("dlq", "replay", dead, "--force")
    assert forced.exit_code == 0 and "replayed" in forced.stdout

    unknown = cli("dlq", "replay", "no-such-id")
    assert unknown.exit_code == 4
    neither = cli("dlq", "replay")
    assert neither.exit_code == 2 and "--all" in one_error_line(neither)
    both = cli("dlq", "replay", dead, "--all")
    assert both.exit_code == 2
    stray_filter = cli("dlq", "replay", dead, "--thread", "t-replay")
    assert stray_filter.exit_code == 2


def test_dlq_replay_all_in_batches(cli: Cli, mailbox: Mailbox) -> None:
    dead = [dead_letter(mailbox, f"t-bulk-{i}") for i in range(5)]
    other = dead_letter(mailbox, "t-other")
    out = as_json(cli("--json", "dlq", "replay", "--all", "--error", "requested",
                      "--thread", "t-other", "--batch-size", "2"))
    assert [r["dispatch_id"] for r in out["replayed"]] == [other]

    human = cli("dlq", "replay", "--all", "--agent", "fail", "--batch-size", "2",
                "--until", str(time.time_ns() // 1_000_000 + 1000))
    assert human.exit_code == 0, human.output
    assert "replayed 6 of 6" in human.stdout
    for dispatch_id in dead:
        assert f"replayed {dispatch_id}" in human.stdout
    queued = mailbox.store.counts_by_status()[DispatchStatus.Queued]
    assert queued == 6  # t-other's replay is not made twice (replay is idempotent)


def test_dlq_purge(cli: Cli, mailbox: Mailbox) -> None:
    a = dead_letter(mailbox, "t-purge")
    b = dead_letter(mailbox, "t-purge")
    c = dead_letter(mailbox, "t-purge-2")
    alive, _ = submit(mailbox, "t-purge", "echo", "x")

    refused = cli("dlq", "purge", a)
    assert refused.exit_code == 2 and "--yes" in one_error_line(refused)
    assert mailbox.get_dispatch(a) is not None

    out = as_json(cli("--json", "dlq", "purge", a, "--yes"))
    assert out["purged"] == 1 and mailbox.get_dispatch(a) is None

    not_dead = cli("dlq", "purge", alive, "--yes")
    assert not_dead.exit_code == 1 and "not a dead letter" in one_error_line(not_dead)
    assert mailbox.get_dispatch(alive) is not None
    unknown = cli("dlq", "purge", "no-such-id", "--yes")
    assert unknown.exit_code == 4

    everything = cli("dlq", "purge", "--all", "--thread", "t-purge-2", "--yes")
    assert everything.exit_code == 0 and "purged 1" in everything.stdout
    assert mailbox.get_dispatch(c) is None and mailbox.get_dispatch(b) is not None
    assert as_json(cli("--json", "dlq", "purge", "--all", "--yes"))["purged"] == 1
    assert mailbox.dead_letters() == []


# ============================================================================= operations
def test_stats(cli: Cli, mailbox: Mailbox) -> None:
    submit(mailbox, "t-stats-a", "echo", "x")
    submit(mailbox, "t-stats-a", "echo", "y")
    submit(mailbox, "t-stats-b", "echo", "z")
    submit(mailbox, "t-stats-c", "ask", "ok?", run=True)
    out = as_json(cli("--json", "stats"))
    assert out["counts"]["Queued"] == 3 and out["counts"]["Acked"] == 1
    assert out["threads_with_queued"] == 2
    assert out["runs_waiting"] == 1
    assert out["oldest_queued_age_ms"] >= 0 and out["oldest_queued_at_iso"].endswith("Z")
    assert abs(out["clock_offset_ms"]) < 1000 and out["clock_round_trip_ms"] >= 0
    assert out["clock_limit_ms"] == mailbox.settings.lease_ms / 6
    assert out["clock_beyond_limit"] is False
    human = cli("stats")
    assert human.exit_code == 0
    assert "threads with queued work" in human.stdout and "Queued" in human.stdout
    assert "this host's clock" in human.stdout and "Redis's" in human.stdout


def test_audit_exit_codes(cli: Cli, mailbox: Mailbox) -> None:
    dispatch_id, _ = submit(mailbox, "t-audit", "echo", "x")
    clean = as_json(cli("--json", "audit"))
    assert clean["ok"] is True and clean["violations"] == []
    assert cli("audit").exit_code == 0

    with mailbox.store.engine.begin() as conn:  # an epoch raised without superseding
        conn.execute(sa.update(thread_epochs).where(thread_epochs.c.thread_id == "t-audit")
                     .values(current_epoch=3))
    broken = cli("--json", "audit")
    assert broken.exit_code == 3
    report = json.loads(broken.stdout)
    assert report["ok"] is False
    [violation] = report["violations"]
    assert violation["check"] == "stale_queued" and violation["sample"] == [dispatch_id]
    human = cli("audit")
    assert human.exit_code == 3 and "stale_queued" in human.stdout and "FAILED" in human.stdout


def test_db_upgrade_and_global_json(cli: Cli) -> None:
    out = as_json(cli("db", "upgrade", "--json"))
    assert out["revision"]
    assert "database at revision" in cli("db", "upgrade").stdout


def test_bad_connection_settings_are_one_line(mailbox: Mailbox) -> None:
    runner = CliRunner(env=CLEAN_ENV)
    bad_url = runner.invoke(main, ["--database-url", "mysql://nowhere/db", "--redis-url",
                                   "redis://127.0.0.1:1/0", "stats"])
    assert bad_url.exit_code == 2 and "database URL" in one_error_line(bad_url)
    no_schema = runner.invoke(main, ["--database-url", "sqlite://", "--redis-url",
                                     mailbox.settings.redis_url or "", "stats"])
    assert no_schema.exit_code == 1 and "db upgrade" in one_error_line(no_schema)


def test_python_m_mailbox_from_the_project_root(mailbox: Mailbox) -> None:
    submit(mailbox, "t-subprocess", "echo", "x")
    s = mailbox.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBOX_", "CELERY_"))}
    env.update({"MAILBOX_DATABASE_URL": s.database_url, "MAILBOX_REDIS_URL": s.redis_url or "",
                "MAILBOX_NAMESPACE": s.namespace})
    helped = subprocess.run([sys.executable, "-m", "mailbox", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "Exit codes" in helped.stdout and "dlq" in helped.stdout
    stats = subprocess.run([sys.executable, "-m", "mailbox", "stats", "--json"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["counts"]["Queued"] == 1


# ================================================================================= thread
def test_thread_prints_the_conversation_and_pages_back(cli: Cli, mailbox: Mailbox) -> None:
    for text in ("first", "second", "third"):
        submit(mailbox, "t-conv", "echo", text, run=True)
    out = as_json(cli("--json", "thread", "t-conv"))
    assert [(m["role"], m["content"]) for m in out] == [
        ("user", "first"), ("assistant", "first"), ("user", "second"),
        ("assistant", "second"), ("user", "third"), ("assistant", "third")]
    newest = as_json(cli("--json", "thread", "t-conv", "--limit", "2"))
    older = as_json(cli("--json", "thread", "t-conv", "--limit", "2", "--before",
                        str(newest[0]["seq"])))
    assert [m["content"] for m in older + newest] == ["second", "second", "third", "third"]
    human = cli("thread", "t-conv", "--limit", "2")
    assert human.exit_code == 0 and "assistant" in human.stdout and "third" in human.stdout
    assert f"--before {newest[0]['seq']}" in human.stdout
    assert cli("thread", "t-empty").stdout.strip() == "no messages on thread t-empty"
    missing = cli("--json", "thread", "t-conv", "--before", "999")
    assert missing.exit_code == 4 and "no message 999" in one_error_line(missing)


@pytest.mark.parametrize("json_mode", [False, True])
def test_submit_wait_exits_5_when_the_dispatch_is_not_acked(
        cli: Cli, make_mailbox: Callable[..., Mailbox], json_mode: bool) -> None:
    """A dead letter (here the built-in `fail` agent) is a result, not a success: exit code
    5 (documented), the result printed as usual, and stderr saying how it ended."""
    worker_box = make_mailbox()
    thread = f"t-wait-fail-{int(json_mode)}"
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            rt = worker_box.runtime()
            ctx = claim_next(rt, thread)
            if ctx is not None:
                run_chain(rt, ctx)
                return
            time.sleep(0.02)

    args = [*(["--json"] if json_mode else []), "submit", thread, "fail", "x", "--wait", "20"]
    with racing(worker, timeout_s=30):
        try:
            result = cli(*args)
        finally:
            stop.set()
    assert result.exit_code == 5, (result.exit_code, result.output)
    line = result.stderr.strip().splitlines()[-1]  # after the wake-up warning
    assert "Traceback" not in result.output
    assert "ended DeadLetter" in line and "requested failure" in line
    if json_mode:
        assert json.loads(result.stdout)["dispatch"]["status"] == "DeadLetter"
        assert json.loads(line)["kind"] == "not_acked"
    else:
        assert "DeadLetter" in result.stdout
