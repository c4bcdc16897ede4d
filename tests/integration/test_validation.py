"""Invalid input is refused with `ValidationError` and writes nothing (reference §1.10, §3).

Each case names the problem in the message, and the test then checks the database (and, for
claims, the Redis lease) is exactly as before: an empty table for a refused enqueue, an
unchanged record for a refused operation on an existing dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from mailbox import (
    DispatchStatus,
    MailboxError,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    ValidationError,
)
from mailbox.schema import dispatches, thread_epochs
from mailbox.store import MailboxStore

LEASE = 30_000


def mk(dispatch_id: str = "d1", thread: str = "t", run: str = "r1", prio: int = 128,
       t: int = 1000) -> RunDispatch:
    return RunDispatch.queued(dispatch_id, thread, run, created_at=t, priority=prio,
                              available_at=t, max_attempts=5)


def row_counts(store: MailboxStore) -> tuple[int, int]:
    """(dispatch rows, thread epoch rows), read straight from SQL."""
    with store.engine.connect() as conn:
        n_dispatches = conn.execute(sa.select(sa.func.count()).select_from(dispatches))
        n_epochs = conn.execute(sa.select(sa.func.count()).select_from(thread_epochs))
        return int(n_dispatches.scalar_one()), int(n_epochs.scalar_one())


def load(store: MailboxStore, dispatch_id: str) -> RunDispatch:
    loaded = store.load_dispatch(dispatch_id)
    assert loaded is not None
    return loaded


def expect_validation(action: Callable[[], Any], *words: str) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        action()
    message = str(info.value)
    assert message.startswith("validation error: ")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return info.value


# ======================================================================== enqueue (§1.10)
BLANKS = ["", " ", "   ", "\t", "\n", " \t\n "]

INVALID_DISPATCHES: list[tuple[str, Callable[[], RunDispatch], str]] = [
    *[(f"blank dispatch_id {b!r}", lambda b=b: mk(dispatch_id=b), "dispatch_id must not be empty")
      for b in BLANKS],
    *[(f"blank thread_id {b!r}", lambda b=b: mk(thread=b), "thread_id must not be empty")
      for b in BLANKS],
    *[(f"blank run_id {b!r}", lambda b=b: mk(run=b), "run_id must not be empty")
      for b in BLANKS],
    ("dispatch_id None", lambda: mk().replace(dispatch_id=None), "dispatch_id"),
    ("dispatch_id int", lambda: mk().replace(dispatch_id=123), "dispatch_id"),
    ("thread_id bytes", lambda: mk().replace(thread_id=b"t"), "thread_id"),
    ("run_id None", lambda: mk().replace(run_id=None), "run_id"),
    ("priority -1", lambda: mk(prio=-1), "priority"),
    ("priority 256", lambda: mk(prio=256), "priority"),
    ("priority 1000", lambda: mk(prio=1000), "priority"),
    ("priority str", lambda: mk().replace(priority="5"), "priority"),
    ("priority float", lambda: mk().replace(priority=5.0), "priority"),
    ("priority bool", lambda: mk().replace(priority=True), "priority"),
    ("max_attempts 0", lambda: mk().replace(max_attempts=0), "max_attempts"),
    ("max_attempts -1", lambda: mk().replace(max_attempts=-1), "max_attempts"),
    ("max_attempts str", lambda: mk().replace(max_attempts="5"), "max_attempts"),
    ("attempt_count above max", lambda: mk().replace(attempt_count=6), "attempt_count"),
    ("attempt_count -1", lambda: mk().replace(attempt_count=-1), "attempt_count"),
    ("created_at -1", lambda: mk().replace(created_at=-1), "created_at"),
    ("created_at float", lambda: mk().replace(created_at=1000.5), "created_at"),
    ("created_at str", lambda: mk().replace(created_at="1000"), "created_at"),
    ("created_at None", lambda: mk().replace(created_at=None), "created_at"),
    ("updated_at -5", lambda: mk().replace(updated_at=-5), "updated_at"),
    ("available_at -1", lambda: mk().replace(available_at=-1), "available_at"),
    ("available_at float", lambda: mk().replace(available_at=1.5), "available_at"),
    ("available_at bool", lambda: mk().replace(available_at=True), "available_at"),
    ("dispatch_epoch -1", lambda: mk().replace(dispatch_epoch=-1), "dispatch_epoch"),
    ("blank dedupe_key", lambda: mk().replace(dedupe_key="  "), "dedupe_key"),
    ("queued with claim token", lambda: mk().replace(claim_token="tok"), "claim"),
    ("queued with claimed_by", lambda: mk().replace(claimed_by="c"), "claim"),
    ("queued with lease_until", lambda: mk().replace(lease_until=5000), "claim"),
    ("queued with completed_at", lambda: mk().replace(completed_at=5000), "completed_at"),
    ("queued with run_status", lambda: mk().replace(run_status=RunStatus.running),
     "runtime result fields"),
    ("queued with dispatch_instance_id", lambda: mk().replace(dispatch_instance_id="i"),
     "runtime result fields"),
    ("queued with run_response", lambda: mk().replace(run_response="ok"),
     "runtime result fields"),
    ("queued with run_error", lambda: mk().replace(run_error="bad"), "runtime result fields"),
    ("claimed", lambda: mk().replace(status=DispatchStatus.Claimed, claim_token="tok",
                                     claimed_by="c", lease_until=5000),
     "must start as Queued"),
    *[(f"status {s.value}", lambda s=s: mk().replace(status=s, completed_at=2000),
       "must start as Queued") for s in DispatchStatus if s.is_terminal],
]


@pytest.mark.parametrize(("build", "words"), [(b, w) for _, b, w in INVALID_DISPATCHES],
                         ids=[name for name, _, _ in INVALID_DISPATCHES])
def test_enqueue_rejects_invalid_dispatch_and_writes_nothing(
        store: MailboxStore, build: Callable[[], RunDispatch], words: str) -> None:
    dispatch = build()

    expect_validation(lambda: store.enqueue(dispatch), words)

    assert row_counts(store) == (0, 0)
    assert store.queued_thread_ids() == []


@pytest.mark.parametrize("value", [None, "d1", {"dispatch_id": "d1"}, 42],
                         ids=["none", "str", "dict", "int"])
def test_enqueue_rejects_non_dispatch_argument(store: MailboxStore, value: Any) -> None:
    expect_validation(lambda: store.enqueue(value), "RunDispatch")
    assert row_counts(store) == (0, 0)


def test_enqueue_accepts_boundary_values(store: MailboxStore) -> None:
    store.enqueue(mk("p0", prio=0, t=0))
    store.enqueue(mk("p255", prio=255))
    store.enqueue(mk("full").replace(max_attempts=1, attempt_count=1))

    assert {d.dispatch_id for d in store.list_dispatches("t")} == {"p0", "p255", "full"}


def test_validation_error_is_a_mailbox_error() -> None:
    assert issubclass(ValidationError, MailboxError)
    err = ValidationError("thread_id must not be empty")
    assert err.message == "thread_id must not be empty"
    assert str(err) == "validation error: thread_id must not be empty"


# ======================================================================= claim paths
BAD_IDS: list[Any] = ["", "   ", "\t", None, 7]
BAD_TIMES: list[Any] = [-1, 1.5, "1000", None, True]


@pytest.fixture
def queued(store: MailboxStore) -> RunDispatch:
    store.enqueue(mk())
    return load(store, "d1")


def _claim_args(**override: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"thread_id": "t", "consumer_id": "c1", "lease_ms": LEASE,
                            "now": 1000, "limit": 1}
    args.update(override)
    return args


CLAIM_CASES: list[tuple[str, dict[str, Any], str]] = [
    *[(f"thread_id {v!r}", {"thread_id": v}, "thread_id") for v in BAD_IDS],
    *[(f"consumer_id {v!r}", {"consumer_id": v}, "consumer_id") for v in BAD_IDS],
    *[(f"lease_ms {v!r}", {"lease_ms": v}, "lease_ms") for v in BAD_TIMES],
    *[(f"now {v!r}", {"now": v}, "now") for v in BAD_TIMES],
    *[(f"limit {v!r}", {"limit": v}, "limit") for v in [-1, "1", 1.0, None, True]],
]


@pytest.mark.parametrize(("override", "word"), [(o, w) for _, o, w in CLAIM_CASES],
                         ids=[name for name, _, _ in CLAIM_CASES])
def test_claim_rejects_invalid_input(store: MailboxStore, queued: RunDispatch,
                                     override: dict[str, Any], word: str) -> None:
    args = _claim_args(**override)

    expect_validation(lambda: store.claim(args["thread_id"], args["consumer_id"],
                                          args["lease_ms"], args["now"], args["limit"]), word)

    assert load(store, "d1") == queued
    assert store.coordinator.read_lease("t") is None
    assert store.claim("t", "c1", LEASE, 1000, 1)[0].dispatch_id == "d1"


CLAIM_DISPATCH_CASES: list[tuple[str, dict[str, Any], str]] = [
    *[(f"dispatch_id {v!r}", {"dispatch_id": v}, "dispatch_id") for v in BAD_IDS],
    *[(f"consumer_id {v!r}", {"consumer_id": v}, "consumer_id") for v in BAD_IDS],
    *[(f"lease_ms {v!r}", {"lease_ms": v}, "lease_ms") for v in BAD_TIMES],
    *[(f"now {v!r}", {"now": v}, "now") for v in BAD_TIMES],
]


@pytest.mark.parametrize(("override", "word"), [(o, w) for _, o, w in CLAIM_DISPATCH_CASES],
                         ids=[name for name, _, _ in CLAIM_DISPATCH_CASES])
def test_claim_dispatch_rejects_invalid_input(store: MailboxStore, queued: RunDispatch,
                                              override: dict[str, Any], word: str) -> None:
    args: dict[str, Any] = {"dispatch_id": "d1", "consumer_id": "c1", "lease_ms": LEASE,
                            "now": 1000}
    args.update(override)

    expect_validation(lambda: store.claim_dispatch(**args), word)

    assert load(store, "d1") == queued
    assert store.coordinator.read_lease("t") is None


# ================================================================ fenced claimed operations
@pytest.fixture
def claimed(store: MailboxStore) -> RunDispatch:
    store.enqueue(mk())
    [c] = store.claim("t", "c1", LEASE, 1000, 1)
    return c


def _fenced_cases() -> list[tuple[str, Callable[[MailboxStore, str], Any], str]]:
    ok_result = RunDispatchResult("r1", "i-1", RunStatus.done)
    cases: list[tuple[str, Callable[[MailboxStore, str], Any], str]] = []
    for bad in BAD_IDS:
        cases += [
            (f"ack dispatch_id {bad!r}", lambda s, tok, b=bad: s.ack(b, tok, 2000),
             "dispatch_id"),
            (f"nack dispatch_id {bad!r}",
             lambda s, tok, b=bad: s.nack(b, tok, 3000, "e", 2000), "dispatch_id"),
            (f"dead_letter dispatch_id {bad!r}",
             lambda s, tok, b=bad: s.dead_letter(b, tok, "e", 2000), "dispatch_id"),
            (f"start dispatch_id {bad!r}",
             lambda s, tok, b=bad: s.record_dispatch_start(b, tok, "i-1", 2000), "dispatch_id"),
            (f"result dispatch_id {bad!r}",
             lambda s, tok, b=bad: s.record_run_result(b, tok, ok_result, 2000), "dispatch_id"),
            (f"start instance id {bad!r}",
             lambda s, tok, b=bad: s.record_dispatch_start("d1", tok, b, 2000),
             "dispatch_instance_id"),
        ]
    for bad in BAD_TIMES:
        cases += [
            (f"ack now {bad!r}", lambda s, tok, b=bad: s.ack("d1", tok, b), "now"),
            (f"nack now {bad!r}", lambda s, tok, b=bad: s.nack("d1", tok, 3000, "e", b), "now"),
            (f"nack retry_at {bad!r}",
             lambda s, tok, b=bad: s.nack("d1", tok, b, "e", 2000), "retry_at"),
            (f"dead_letter now {bad!r}",
             lambda s, tok, b=bad: s.dead_letter("d1", tok, "e", b), "now"),
            (f"start now {bad!r}",
             lambda s, tok, b=bad: s.record_dispatch_start("d1", tok, "i-1", b), "now"),
            (f"result now {bad!r}",
             lambda s, tok, b=bad: s.record_run_result("d1", tok, ok_result, b), "now"),
            (f"extend now {bad!r}",
             lambda s, tok, b=bad: s.extend_lease("d1", tok, 1000, b), "now"),
            (f"extend extension_ms {bad!r}",
             lambda s, tok, b=bad: s.extend_lease("d1", tok, b, 2000), "extension_ms"),
            (f"supersede now {bad!r}",
             lambda s, tok, b=bad: s.supersede_claimed("d1", tok, b, "why"), "now"),
        ]
    cases += [
        ("ack token None", lambda s, tok: s.ack("d1", None, 2000), "claim_token"),
        ("nack token int", lambda s, tok: s.nack("d1", 5, 3000, "e", 2000), "claim_token"),
        ("result not a RunDispatchResult",
         lambda s, tok: s.record_run_result("d1", tok, {"run_id": "r1"}, 2000), "result"),
        ("result for another run",
         lambda s, tok: s.record_run_result(
             "d1", tok, RunDispatchResult("r-other", "i-1", RunStatus.done), 2000), "run"),
        ("supersede dispatch_id blank",
         lambda s, tok: s.supersede_claimed("  ", tok, 2000, "why"), "dispatch_id"),
    ]
    return cases


FENCED_CASES = _fenced_cases()


@pytest.mark.parametrize(("action", "word"), [(a, w) for _, a, w in FENCED_CASES],
                         ids=[name for name, _, _ in FENCED_CASES])
def test_claimed_operation_rejects_invalid_input_and_changes_nothing(
        store: MailboxStore, claimed: RunDispatch,
        action: Callable[[MailboxStore, str], Any], word: str) -> None:
    token = claimed.claim_token
    assert token is not None

    expect_validation(lambda: action(store, token), word)

    assert load(store, "d1") == claimed
    lease = store.coordinator.read_lease("t")
    assert lease is not None and lease.token == token
    assert lease.lease_until == claimed.lease_until


def test_record_run_result_run_id_mismatch_names_both_runs(store: MailboxStore,
                                                           claimed: RunDispatch) -> None:
    assert claimed.claim_token is not None
    bad = RunDispatchResult("r-other", "i-1", RunStatus.done)

    err = expect_validation(
        lambda: store.record_run_result("d1", claimed.claim_token or "", bad, 2000))

    assert "r-other" in err.message and "r1" in err.message
    assert load(store, "d1") == claimed


# ============================================================== other write operations
@pytest.mark.parametrize(("dispatch_id", "now", "word"),
                         [*[(v, 2000, "dispatch_id") for v in BAD_IDS],
                          *[("d1", v, "now") for v in BAD_TIMES]])
def test_cancel_rejects_invalid_input(store: MailboxStore, queued: RunDispatch,
                                      dispatch_id: Any, now: Any, word: str) -> None:
    expect_validation(lambda: store.cancel(dispatch_id, now), word)
    assert load(store, "d1") == queued


@pytest.mark.parametrize(("thread_id", "now", "word"),
                         [*[(v, 2000, "thread_id") for v in BAD_IDS],
                          *[("t", v, "now") for v in BAD_TIMES]])
def test_interrupt_rejects_invalid_input(store: MailboxStore, queued: RunDispatch,
                                         thread_id: Any, now: Any, word: str) -> None:
    expect_validation(lambda: store.interrupt(thread_id, now), word)

    assert load(store, "d1") == queued
    assert store.sql_epoch("t") == 0
    assert store.current_dispatch_epoch("t") == 0


@pytest.mark.parametrize(("now", "limit", "word"),
                         [*[(v, 10, "now") for v in BAD_TIMES],
                          *[(5000, v, "limit") for v in [-1, "10", 2.5, None, True]]])
def test_reclaim_rejects_invalid_input(store: MailboxStore, now: Any, limit: Any,
                                       word: str) -> None:
    store.enqueue(mk())
    [claimed] = store.claim("t", "c1", 100, 1000, 1)

    expect_validation(lambda: store.reclaim_expired_leases(now, limit), word)

    assert load(store, "d1") == claimed


@pytest.mark.parametrize("older_than", BAD_TIMES)
def test_purge_rejects_invalid_cutoff(store: MailboxStore, older_than: Any) -> None:
    store.enqueue(mk())
    cancelled = store.cancel("d1", 1500)

    expect_validation(lambda: store.purge_terminal(older_than), "older_than")

    assert load(store, "d1") == cancelled


# ======================================================================== read operations
@pytest.mark.parametrize("thread_id", BAD_IDS)
def test_current_dispatch_epoch_rejects_blank_thread(store: MailboxStore, thread_id: Any) -> None:
    expect_validation(lambda: store.current_dispatch_epoch(thread_id), "thread_id")


@pytest.mark.parametrize("dispatch_id", BAD_IDS)
def test_load_dispatch_rejects_blank_id(store: MailboxStore, dispatch_id: Any) -> None:
    expect_validation(lambda: store.load_dispatch(dispatch_id), "dispatch_id")


@pytest.mark.parametrize(("kwargs", "word"), [
    *[({"thread_id": v}, "thread_id") for v in BAD_IDS],
    *[({"limit": v}, "limit") for v in [-1, "10", 1.5, None, True]],
    *[({"offset": v}, "offset") for v in [-1, "0", 0.5, None, False]],
    ({"statuses": ["Bogus"]}, "Bogus"),
    ({"statuses": [42]}, "42"),
])
def test_list_dispatches_rejects_invalid_input(store: MailboxStore, queued: RunDispatch,
                                               kwargs: dict[str, Any], word: str) -> None:
    args: dict[str, Any] = {"thread_id": "t", "statuses": None, "limit": 100, "offset": 0}
    args.update(kwargs)
    expect_validation(lambda: store.list_dispatches(**args), word)


@pytest.mark.parametrize(("limit", "offset", "word"), [
    *[(v, 0, "limit") for v in [-1, "10", 1.5, None, True]],
    *[(10, v, "offset") for v in [-1, "0", 0.5, None, True]],
])
def test_list_terminal_dispatches_rejects_bad_paging(store: MailboxStore, limit: Any,
                                                     offset: Any, word: str) -> None:
    expect_validation(lambda: store.list_terminal_dispatches(limit, offset), word)


@pytest.mark.parametrize("status", ["Bogus", "queued", None, 3])
def test_count_dispatches_by_status_rejects_unknown_status(store: MailboxStore,
                                                           status: Any) -> None:
    expect_validation(lambda: store.count_dispatches_by_status(status), str(status))


def test_count_dispatches_by_status_accepts_the_status_name(store: MailboxStore,
                                                            queued: RunDispatch) -> None:
    assert store.count_dispatches_by_status("Queued") == 1  # type: ignore[arg-type]
    assert store.count_dispatches_by_status(DispatchStatus.Queued) == 1
