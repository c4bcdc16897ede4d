"""The store conformance suite of reference §6.1 (`mailbox_conformance.rs`, all 35).

Each test runs against a fresh store (a fresh database and Redis namespace from the `store`
fixture) on every configured backend. The Given/When/Then of each test is the one of the
reference; where the reference only says "error", the test pins the error the port specifies
(reference §3.1, §3.2: NotFound for a missing dispatch, VersionConflict(0, 1) for a token that is
not the current claim's).

The port claims at most one dispatch per call (reference §3.1 recommendation) and `interrupt`
returns the superseded records itself (there is no separate `interrupt_detailed`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailbox import (
    AlreadyExistsError,
    DispatchStatus,
    NotFoundError,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    Termination,
    VersionConflictError,
)
from mailbox.store import MailboxStore
from tests.support.dispatches import assert_no_claim, load, mk, token_of


# 1
def test_enqueue_and_list(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-enqueue", "r1", 128, 1000))

    listed = store.list_dispatches("t-enqueue", None, 100, 0)

    assert len(listed) == 1
    assert listed[0].dispatch_id == "d1"
    assert listed[0].status == DispatchStatus.Queued


# 2
def test_claim_returns_queued_dispatch(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-claim", "r1", 128, 1000))

    claimed = store.claim("t-claim", "consumer-1", 30_000, 1000, 10)

    assert len(claimed) == 1
    assert claimed[0].dispatch_id == "d1"
    assert claimed[0].status == DispatchStatus.Claimed
    assert claimed[0].claim_token is not None and claimed[0].claim_token != ""
    assert claimed[0].claimed_by == "consumer-1"
    assert claimed[0].lease_until == 31_000


# 3
def test_claim_respects_available_at(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-avail", "r1", 128, 5000))

    assert store.claim("t-avail", "consumer-1", 30_000, 1000, 10) == []
    assert load(store, "d1").status == DispatchStatus.Queued

    claimed = store.claim("t-avail", "consumer-1", 30_000, 5000, 10)
    assert [d.dispatch_id for d in claimed] == ["d1"]
    assert claimed[0].status == DispatchStatus.Claimed


# 4
def test_claim_respects_priority_before_created_at(store: MailboxStore) -> None:
    store.enqueue(mk("d-low", "t-priority", "r-low", 200, 1000).replace(created_at=10))
    store.enqueue(mk("d-high", "t-priority", "r-high", 10, 1000).replace(created_at=20))

    claimed = store.claim("t-priority", "consumer-1", 30_000, 1000, 1)

    assert len(claimed) == 1
    assert claimed[0].dispatch_id == "d-high"
    assert claimed[0].priority == 10
    assert load(store, "d-low").status == DispatchStatus.Queued


# 5
def test_claim_limit_preserves_thread_exclusivity(store: MailboxStore) -> None:
    store.enqueue(mk("d-one", "t-claim-limit", "r-one", 10, 1000))
    store.enqueue(mk("d-two", "t-claim-limit", "r-two", 10, 1000).replace(created_at=2000))

    claimed = store.claim("t-claim-limit", "consumer-1", 30_000, 1000, 1)
    assert [d.dispatch_id for d in claimed] == ["d-one"]

    blocked = store.claim("t-claim-limit", "consumer-2", 30_000, 1100, 10)
    assert blocked == [], "same thread must not claim a second dispatch while one is active"
    assert load(store, "d-two").status == DispatchStatus.Queued

    store.ack("d-one", token_of(claimed[0]), 1200)

    following = store.claim("t-claim-limit", "consumer-2", 30_000, 1300, 1)
    assert [d.dispatch_id for d in following] == ["d-two"]
    assert following[0].claimed_by == "consumer-2"


# 6
def test_list_dispatches_orders_by_priority_then_created_at(store: MailboxStore) -> None:
    store.enqueue(mk("d-low", "t-list-order", "r-low", 200, 1000).replace(created_at=10))
    store.enqueue(mk("d-high-newer", "t-list-order", "r-high-newer", 10, 1000)
                  .replace(created_at=30))
    store.enqueue(mk("d-high-older", "t-list-order", "r-high-older", 10, 1000)
                  .replace(created_at=20))

    listed = store.list_dispatches("t-list-order", None, 10, 0)

    assert [d.dispatch_id for d in listed] == ["d-high-older", "d-high-newer", "d-low"]


# 7
def test_ack_transitions_to_acked(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-ack", "r1", 128, 1000))
    [claimed] = store.claim("t-ack", "consumer-1", 30_000, 1000, 1)

    store.ack("d1", token_of(claimed), 2000)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Acked
    assert_no_claim(loaded)
    assert loaded.completed_at == 2000
    assert loaded.updated_at == 2000


# 8
def test_ack_rejects_wrong_claim_token(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-ack-wrong", "r1", 128, 1000))
    [claimed] = store.claim("t-ack-wrong", "consumer-1", 30_000, 1000, 1)

    with pytest.raises(VersionConflictError) as info:
        store.ack("d1", "wrong-token", 2000)
    assert (info.value.expected, info.value.actual) == (0, 1)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Claimed
    assert loaded.claim_token == claimed.claim_token
    assert loaded == claimed


# 9
def test_nack_returns_to_queued(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-nack", "r1", 128, 1000))
    [claimed] = store.claim("t-nack", "consumer-1", 30_000, 1000, 1)
    token = token_of(claimed)
    store.record_dispatch_start("d1", token, "attempt-1", 1500)

    store.nack("d1", token, 3000, "transient error", 2000)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Queued
    assert loaded.attempt_count == 1
    assert loaded.available_at == 3000
    assert_no_claim(loaded)
    assert loaded.last_error == "transient error"
    assert loaded.run_status is None
    assert loaded.dispatch_instance_id is None


# 10
def test_nack_dead_letters_after_max_attempts(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-dead", "r1", 128, 1000).replace(max_attempts=2))

    [first] = store.claim("t-dead", "consumer-1", 30_000, 1000, 1)
    store.nack("d1", token_of(first), 1500, "retry", 1100)
    after_first = load(store, "d1")
    assert after_first.status == DispatchStatus.Queued
    assert after_first.attempt_count == 1

    [second] = store.claim("t-dead", "consumer-1", 30_000, 1500, 1)
    store.nack("d1", token_of(second), 2500, "final error", 2000)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.DeadLetter
    assert loaded.attempt_count == 2
    assert_no_claim(loaded)
    assert loaded.last_error == "final error"


# 11
def test_cancel_queued_dispatch(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-cancel", "r1", 128, 1000))

    cancelled = store.cancel("d1", 2000)

    assert cancelled is not None
    assert cancelled.status == DispatchStatus.Cancelled
    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Cancelled
    assert_no_claim(loaded)
    assert loaded.completed_at == 2000


# 12
def test_cancel_claimed_dispatch_returns_none(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-cancel-claimed", "r1", 128, 1000))
    claimed = store.claim("t-cancel-claimed", "consumer-1", 30_000, 1000, 1)
    assert len(claimed) == 1

    assert store.cancel("d1", 2000) is None

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Claimed
    assert loaded == claimed[0]


# 13
def test_extend_lease_success(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-extend", "r1", 128, 1000))
    [claimed] = store.claim("t-extend", "consumer-1", 30_000, 1000, 1)

    assert store.extend_lease("d1", token_of(claimed), 60_000, 15_000) is True

    assert load(store, "d1").lease_until == 75_000


# 14
def test_extend_lease_wrong_token(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-extend-wrong", "r1", 128, 1000))
    [claimed] = store.claim("t-extend-wrong", "consumer-1", 30_000, 1000, 1)
    assert claimed.lease_until == 31_000

    assert store.extend_lease("d1", "wrong-token", 60_000, 15_000) is False

    loaded = load(store, "d1")
    assert loaded.lease_until == 31_000
    assert loaded.status == DispatchStatus.Claimed


# 15
def test_interrupt_supersedes_queued(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-interrupt", "r1", 128, 1000))
    store.enqueue(mk("d2", "t-interrupt", "r2", 128, 1000))

    result = store.interrupt("t-interrupt", 2000)

    assert result.superseded_count == 2
    assert len(result.superseded) == 2
    assert result.active_dispatch is None
    assert result.new_dispatch_epoch >= 1
    assert sorted(d.dispatch_id for d in result.superseded) == ["d1", "d2"]
    assert all(d.status == DispatchStatus.Superseded for d in result.superseded)

    listed = store.list_dispatches("t-interrupt", [DispatchStatus.Superseded], 100, 0)
    assert len(listed) == 2


# 16
def test_interrupt_returns_active_claimed(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-interrupt-active", "r1", 128, 1000))
    claimed = store.claim("t-interrupt-active", "consumer-1", 30_000, 1000, 1)
    assert len(claimed) == 1
    store.enqueue(mk("d2", "t-interrupt-active", "r2", 128, 1000))

    result = store.interrupt("t-interrupt-active", 2000)

    assert result.active_dispatch is not None
    assert result.active_dispatch.dispatch_id == claimed[0].dispatch_id == "d1"
    assert result.active_dispatch.status == DispatchStatus.Claimed
    assert result.superseded_count == 1
    assert [d.dispatch_id for d in result.superseded] == ["d2"]
    assert result.superseded[0].status == DispatchStatus.Superseded


# 17
def test_current_dispatch_epoch_tracks_interrupt(store: MailboxStore) -> None:
    initial = store.current_dispatch_epoch("t-epoch")
    assert initial == 0

    result = store.interrupt("t-epoch", 2000)
    current = store.current_dispatch_epoch("t-epoch")

    assert current == result.new_dispatch_epoch
    assert current > initial


# 18
def test_supersede_claimed_terminalizes_active_dispatch(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-supersede-claimed", "r1", 128, 1000))
    [claimed] = store.claim("t-supersede-claimed", "consumer-1", 30_000, 1000, 1)

    superseded = store.supersede_claimed("d1", token_of(claimed), 2000, "test supersede")

    assert superseded is not None
    assert superseded.status == DispatchStatus.Superseded
    assert_no_claim(superseded)
    assert superseded.completed_at == 2000
    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Superseded
    assert loaded.claim_token is None


# 19
def test_extend_lease_rejects_stale_claim_after_interrupt(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-stale-lease", "r1", 128, 1000))
    [claimed] = store.claim("t-stale-lease", "consumer-1", 30_000, 1000, 1)
    store.interrupt("t-stale-lease", 1500)

    assert store.extend_lease("d1", token_of(claimed), 30_000, 2000) is False

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Superseded
    assert loaded.claim_token is None


# 20
def test_record_dispatch_start_rejects_stale_claim_after_interrupt(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-stale-start", "r1", 128, 1000))
    [claimed] = store.claim("t-stale-start", "consumer-1", 30_000, 1000, 1)
    store.interrupt("t-stale-start", 1500)

    with pytest.raises(VersionConflictError) as info:
        store.record_dispatch_start("d1", token_of(claimed), "attempt-1", 2000)
    assert (info.value.expected, info.value.actual) == (0, 1)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Superseded
    assert loaded.dispatch_instance_id is None
    assert loaded.run_status is None


# 21
def test_reclaim_expired_stale_claim_supersedes(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-stale-reclaim", "r1", 128, 1000))
    store.claim("t-stale-reclaim", "consumer-1", 100, 1000, 1)
    store.interrupt("t-stale-reclaim", 1050)

    assert store.reclaim_expired_leases(2000, 10) == []

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Superseded
    assert loaded.claim_token is None
    assert loaded.lease_until is None


# 22
def test_dedupe_key_rejects_duplicate(store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("d1", "t-dedupe", "r1", created_at=1000,
                                     dedupe_key="unique-key", available_at=1000))

    with pytest.raises(AlreadyExistsError):
        store.enqueue(RunDispatch.queued("d2", "t-dedupe", "r2", created_at=1000,
                                         dedupe_key="unique-key", available_at=1000))

    assert store.load_dispatch("d2") is None
    assert [d.dispatch_id for d in store.list_dispatches("t-dedupe")] == ["d1"]


# 23
def test_reclaim_expired_leases_requeues(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-reclaim", "r1", 128, 1000))
    store.claim("t-reclaim", "consumer-1", 100, 1000, 1)

    reclaimed = store.reclaim_expired_leases(2000, 10)

    assert [d.dispatch_id for d in reclaimed] == ["d1"]
    assert reclaimed[0].status == DispatchStatus.Queued
    assert reclaimed[0].attempt_count == 1
    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Queued
    assert loaded.claim_token is None


# 24
def test_reclaim_expired_leases_dead_letters_at_max_attempts(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-reclaim-max", "r1", 128, 1000).replace(max_attempts=1))
    [claimed] = store.claim("t-reclaim-max", "consumer-1", 100, 1000, 1)
    store.record_dispatch_start("d1", token_of(claimed), "attempt-1", 1050)

    reclaimed = store.reclaim_expired_leases(2000, 10)

    assert [d.dispatch_id for d in reclaimed] == ["d1"]
    assert reclaimed[0].status == DispatchStatus.DeadLetter
    assert reclaimed[0].attempt_count == 1
    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.DeadLetter
    assert loaded.attempt_count == 1
    assert_no_claim(loaded)
    assert loaded.run_status is None
    assert loaded.dispatch_instance_id is None


# 25
def test_reclaim_expired_leases_dead_letter_is_idempotent_under_concurrency(
        store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-reclaim-race", "r1", 128, 1000).replace(max_attempts=1))
    store.claim("t-reclaim-race", "consumer-1", 100, 1000, 1)

    barrier = threading.Barrier(2)

    def sweep() -> list[RunDispatch]:
        barrier.wait(timeout=10)
        return store.reclaim_expired_leases(2000, 10)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [f.result(timeout=30) for f in [pool.submit(sweep) for _ in range(2)]]

    returned = [d for batch in results for d in batch]
    assert len(returned) == 1
    assert returned[0].dispatch_id == "d1"
    assert returned[0].status == DispatchStatus.DeadLetter
    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.DeadLetter
    assert loaded.attempt_count == 1
    assert_no_claim(loaded)
    assert store.reclaim_expired_leases(3000, 10) == []


# 26
def test_purge_terminal_removes_old(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-purge", "r1", 128, 1000))
    store.cancel("d1", 1500)
    assert load(store, "d1").status == DispatchStatus.Cancelled

    assert store.purge_terminal(2000) == 1

    assert store.load_dispatch("d1") is None


# 27
def test_queued_thread_ids_returns_active_threads(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "thread-a", "r1", 128, 1000))
    store.enqueue(mk("d2", "thread-b", "r2", 128, 1000))

    ids = store.queued_thread_ids()

    assert "thread-a" in ids
    assert "thread-b" in ids
    assert len(ids) == 2


# 28
def test_count_dispatches_by_status_tracks_lifecycle(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-count-a", "r1", 128, 1000))
    store.enqueue(mk("d2", "t-count-b", "r2", 128, 1000))
    assert store.count_dispatches_by_status(DispatchStatus.Queued) == 2
    assert store.count_dispatches_by_status(DispatchStatus.Claimed) == 0

    [claimed] = store.claim("t-count-a", "consumer-1", 30_000, 1000, 1)
    assert store.count_dispatches_by_status(DispatchStatus.Queued) == 1
    assert store.count_dispatches_by_status(DispatchStatus.Claimed) == 1

    store.ack("d1", token_of(claimed), 1100)
    store.cancel("d2", 1200)
    assert store.count_dispatches_by_status(DispatchStatus.Queued) == 0
    assert store.count_dispatches_by_status(DispatchStatus.Acked) == 1
    assert store.count_dispatches_by_status(DispatchStatus.Cancelled) == 1


# 29
def test_list_terminal_dispatches_returns_all_terminal(store: MailboxStore) -> None:
    store.enqueue(mk("d-cancel", "t-terminal-a", "r1", 128, 1000))
    store.enqueue(mk("d-supersede", "t-terminal-b", "r2", 128, 1001))
    store.enqueue(mk("d-queued", "t-terminal-c", "r3", 128, 1002))
    store.cancel("d-cancel", 2000)
    store.interrupt("t-terminal-b", 3000)

    listed = store.list_terminal_dispatches(10, 0)

    assert sorted((d.dispatch_id, d.status) for d in listed) == [
        ("d-cancel", DispatchStatus.Cancelled),
        ("d-supersede", DispatchStatus.Superseded),
    ]
    paged = store.list_terminal_dispatches(1, 1)
    assert len(paged) == 1
    assert paged[0].status.is_terminal


# 30
def test_claim_dispatch_by_id(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-claim-id", "r1", 128, 1000))

    claimed = store.claim_dispatch("d1", "consumer-1", 30_000, 1000)

    assert claimed is not None
    assert claimed.dispatch_id == "d1"
    assert claimed.status == DispatchStatus.Claimed
    assert claimed.claim_token is not None and claimed.claim_token != ""
    assert load(store, "d1") == claimed


# 31
def test_claim_dispatch_ignores_available_at(store: MailboxStore) -> None:
    store.enqueue(mk("d-guarded", "t-guarded", "r1", 128, 1000).replace(available_at=1_000_000))

    assert store.claim("t-guarded", "consumer-1", 30_000, 1000, 10) == []

    claimed = store.claim_dispatch("d-guarded", "consumer-1", 30_000, 1000)
    assert claimed is not None
    assert claimed.dispatch_id == "d-guarded"
    assert claimed.status == DispatchStatus.Claimed


# 32
def test_record_dispatch_start_marks_running(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-start", "r1", 128, 1000))
    [claimed] = store.claim("t-start", "consumer-1", 30_000, 1000, 1)

    store.record_dispatch_start("d1", token_of(claimed), "attempt-1", 1500)

    loaded = load(store, "d1")
    assert loaded.dispatch_instance_id == "attempt-1"
    assert loaded.run_status == RunStatus.running
    assert loaded.termination is None
    assert loaded.run_response is None
    assert loaded.run_error is None
    assert loaded.completed_at is None
    assert loaded.status == DispatchStatus.Claimed


# 33
def test_record_run_result_sets_terminal_projection(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-result", "r1", 128, 1000))
    [claimed] = store.claim("t-result", "consumer-1", 30_000, 1000, 1)
    result = RunDispatchResult("r1", "attempt-1", RunStatus.done,
                               termination=Termination.natural_end(), response="ok",
                               error=None)

    store.record_run_result("d1", token_of(claimed), result, 2000)

    loaded = load(store, "d1")
    assert loaded.dispatch_instance_id == "attempt-1"
    assert loaded.run_status == RunStatus.done
    assert loaded.termination == Termination.natural_end()
    assert loaded.run_response == "ok"
    assert loaded.run_error is None
    assert loaded.completed_at == 2000
    assert loaded.status == DispatchStatus.Claimed


# 34
def test_record_projection_rejects_missing_or_unclaimed_dispatch(store: MailboxStore) -> None:
    missing_result = RunDispatchResult("r-missing", "attempt-missing", RunStatus.done)
    with pytest.raises(NotFoundError):
        store.record_dispatch_start("missing", "token", "attempt-missing", 1000)
    with pytest.raises(NotFoundError):
        store.record_run_result("missing", "token", missing_result, 1000)

    store.enqueue(mk("d1", "t-unclaimed", "r1", 128, 1000))
    result = RunDispatchResult("r1", "attempt-1", RunStatus.done)
    with pytest.raises(VersionConflictError) as start_info:
        store.record_dispatch_start("d1", "token", "attempt-1", 1000)
    assert (start_info.value.expected, start_info.value.actual) == (0, 1)
    with pytest.raises(VersionConflictError) as result_info:
        store.record_run_result("d1", "token", result, 1000)
    assert (result_info.value.expected, result_info.value.actual) == (0, 1)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Queued
    assert loaded.run_status is None
    assert loaded.dispatch_instance_id is None


# 35
def test_fifo_ordering_within_same_priority(store: MailboxStore) -> None:
    store.enqueue(mk("older", "t-fifo", "r-older", 128, 1000).replace(created_at=100))
    store.enqueue(mk("newer", "t-fifo", "r-newer", 128, 1000).replace(created_at=200))

    first = store.claim("t-fifo", "consumer-1", 30_000, 1000, 1)
    assert [d.dispatch_id for d in first] == ["older"]
    store.ack("older", token_of(first[0]), 1100)

    second = store.claim("t-fifo", "consumer-1", 30_000, 1100, 1)
    assert [d.dispatch_id for d in second] == ["newer"]
