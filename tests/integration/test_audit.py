"""`mailbox.audit` on a live system (DESIGN.md §4.1): a healthy mailbox audits clean, and
each breach staged directly in SQL or Redis — what a bug, a crash between two writes, a
restored backup or a dead sweep would leave — is reported under its check, as a violation or
as a warning.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from mailbox import DispatchStatus, Mailbox, RunStatus
from mailbox.audit import AuditReport, Finding, audit, collect_stats
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import now_ms
from mailbox.schema import dispatches, runs, thread_epochs


def process(box: Mailbox, thread_id: str) -> None:
    rt = box.runtime()
    ctx = claim_next(rt, thread_id)
    assert ctx is not None
    run_chain(rt, ctx)


def finding(report: AuditReport, check: str) -> Finding:
    found = [f for f in report.violations + report.warnings if f.check == check]
    assert len(found) == 1, report.to_json()
    return found[0]


def checks_failed(report: AuditReport) -> set[str]:
    return {f.check for f in report.violations + report.warnings}


def sql(box: Mailbox, statement: sa.Executable) -> None:
    with box.store.engine.begin() as conn:
        conn.execute(statement)


def test_a_healthy_system_audits_clean(mailbox: Mailbox) -> None:
    mailbox.submit("t-ok", "echo", "done")
    process(mailbox, "t-ok")
    mailbox.submit("t-ok", "fail", "dead")
    process(mailbox, "t-ok")
    mailbox.submit("t-ask", "ask", "approve?")
    process(mailbox, "t-ask")  # waiting run, acked dispatch
    mailbox.submit("t-queued", "echo", "later", delay_ms=60_000)
    mailbox.submit("t-run", "echo", "running")
    rt = mailbox.runtime()
    assert claim_next(rt, "t-run") is not None  # Claimed, with a live Redis lease
    cancelled = mailbox.submit("t-cancel", "echo", "x")
    mailbox.cancel(cancelled.dispatch_id)
    mailbox.submit("t-intr", "echo", "superseded")
    mailbox.interrupt("t-intr")
    mailbox.submit("t-intr", "echo", "current")

    report = audit(mailbox)
    assert report.ok and report.violations == [] and report.warnings == [], report.to_json()
    assert report.counts == {"Queued": 2, "Claimed": 1, "Acked": 2, "Cancelled": 1,
                             "Superseded": 1, "DeadLetter": 1}
    assert len(report.checks) >= 10
    assert json.loads(json.dumps(report.to_json()))["ok"] is True


def test_stale_queued_dispatch_is_a_violation(mailbox: Mailbox) -> None:
    receipt = mailbox.submit("t-stale", "echo", "x")
    sql(mailbox, sa.update(thread_epochs).where(thread_epochs.c.thread_id == "t-stale")
        .values(current_epoch=2))  # an epoch raised without superseding the queued work
    report = audit(mailbox)
    assert not report.ok
    stale = finding(report, "stale_queued")
    assert stale.severity == "violation" and stale.count == 1
    assert stale.sample == (receipt.dispatch_id,)
    assert checks_failed(report) == {"stale_queued"}


def test_epochs_going_backwards_are_violations(mailbox: Mailbox) -> None:
    mailbox.interrupt("t-back")
    receipt = mailbox.submit("t-back", "echo", "x")  # stamped with epoch 1
    mailbox.store.current_dispatch_epoch("t-back")  # Redis caches epoch 1
    sql(mailbox, sa.update(thread_epochs).where(thread_epochs.c.thread_id == "t-back")
        .values(current_epoch=0))  # as if restored from an older backup
    report = audit(mailbox)
    assert finding(report, "epoch_regressed").sample == (receipt.dispatch_id,)
    ahead = finding(report, "redis_epoch_ahead")
    assert ahead.severity == "violation" and "t-back" in ahead.sample[0]

    sql(mailbox, sa.delete(thread_epochs).where(thread_epochs.c.thread_id == "t-back"))
    assert finding(audit(mailbox), "missing_epoch").sample == ("t-back",)


def test_unreconciled_run_is_a_warning_the_sweep_repairs(mailbox: Mailbox) -> None:
    receipt = mailbox.submit("t-rec", "echo", "x")
    mailbox.cancel(receipt.dispatch_id)
    sql(mailbox, sa.update(runs).where(runs.c.run_id == receipt.run_id)
        .values(status=RunStatus.created.value, finished_at=None, termination=None))
    report = audit(mailbox)
    assert report.ok, "a warning, not a violation"
    warning = finding(report, "unreconciled_run")
    assert warning.severity == "warning" and warning.sample == (receipt.dispatch_id,)

    mailbox.sweep()
    assert audit(mailbox).warnings == []
    run = mailbox.get_run(receipt.run_id)
    assert run is not None and run.status == RunStatus.done


def test_stale_redis_lease_is_a_warning(mailbox: Mailbox) -> None:
    queued = mailbox.submit("t-lease", "echo", "x")
    mailbox.submit("t-live", "echo", "y")
    assert claim_next(mailbox.runtime(), "t-live") is not None  # a real lease: not reported
    client = mailbox.store.coordinator.client
    coordinator = mailbox.store.coordinator
    client.hset(coordinator.lease_key("t-lease"), mapping={
        "token": "bogus", "dispatch_id": queued.dispatch_id,
        "lease_until": now_ms() + 60_000, "holder": "ghost"})
    client.hset(coordinator.lease_key("t-pending"), mapping={  # a claim in flight
        "token": "p", "dispatch_id": "", "lease_until": now_ms() + 60_000, "holder": "h"})
    client.hset(coordinator.lease_key("t-gone"), mapping={
        "token": "g", "dispatch_id": "no-such-dispatch", "lease_until": 1, "holder": "h"})
    report = audit(mailbox)
    assert report.ok
    stale = finding(report, "stale_lease")
    assert stale.severity == "warning" and stale.count == 2
    assert any(queued.dispatch_id in s and "Queued" in s for s in stale.sample)
    assert any("no-such-dispatch" in s and "missing" in s for s in stale.sample)


def test_stale_leases_are_found_across_scan_pages(mailbox: Mailbox) -> None:
    receipt = mailbox.submit("t-many", "echo", "x")
    coordinator = mailbox.store.coordinator
    pipe = coordinator.client.pipeline()
    for i in range(40):
        pipe.hset(coordinator.lease_key(f"t-many-{i}"), mapping={
            "token": f"tok{i}", "dispatch_id": receipt.dispatch_id,
            "lease_until": now_ms() + 60_000, "holder": "ghost"})
    pipe.execute()
    report = audit(mailbox, page_size=7, sample=3)
    stale = finding(report, "stale_lease")
    assert stale.count == 40 and len(stale.sample) == 3


def test_stuck_claim_is_a_warning_until_the_sweep_reclaims_it(mailbox: Mailbox) -> None:
    receipt = mailbox.submit("t-stuck", "echo", "x")
    long_ago = now_ms() - 600_000
    claimed = mailbox.store.claim_dispatch(receipt.dispatch_id, "dead-worker", 1_000, long_ago)
    assert claimed is not None
    report = audit(mailbox, stuck_after_s=60)
    assert report.ok
    stuck = finding(report, "stuck_claim")
    assert stuck.severity == "warning" and stuck.sample == (receipt.dispatch_id,)
    assert "sweep" in stuck.message
    assert "stuck_claim" not in checks_failed(audit(mailbox, stuck_after_s=3_600))

    mailbox.sweep()
    assert audit(mailbox, stuck_after_s=60).warnings == []
    assert claimed.claim_token


def test_claim_field_breaches_are_violations(mailbox: Mailbox) -> None:
    claimed = mailbox.submit("t-c1", "echo", "x")
    assert claim_next(mailbox.runtime(), "t-c1") is not None
    queued = mailbox.submit("t-c2", "echo", "y")
    sql(mailbox, sa.update(dispatches).where(dispatches.c.dispatch_id == claimed.dispatch_id)
        .values(lease_until=None))
    sql(mailbox, sa.update(dispatches).where(dispatches.c.dispatch_id == queued.dispatch_id)
        .values(claim_token="leftover"))
    report = audit(mailbox)
    assert finding(report, "claimed_without_lease").sample == (claimed.dispatch_id,)
    assert finding(report, "claim_fields_on_idle").sample == (queued.dispatch_id,)


def test_two_claimed_on_one_thread_is_a_violation(mailbox: Mailbox) -> None:
    """The partial unique index forbids the state, so drop it to stage the breach."""
    first = mailbox.submit("t-two", "echo", "a")
    second = mailbox.submit("t-two", "echo", "b")
    assert claim_next(mailbox.runtime(), "t-two") is not None
    with mailbox.store.engine.begin() as conn:
        try:
            conn.execute(sa.update(dispatches)
                         .where(dispatches.c.dispatch_id == second.dispatch_id)
                         .values(status="Claimed", claim_token="t2", claimed_by="rogue",
                                 lease_until=now_ms() + 60_000))
            raise AssertionError("the one-Claimed-per-thread index let a second claim in")
        except sa.exc.IntegrityError:
            pass
    sql(mailbox, sa.text("DROP INDEX uq_dispatch_one_claimed_per_thread"))
    sql(mailbox, sa.update(dispatches).where(dispatches.c.dispatch_id == second.dispatch_id)
        .values(status="Claimed", claim_token="t2", claimed_by="rogue",
                lease_until=now_ms() + 60_000))
    report = audit(mailbox)
    doubled = finding(report, "two_claimed_per_thread")
    assert doubled.severity == "violation" and doubled.sample == ("t-two (2)",)
    assert first.thread_id == "t-two"


def test_orphan_runs_are_violations_but_purged_history_is_not(mailbox: Mailbox) -> None:
    orphan = mailbox.submit("t-orphan", "echo", "x")
    sql(mailbox, sa.delete(dispatches).where(dispatches.c.dispatch_id == orphan.dispatch_id))
    dead = mailbox.submit("t-dead", "fail", "x")
    process(mailbox, "t-dead")
    assert mailbox.purge_dead_letters([dead.dispatch_id]) == 1  # run done, dispatch gone
    report = audit(mailbox)
    assert finding(report, "orphan_run").sample == (orphan.run_id,)
    assert checks_failed(report) == {"orphan_run"}


def test_unknown_status_is_reported_not_crashed_on(mailbox: Mailbox) -> None:
    receipt = mailbox.submit("t-weird", "echo", "x")
    sql(mailbox, sa.update(dispatches).where(dispatches.c.dispatch_id == receipt.dispatch_id)
        .values(status="Exploded"))
    report = audit(mailbox)
    assert finding(report, "unknown_status").sample == ("Exploded",)
    assert report.counts["Exploded"] == 1


def test_collect_stats(mailbox: Mailbox) -> None:
    at = now_ms()
    mailbox.submit("t-s1", "echo", "a")
    mailbox.submit("t-s1", "echo", "b", delay_ms=60_000)
    mailbox.submit("t-s2", "ask", "?")
    process(mailbox, "t-s2")
    stats = collect_stats(mailbox, now=at + 10_000)
    assert stats.counts[DispatchStatus.Queued.value] == 2
    assert stats.threads_with_queued == 1 and stats.due_now == 1
    assert stats.runs_waiting == 1
    assert stats.oldest_queued_age_ms is not None and 0 < stats.oldest_queued_age_ms <= 10_000
    out: dict[str, Any] = stats.to_json()
    assert out["runs_by_status"]["waiting"] == 1 and out["oldest_queued_at_iso"].endswith("Z")
