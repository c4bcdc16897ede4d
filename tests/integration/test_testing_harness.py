"""`mailbox.testing`, used as a user's tests use it (README "Test your agents"): the
in-process harness (`mailbox_harness`) and the Celery fixtures (`mailbox_celery_worker`) of
`mailbox.testing.pytest_plugin`, enabled here as a user enables them.

Nothing here needs a service: the harness brings an in-memory SQLite and an embedded Redis,
and the Celery worker runs in this process on kombu's in-memory broker.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import current_app
from celery.signals import task_prerun

from mailbox import DispatchStatus, Mailbox, RunStatus, Termination
from mailbox.agents import AgentContext, agent
from mailbox.context import PhaseContext
from mailbox.database import create_engine
from mailbox.testing import MailboxHarness, MemoryDatabase, PhaseCrashedError
from mailbox.testing.celery_worker import celery_worker_for
from tasks import dispatch
from tasks import runtime as tasks_runtime
from tasks.app import app as project_app

pytest_plugins = ["mailbox.testing.pytest_plugin", "pytester"]

ROOT = Path(__file__).resolve().parents[2]


@agent("harness-chat")
def chat(ctx: AgentContext) -> str:
    """Answers with how many user turns it has seen so far, its own input included."""
    turns = sum(1 for m in ctx.messages if m.role == "user")
    return f"{turns}: {ctx.input}"


def conversation(box: MailboxHarness, thread_id: str) -> list[tuple[str, Any]]:
    return [(m.role, m.content) for m in box.thread(thread_id)]


# ================================================================= the in-process harness
def test_an_agent_runs_through_the_five_phases_with_json_between_them(
        mailbox_harness: MailboxHarness) -> None:
    result = mailbox_harness.run("echo", "hi", thread_id="t1")

    assert result.completed and result.response == "hi"
    assert result.event_types == ["run_queued", "run_started", "run_finish"]
    assert [(m.role, m.content) for m in result.messages] == [("user", "hi"),
                                                              ("assistant", "hi")]
    (attempt,) = result.attempts
    assert (attempt.attempt, attempt.outcome, attempt.settled) == (0, "completed", "completed")
    # What each phase received: the context decoded from its JSON message, and only that.
    verify_in, reconstruct_in, resolve_in, execute_in, settle_in = attempt.hops
    assert "token" in verify_in and "instance_id" not in verify_in
    assert reconstruct_in == verify_in
    assert "instance_id" in resolve_in and "agent" not in resolve_in
    assert execute_in["agent"] == ["echo", "1"]
    assert settle_in["outcome"] == {"kind": "completed", "error": None, "recorded": True,
                                    "replayed": False}
    for hop in attempt.hops:
        assert PhaseContext.from_message(hop).to_message() == hop


def test_a_thread_of_submissions_runs_in_order_and_each_sees_the_conversation(
        mailbox_harness: MailboxHarness) -> None:
    box = mailbox_harness
    receipts = [box.submit("t-chat", "harness-chat", text) for text in ("a", "b", "c")]
    urgent = box.submit("t-chat", "harness-chat", "urgent", priority=0)

    ran = box.drain()

    assert [a.dispatch_id for a in ran] == [urgent.dispatch_id] + [r.dispatch_id
                                                                  for r in receipts]
    # Runs are listed in the order their inputs arrived, each answer beside its input; the
    # urgent run, claimed first, arrived last and saw the three earlier inputs.
    assert conversation(box, "t-chat") == [
        ("user", "a"), ("assistant", "1: a"), ("user", "b"), ("assistant", "2: b"),
        ("user", "c"), ("assistant", "3: c"), ("user", "urgent"), ("assistant", "4: urgent")]
    assert box.drain() == []


def test_retries_run_on_the_harness_clock_without_waiting(
        mailbox_harness: MailboxHarness) -> None:
    box = mailbox_harness
    result = box.run("flaky", {"fail_times": 2}, thread_id="t-flaky")

    assert result.completed and result.response == "ok after 2 failures"
    assert [a.settled for a in result.attempts] == ["transient_error", "transient_error",
                                                    "completed"]
    assert result.dispatch.attempt_count == 2
    # The backoff settle computed (250 ms, then 250 ms), as delayed wake-ups; the clock was
    # moved to each retry instead of waiting for it.
    assert [w for w in box.wakes if w[1] > 0] == [("t-flaky", 250), ("t-flaky", 250)]
    assert box.clock.offset_ms > 0
    finishes = [e.data.get("status") for e in result.events if e.type == "run_finish"]
    assert finishes == ["retrying", "retrying", "acked"]


def test_without_auto_advance_a_retry_waits_for_the_clock(
        mailbox_harness: MailboxHarness) -> None:
    box = mailbox_harness
    first = box.run("flaky", {"fail_times": 1}, advance=False)
    assert first.status == DispatchStatus.Queued and first.dispatch.attempt_count == 1
    due = box.next_due()
    assert due == first.dispatch.available_at

    assert box.drain(advance=False) == []  # not due yet
    box.clock.advance_to(due)
    (attempt,) = box.drain(advance=False)

    assert attempt.settled == "completed"
    assert box.result(first.receipt.dispatch_id).response == "ok after 1 failures"


def test_a_permanent_failure_dead_letters_with_its_reason(
        mailbox_harness: MailboxHarness) -> None:
    result = mailbox_harness.run("fail", "x", thread_id="t-fail")

    assert result.status == DispatchStatus.DeadLetter
    assert result.error == "requested failure"
    assert result.run.termination == Termination.error("requested failure")
    assert [d.dispatch_id for d in mailbox_harness.mailbox.dead_letters(thread_id="t-fail")
            ] == [result.receipt.dispatch_id]


def test_cancel_a_queued_dispatch_before_it_runs(mailbox_harness: MailboxHarness) -> None:
    box = mailbox_harness
    receipt = box.submit("t-cancel", "echo", "later", delay_ms=60_000)

    assert box.cancel(receipt.dispatch_id)
    assert box.drain() == []  # nothing left to run, even with the clock free to jump

    result = box.result(receipt.dispatch_id)
    assert result.status == DispatchStatus.Cancelled
    assert result.run.status == RunStatus.done
    assert result.run.termination == Termination.cancelled()


def test_cancel_a_running_agent_through_the_heartbeat(mailbox_harness: MailboxHarness) -> None:
    box = mailbox_harness
    with box.worker():
        receipt = box.submit("t-running", "sleep", {"ms": 60_000})
        box.wait_for_event(receipt.run_id, "run_started", timeout_s=30)
        assert box.cancel(receipt.dispatch_id)
        final = box.wait(receipt.dispatch_id, timeout_s=30)

    assert final.status == DispatchStatus.Acked
    result = box.result(receipt.dispatch_id)
    assert result.run.termination == Termination.cancelled()
    assert result.event_types[-1] == "run_finish"


def test_an_interrupt_supersedes_queued_work_and_latest_wins(
        mailbox_harness: MailboxHarness) -> None:
    box = mailbox_harness
    stale = [box.submit("t-int", "echo", text, delay_ms=60_000) for text in ("x", "y")]
    latest = box.submit("t-int", "echo", "z", interrupt=True)

    box.drain()

    assert [box.dispatch(r.dispatch_id).status for r in stale] == [DispatchStatus.Superseded] * 2
    assert box.result(latest.dispatch_id).response == "z"


def test_a_run_that_asks_waits_for_the_decision_and_resumes(
        mailbox_harness: MailboxHarness) -> None:
    box = mailbox_harness
    asked = box.run("ask", "deploy?", thread_id="t-ask")
    assert asked.status == DispatchStatus.Acked and asked.run.status == RunStatus.waiting
    assert asked.run.waiting is not None and asked.run.waiting["action"] == "approve"

    resumed = box.resume(asked.run.run_id, "approved")
    box.drain()

    result = box.result(resumed.dispatch_id)
    assert result.completed and result.response == "approved"
    assert result.run.run_id == asked.run.run_id


def test_a_crashing_phase_is_raised_and_left_for_the_sweep(
        mailbox_harness: MailboxHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    box = mailbox_harness

    def broken(resolution_id: str) -> None:
        raise RuntimeError("resolution store broke")

    monkeypatch.setattr(box.mailbox.runs, "load_resolution", broken)
    with pytest.raises(PhaseCrashedError, match="resolve: RuntimeError: resolution store"):
        box.run("echo", "hi", thread_id="t-crash")
    monkeypatch.undo()
    (claimed,) = box.dispatches("t-crash")
    assert claimed.status == DispatchStatus.Claimed  # as a worker leaves it
    assert box.drain() == []  # the thread is held until its lease runs out

    box.advance(box.settings.lease_ms + 1)
    report = box.sweep()

    assert report.reclaimed == [claimed.dispatch_id]
    (attempt,) = box.drain()
    assert attempt.attempt == 1 and attempt.settled == "completed"
    assert [a.crashed for a in box.attempts(claimed.dispatch_id)] == [
        "resolve: RuntimeError: resolution store broke", None]


def test_environment_points_another_process_mailbox_at_the_harness(
        mailbox_harness: MailboxHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    receipt = mailbox_harness.submit("t-env", "echo", "seen")
    for name, value in mailbox_harness.environment().items():
        monkeypatch.setenv(name, value)
    with Mailbox.connect() as other:
        assert other.settings.namespace == mailbox_harness.namespace
        queued = other.get_dispatch(receipt.dispatch_id)
        assert queued is not None and queued.status == DispatchStatus.Queued


def test_settings_reach_the_phases(mailbox_redis_url: str) -> None:
    with MailboxHarness(redis_url=mailbox_redis_url, retry_base_ms=40, max_attempts=2) as box:
        result = box.run("flaky", {"fail_times": 5})
        assert result.status == DispatchStatus.DeadLetter
        assert [w[1] for w in box.wakes if w[1] > 0] == [40]
    with pytest.raises(Exception, match="unknown settings"):
        MailboxHarness(lease=1)


def test_the_harness_runs_on_a_given_database(database_url: str, mailbox_redis_url: str
                                              ) -> None:
    """`database_url=`: a SQLite file (WAL, the writers' gate) or PostgreSQL, as in
    production (the suite's databases: MAILBOX_TEST_BACKENDS)."""
    with MailboxHarness(database_url=database_url, redis_url=mailbox_redis_url) as box:
        assert box.settings.database_url == database_url
        flaky = box.run("flaky", {"fail_times": 1}, thread_id="t-db")
        echo = box.run("echo", "on disk", thread_id="t-db")
        assert (flaky.completed, echo.response) == (True, "on disk")
        assert [m.role for m in box.thread("t-db")] == ["user", "assistant"] * 2


def test_the_memory_database_is_shared_by_connections_and_dropped_on_close() -> None:
    database = MemoryDatabase().open()
    engine = create_engine(database.url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        seen: list[int] = []

        def read() -> None:  # another thread, so another pooled connection
            with engine.connect() as conn:
                seen.append(conn.exec_driver_sql("SELECT x FROM t").scalar_one())

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(10)
        assert seen == [1]
    finally:
        engine.dispose()
        database.close()
    fresh = create_engine(database.url)
    try:
        with fresh.connect() as conn, pytest.raises(sa.exc.OperationalError):
            conn.exec_driver_sql("SELECT x FROM t")
    finally:
        fresh.dispose()


# ====================================================== real Celery, in-process worker
@pytest.fixture
def phase_tasks() -> Iterator[list[tuple[str, str, type]]]:
    """(task name, thread id, type of its first argument) of every task the worker runs."""
    seen: list[tuple[str, str, type]] = []

    def record(task: Any = None, args: Any = None, **_: Any) -> None:
        first = args[0] if args else None
        thread = first if isinstance(first, str) else (first or {}).get("thread_id", "")
        seen.append((task.name, thread, type(first)))

    task_prerun.connect(record, weak=False)
    try:
        yield seen
    finally:
        task_prerun.disconnect(record)


def test_dispatch_delay_goes_through_real_celery_messages(
        mailbox_harness: MailboxHarness, mailbox_celery_worker: Any,
        phase_tasks: list[tuple[str, str, type]]) -> None:
    sent = dispatch.delay("t-celery", "echo", "hello")

    final = mailbox_harness.wait(sent.id, timeout_s=30)

    assert final.status == DispatchStatus.Acked and final.run_response == "hello"
    ours = [(name, kind) for name, thread, kind in phase_tasks if thread == "t-celery"]
    # Each phase got its context as a plain dict decoded from the message body, not the
    # object the previous phase returned (tasks.phases.PhaseMessage).
    assert ours[:6] == [("mailbox.dispatch", str), ("mailbox.verify", dict),
                        ("mailbox.reconstruct", dict), ("mailbox.resolve", dict),
                        ("mailbox.execute", dict), ("mailbox.settle", dict)]
    # The run's final event follows the ack that `wait` saw.
    mailbox_harness.wait_for_event(final.run_id, "run_finish", timeout_s=30)
    assert mailbox_harness.result(sent.id).event_types == ["run_queued", "run_started",
                                                           "run_finish"]


def test_a_recycle_under_the_in_process_worker_does_not_stop_the_test_run(
        mailbox_harness: MailboxHarness, mailbox_celery_worker: Any) -> None:
    """An agent abandoned past its time limit asks its process to be recycled (a warm
    shutdown of a `celery worker`). Under the in-process test worker that process is the
    test run itself: it only logs."""
    import signal

    from tasks import health

    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        health.recycle("a test of the in-process worker")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        health._recycling = False
    assert received == [], "recycle sent SIGTERM to the test process"


class TestACeleryWorkerOnTheHarness:
    @pytest.fixture
    def mailbox_harness_options(self) -> dict[str, Any]:
        return {"retry_base_ms": 20}

    def test_a_thread_with_a_retry_runs_in_order(
            self, mailbox_harness: MailboxHarness, mailbox_celery_worker: Any) -> None:
        first = dispatch.delay("t-order", "harness-chat", "a")
        flaky = dispatch.delay("t-order", "flaky", {"fail_times": 1})
        last = dispatch.delay("t-order", "harness-chat", "c")

        finals = [mailbox_harness.wait(r.id, timeout_s=30) for r in (first, flaky, last)]

        assert [f.status for f in finals] == [DispatchStatus.Acked] * 3
        assert finals[1].attempt_count == 1  # one retry, after the harness's 20 ms backoff
        assert conversation(mailbox_harness, "t-order") == [
            ("user", "a"), ("assistant", "1: a"),
            ("user", {"fail_times": 1}), ("assistant", "ok after 1 failures"),
            ("user", "c"), ("assistant", "3: c")]

    def test_cancel_reaches_the_agent_in_the_worker(
            self, mailbox_harness: MailboxHarness, mailbox_celery_worker: Any) -> None:
        sent = dispatch.delay("t-stop", "sleep", {"ms": 60_000})
        run_id = mailbox_harness.dispatch(sent.id).run_id
        mailbox_harness.wait_for_event(run_id, "run_started", timeout_s=30)

        assert tasks_runtime.mailbox().cancel(sent.id)  # the worker's own Mailbox
        final = mailbox_harness.wait(sent.id, timeout_s=30)

        assert final.status == DispatchStatus.Acked
        assert mailbox_harness.get_run(final.run_id).termination == Termination.cancelled()


def test_the_celery_worker_puts_the_process_back(mailbox_redis_url: str) -> None:
    watched = ("MAILBOX_DATABASE_URL", "MAILBOX_REDIS_URL", "MAILBOX_NAMESPACE",
               "CELERY_BROKER_URL", "MAILBOX_METRICS_PORT", "MAILBOX_LEASE_MS")
    env_before = {name: os.environ.get(name) for name in watched}
    conf_before = (project_app.conf.broker_url, project_app.conf.broker_transport,
                   project_app.conf.broker_transport_options)
    app_before = current_app._get_current_object()
    execute = project_app.tasks["mailbox.execute"]
    limits_before = (execute.soft_time_limit, execute.time_limit)
    root = logging.getLogger()
    logging_before = (root.level, list(root.handlers))

    with MailboxHarness(redis_url=mailbox_redis_url) as box, celery_worker_for(box):
        assert project_app.conf.broker_url == "memory://"
        assert os.environ["MAILBOX_NAMESPACE"] == box.namespace
        sent = dispatch.delay("t-restore", "echo", "x")
        assert box.wait(sent.id, timeout_s=30).status == DispatchStatus.Acked

    assert {name: os.environ.get(name) for name in watched} == env_before
    assert (project_app.conf.broker_url, project_app.conf.broker_transport,
            project_app.conf.broker_transport_options) == conf_before
    assert current_app._get_current_object() is app_before
    assert (execute.soft_time_limit, execute.time_limit) == limits_before
    assert (root.level, list(root.handlers)) == logging_before  # Celery's log setup undone


# ======================================================================== the README
def readme_files() -> dict[str, str]:
    """The files of the README's "Test your agents" example: each ```python block there
    starts with a `# <file name>` line."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Test your agents\n", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        first, _, body = block.partition("\n")
        name = first.removeprefix("# ").strip()
        assert re.fullmatch(r"[\w.]+\.py", name), f"README block without a file name: {first}"
        files[name] = body
    return files


@pytest.mark.parametrize("plugin_options", [("-p", "no:celery"), ()],
                         ids=["without-pytest-celery-plugin", "with-pytest-celery-plugin"])
def test_the_readme_example_passes(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                   plugin_options: tuple[str, ...]) -> None:
    files = readme_files()
    assert "conftest.py" in files and any(n.startswith("test_") for n in files)
    for name, body in files.items():
        pytester.path.joinpath(name).write_text(body)
    # As the README says: another project puts this one's root on PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess(*plugin_options, "-p", "no:cacheprovider", "-q",
                                           timeout=240)
    result.assert_outcomes(passed=sum(body.count("\ndef test_") + body.startswith("def test_")
                                      for body in files.values()))
