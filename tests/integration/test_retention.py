"""Retention (docs/behaviour.md#gc): what garbage collection deletes and what it keeps, the
dead-letter purge, and the bounded work of every list call and of the sweep
(docs/behaviour.md#sweep). Real SQL (every configured backend) and real Redis.

Runs are submitted through the facade and executed with the phase functions (what a worker
does), stamped with the wall clock; garbage collection is then run at a `now` past the
retention under test.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner

from mailbox import DispatchStatus, Mailbox, RunStatus, ValidationError
from mailbox.agents import AgentContext
from mailbox.audit import audit
from mailbox.cli import main
from mailbox.errors import PermanentError, StoreUnavailableError
from mailbox.events import CursorExpiredError, EventStreams
from mailbox.maintenance import GcReport, garbage_collection, sweep
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import now_ms
from mailbox.schema import messages, runs, thread_epochs
from mailbox.store.dispatches import MAX_LIST_LIMIT
from tests.support.phase_kit import register

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


def process(box: Mailbox, thread_id: str) -> None:
    rt = box.runtime()
    ctx = claim_next(rt, thread_id)
    assert ctx is not None, f"nothing claimable on {thread_id}"
    run_chain(rt, ctx)


def gc(box: Mailbox, now: int, **settings: Any) -> GcReport:
    rt = box.runtime()
    if settings:
        rt = replace(rt, settings=replace(box.settings, **settings))
    return garbage_collection(rt, now)


def done(box: Mailbox, thread_id: str, agent: str = "echo", value: Any = "hi") -> Any:
    receipt = box.submit(thread_id, agent, value)
    process(box, thread_id)
    return receipt


def count(box: Mailbox, table: sa.Table, **where: str) -> int:
    query = sa.select(sa.func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with box.store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def has_epoch_row(box: Mailbox, thread_id: str) -> bool:
    return count(box, thread_epochs, thread_id=thread_id) == 1


def stream_keys(box: Mailbox, run_id: str) -> int:
    """How many keys the run's events have in Redis: its stream, and the meta hash of a
    stream written before the stream kept its own books (never written now)."""
    base = f"{box.settings.namespace}:events:{run_id}"
    return int(box.store.coordinator.client.exists(base, base + ":meta"))


# ====================================================================== terminal dispatches
def test_terminal_dispatch_goes_after_the_retention_and_a_dead_letter_survives_it(
        mailbox: Mailbox) -> None:
    acked = done(mailbox, "t-acked")
    dead = done(mailbox, "t-dead", "fail")
    acked_at = mailbox.store.load_dispatch(acked.dispatch_id).updated_at  # type: ignore[union-attr]
    day = mailbox.settings.retention_s * 1000

    report = gc(mailbox, acked_at + day)  # not strictly older yet
    assert report.dispatches == 0 and mailbox.get_dispatch(acked.dispatch_id) is not None

    report = gc(mailbox, now_ms() + day + 1000)
    assert (report.dispatches, report.dead_letters) == (1, 0)
    assert mailbox.get_dispatch(acked.dispatch_id) is None
    survivor = mailbox.get_dispatch(dead.dispatch_id)
    assert survivor is not None and survivor.status == DispatchStatus.DeadLetter
    # The runs are the thread's conversation: kept for the thread retention.
    assert mailbox.get_run(acked.run_id) is not None
    assert mailbox.get_run(dead.run_id) is not None


def test_dead_letter_goes_after_its_own_retention(mailbox: Mailbox) -> None:
    dead = done(mailbox, "t-dead", "fail")
    two_weeks = mailbox.settings.dead_letter_retention_s * 1000
    assert two_weeks == 14 * DAY_MS

    assert gc(mailbox, now_ms() + two_weeks - HOUR_MS).dead_letters == 0
    assert mailbox.dead_letters(thread_id="t-dead") != []
    report = gc(mailbox, now_ms() + two_weeks + 1000)
    assert report.dead_letters == 1 and mailbox.get_dispatch(dead.dispatch_id) is None
    # Independent settings: a short dead-letter retention takes it before the others'.
    again = done(mailbox, "t-dead-2", "fail")
    acked = done(mailbox, "t-dead-2")
    report = gc(mailbox, now_ms() + 2000, dead_letter_retention_s=1)
    assert (report.dead_letters, report.dispatches) == (1, 0)
    assert mailbox.get_dispatch(again.dispatch_id) is None
    assert mailbox.get_dispatch(acked.dispatch_id) is not None


def test_replay_works_after_the_normal_retention_passed(mailbox: Mailbox) -> None:
    dead = done(mailbox, "t-replay", "fail")
    gc(mailbox, now_ms() + 3 * DAY_MS)
    assert mailbox.get_dispatch(dead.dispatch_id) is not None
    receipt = mailbox.replay(dead.dispatch_id)
    process(mailbox, "t-replay")
    replayed = mailbox.get_dispatch(receipt.dispatch_id)
    assert replayed is not None and replayed.status == DispatchStatus.DeadLetter  # ran again
    assert replayed.attempt_count >= 0 and replayed.run_id == receipt.run_id


# ===================================================================== runs and messages
def test_finished_run_and_its_messages_go_after_the_thread_retention(mailbox: Mailbox) -> None:
    receipt = done(mailbox, "t-run")
    logged = count(mailbox, messages, run_id=receipt.run_id)  # the input (and any answer)
    assert logged >= 1
    month = mailbox.settings.thread_retention_s * 1000
    assert month == 30 * DAY_MS

    report = gc(mailbox, now_ms() + month - HOUR_MS)
    assert report.dispatches == 1 and report.runs == 0, "the dispatch goes after a day"
    assert mailbox.get_run(receipt.run_id) is not None
    assert len(mailbox.runs.thread_messages("t-run")) == logged

    report = gc(mailbox, now_ms() + month + 1000)
    assert (report.runs, report.messages, report.threads) == (1, logged, 1)
    assert mailbox.get_run(receipt.run_id) is None
    assert mailbox.runs.thread_messages("t-run") == []


def test_a_run_a_kept_dispatch_references_stays_with_its_input(mailbox: Mailbox) -> None:
    dead = done(mailbox, "t-kept", "fail")
    report = gc(mailbox, now_ms() + 31 * DAY_MS, dead_letter_retention_s=60 * 24 * 3600)
    assert (report.dead_letters, report.runs, report.threads) == (0, 0, 0)
    assert mailbox.get_run(dead.run_id) is not None
    assert [m.role for m in mailbox.runs.run_messages(dead.run_id)] == ["user"]
    assert has_epoch_row(mailbox, "t-kept")
    mailbox.replay(dead.dispatch_id)  # still possible: run, pin and input are there


def test_event_streams_of_deleted_runs_go(mailbox: Mailbox) -> None:
    gone = done(mailbox, "t-events")
    kept = done(mailbox, "t-events-kept", "fail")
    assert stream_keys(mailbox, gone.run_id) == 1 and stream_keys(mailbox, kept.run_id) == 1
    last = [e.id for e in mailbox.events_of(gone.run_id)][-1]

    report = gc(mailbox, now_ms() + 31 * DAY_MS, dead_letter_retention_s=60 * 24 * 3600)
    assert report.runs == 1 and report.event_streams == 1  # streams, not keys
    assert stream_keys(mailbox, gone.run_id) == 0
    assert stream_keys(mailbox, kept.run_id) == 1
    with pytest.raises(CursorExpiredError):
        mailbox.events.read(gone.run_id, after=last)


def test_replay_of_a_kept_dead_letter_stays_so_replay_stays_idempotent(
        mailbox: Mailbox) -> None:
    def fails_once(ctx: AgentContext) -> str:
        if calls.count == 1:
            raise PermanentError("first call fails")
        return "ok"

    name, calls = register(fails_once)
    dead = done(mailbox, "t-replays", name)
    first = mailbox.replay(dead.dispatch_id)
    process(mailbox, "t-replays")  # the replay succeeds: its dispatch Acked, its run done
    # A thread retention shorter than the dead letters': the replay's run would be due.
    report = gc(mailbox, now_ms() + 2 * DAY_MS, thread_retention_s=3600,
                dead_letter_retention_s=14 * 24 * 3600)
    assert report.kept_replays == 1
    assert mailbox.get_run(first.run_id) is not None
    again = mailbox.replay(dead.dispatch_id)
    assert again.already_replayed and again.run_id == first.run_id


# ================================================================================ threads
def test_never_a_thread_with_live_work(mailbox: Mailbox) -> None:
    queued = mailbox.submit("t-queued", "echo", "later")
    claimed = mailbox.submit("t-claimed", "echo", "now")
    [_] = mailbox.store.claim("t-claimed", "c", 30_000, now_ms())
    waiting = mailbox.submit("t-waiting", "ask", "deploy?")
    process(mailbox, "t-waiting")
    assert mailbox.get_run(waiting.run_id).status == RunStatus.waiting  # type: ignore[union-attr]
    created = mailbox.submit("t-created", "echo", "x")
    mailbox.store.cancel(created.dispatch_id, now_ms())  # a crash before the reconcile
    assert mailbox.get_run(created.run_id).status == RunStatus.created  # type: ignore[union-attr]

    report = gc(mailbox, now_ms() + 365 * DAY_MS)
    assert report.dispatches == 2, "the acked ask and the cancelled dispatch"
    assert report.runs == 0 and report.threads == 0
    for receipt, thread in ((queued, "t-queued"), (claimed, "t-claimed"),
                            (waiting, "t-waiting"), (created, "t-created")):
        assert mailbox.get_run(receipt.run_id) is not None, thread
        assert mailbox.runs.run_messages(receipt.run_id), thread
        assert has_epoch_row(mailbox, thread), thread
    assert mailbox.get_dispatch(queued.dispatch_id).status == DispatchStatus.Queued  # type: ignore[union-attr]
    assert mailbox.get_dispatch(claimed.dispatch_id).status == DispatchStatus.Claimed  # type: ignore[union-attr]


def test_an_empty_thread_loses_its_epoch_row_and_cached_epoch_and_starts_again(
        mailbox: Mailbox) -> None:
    done(mailbox, "t-epoch")
    mailbox.interrupt("t-epoch")
    mailbox.interrupt("t-epoch")
    assert mailbox.store.current_dispatch_epoch("t-epoch") == 2  # cached in Redis
    epoch_key = mailbox.store.coordinator.epoch_key("t-epoch")
    assert mailbox.store.coordinator.client.get(epoch_key) == b"2"

    report = gc(mailbox, now_ms() + 31 * DAY_MS)
    assert report.threads == 1
    assert not has_epoch_row(mailbox, "t-epoch")
    assert mailbox.store.coordinator.client.get(epoch_key) is None

    # A later submit starts the thread at epoch 0 and runs: nothing fences it as stale.
    receipt = done(mailbox, "t-epoch", value="again")
    after = mailbox.get_dispatch(receipt.dispatch_id)
    assert after is not None and after.status == DispatchStatus.Acked
    assert after.dispatch_epoch == 0
    assert audit(mailbox).ok, audit(mailbox).to_json()


def test_an_epoch_row_stays_while_any_dispatch_of_the_thread_is_left(mailbox: Mailbox) -> None:
    dead = done(mailbox, "t-dl-epoch", "fail")
    mailbox.interrupt("t-dl-epoch")
    # Runs may go (short thread retention), the dead letter stays: so does the epoch.
    report = gc(mailbox, now_ms() + 2 * DAY_MS, thread_retention_s=3600)
    assert report.threads == 0 and report.runs == 0  # the dead letter references its run
    assert has_epoch_row(mailbox, "t-dl-epoch")
    assert mailbox.store.sql_epoch("t-dl-epoch") == 1
    assert mailbox.get_dispatch(dead.dispatch_id) is not None


def test_the_thread_scan_is_bounded_and_goes_on_where_it_stopped(mailbox: Mailbox) -> None:
    for i in range(5):
        mailbox.interrupt(f"t-scan-{i}")  # epoch rows and nothing else
    rt = mailbox.runtime()
    first = garbage_collection(rt, now_ms(), max_threads=2)
    assert (first.threads_scanned, first.threads, first.scan_complete) == (2, 2, False)
    second = garbage_collection(rt, now_ms(), max_threads=2)
    assert (second.threads_scanned, second.threads, second.scan_complete) == (2, 2, False)
    third = garbage_collection(rt, now_ms(), max_threads=2)
    assert third.threads == 1 and third.scan_complete
    assert count(mailbox, thread_epochs) == 0


def test_collection_works_in_batches_of_the_given_size(mailbox: Mailbox) -> None:
    receipts = [done(mailbox, f"t-batch-{i % 2}") for i in range(7)]
    logged = count(mailbox, messages)
    report = garbage_collection(mailbox.runtime(), now_ms() + 31 * DAY_MS, batch=2)
    assert (report.dispatches, report.runs, report.messages, report.threads) == (
        7, 7, logged, 2)
    # Two rows per transaction at most: 4 of dispatches, 4 pages of runs (each deleting its
    # runs after at least one of messages), one per thread.
    assert report.transactions >= 4 + 2 * 4 + 2
    assert all(mailbox.get_run(r.run_id) is None for r in receipts)
    with pytest.raises(ValidationError, match="batch"):
        garbage_collection(mailbox.runtime(), now_ms(), batch=0)


def test_concurrent_submit_keeps_its_thread(mailbox: Mailbox) -> None:
    """The thread's deletion is decided under its lock: a thread that got a dispatch after
    the candidate read keeps its epoch row."""
    mailbox.interrupt("t-race")
    retention = mailbox.retention
    assert retention.empty_threads(["t-race"]) == ["t-race"]
    mailbox.submit("t-race", "echo", "x")
    assert retention.delete_thread("t-race").threads == 0
    assert has_epoch_row(mailbox, "t-race")


def test_an_epoch_row_stays_when_redis_cannot_forget_its_cached_epoch(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    mailbox.interrupt("t-redis-down")
    mailbox.store.current_dispatch_epoch("t-redis-down")  # cached: 1

    def unreachable(*_: Any) -> None:
        raise redis.ConnectionError("Redis is down")

    monkeypatch.setattr(mailbox.store.coordinator, "forget_epochs", unreachable)
    with pytest.raises(StoreUnavailableError, match="redis unreachable"):
        mailbox.retention.delete_thread("t-redis-down")
    assert has_epoch_row(mailbox, "t-redis-down"), "rolled back: the cache would outlive it"
    assert mailbox.store.sql_epoch("t-redis-down") == 1
    monkeypatch.undo()
    assert mailbox.retention.delete_thread("t-redis-down").threads == 1
    assert mailbox.store.coordinator.client.get(
        mailbox.store.coordinator.epoch_key("t-redis-down")) is None


# ================================================================================== purge
def test_purge_removes_run_input_and_event_stream(mailbox: Mailbox) -> None:
    dead = done(mailbox, "t-purge", "fail")
    assert stream_keys(mailbox, dead.run_id) == 1
    assert mailbox.purge_dead_letters([dead.dispatch_id]) == 1
    assert mailbox.get_dispatch(dead.dispatch_id) is None
    assert mailbox.get_run(dead.run_id) is None
    assert count(mailbox, messages, run_id=dead.run_id) == 0
    assert stream_keys(mailbox, dead.run_id) == 0


def test_purge_keeps_a_run_another_dispatch_references(mailbox: Mailbox) -> None:
    def suspend_then_fail(ctx: AgentContext) -> str:
        if ctx.decision is None:
            ctx.suspend("approve")
        raise PermanentError("refused after the decision")

    name, _ = register(suspend_then_fail)
    first = mailbox.submit("t-resumed", name, "go?")
    process(mailbox, "t-resumed")  # acked, run waiting
    resumed = mailbox.resume(first.run_id, "yes")
    process(mailbox, "t-resumed")  # the resumed dispatch dead-letters
    assert mailbox.get_dispatch(resumed.dispatch_id).status == DispatchStatus.DeadLetter  # type: ignore[union-attr]

    assert mailbox.purge_dead_letters([resumed.dispatch_id]) == 1
    assert mailbox.get_run(first.run_id) is not None, "the acked first dispatch needs it"
    assert [m.role for m in mailbox.runs.run_messages(first.run_id)] == ["user", "decision"]


def test_cli_dlq_purge_removes_runs_too(mailbox: Mailbox) -> None:
    dead = done(mailbox, "t-cli-purge", "fail")
    s = mailbox.settings
    assert s.redis_url is not None
    result = CliRunner(env={"MAILBOX_DATABASE_URL": None, "MAILBOX_REDIS_URL": None,
                            "MAILBOX_NAMESPACE": None}).invoke(main, [
        "--database-url", s.database_url, "--redis-url", s.redis_url, "--namespace",
        s.namespace, "dlq", "purge", dead.dispatch_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert mailbox.get_run(dead.run_id) is None
    assert mailbox.runs.run_messages(dead.run_id) == []


# ============================================================================ list limits
def test_every_list_call_has_a_maximum_limit(mailbox: Mailbox) -> None:
    too_many = MAX_LIST_LIMIT + 1
    calls: dict[str, Callable[[], object]] = {
        "list_dispatches": lambda: mailbox.store.list_dispatches("t", None, too_many, 0),
        "list_terminal_dispatches": lambda: mailbox.store.list_terminal_dispatches(too_many),
        "list_dead_letters": lambda: mailbox.store.list_dead_letters(limit=too_many),
        "dead_letters": lambda: mailbox.dead_letters(limit=too_many),
        "thread_messages": lambda: mailbox.runs.thread_messages("t", too_many),
        "unreconciled": lambda: mailbox.store.unreconciled_terminal_dispatches(too_many),
        "due_thread_ids": lambda: mailbox.store.due_thread_ids(now_ms(), too_many),
        "purge": lambda: mailbox.purge_dead_letters([f"d{i}" for i in range(too_many)]),
    }
    for name, call in calls.items():
        with pytest.raises(ValidationError, match=str(MAX_LIST_LIMIT)):
            call()
        assert name
    assert mailbox.store.list_dispatches("t", None, MAX_LIST_LIMIT, 0) == []
    assert mailbox.dead_letters(limit=MAX_LIST_LIMIT) == []


def test_cli_list_limits_are_the_same(mailbox: Mailbox) -> None:
    s = mailbox.settings
    assert s.redis_url is not None
    base = ["--database-url", s.database_url, "--redis-url", s.redis_url, "--namespace",
            s.namespace]
    runner = CliRunner(env={"MAILBOX_DATABASE_URL": None, "MAILBOX_REDIS_URL": None,
                            "MAILBOX_NAMESPACE": None})
    for args in (["list", "t", "--limit", str(MAX_LIST_LIMIT + 1)],
                 ["dlq", "list", "--limit", str(MAX_LIST_LIMIT + 1)],
                 ["dlq", "purge", "--all", "--yes", "--batch-size", str(MAX_LIST_LIMIT + 1)]):
        result = runner.invoke(main, [*base, *args])
        assert result.exit_code == 2 and str(MAX_LIST_LIMIT) in result.output, result.output
    ok = runner.invoke(main, [*base, "--json", "dlq", "list", "--limit", str(MAX_LIST_LIMIT)])
    assert ok.exit_code == 0, ok.output


# ========================================================================= sweep batches
def test_sweep_reconciles_every_page_of_unreconciled_dispatches(mailbox: Mailbox) -> None:
    receipts = [mailbox.submit(f"t-rec-{i}", "echo", "x") for i in range(130)]
    for receipt in receipts:  # cancelled in the store only: what a crash leaves
        mailbox.store.cancel(receipt.dispatch_id, now_ms())
    # One that cannot be reconciled (its run names another thread) must not stop the pages.
    with mailbox.store.engine.begin() as conn:
        conn.execute(sa.update(runs).where(runs.c.run_id == receipts[0].run_id)
                     .values(thread_id="elsewhere"))
    report = sweep(mailbox.runtime(), now_ms())
    assert len(report.reconciled) == 129
    assert all(mailbox.get_run(r.run_id).status == RunStatus.done  # type: ignore[union-attr]
               for r in receipts[1:])


def test_unreconciled_pages_by_cursor(mailbox: Mailbox) -> None:
    receipts = [mailbox.submit(f"t-page-{i}", "echo", "x") for i in range(5)]
    for receipt in receipts:
        mailbox.store.cancel(receipt.dispatch_id, now_ms())
    first = mailbox.store.unreconciled_terminal_dispatches(3)
    rest = mailbox.store.unreconciled_terminal_dispatches(
        3, (first[-1].updated_at, first[-1].dispatch_id))
    assert len(first) == 3 and len(rest) == 2
    assert {d.dispatch_id for d in first + rest} == {r.dispatch_id for r in receipts}


def test_retention_settings_come_from_the_environment() -> None:
    from mailbox.settings import Settings

    env = {"MAILBOX_RETENTION_S": "60", "MAILBOX_DEAD_LETTER_RETENTION_S": "120",
           "MAILBOX_THREAD_RETENTION_S": "180", "MAILBOX_EVENT_STREAM_MAX_BYTES": "300000"}
    s = Settings.from_env(env)
    assert (s.retention_s, s.dead_letter_retention_s, s.thread_retention_s,
            s.event_stream_max_bytes) == (60, 120, 180, 300_000)
    d = Settings.from_env({})
    assert (d.retention_s, d.dead_letter_retention_s, d.thread_retention_s,
            d.event_stream_max_bytes) == (86_400, 14 * 86_400, 30 * 86_400, 4 * 1024 * 1024)
    for name, value in (("MAILBOX_DEAD_LETTER_RETENTION_S", "-1"),
                        ("MAILBOX_THREAD_RETENTION_S", "soon"),
                        ("MAILBOX_EVENT_STREAM_MAX_BYTES", "1000")):
        with pytest.raises(ValidationError, match=name):
            Settings.from_env({name: value})


def test_unknown_ids_are_no_work(mailbox: Mailbox) -> None:
    assert mailbox.purge_dead_letters([]) == 0
    assert mailbox.purge_dead_letters([str(uuid.uuid4())]) == 0
    report = gc(mailbox, now_ms())
    assert report == GcReport(threads_scanned=0, scan_complete=True)


# ====================================================================== event byte budget
def _payload_bytes(box: Mailbox, stream: EventStreams, run_id: str) -> tuple[int, int]:
    """(bytes of the retained events' payloads, the running count in the newest entry's
    books)."""
    client = box.store.coordinator.client
    key = f"{stream.namespace}:events:{run_id}"
    total = sum(len(fields[b"e"]) for _, fields in client.xrange(key))
    newest = client.xrevrange(key, count=1)
    return total, int(newest[0][1].get(b"b", -1)) if newest else -1


def test_event_streams_are_bounded_in_bytes(mailbox: Mailbox) -> None:
    assert mailbox.events.max_bytes == mailbox.settings.event_stream_max_bytes == 4 * 2**20
    small = EventStreams(mailbox.store.coordinator.client, mailbox.settings.namespace,
                         retention_s=60, max_bytes=10_000)
    ids = [small.emit("run-bytes", "d1", "output", {"i": i, "text": "x" * 900})
           for i in range(30)]
    kept = small.read("run-bytes")
    total, counted = _payload_bytes(mailbox, small, "run-bytes")
    assert total == counted <= 10_000
    assert 8 <= len(kept) < 30 and kept[-1].id == ids[-1], "the oldest went, the newest stay"
    assert [e.data["i"] for e in kept] == list(range(30 - len(kept), 30))
    with pytest.raises(CursorExpiredError):
        small.read("run-bytes", after=ids[0])
    assert [e.data["i"] for e in small.read("run-bytes", after=kept[0].id)] == [
        e.data["i"] for e in kept[1:]]


def test_an_event_over_the_budget_is_kept_alone_until_the_next(mailbox: Mailbox) -> None:
    tiny = EventStreams(mailbox.store.coordinator.client, mailbox.settings.namespace,
                        retention_s=60, max_bytes=500)
    tiny.emit("run-big", "d1", "output", {"i": 0})
    big = tiny.emit("run-big", "d1", "output", {"text": "y" * 2000})
    assert [e.id for e in tiny.read("run-big")] == [big]
    last = tiny.emit("run-big", "d1", "output", {"i": 2})
    assert [e.id for e in tiny.read("run-big")] == [last]
    assert _payload_bytes(mailbox, tiny, "run-big")[0] == _payload_bytes(
        mailbox, tiny, "run-big")[1]


def test_a_stream_from_before_the_byte_budget_is_counted_once(mailbox: Mailbox) -> None:
    client = mailbox.store.coordinator.client
    key = f"{mailbox.settings.namespace}:events:run-old"
    for i in range(5):  # what the previous append script left: no byte count in the meta
        entry = client.xadd(key, {"e": json.dumps({"type": "output", "run_id": "run-old",
                                                   "dispatch_id": "d1", "ts": 1,
                                                   "data": {"i": i, "pad": "z" * 1000}})})
        client.hset(key + ":meta", "last_id", entry)
    stream = EventStreams(client, mailbox.settings.namespace, retention_s=60,
                          max_bytes=3000)
    stream.emit("run-old", "d1", "output", {"i": 5})
    total, counted = _payload_bytes(mailbox, stream, "run-old")
    assert total == counted <= 3000
    assert [e.data["i"] for e in stream.read("run-old")] == [3, 4, 5]
