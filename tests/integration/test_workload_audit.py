"""The workload checker (mailbox/dev/workload_audit.py) passes a clean workload and catches each
kind of breach: every check is shown failing on a state built directly in SQL, Redis or the
event streams of a scratch mailbox (a checker that cannot fail proves nothing).

The clean workload runs the real phases in-process (claim_next + run_chain, no Celery).
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.workload_audit import WorkloadAudit, WorkloadReport
from mailbox.phases import claim_next, run_chain
from mailbox.schema import dispatches, runs, thread_epochs


def submit(box: Mailbox, audit: WorkloadAudit, thread_id: str, text: str) -> str:
    receipt = box.submit(thread_id, "echo", text)
    audit.record(thread_id, receipt.dispatch_id)
    return receipt.dispatch_id


def drain(box: Mailbox, thread_id: str) -> None:
    """Run every due dispatch of the thread through the five phases, in this process."""
    rt = box.runtime()
    while (ctx := claim_next(rt, thread_id)) is not None:
        run_chain(rt, ctx)


def clean_workload(box: Mailbox, threads: int = 3, per_thread: int = 3
                   ) -> tuple[WorkloadAudit, list[str]]:
    audit = WorkloadAudit(box, grace_s=0)
    ids = [submit(box, audit, f"t{t}", f"t{t} #{n}")
           for n in range(per_thread) for t in range(threads)]
    with audit.sampling():
        for t in range(threads):
            drain(box, f"t{t}")
    return audit, ids


def set_dispatch(box: Mailbox, dispatch_id: str, **values: object) -> None:
    with box.store.engine.begin() as conn:
        conn.execute(sa.update(dispatches).where(dispatches.c.dispatch_id == dispatch_id)
                     .values(**values))


def run_of(box: Mailbox, dispatch_id: str) -> str:
    found = box.get_dispatch(dispatch_id)
    assert found is not None
    return found.run_id


def failing(report: WorkloadReport, prefix: str) -> list[str]:
    assert not report.ok, report.to_json()
    with pytest.raises(AssertionError, match="workload audit failed"):
        report.raise_if_failed()
    found = [v for v in report.violations if v.startswith(prefix)]
    assert found, f"expected a {prefix!r} violation, got {report.violations}"
    return found


# ================================================================================ passing
def test_a_clean_workload_passes(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox)
    report = audit.check()
    report.raise_if_failed()
    assert report.ok and report.violations == []
    assert report.dispatches == len(ids) == 9 and report.threads == 3
    assert report.by_status == {"Acked": 9}
    assert report.samples >= 1 and report.events_unverified == 0
    assert report.to_json()["ok"] is True
    progress: list[tuple[int, int]] = []
    audit.wait_terminal(1, progress=lambda done, total: progress.append((done, total)))
    assert progress[-1] == (9, 9)


def test_recording_a_dispatch_twice_is_refused(mailbox: Mailbox) -> None:
    audit = WorkloadAudit(mailbox)
    audit.record("t", "d1")
    with pytest.raises(ValueError, match="twice"):
        audit.record("t", "d1")


# ============================================================================== none lost
def test_a_lost_or_live_dispatch_fails(mailbox: Mailbox) -> None:
    audit, _ = clean_workload(mailbox, threads=1, per_thread=1)
    audit.record("t0", "never-stored")
    live = submit(mailbox, audit, "t9", "still queued")
    report = audit.check()
    assert failing(report, "lost:") == [
        "lost: dispatch never-stored (thread t0) has no row"]
    assert any(live in v for v in failing(report, "not_terminal:"))
    assert report.by_status == {"Acked": 1, "missing": 1, "Queued": 1}


def test_wait_terminal_times_out_naming_counts_and_live_ids(mailbox: Mailbox) -> None:
    audit = WorkloadAudit(mailbox)
    live = submit(mailbox, audit, "t", "queued")
    audit.record("t", "never-stored")
    with pytest.raises(AssertionError) as failed:
        audit.wait_terminal(0.3)
    text = str(failed.value)
    assert "2 of 2 dispatches not terminal" in text, text
    assert "'Queued': 1" in text and "'missing': 1" in text and live in text, text


def test_check_requires_sampling(mailbox: Mailbox) -> None:
    audit = WorkloadAudit(mailbox, grace_s=0)
    submit(mailbox, audit, "t", "x")
    drain(mailbox, "t")
    assert failing(audit.check(), "not_sampled:")
    assert audit.check(require_sampling=False).ok


# ===================================================================== thread exclusivity
def test_two_claimed_on_one_thread_is_caught_by_a_sample(mailbox: Mailbox) -> None:
    audit = WorkloadAudit(mailbox, grace_s=0)
    first = submit(mailbox, audit, "t", "a")
    second = submit(mailbox, audit, "t", "b")
    with mailbox.store.engine.begin() as conn:  # what the unique index normally forbids
        conn.exec_driver_sql("DROP INDEX uq_dispatch_one_claimed_per_thread")
    for n, dispatch_id in enumerate((first, second)):
        set_dispatch(mailbox, dispatch_id, status="Claimed", claim_token=f"tok{n}",
                     claimed_by="test", lease_until=2**40)
    assert audit.sample_once()
    for dispatch_id in (first, second):  # both end well: only the sample saw the breach
        set_dispatch(mailbox, dispatch_id, status="Acked", claim_token=None, claimed_by=None,
                     lease_until=None)
    with audit.sampling():
        pass
    found = failing(audit.check(require_sampling=True), "two_claimed:")
    assert found[0].startswith("two_claimed: thread t had 2 Claimed dispatches at "), found


# ==================================================================== epochs monotonic
def epoch_audit(box: Mailbox) -> tuple[WorkloadAudit, str]:
    audit = WorkloadAudit(box, grace_s=0)
    dispatch_id = submit(box, audit, "t", "x")
    drain(box, "t")
    return audit, dispatch_id


def set_sql_epoch(box: Mailbox, thread_id: str, epoch: int) -> None:
    with box.store.engine.begin() as conn:
        conn.execute(sa.update(thread_epochs).where(thread_epochs.c.thread_id == thread_id)
                     .values(current_epoch=epoch))


def test_sql_epoch_going_back_is_caught(mailbox: Mailbox) -> None:
    audit, _ = epoch_audit(mailbox)
    set_sql_epoch(mailbox, "t", 3)
    assert audit.sample_once()
    set_sql_epoch(mailbox, "t", 1)
    with audit.sampling():
        pass
    assert failing(audit.check(), "epoch_went_back: SQL epoch of thread t went from 3 to 1")


def test_redis_epoch_going_back_or_ahead_of_sql_is_caught(mailbox: Mailbox) -> None:
    audit, _ = epoch_audit(mailbox)
    client = mailbox.store.coordinator.client
    key = mailbox.store.coordinator.epoch_key("t")
    set_sql_epoch(mailbox, "t", 5)
    client.set(key, 5)
    assert audit.sample_once()
    client.delete(key)  # a flush: an absent cache is not a step back
    assert audit.sample_once()
    client.set(key, 2)
    assert audit.sample_once()
    client.set(key, 7)
    with audit.sampling():
        pass
    report = audit.check()
    assert failing(report, "epoch_went_back: Redis epoch cache of thread t went from 5 to 2")
    assert failing(report, "epoch_cache_ahead: Redis epoch cache of thread t is 7")
    assert len(failing(report, "epoch_went_back")) == 1, report.violations


def test_acked_dispatches_queued_under_decreasing_epochs_fail(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=2)
    set_dispatch(mailbox, ids[0], dispatch_epoch=2)
    set_sql_epoch(mailbox, "t0", 2)  # keep the store's own audit quiet about it
    found = failing(audit.check(), "epoch_went_back: thread t0")
    assert ids[1] in found[0] and "epoch 0" in found[0], found


# ====================================================================== result per attempt
def test_acked_dispatch_without_its_result_fails(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=1)
    set_dispatch(mailbox, ids[0], run_status=None, dispatch_instance_id=None)
    assert failing(audit.check(), f"result: Acked dispatch {ids[0]} has no recorded result")


def test_run_decided_by_another_result_than_the_acked_one_fails(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=1)
    with mailbox.store.engine.begin() as conn:
        conn.execute(sa.update(runs).where(runs.c.run_id == run_of(mailbox, ids[0]))
                     .values(response="another attempt's answer"))
    found = failing(audit.check(), "result: run ")
    assert "recorded a result other than its acked dispatch" in found[0], found


def test_run_still_running_after_the_ack_fails(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=1)
    with mailbox.store.engine.begin() as conn:
        conn.execute(sa.update(runs).where(runs.c.run_id == run_of(mailbox, ids[0]))
                     .values(status="running"))
    assert "not decided" in failing(audit.check(), "result: run ")[0]


def test_dead_letter_whose_run_never_ends_fails(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=1)
    run_id = run_of(mailbox, ids[0])
    set_dispatch(mailbox, ids[0], status=DispatchStatus.DeadLetter.value)
    report = audit.check()  # the run is done, by an earlier attempt's outcome: a warning
    assert any("dead-lettered although its run" in w for w in report.warnings), report.warnings
    with mailbox.store.engine.begin() as conn:
        conn.execute(sa.update(runs).where(runs.c.run_id == run_id).values(status="running"))
    found = failing(audit.check(), f"result: run {run_id} of dead-lettered dispatch")
    assert "(unreconciled)" in found[0], found


def test_an_attempt_started_twice_fails(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=1)
    mailbox.events.emit(run_of(mailbox, ids[0]), ids[0], "run_started", {"attempt": 0})
    assert failing(audit.check(), f"attempt_twice: attempt 0 of dispatch {ids[0]} started 2")


def test_an_attempt_without_its_finish_or_with_two_fails(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=2)
    # First: the ack's run_finish duplicated. Second: a failed attempt never finished.
    mailbox.events.emit(run_of(mailbox, ids[0]), ids[0], "run_finish", {"status": "acked"})
    set_dispatch(mailbox, ids[1], attempt_count=1)
    report = audit.check()
    found = failing(report, "result_per_attempt:")
    assert any(ids[0] in v and "['acked', 'acked']" in v for v in found), found
    assert any(ids[1] in v and "expected ['retrying', 'acked']" in v for v in found), found


def test_a_lost_event_stream_fails_unless_redis_data_loss_is_expected(
        mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=1)
    mailbox.store.coordinator.client.delete(
        f"{mailbox.settings.namespace}:events:{run_of(mailbox, ids[0])}")
    assert failing(audit.check(), f"events_lost: the event stream of dispatch {ids[0]}")
    audit.redis_data_loss = True
    report = audit.check()
    assert report.ok and report.events_unverified == 1, report.to_json()


def test_a_missing_final_finish_is_waited_for_within_the_grace_period(
        mailbox: Mailbox) -> None:
    audit = WorkloadAudit(mailbox, grace_s=0.6)
    dispatch_id = submit(mailbox, audit, "t", "x")
    rt = mailbox.runtime()
    ctx = claim_next(rt, "t")
    assert ctx is not None
    with audit.sampling():
        run_chain(rt, ctx)
    stream = f"{mailbox.settings.namespace}:events:{run_of(mailbox, dispatch_id)}"
    client = mailbox.store.coordinator.client
    last_id, fields = client.xrevrange(stream, count=1)[0]
    client.xdel(stream, last_id)  # the run_finish that follows the ack: not there yet
    timer = threading.Timer(0.2, lambda: client.xadd(stream, fields))
    timer.start()
    report = audit.check()  # re-reads until the event lands
    timer.join()
    assert report.ok, report.violations
    client.xdel(stream, client.xrevrange(stream, count=1)[0][0])
    assert failing(audit.check(), "result_per_attempt:")  # and fails once the grace is over


# ====================================================================== per-thread order
def test_a_later_dispatch_acked_before_an_earlier_one_fails(mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=2)
    first = mailbox.get_dispatch(ids[0])
    assert first is not None and first.completed_at is not None
    set_dispatch(mailbox, ids[0], completed_at=first.completed_at + 10_000)
    found = failing(audit.check(), "order: thread t0")
    assert any(f"dispatch {ids[1]} was acked at" in v and ids[0] in v for v in found), found
    assert any(f"dispatch {ids[1]} started at" in v for v in found), found


def test_order_exempts_dispatches_put_back_by_a_retry_or_recorded_unordered(
        mailbox: Mailbox) -> None:
    audit, ids = clean_workload(mailbox, threads=1, per_thread=2)
    first = mailbox.get_dispatch(ids[0])
    assert first is not None and first.completed_at is not None
    set_dispatch(mailbox, ids[0], completed_at=first.completed_at + 10_000)
    assert failing(audit.check(), "order:")
    set_dispatch(mailbox, ids[0], last_error="transient: retried with backoff")
    assert audit.check().ok  # in backoff it was not due: the later one may overtake it
    set_dispatch(mailbox, ids[0], last_error=None)
    unordered = WorkloadAudit(mailbox, grace_s=0)
    unordered.record("t0", ids[0], ordered=False)
    unordered.record("t0", ids[1])
    with unordered.sampling():
        pass
    assert unordered.check().ok


# ===================================================================== the store's audit
def test_the_stores_own_audit_is_part_of_the_check(mailbox: Mailbox) -> None:
    audit, _ = clean_workload(mailbox, threads=1, per_thread=1)
    other = mailbox.submit("unrecorded", "echo", "x").dispatch_id
    set_dispatch(mailbox, other, status=DispatchStatus.Cancelled.value, claim_token="stale")
    found = failing(audit.check(), "store_audit: claim_fields_on_idle")
    assert other in found[0], found


def test_report_lists_the_first_twenty_violations() -> None:
    report = WorkloadReport(30, 1, {"missing": 30}, 1, [f"lost: d{i}" for i in range(30)])
    with pytest.raises(AssertionError) as failed:
        report.raise_if_failed()
    text = str(failed.value)
    assert "30 violation(s)" in text and "lost: d19" in text and "lost: d20" not in text
    assert "and 10 more" in text
