"""Store-level contract tests beyond the conformance suite (reference §6.3, §6.2 #38 and #39, §3).

Real SQL and real Redis via the `store` fixture, on every configured backend. Concurrency
tests use real OS threads started together at a barrier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from mailbox import (
    AlreadyExistsError,
    DispatchStatus,
    NotFoundError,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    Termination,
    ValidationError,
    VersionConflictError,
)
from mailbox.store import MailboxStore
from tests.support.dispatches import assert_no_claim, load, mk, token_of
from tests.support.phase_kit import count_sql

T = TypeVar("T")

LEASE = 30_000








def claim_one(store: MailboxStore, thread: str, now: int = 1000, lease_ms: int = LEASE,
              consumer: str = "consumer-1") -> RunDispatch:
    claimed = store.claim(thread, consumer, lease_ms, now, 1)
    assert len(claimed) == 1, f"expected one claim on {thread} at {now}, got {claimed}"
    return claimed[0]




def assert_no_projection(d: RunDispatch) -> None:
    assert d.dispatch_instance_id is None
    assert d.run_status is None
    assert d.termination is None
    assert d.run_response is None
    assert d.run_error is None


def run_concurrently(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run fn(0..n-1) on n real threads released together; re-raise any thread's error."""
    barrier = threading.Barrier(n)

    def call(i: int) -> T:
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(call, i) for i in range(n)]
        return [f.result(timeout=120) for f in futures]


def done_result(run_id: str = "r1", instance: str = "attempt-1") -> RunDispatchResult:
    return RunDispatchResult(run_id, instance, RunStatus.done,
                             termination=Termination.natural_end(), response="ok", error=None)


# ============================================================ reference §6.3 store unit tests
def test_enqueue_rejects_non_queued_dispatch(store: MailboxStore) -> None:
    claimed = mk("d1", "t", "r1").replace(status=DispatchStatus.Claimed, claim_token="tok",
                                         claimed_by="c", lease_until=5000)

    with pytest.raises(ValidationError) as info:
        store.enqueue(claimed)

    assert "must start as Queued" in str(info.value)
    assert store.load_dispatch("d1") is None
    assert store.list_dispatches("t") == []


def test_records_dispatch_start_and_run_result_separately_from_ack(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    token = token_of(claim_one(store, "t"))

    store.record_dispatch_start("d1", token, "attempt-1", 1100)
    started = load(store, "d1")
    assert started.status == DispatchStatus.Claimed
    assert started.run_status == RunStatus.running
    assert started.dispatch_instance_id == "attempt-1"

    store.record_run_result("d1", token, done_result(), 1200)
    recorded = load(store, "d1")
    assert recorded.status == DispatchStatus.Claimed, "a run result does not close delivery"
    assert recorded.claim_token == token
    assert recorded.run_status == RunStatus.done
    assert recorded.completed_at == 1200

    store.ack("d1", token, 1300)
    acked = load(store, "d1")
    assert acked.status == DispatchStatus.Acked
    assert_no_claim(acked)
    assert acked.run_status == RunStatus.done
    assert acked.termination == Termination.natural_end()
    assert acked.run_response == "ok"
    assert acked.run_error is None
    assert acked.dispatch_instance_id == "attempt-1"
    assert acked.completed_at == 1300


def test_record_run_result_rejects_stale_claim_token(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    old_token = token_of(claim_one(store, "t", now=1000))
    store.nack("d1", old_token, 1100, "retry", 1050)
    current = claim_one(store, "t", now=1100, consumer="consumer-2")
    assert token_of(current) != old_token

    with pytest.raises(VersionConflictError) as info:
        store.record_run_result("d1", old_token, done_result(), 1200)

    assert (info.value.expected, info.value.actual) == (0, 1)
    assert load(store, "d1") == current


def test_concurrent_claim_only_one_wins(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-race", "r1"))

    results = run_concurrently(
        10, lambda i: store.claim("t-race", f"consumer-{i}", LEASE, 1000, 1))

    winners = [(i, batch) for i, batch in enumerate(results) if batch]
    assert len(winners) == 1
    index, [won] = winners[0]
    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Claimed
    assert loaded.claimed_by == f"consumer-{index}" == won.claimed_by
    assert loaded.claim_token == won.claim_token


def test_concurrent_claims_of_thread_with_many_queued_claim_exactly_one(
        store: MailboxStore) -> None:
    for i in range(5):
        store.enqueue(mk(f"d{i}", "t-race", f"r{i}", 128, 1000 + i))

    results = run_concurrently(
        10, lambda i: store.claim("t-race", f"consumer-{i}", LEASE, 2000, 1))

    claimed = [d for batch in results for d in batch]
    assert [d.dispatch_id for d in claimed] == ["d0"]
    assert len(store.list_dispatches("t-race", [DispatchStatus.Claimed])) == 1


def test_claim_respects_per_thread_isolation(store: MailboxStore) -> None:
    store.enqueue(mk("d-a", "thread-a", "r-a"))
    store.enqueue(mk("d-b", "thread-b", "r-b"))

    a = claim_one(store, "thread-a")
    b = claim_one(store, "thread-b")

    assert a.dispatch_id == "d-a"
    assert b.dispatch_id == "d-b"
    assert token_of(a) != token_of(b)
    assert load(store, "d-a").claim_token == a.claim_token
    assert load(store, "d-b").claim_token == b.claim_token


def test_concurrent_claim_dispatch_only_one_wins(store: MailboxStore) -> None:
    for round_ in range(5):
        thread = f"t-pair-{round_}"
        store.enqueue(mk(f"{thread}-d1", thread, "r1"))
        store.enqueue(mk(f"{thread}-d2", thread, "r2"))

        results = run_concurrently(2, lambda i, th=thread: store.claim_dispatch(
            f"{th}-d{i + 1}", f"consumer-{i}", LEASE, 1000))

        winners = [d for d in results if d is not None]
        assert len(winners) == 1, f"round {round_}: {results}"
        assert len(store.list_dispatches(thread, [DispatchStatus.Claimed])) == 1
        assert len(store.list_dispatches(thread, [DispatchStatus.Queued])) == 1


def test_claim_after_nack_works(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    first = claim_one(store, "t", now=1000)
    store.nack("d1", token_of(first), 1500, "transient", 1100)

    again = claim_one(store, "t", now=1500, consumer="consumer-2")

    assert again.dispatch_id == "d1"
    assert again.status == DispatchStatus.Claimed
    assert again.attempt_count == 1
    assert again.claimed_by == "consumer-2"
    assert token_of(again) != token_of(first)
    store.ack("d1", token_of(again), 1600)
    assert load(store, "d1").status == DispatchStatus.Acked


def test_concurrent_enqueue_no_lost_dispatches(store: MailboxStore) -> None:
    def enqueue(i: int) -> None:
        store.enqueue(RunDispatch.queued(f"d{i}", "t-enqueue", f"r{i}", 1000 + i,
                                         dedupe_key=f"key-{i}"))

    run_concurrently(10, enqueue)

    listed = store.list_dispatches("t-enqueue")
    assert sorted(d.dispatch_id for d in listed) == sorted(f"d{i}" for i in range(10))
    assert all(d.status == DispatchStatus.Queued for d in listed)
    assert store.count_dispatches_by_status(DispatchStatus.Queued) == 10


def test_concurrent_enqueue_same_dedupe_key_admits_exactly_one(store: MailboxStore) -> None:
    def enqueue(i: int) -> str:
        try:
            store.enqueue(RunDispatch.queued(f"d{i}", "t-dedupe", f"r{i}", 1000,
                                             dedupe_key="same"))
        except AlreadyExistsError as exc:
            assert exc.message == "dedupe_key=same"
            return "rejected"
        return "ok"

    outcomes = run_concurrently(10, enqueue)

    assert outcomes.count("ok") == 1
    assert outcomes.count("rejected") == 9
    assert len(store.list_dispatches("t-dedupe")) == 1


def test_distributed_claim_same_dispatch_allows_exactly_one_consumer(
        store: MailboxStore) -> None:
    store.enqueue(mk("d-shared", "t-distributed", "r1"))

    results = run_concurrently(
        32, lambda i: store.claim_dispatch("d-shared", f"node-{i}", LEASE, 1000))

    winners = [(i, d) for i, d in enumerate(results) if d is not None]
    assert len(winners) == 1
    index, won = winners[0]
    loaded = load(store, "d-shared")
    assert loaded.status == DispatchStatus.Claimed
    assert loaded.claimed_by == f"node-{index}" == won.claimed_by
    assert loaded.claim_token == won.claim_token


def test_distributed_nack_retry_window_respects_retry_at_boundary(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    first = claim_one(store, "t", now=1000)
    store.nack("d1", token_of(first), 2000, "retry later", 1500)

    assert store.claim("t", "consumer-2", LEASE, 1999, 1) == []
    assert load(store, "d1").status == DispatchStatus.Queued

    retried = store.claim("t", "consumer-2", LEASE, 2000, 1)
    assert [d.dispatch_id for d in retried] == ["d1"]


# ================================================= run_dispatch_transition_api contract tests
def test_run_dispatch_transition_api_enforces_lifecycle_shape(store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000,
                                     dedupe_key="req-xyz"))
    queued = load(store, "dispatch-001")
    assert queued.status == DispatchStatus.Queued
    assert queued.claim_token is None

    claimed = store.claim_dispatch("dispatch-001", "consumer-1", 900, 1100)
    assert claimed is not None
    assert claimed.status == DispatchStatus.Claimed
    assert claimed.claimed_by == "consumer-1"
    assert claimed.lease_until == 2000

    store.ack("dispatch-001", token_of(claimed), 3000)
    acked = load(store, "dispatch-001")
    assert acked.status == DispatchStatus.Acked
    assert_no_claim(acked)
    assert acked.completed_at == 3000


def test_run_dispatch_transition_api_rejects_claiming_terminal_dispatch(
        store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000))
    store.cancel("dispatch-001", 2000)
    cancelled = load(store, "dispatch-001")

    assert store.claim_dispatch("dispatch-001", "consumer-1", 500, 2500) is None
    assert store.claim("thread-abc", "consumer-1", 500, 2500, 1) == []
    assert load(store, "dispatch-001") == cancelled

    with pytest.raises(ValidationError, match="must be Queued"):
        cancelled.claimed("claim-1", "consumer-1", 500, 2500)


def test_run_dispatch_transition_api_rejects_terminalizing_unclaimed_dispatch(
        store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000))
    queued = load(store, "dispatch-001")

    for attempt in (lambda: store.ack("dispatch-001", "claim-1", 2000),
                    lambda: store.dead_letter("dispatch-001", "claim-1", "failed", 2000),
                    lambda: store.nack("dispatch-001", "claim-1", 3000, "retry later", 2000)):
        with pytest.raises(VersionConflictError) as info:
            attempt()
        assert (info.value.expected, info.value.actual) == (0, 1)
    assert load(store, "dispatch-001") == queued

    with pytest.raises(ValidationError, match="must be Claimed"):
        queued.acked(2000)
    with pytest.raises(ValidationError, match="must be Claimed"):
        queued.dead_lettered("failed", 2000)
    with pytest.raises(ValidationError, match="must be Claimed"):
        queued.nacked(3000, "retry later", 2000)
    with pytest.raises(ValidationError, match="must be Claimed"):
        queued.lease_expired(2000)


def test_run_dispatch_transition_api_rejects_cancelling_claimed_dispatch(
        store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000))
    claimed = store.claim_dispatch("dispatch-001", "consumer-1", 900, 1100)
    assert claimed is not None

    assert store.cancel("dispatch-001", 2000) is None
    assert load(store, "dispatch-001") == claimed

    with pytest.raises(ValidationError, match="must be Queued"):
        claimed.cancelled(2000)


def test_run_dispatch_requeue_after_nack_clears_runtime_projection(store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000,
                                     max_attempts=3))
    token = token_of(claim_one(store, "thread-abc", now=1100, lease_ms=900))
    store.record_run_result("dispatch-001", token, done_result("run-001", "runtime-1"), 1500)

    store.nack("dispatch-001", token, 1700, "retry", 1600)

    loaded = load(store, "dispatch-001")
    assert loaded.status == DispatchStatus.Queued
    assert_no_projection(loaded)
    assert loaded.completed_at is None


def test_run_dispatch_requeue_after_expired_lease_clears_runtime_projection(
        store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000,
                                     max_attempts=3))
    token = token_of(claim_one(store, "thread-abc", now=1100, lease_ms=900))
    store.record_dispatch_start("dispatch-001", token, "runtime-1", 1200)

    [reclaimed] = store.reclaim_expired_leases(2100, 10)

    assert reclaimed.status == DispatchStatus.Queued
    loaded = load(store, "dispatch-001")
    assert loaded == reclaimed
    assert_no_projection(loaded)
    assert_no_claim(loaded)
    assert loaded.completed_at is None


def test_run_dispatch_dead_letter_after_expired_lease_clears_runtime_projection(
        store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000,
                                     max_attempts=1))
    token = token_of(claim_one(store, "thread-abc", now=1100, lease_ms=900))
    store.record_dispatch_start("dispatch-001", token, "runtime-1", 1200)
    started = load(store, "dispatch-001")
    assert started.run_status == RunStatus.running
    assert started.dispatch_instance_id == "runtime-1"

    [reclaimed] = store.reclaim_expired_leases(2100, 10)

    loaded = load(store, "dispatch-001")
    assert loaded == reclaimed
    assert loaded.status == DispatchStatus.DeadLetter
    assert loaded.completed_at == 2100
    assert loaded.last_error == "lease expired; max attempts reached"
    assert_no_projection(loaded)


def test_run_dispatch_rejects_persisted_queued_runtime_projection(store: MailboxStore) -> None:
    with_projection = RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000
                                         ).replace(dispatch_instance_id="runtime-1",
                                                   run_status=RunStatus.running)

    with pytest.raises(ValidationError, match="runtime result fields"):
        store.enqueue(with_projection)
    with pytest.raises(ValidationError, match="runtime result fields"):
        with_projection.validate_for_persist()
    assert store.load_dispatch("dispatch-001") is None


def test_run_dispatch_supersede_transitions_are_explicit(store: MailboxStore) -> None:
    queued = RunDispatch.queued("dispatch-001", "thread-abc", "run-001", 1000)
    assert queued.superseded_by_interrupt(1100).status == DispatchStatus.Superseded

    store.enqueue(RunDispatch.queued("dispatch-002", "thread-abc", "run-002", 1000))
    claimed = store.claim_dispatch("dispatch-002", "consumer-1", 900, 1100)
    assert claimed is not None
    with pytest.raises(ValidationError, match="must be Queued"):
        claimed.superseded_by_interrupt(1200)
    token = token_of(claimed)
    store.record_dispatch_start("dispatch-002", token, "runtime-1", 1250)

    superseded = store.supersede_claimed("dispatch-002", token, 1300, "stale epoch")

    assert superseded is not None
    assert superseded.status == DispatchStatus.Superseded
    assert superseded.last_error == "stale epoch"
    assert_no_claim(superseded)
    assert_no_projection(superseded)
    assert load(store, "dispatch-002") == superseded
    with pytest.raises(ValidationError, match="must be Queued"):
        superseded.superseded_by_interrupt(1400)


# =============================================================== reference §6.2 #38 and #39
def test_distributed_expired_lease_reclaim_rejects_late_old_owner_ack(
        store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-distributed", "r1", 128, 0))
    a = store.claim_dispatch("d1", "consumer-a", 100, 1000)
    assert a is not None and a.lease_until == 1100

    reclaimed = store.reclaim_expired_leases(1101, 10)
    assert [(d.dispatch_id, d.status, d.attempt_count) for d in reclaimed] == [
        ("d1", DispatchStatus.Queued, 1)]

    b = claim_one(store, "t-distributed", now=1102, consumer="consumer-b")
    assert b.dispatch_id == "d1"

    with pytest.raises(VersionConflictError) as info:
        store.ack("d1", token_of(a), 1103)
    assert (info.value.expected, info.value.actual) == (0, 1)
    still_b = load(store, "d1")
    assert still_b.status == DispatchStatus.Claimed
    assert still_b.claimed_by == "consumer-b"
    assert still_b.claim_token == b.claim_token

    store.ack("d1", token_of(b), 1104)
    assert load(store, "d1").status == DispatchStatus.Acked


def test_distributed_lease_reclaim_uses_strict_expiry_boundary(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    claimed = claim_one(store, "t", now=1000, lease_ms=100)
    assert claimed.lease_until == 1100

    assert store.reclaim_expired_leases(999, 10) == []
    assert store.reclaim_expired_leases(1100, 10) == []
    assert load(store, "d1").status == DispatchStatus.Claimed

    reclaimed = store.reclaim_expired_leases(1101, 10)
    assert [(d.dispatch_id, d.status) for d in reclaimed] == [("d1", DispatchStatus.Queued)]


# ================================================================ enqueue identity and dedupe
def test_duplicate_dispatch_id_is_rejected_and_existing_untouched(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1", 10, 1000))
    before = load(store, "d1")

    for duplicate in (mk("d1", "t", "r-other", 200, 5000),
                      mk("d1", "t-other", "r-other", 1, 7000)):
        with pytest.raises(AlreadyExistsError) as info:
            store.enqueue(duplicate)
        assert info.value.message == "d1"
        assert load(store, "d1") == before

    assert store.list_dispatches("t-other") == []
    assert store.queued_thread_ids() == ["t"]

    store.enqueue(mk("d9", "t9", "r1"))
    store.ack("d9", token_of(claim_one(store, "t9")), 1500)
    acked = load(store, "d9")

    with pytest.raises(AlreadyExistsError) as info:
        store.enqueue(mk("d9", "t9", "r1", 128, 2000))

    assert info.value.message == "d9"
    assert load(store, "d9") == acked


def test_dedupe_key_held_while_queued_or_claimed_and_error_names_key(store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("d1", "t", "r1", 1000, dedupe_key="k"))
    before = load(store, "d1")

    with pytest.raises(AlreadyExistsError) as info:
        store.enqueue(RunDispatch.queued("d2", "t", "r2", 1100, dedupe_key="k"))

    assert info.value.message == "dedupe_key=k"
    assert store.load_dispatch("d2") is None
    assert load(store, "d1") == before

    store.enqueue(RunDispatch.queued("c1", "t-c", "r1", 1000, dedupe_key="k"))
    claim_one(store, "t-c")

    with pytest.raises(AlreadyExistsError) as claimed_info:
        store.enqueue(RunDispatch.queued("c2", "t-c", "r2", 1100, dedupe_key="k"))
    assert claimed_info.value.message == "dedupe_key=k"
    assert store.load_dispatch("c2") is None


TERMINALIZERS: dict[str, Callable[[MailboxStore, str, str], Any]] = {
    "acked": lambda s, d, t: s.ack(d, token_of(claim_one(s, t)), 1500),
    "cancelled": lambda s, d, t: s.cancel(d, 1500),
    "superseded": lambda s, d, t: s.interrupt(t, 1500),
    "dead_letter": lambda s, d, t: s.dead_letter(d, token_of(claim_one(s, t)), "fatal", 1500),
    "superseded_claimed": lambda s, d, t: s.supersede_claimed(
        d, token_of(claim_one(s, t)), 1500, "gone"),
    "nack_exhausted": lambda s, d, t: s.nack(
        d, token_of(claim_one(s, t)), 1600, "failed", 1500),
    "reclaim_exhausted": lambda s, d, t: (claim_one(s, t, lease_ms=100),
                                          s.reclaim_expired_leases(1500, 100)),
}


def test_dedupe_key_freed_after_terminal(store: MailboxStore) -> None:
    for name, terminalize in TERMINALIZERS.items():
        thread = f"t-{name}"
        store.enqueue(RunDispatch.queued(f"{name}-1", thread, "r1", 1000, dedupe_key="k",
                                         max_attempts=1))
        terminalize(store, f"{name}-1", thread)
        assert load(store, f"{name}-1").status.is_terminal, name

        store.enqueue(RunDispatch.queued(f"{name}-2", thread, "r2", 2000, dedupe_key="k"))

        again = load(store, f"{name}-2")
        assert (again.status, again.dedupe_key) == (DispatchStatus.Queued, "k"), name


def test_same_dedupe_key_on_another_thread_is_independent(store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("d1", "thread-a", "r1", 1000, dedupe_key="k"))
    store.enqueue(RunDispatch.queued("d2", "thread-b", "r2", 1000, dedupe_key="k"))

    assert load(store, "d1").status == DispatchStatus.Queued
    assert load(store, "d2").status == DispatchStatus.Queued
    with pytest.raises(AlreadyExistsError):
        store.enqueue(RunDispatch.queued("d3", "thread-b", "r3", 1000, dedupe_key="k"))


def test_enqueue_stamps_current_thread_epoch_and_clears_claim(store: MailboxStore) -> None:
    store.interrupt("t", 500)
    store.interrupt("t", 600)
    store.enqueue(mk("d1", "t", "r1").replace(dispatch_epoch=99, last_error="carried",
                                              attempt_count=2))

    loaded = load(store, "d1")
    assert loaded.dispatch_epoch == 2
    assert loaded.status == DispatchStatus.Queued
    assert loaded.attempt_count == 2
    assert loaded.last_error == "carried"
    assert_no_claim(loaded)
    assert_no_projection(loaded)
    assert loaded.completed_at is None
    assert (loaded.created_at, loaded.updated_at, loaded.available_at) == (1000, 1000, 1000)


# ===================================================================== purge and epochs
def test_purge_never_deletes_non_terminal_rows_and_never_resets_epochs(store: MailboxStore) -> None:
    store.enqueue(mk("queued", "t-live", "r1", 128, 1000))
    store.enqueue(mk("claimed", "t-claimed", "r2", 128, 1000))
    claim_one(store, "t-claimed")
    store.enqueue(mk("old", "t-done", "r3", 128, 1000))
    store.interrupt("t-done", 1500)
    store.interrupt("t-done", 1600)
    assert store.current_dispatch_epoch("t-done") == 2

    purged = store.purge_terminal(10**12)

    assert purged == 1
    assert store.load_dispatch("old") is None
    assert load(store, "queued").status == DispatchStatus.Queued
    assert load(store, "claimed").status == DispatchStatus.Claimed
    assert store.sql_epoch("t-done") == 2
    assert store.current_dispatch_epoch("t-done") == 2
    store.enqueue(mk("new", "t-done", "r4", 128, 3000))
    assert load(store, "new").dispatch_epoch == 2
    assert store.interrupt("t-done", 3100).new_dispatch_epoch == 3

    store.enqueue(mk("d1", "t", "r1"))
    store.cancel("d1", 1500)

    assert store.purge_terminal(1500) == 0
    assert load(store, "d1").status == DispatchStatus.Cancelled
    assert store.purge_terminal(1501) == 1
    assert store.load_dispatch("d1") is None


# ============================================================================= listing
def test_list_dispatches_ordering_filtering_and_paging(store: MailboxStore) -> None:
    store.enqueue(mk("e", "t", "r", 200, 1000).replace(created_at=5))
    store.enqueue(mk("c", "t", "r", 10, 1000).replace(created_at=30))
    store.enqueue(mk("b", "t", "r", 10, 1000).replace(created_at=20))
    store.enqueue(mk("a2", "t", "r", 10, 1000).replace(created_at=20))
    store.enqueue(mk("z", "t", "r", 0, 1000).replace(created_at=99))
    store.enqueue(mk("other", "t-other", "r", 0, 1000))

    everything = [d.dispatch_id for d in store.list_dispatches("t", None, 100, 0)]
    assert everything == ["z", "a2", "b", "c", "e"]
    assert [d.dispatch_id for d in store.list_dispatches("t", None, 2, 0)] == ["z", "a2"]
    assert [d.dispatch_id for d in store.list_dispatches("t", None, 2, 2)] == ["b", "c"]
    assert [d.dispatch_id for d in store.list_dispatches("t", None, 2, 4)] == ["e"]
    assert store.list_dispatches("t", None, 2, 5) == []
    assert store.list_dispatches("t", None, 0, 0) == []

    store.cancel("b", 2000)
    assert [d.dispatch_id for d in store.list_dispatches("t", [DispatchStatus.Cancelled])
            ] == ["b"]
    assert [d.dispatch_id for d in store.list_dispatches(
        "t", [DispatchStatus.Queued, DispatchStatus.Cancelled], 100, 1)] == ["a2", "b", "c", "e"]
    assert store.list_dispatches("t-unknown") == []

    store.enqueue(mk("d1", "t-empty", "r1"))

    assert store.list_dispatches("t-empty", [], 100, 0) == []
    assert len(store.list_dispatches("t-empty", None, 100, 0)) == 1


def test_list_terminal_dispatches_order_and_paging(store: MailboxStore) -> None:
    for name, thread in (("x", "t1"), ("y", "t2"), ("w", "t3"), ("live", "t4")):
        store.enqueue(mk(name, thread, "r", 128, 1000))
    store.cancel("y", 3000)
    store.cancel("x", 2000)
    store.cancel("w", 2000)

    ids = [d.dispatch_id for d in store.list_terminal_dispatches(10, 0)]
    assert ids == ["w", "x", "y"]
    assert [d.dispatch_id for d in store.list_terminal_dispatches(2, 1)] == ["x", "y"]
    assert store.list_terminal_dispatches(10, 3) == []


def test_queued_thread_ids_sorted_and_include_future_available(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t-b", "r"))
    store.enqueue(mk("d2", "t-a", "r", 128, 10**9))
    store.enqueue(mk("d3", "t-c", "r"))
    store.enqueue(mk("d4", "t-c", "r"))
    store.enqueue(mk("d5", "t-claimed", "r"))
    claim_one(store, "t-claimed")

    assert store.queued_thread_ids() == ["t-a", "t-b", "t-c"]


# =========================================================== VersionConflict payloads
def _claimed_token_on(store: MailboxStore, dispatch_id: str = "d1", thread: str = "t") -> str:
    store.enqueue(mk(dispatch_id, thread, "r1"))
    return token_of(claim_one(store, thread))


FENCED_OPS: dict[str, Callable[[MailboxStore, str, str, int], Any]] = {
    "ack": lambda s, d, tok, now: s.ack(d, tok, now),
    "nack": lambda s, d, tok, now: s.nack(d, tok, now + 100, "err", now),
    "dead_letter": lambda s, d, tok, now: s.dead_letter(d, tok, "err", now),
    "record_dispatch_start": lambda s, d, tok, now: s.record_dispatch_start(d, tok, "i-1", now),
    "record_run_result": lambda s, d, tok, now: s.record_run_result(d, tok, done_result(), now),
}


def test_token_mismatch_is_version_conflict_0_1_and_changes_nothing(store: MailboxStore) -> None:
    for op, call in sorted(FENCED_OPS.items()):
        _claimed_token_on(store, f"d-{op}", f"t-{op}")
        before = load(store, f"d-{op}")

        with pytest.raises(VersionConflictError) as info:
            call(store, f"d-{op}", "not-the-token", 2000)

        assert (info.value.expected, info.value.actual) == (0, 1), op
        assert str(info.value) == "version conflict: expected 0, actual 1"
        assert load(store, f"d-{op}") == before, op


def test_fenced_op_on_missing_dispatch_is_not_found(store: MailboxStore) -> None:
    for op, call in sorted(FENCED_OPS.items()):
        with pytest.raises(NotFoundError) as info:
            call(store, "missing", "token", 2000)
        assert info.value.message == "missing", op
    assert store.load_dispatch("missing") is None


def test_fenced_op_on_terminal_dispatch_is_version_conflict_0_1(store: MailboxStore) -> None:
    for op, call in sorted(FENCED_OPS.items()):
        token = _claimed_token_on(store, f"d-{op}", f"t-{op}")
        store.ack(f"d-{op}", token, 1500)
        before = load(store, f"d-{op}")

        with pytest.raises(VersionConflictError) as info:
            call(store, f"d-{op}", token, 2000)

        assert (info.value.expected, info.value.actual) == (0, 1), op
        assert load(store, f"d-{op}") == before, op


def test_supersede_claimed_token_mismatch_and_non_claimed(store: MailboxStore) -> None:
    assert store.supersede_claimed("missing", "tok", 2000, "why") is None
    store.enqueue(mk("q", "t-q", "r"))
    queued = load(store, "q")
    assert store.supersede_claimed("q", "wrong", 2000, "why") is None
    assert load(store, "q") == queued

    _claimed_token_on(store)
    before = load(store, "d1")
    with pytest.raises(VersionConflictError) as info:
        store.supersede_claimed("d1", "wrong", 2000, "why")
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert load(store, "d1") == before


STALE_REASONS = {
    "ack": "claimed dispatch superseded before ack",
    "nack": "claimed dispatch superseded before nack",
    "dead_letter": "claimed dispatch superseded before dead letter",
    "record_dispatch_start": "claimed dispatch superseded before runtime start",
    "record_run_result": "claimed dispatch superseded before run result",
}


def test_stale_fenced_op_supersedes_with_reason_and_epoch_conflict(store: MailboxStore) -> None:
    for op, call in sorted(FENCED_OPS.items()):
        d, t = f"d-{op}", f"t-{op}"
        store.interrupt(t, 500)  # thread epoch 1: the dispatch is stamped 1
        store.enqueue(mk(d, t, "r1"))
        token = token_of(claim_one(store, t))
        store.record_dispatch_start(d, token, "attempt-1", 1100)
        store.interrupt(t, 1200)
        store.interrupt(t, 1300)  # thread epoch 3

        with pytest.raises(VersionConflictError) as info:
            call(store, d, token, 2000)

        assert (info.value.expected, info.value.actual) == (1, 3), op
        loaded = load(store, d)
        assert loaded.status == DispatchStatus.Superseded, op
        assert loaded.last_error == STALE_REASONS[op]
        assert loaded.dispatch_epoch == 3
        assert loaded.completed_at == 2000
        assert loaded.updated_at == 2000
        assert loaded.attempt_count == 0
        assert_no_claim(loaded)
        assert_no_projection(loaded)
        # The fenced claim no longer blocks the thread.
        store.enqueue(mk(f"{d}-next", t, "r2", 128, 2100))
        assert claim_one(store, t, now=2100).dispatch_id == f"{d}-next"


def test_stale_extend_lease_supersedes_with_renewal_reason(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    token = token_of(claim_one(store, "t"))
    store.record_dispatch_start("d1", token, "attempt-1", 1100)
    store.interrupt("t", 1200)

    assert store.extend_lease("d1", token, 30_000, 2000) is False

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Superseded
    assert loaded.last_error == "claimed dispatch superseded during lease renewal"
    assert loaded.dispatch_epoch == 1
    assert loaded.completed_at == 2000
    assert_no_claim(loaded)
    assert_no_projection(loaded)


def test_stale_reclaim_supersedes_with_reclaim_reason(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    token = token_of(claim_one(store, "t", lease_ms=100))
    store.record_dispatch_start("d1", token, "attempt-1", 1050)
    store.interrupt("t", 1060)

    assert store.reclaim_expired_leases(2000, 10) == []

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.Superseded
    assert loaded.last_error == "claimed dispatch lease expired after interrupt"
    assert loaded.dispatch_epoch == 1
    assert loaded.attempt_count == 0
    assert loaded.completed_at == 2000
    assert_no_claim(loaded)
    assert_no_projection(loaded)


def test_interrupt_reason_and_epoch_unchanged_on_superseded_queued(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))

    result = store.interrupt("t", 2000)

    [superseded] = result.superseded
    assert superseded.last_error == "queued dispatch superseded by interrupt"
    assert superseded.dispatch_epoch == 0
    assert superseded.completed_at == 2000
    assert load(store, "d1") == superseded
    assert result.new_dispatch_epoch == 1


def test_supersede_claimed_keeps_highest_epoch(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    token = token_of(claim_one(store, "t"))
    store.interrupt("t", 1100)
    store.interrupt("t", 1200)

    superseded = store.supersede_claimed("d1", token, 1300, "found stale")

    assert superseded is not None
    assert superseded.dispatch_epoch == 2
    assert superseded.last_error == "found stale"
    assert superseded.updated_at == 1300


# ======================================================================= attempts budget
def test_attempts_at_budget_dead_letter_without_exceeding_max_attempts(store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("d1", "t", "r1", 1000, max_attempts=3, attempt_count=3))
    token = token_of(claim_one(store, "t"))

    store.nack("d1", token, 5000, "one more failure", 2000)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.DeadLetter
    assert loaded.attempt_count == 3
    assert loaded.max_attempts == 3
    assert loaded.last_error == "one more failure"
    assert_no_claim(loaded)

    store.enqueue(RunDispatch.queued("d2", "t2", "r1", 1000, max_attempts=2, attempt_count=2))
    claim_one(store, "t2", lease_ms=100)

    [reclaimed] = store.reclaim_expired_leases(2000, 10)

    assert reclaimed.status == DispatchStatus.DeadLetter
    assert reclaimed.attempt_count == 2
    assert reclaimed.last_error == "lease expired; max attempts reached"
    assert load(store, "d2") == reclaimed


def test_nack_exhausted_keeps_projection_and_available_at(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1").replace(max_attempts=1))
    token = token_of(claim_one(store, "t"))
    store.record_run_result("d1", token, RunDispatchResult(
        "r1", "attempt-1", RunStatus.done, Termination.error("boom"), None, "boom"), 1500)

    store.nack("d1", token, 9000, "boom", 2000)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.DeadLetter
    assert loaded.attempt_count == 1
    assert loaded.available_at == 1000
    assert loaded.completed_at == 2000
    assert loaded.run_status == RunStatus.done
    assert loaded.termination == Termination.error("boom")
    assert loaded.run_error == "boom"
    assert loaded.dispatch_instance_id == "attempt-1"


def test_dead_letter_keeps_attempts_and_projection(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    token = token_of(claim_one(store, "t"))
    store.record_run_result("d1", token, RunDispatchResult(
        "r1", "attempt-1", RunStatus.done, Termination.error("fatal"), None, "fatal"), 1500)

    store.dead_letter("d1", token, "fatal", 2000)

    loaded = load(store, "d1")
    assert loaded.status == DispatchStatus.DeadLetter
    assert loaded.attempt_count == 0
    assert loaded.last_error == "fatal"
    assert loaded.completed_at == 2000
    assert loaded.run_error == "fatal"
    assert loaded.termination == Termination.error("fatal")
    assert_no_claim(loaded)


def test_reclaim_requeue_makes_dispatch_available_now(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1", 128, 500).replace(last_error="earlier"))
    claim_one(store, "t", lease_ms=100)

    [reclaimed] = store.reclaim_expired_leases(2000, 10)

    assert reclaimed.status == DispatchStatus.Queued
    assert reclaimed.available_at == 2000
    assert reclaimed.attempt_count == 1
    assert reclaimed.last_error == "earlier"
    assert reclaimed.updated_at == 2000
    assert [d.dispatch_id for d in store.claim("t", "c2", LEASE, 2000, 1)] == ["d1"]


def test_reclaim_respects_limit(store: MailboxStore) -> None:
    for i in range(3):
        store.enqueue(mk(f"d{i}", f"t{i}", "r"))
        claim_one(store, f"t{i}", lease_ms=100)

    first = store.reclaim_expired_leases(2000, 2)
    second = store.reclaim_expired_leases(2000, 2)

    assert len(first) == 2
    assert len(second) == 1
    assert {d.dispatch_id for d in first + second} == {"d0", "d1", "d2"}


# ============================================================== extend lease edge cases
def test_extend_lease_edge_cases(store: MailboxStore) -> None:
    assert store.extend_lease("missing", "tok", 1000, 2000) is False
    store.enqueue(mk("d1", "t", "r1"))
    queued = load(store, "d1")
    assert store.extend_lease("d1", "tok", 1000, 2000) is False
    assert load(store, "d1") == queued

    store.enqueue(mk("d2", "t2", "r1"))
    token = token_of(claim_one(store, "t2", lease_ms=100))

    assert store.extend_lease("d2", token, 500, 5000) is True

    loaded = load(store, "d2")
    assert loaded.lease_until == 5500
    assert loaded.updated_at == 5000
    assert store.reclaim_expired_leases(5500, 10) == []


# ======================================================== busy thread refused without SQL
def test_claim_on_busy_thread_issues_no_sql(store: MailboxStore) -> None:
    store.enqueue(mk("d1", "t", "r1"))
    store.enqueue(mk("d2", "t", "r2"))

    with count_sql(store) as first_claim:
        claimed = claim_one(store, "t", now=1000)
    assert first_claim, "the listener must see the SQL of an ordinary claim"

    with count_sql(store) as busy_claim:
        assert store.claim("t", "consumer-2", LEASE, 1100, 1) == []
    assert busy_claim == []

    assert load(store, "d2").status == DispatchStatus.Queued
    store.ack("d1", token_of(claimed), 1200)
    assert claim_one(store, "t", now=1300).dispatch_id == "d2"


def test_claim_on_a_thread_with_nothing_due_only_reads(store: MailboxStore) -> None:
    """No write transaction (on SQLite the database's one write lock) for an empty thread,
    nor for one whose only dispatch is not due yet; the lease it took is given back."""
    store.enqueue(mk("d1", "t", "r1", t=5000))  # created and available at 5000
    for thread_id in ("t", "empty"):
        with count_sql(store) as statements:
            assert store.claim(thread_id, "consumer-1", LEASE, 1000, 1) == []
        writes = [sql for sql in statements if sql.lstrip().upper().startswith(
            ("INSERT", "UPDATE", "DELETE", "BEGIN IMMEDIATE", "SELECT PG_ADVISORY"))
            or "FOR UPDATE" in sql.upper()]
        assert statements and writes == [], statements
        assert store.coordinator.read_lease(thread_id) is None
    assert claim_one(store, "t", now=5000).dispatch_id == "d1"


def test_claim_returns_at_most_one_per_call_and_nothing_for_limit_zero(store: MailboxStore) -> None:
    for i in range(3):
        store.enqueue(mk(f"d{i}", "t", f"r{i}", 128, 1000 + i))

    claimed = store.claim("t", "consumer-1", LEASE, 5000, 10)

    assert [d.dispatch_id for d in claimed] == ["d0"]
    assert claimed[0].lease_until == 5000 + LEASE
    assert claimed[0].updated_at == 5000
    assert claimed[0].available_at == 1000
    assert claimed[0].attempt_count == 0

    store.enqueue(mk("z1", "t-zero", "r1"))

    assert store.claim("t-zero", "consumer-1", LEASE, 1000, 0) == []

    assert load(store, "z1").status == DispatchStatus.Queued
    assert claim_one(store, "t-zero").dispatch_id == "z1"


# ================================================================= persistence round trips
def test_projection_round_trips_through_sql_for_every_termination(store: MailboxStore) -> None:
    terminations = [Termination.natural_end(), Termination.behavior_requested(),
                    Termination.cancelled(), Termination.suspended(), Termination.error("e: ü"),
                    Termination.blocked("needs approval"), Termination.stopped("max_rounds"),
                    Termination.stopped("limit", "hit 10 rounds"), None]
    for i, termination in enumerate(terminations):
        thread = f"t{i}"
        store.enqueue(mk(f"d{i}", thread, "r1"))
        token = token_of(claim_one(store, thread))
        result = RunDispatchResult("r1", f"inst-{i}", RunStatus.done, termination,
                                   "réponse ✓", "err\nline 2")
        store.record_run_result(f"d{i}", token, result, 1500)
        store.ack(f"d{i}", token, 1600)

        loaded = load(store, f"d{i}")

        assert loaded.termination == termination, termination
        assert loaded.run_response == "réponse ✓"
        assert loaded.run_error == "err\nline 2"
        assert loaded.dispatch_instance_id == f"inst-{i}"
        assert RunDispatch.from_json(loaded.to_json()) == loaded


def test_large_times_round_trip(store: MailboxStore) -> None:
    from mailbox.model import MAX_MS

    big = MAX_MS
    store.enqueue(RunDispatch.queued("d1", "t", "r1", big, available_at=big))
    [claimed] = store.claim("t", "c1", 1000, big, 1)

    loaded = load(store, "d1")
    assert loaded == claimed
    assert (loaded.created_at, loaded.available_at, loaded.lease_until) == (big, big, big + 1000)


def test_loading_an_invalid_row_is_an_error(store: MailboxStore) -> None:
    from mailbox import MailboxError
    from mailbox.schema import dispatches

    store.enqueue(mk("d1", "t", "r1"))
    with store.engine.begin() as conn:
        conn.execute(sa.update(dispatches).where(dispatches.c.dispatch_id == "d1")
                     .values(claim_token="forged"))

    with pytest.raises(MailboxError, match="d1"):
        store.load_dispatch("d1")


def _epoch_statements(statements: list[str]) -> tuple[int, int]:
    """(SELECTs, INSERTs) of the thread epochs table among `statements`."""
    on_epochs = [s.lstrip().upper() for s in statements if "thread_dispatch_epochs" in s]
    return (sum(s.startswith("SELECT") for s in on_epochs),
            sum(s.startswith("INSERT") for s in on_epochs))


def test_a_new_threads_first_enqueue_takes_epoch_0_from_its_own_insert(
        store: MailboxStore) -> None:
    with count_sql(store) as first:
        store.enqueue(mk("d-first", "t-new-epoch", "r1"))
    assert _epoch_statements(first) == (1, 1)  # looked, created; no read back
    assert load(store, "d-first").dispatch_epoch == 0
    with count_sql(store) as second:
        store.enqueue(mk("d-second", "t-new-epoch", "r2"))
    assert _epoch_statements(second) == (1, 0)
    assert load(store, "d-second").dispatch_epoch == 0


def test_an_epoch_row_created_between_the_look_and_the_insert_is_read_back(
        store: MailboxStore) -> None:
    """Another transaction creates the thread's row after this one found none: the insert
    does nothing, and the epoch is read (and locked) as the other one left it. Only
    PostgreSQL can interleave two writers so; SQLite runs one at a time."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite never runs two writers at once")
    fired: list[bool] = []

    def create_meanwhile(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if fired or "thread_dispatch_epochs" not in statement \
                or not statement.lstrip().upper().startswith("SELECT"):
            return
        fired.append(True)
        with store.engine.begin() as other:
            other.execute(sa.text("INSERT INTO thread_dispatch_epochs (thread_id, current_epoch) "
                                  "VALUES ('t-raced-epoch', 7)"))

    sa.event.listen(store.engine, "after_cursor_execute", create_meanwhile)
    try:
        with count_sql(store) as statements:
            store.enqueue(mk("d-raced", "t-raced-epoch", "r1"))
    finally:
        sa.event.remove(store.engine, "after_cursor_execute", create_meanwhile)
    assert fired
    assert load(store, "d-raced").dispatch_epoch == 7
    # This transaction's look, insert (which did nothing) and read back; the other's insert.
    assert _epoch_statements(statements) == (2, 2)
