"""Invalid input is refused with `ValidationError` and writes nothing (reference §1.10, §3).

Each case must raise `ValidationError` whose message names the problem (the field, or the
rule), and the test then checks the database (and, for claims, the Redis lease) is exactly as
before: an empty table for a refused enqueue, an unchanged record for a refused operation on an
existing dispatch.

Cases are grouped per operation and checked in a loop that reports every failing case at once
(one database per group keeps the suite fast on PostgreSQL, where each fresh schema costs a
migration).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
BLANKS = ["", " ", "   ", "\t", "\n", " \t\n "]
BAD_IDS: list[Any] = [*BLANKS, None, 7, b"d1"]
BAD_TIMES: list[Any] = [-1, -1000, 1.5, 1000.0, "1000", None, True, [1000]]
BAD_PAGES: list[Any] = [-1, "10", 1.5, None, True]

Case = tuple[str, Callable[[], Any], tuple[str, ...]]


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


def validation_problem(action: Callable[[], Any], words: Iterable[str]) -> str | None:
    """None when `action` raises ValidationError naming every word; else what went wrong."""
    try:
        action()
    except ValidationError as exc:
        message = str(exc)
        missing = [w for w in words if w not in message]
        if not message.startswith("validation error: ") or missing:
            return f"message {message!r} does not name {missing}"
        return None
    except Exception as exc:  # any other outcome is the finding
        return f"raised {type(exc).__name__}: {exc}"
    return "accepted (no error)"


def check_cases(cases: Iterable[Case], unchanged: Callable[[], str | None]) -> None:
    """Run every case; after each, `unchanged()` reports any write. Fail listing all problems."""
    problems: list[str] = []
    count = 0
    for name, action, words in cases:
        count += 1
        problem = validation_problem(action, words)
        if problem is not None:
            problems.append(f"{name}: {problem}")
        written = unchanged()
        if written is not None:
            problems.append(f"{name}: wrote something: {written}")
    assert count > 0
    assert not problems, f"{len(problems)} of {count} cases failed:\n" + "\n".join(problems)


def nothing_in_tables(store: MailboxStore) -> Callable[[], str | None]:
    def check() -> str | None:
        counts = row_counts(store)
        return None if counts == (0, 0) else f"(dispatch rows, epoch rows) = {counts}"
    return check


def record_unchanged(store: MailboxStore, before: RunDispatch,
                     lease_token: str | None = None) -> Callable[[], str | None]:
    """The record equals `before`, and the thread's Redis lease still carries `lease_token`
    (None: no lease at all, e.g. no pending lease left behind by a refused claim)."""
    def check() -> str | None:
        now = store.load_dispatch(before.dispatch_id)
        if now != before:
            return f"record changed to {now}"
        lease = store.coordinator.read_lease(before.thread_id)
        held = None if lease is None else lease.token
        if held != lease_token:
            return f"redis lease token {held!r}, expected {lease_token!r}"
        if lease is not None and lease.lease_until != before.lease_until:
            return f"redis lease_until {lease.lease_until}, expected {before.lease_until}"
        return None
    return check


# ======================================================================== enqueue (§1.10)
def _dispatch_cases(store: MailboxStore,
                    builds: list[tuple[str, Callable[[], RunDispatch], str]]) -> list[Case]:
    return [(name, lambda build=build: store.enqueue(build()), (word,))
            for name, build, word in builds]


def test_enqueue_rejects_blank_or_non_string_ids(store: MailboxStore) -> None:
    builds: list[tuple[str, Callable[[], RunDispatch], str]] = []
    for bad in BAD_IDS:
        builds += [
            (f"dispatch_id {bad!r}", lambda b=bad: mk().replace(dispatch_id=b), "dispatch_id"),
            (f"thread_id {bad!r}", lambda b=bad: mk().replace(thread_id=b), "thread_id"),
            (f"run_id {bad!r}", lambda b=bad: mk().replace(run_id=b), "run_id"),
        ]
    for blank in BLANKS:
        builds += [
            (f"message dispatch_id {blank!r}", lambda b=blank: mk(dispatch_id=b),
             "dispatch_id must not be empty"),
            (f"message thread_id {blank!r}", lambda b=blank: mk(thread=b),
             "thread_id must not be empty"),
            (f"message run_id {blank!r}", lambda b=blank: mk(run=b),
             "run_id must not be empty"),
        ]
    builds.append(("blank dedupe_key", lambda: mk().replace(dedupe_key="  "), "dedupe_key"))

    check_cases(_dispatch_cases(store, builds), nothing_in_tables(store))


def test_enqueue_rejects_out_of_range_numbers(store: MailboxStore) -> None:
    builds: list[tuple[str, Callable[[], RunDispatch], str]] = [
        ("priority -1", lambda: mk(prio=-1), "priority"),
        ("priority 256", lambda: mk(prio=256), "priority"),
        ("priority 100000", lambda: mk(prio=100_000), "priority"),
        ("max_attempts 0", lambda: mk().replace(max_attempts=0), "max_attempts"),
        ("max_attempts -1", lambda: mk().replace(max_attempts=-1), "max_attempts"),
        ("attempt_count above max_attempts", lambda: mk().replace(attempt_count=6),
         "attempt_count"),
        ("attempt_count far above", lambda: mk().replace(max_attempts=1, attempt_count=2),
         "attempt_count"),
        ("attempt_count -1", lambda: mk().replace(attempt_count=-1), "attempt_count"),
        ("dispatch_epoch -1", lambda: mk().replace(dispatch_epoch=-1), "dispatch_epoch"),
    ]
    for field in ("created_at", "updated_at", "available_at"):
        builds += [(f"{field} {bad!r}", lambda f=field, b=bad: mk().replace(**{f: b}), field)
                   for bad in BAD_TIMES]

    check_cases(_dispatch_cases(store, builds), nothing_in_tables(store))


def test_enqueue_rejects_wrong_types(store: MailboxStore) -> None:
    builds: list[tuple[str, Callable[[], RunDispatch], str]] = [
        (f"priority {bad!r}", lambda b=bad: mk().replace(priority=b), "priority")
        for bad in ("5", 5.0, None, True)
    ]
    builds += [(f"max_attempts {bad!r}", lambda b=bad: mk().replace(max_attempts=b),
                "max_attempts") for bad in ("5", 5.0, None)]
    builds += [(f"attempt_count {bad!r}", lambda b=bad: mk().replace(attempt_count=b),
                "attempt_count") for bad in ("0", 0.0, None)]
    cases = _dispatch_cases(store, builds)
    cases += [(f"argument {value!r}", lambda v=value: store.enqueue(v), ("RunDispatch",))
              for value in (None, "d1", {"dispatch_id": "d1"}, 42)]

    check_cases(cases, nothing_in_tables(store))


def test_enqueue_rejects_non_queued_or_misshapen_dispatch(store: MailboxStore) -> None:
    builds: list[tuple[str, Callable[[], RunDispatch], str]] = [
        ("with claim_token", lambda: mk().replace(claim_token="tok"), "claim"),
        ("with claimed_by", lambda: mk().replace(claimed_by="c"), "claim"),
        ("with lease_until", lambda: mk().replace(lease_until=5000), "claim"),
        ("with completed_at", lambda: mk().replace(completed_at=5000), "completed_at"),
        ("with run_status", lambda: mk().replace(run_status=RunStatus.running),
         "runtime result fields"),
        ("with dispatch_instance_id", lambda: mk().replace(dispatch_instance_id="i"),
         "runtime result fields"),
        ("with run_response", lambda: mk().replace(run_response="ok"),
         "runtime result fields"),
        ("with run_error", lambda: mk().replace(run_error="bad"), "runtime result fields"),
        ("status Claimed", lambda: mk().replace(status=DispatchStatus.Claimed,
                                                claim_token="tok", claimed_by="c",
                                                lease_until=5000), "must start as Queued"),
    ]
    builds += [(f"status {s.value}", lambda s=s: mk().replace(status=s, completed_at=2000),
                "must start as Queued") for s in DispatchStatus if s.is_terminal]

    check_cases(_dispatch_cases(store, builds), nothing_in_tables(store))


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
def test_claim_rejects_invalid_input(store: MailboxStore) -> None:
    store.enqueue(mk())
    before = load(store, "d1")

    def claim(**override: Any) -> Callable[[], Any]:
        args: dict[str, Any] = {"thread_id": "t", "consumer_id": "c1", "lease_ms": LEASE,
                                "now": 1000, "limit": 1}
        args.update(override)
        return lambda: store.claim(**args)

    cases: list[Case] = []
    for bad in BAD_IDS:
        cases += [(f"thread_id {bad!r}", claim(thread_id=bad), ("thread_id",)),
                  (f"consumer_id {bad!r}", claim(consumer_id=bad), ("consumer_id",))]
    for bad in BAD_TIMES:
        cases += [(f"lease_ms {bad!r}", claim(lease_ms=bad), ("lease_ms",)),
                  (f"now {bad!r}", claim(now=bad), ("now",))]
    cases += [(f"limit {bad!r}", claim(limit=bad), ("limit",)) for bad in BAD_PAGES]

    check_cases(cases, record_unchanged(store, before, lease_token=None))
    assert [d.dispatch_id for d in store.claim("t", "c1", LEASE, 1000, 1)] == ["d1"]


def test_claim_dispatch_rejects_invalid_input(store: MailboxStore) -> None:
    store.enqueue(mk())
    before = load(store, "d1")

    def claim_dispatch(**override: Any) -> Callable[[], Any]:
        args: dict[str, Any] = {"dispatch_id": "d1", "consumer_id": "c1", "lease_ms": LEASE,
                                "now": 1000}
        args.update(override)
        return lambda: store.claim_dispatch(**args)

    cases: list[Case] = []
    for bad in BAD_IDS:
        cases += [(f"dispatch_id {bad!r}", claim_dispatch(dispatch_id=bad), ("dispatch_id",)),
                  (f"consumer_id {bad!r}", claim_dispatch(consumer_id=bad), ("consumer_id",))]
    for bad in BAD_TIMES:
        cases += [(f"lease_ms {bad!r}", claim_dispatch(lease_ms=bad), ("lease_ms",)),
                  (f"now {bad!r}", claim_dispatch(now=bad), ("now",))]

    check_cases(cases, record_unchanged(store, before, lease_token=None))


# ================================================================ fenced claimed operations
@pytest.fixture
def claimed(store: MailboxStore) -> RunDispatch:
    store.enqueue(mk())
    [c] = store.claim("t", "c1", LEASE, 1000, 1)
    return c


def test_fenced_operations_reject_invalid_ids(store: MailboxStore, claimed: RunDispatch) -> None:
    tok = claimed.claim_token or ""
    ok = RunDispatchResult("r1", "i-1", RunStatus.done)
    cases: list[Case] = []
    for bad in BAD_IDS:
        cases += [
            (f"ack {bad!r}", lambda b=bad: store.ack(b, tok, 2000), ("dispatch_id",)),
            (f"nack {bad!r}", lambda b=bad: store.nack(b, tok, 3000, "e", 2000),
             ("dispatch_id",)),
            (f"dead_letter {bad!r}", lambda b=bad: store.dead_letter(b, tok, "e", 2000),
             ("dispatch_id",)),
            (f"record_dispatch_start {bad!r}",
             lambda b=bad: store.record_dispatch_start(b, tok, "i-1", 2000), ("dispatch_id",)),
            (f"record_run_result {bad!r}",
             lambda b=bad: store.record_run_result(b, tok, ok, 2000), ("dispatch_id",)),
            (f"extend_lease {bad!r}", lambda b=bad: store.extend_lease(b, tok, 1000, 2000),
             ("dispatch_id",)),
            (f"supersede_claimed {bad!r}",
             lambda b=bad: store.supersede_claimed(b, tok, 2000, "why"), ("dispatch_id",)),
            (f"dispatch_instance_id {bad!r}",
             lambda b=bad: store.record_dispatch_start("d1", tok, b, 2000),
             ("dispatch_instance_id",)),
        ]
    cases += [
        ("ack token None", lambda: store.ack("d1", None, 2000), ("claim_token",)),
        ("nack token int", lambda: store.nack("d1", 5, 3000, "e", 2000), ("claim_token",)),
        ("dead_letter token None", lambda: store.dead_letter("d1", None, "e", 2000),
         ("claim_token",)),
    ]

    check_cases(cases, record_unchanged(store, claimed, lease_token=claimed.claim_token))


def test_fenced_operations_reject_invalid_times(store: MailboxStore,
                                                claimed: RunDispatch) -> None:
    tok = claimed.claim_token or ""
    ok = RunDispatchResult("r1", "i-1", RunStatus.done)
    cases: list[Case] = []
    for bad in BAD_TIMES:
        cases += [
            (f"ack now {bad!r}", lambda b=bad: store.ack("d1", tok, b), ("now",)),
            (f"nack now {bad!r}", lambda b=bad: store.nack("d1", tok, 3000, "e", b), ("now",)),
            (f"nack retry_at {bad!r}", lambda b=bad: store.nack("d1", tok, b, "e", 2000),
             ("retry_at",)),
            (f"dead_letter now {bad!r}", lambda b=bad: store.dead_letter("d1", tok, "e", b),
             ("now",)),
            (f"record_dispatch_start now {bad!r}",
             lambda b=bad: store.record_dispatch_start("d1", tok, "i-1", b), ("now",)),
            (f"record_run_result now {bad!r}",
             lambda b=bad: store.record_run_result("d1", tok, ok, b), ("now",)),
            (f"extend_lease now {bad!r}", lambda b=bad: store.extend_lease("d1", tok, 1000, b),
             ("now",)),
            (f"extend_lease extension_ms {bad!r}",
             lambda b=bad: store.extend_lease("d1", tok, b, 2000), ("extension_ms",)),
            (f"supersede_claimed now {bad!r}",
             lambda b=bad: store.supersede_claimed("d1", tok, b, "why"), ("now",)),
        ]

    check_cases(cases, record_unchanged(store, claimed, lease_token=claimed.claim_token))


def test_record_run_result_rejects_bad_results(store: MailboxStore,
                                               claimed: RunDispatch) -> None:
    tok = claimed.claim_token or ""
    cases: list[Case] = [
        (f"result {value!r}", lambda v=value: store.record_run_result("d1", tok, v, 2000),
         ("result",))
        for value in (None, {"run_id": "r1"}, "done")
    ]
    cases.append(("result for another run", lambda: store.record_run_result(
        "d1", tok, RunDispatchResult("r-other", "i-1", RunStatus.done), 2000),
        ("r-other", "r1")))

    check_cases(cases, record_unchanged(store, claimed, lease_token=claimed.claim_token))


# ============================================================== other write operations
def test_cancel_rejects_invalid_input(store: MailboxStore) -> None:
    store.enqueue(mk())
    before = load(store, "d1")
    cases: list[Case] = [(f"dispatch_id {bad!r}", lambda b=bad: store.cancel(b, 2000),
                          ("dispatch_id",)) for bad in BAD_IDS]
    cases += [(f"now {bad!r}", lambda b=bad: store.cancel("d1", b), ("now",))
              for bad in BAD_TIMES]

    check_cases(cases, record_unchanged(store, before))


def test_interrupt_rejects_invalid_input(store: MailboxStore) -> None:
    store.enqueue(mk())
    before = load(store, "d1")
    cases: list[Case] = [(f"thread_id {bad!r}", lambda b=bad: store.interrupt(b, 2000),
                          ("thread_id",)) for bad in BAD_IDS]
    cases += [(f"now {bad!r}", lambda b=bad: store.interrupt("t", b), ("now",))
              for bad in BAD_TIMES]

    def unchanged() -> str | None:
        problem = record_unchanged(store, before)()
        if problem is None and (store.sql_epoch("t"), row_counts(store)) != (0, (1, 1)):
            return f"epoch {store.sql_epoch('t')}, rows {row_counts(store)}"
        return problem

    check_cases(cases, unchanged)
    assert store.current_dispatch_epoch("t") == 0


def test_reclaim_rejects_invalid_input(store: MailboxStore) -> None:
    store.enqueue(mk())
    [claimed] = store.claim("t", "c1", 100, 1000, 1)
    cases: list[Case] = [(f"now {bad!r}", lambda b=bad: store.reclaim_expired_leases(b, 10),
                          ("now",)) for bad in BAD_TIMES]
    cases += [(f"limit {bad!r}", lambda b=bad: store.reclaim_expired_leases(5000, b),
               ("limit",)) for bad in BAD_PAGES]

    check_cases(cases, record_unchanged(store, claimed, lease_token=claimed.claim_token))


def test_purge_rejects_invalid_cutoff(store: MailboxStore) -> None:
    store.enqueue(mk())
    cancelled = store.cancel("d1", 1500)
    assert cancelled is not None
    cases: list[Case] = [(f"older_than {bad!r}", lambda b=bad: store.purge_terminal(b),
                          ("older_than",)) for bad in BAD_TIMES]

    check_cases(cases, record_unchanged(store, cancelled))


# ======================================================================== read operations
def test_reads_reject_invalid_ids_and_paging(store: MailboxStore) -> None:
    store.enqueue(mk())
    before = load(store, "d1")
    cases: list[Case] = []
    for bad in BAD_IDS:
        cases += [
            (f"current_dispatch_epoch {bad!r}", lambda b=bad: store.current_dispatch_epoch(b),
             ("thread_id",)),
            (f"load_dispatch {bad!r}", lambda b=bad: store.load_dispatch(b), ("dispatch_id",)),
            (f"list_dispatches thread {bad!r}", lambda b=bad: store.list_dispatches(b),
             ("thread_id",)),
        ]
    for bad in BAD_PAGES:
        cases += [
            (f"list_dispatches limit {bad!r}",
             lambda b=bad: store.list_dispatches("t", None, b, 0), ("limit",)),
            (f"list_dispatches offset {bad!r}",
             lambda b=bad: store.list_dispatches("t", None, 10, b), ("offset",)),
            (f"list_terminal_dispatches limit {bad!r}",
             lambda b=bad: store.list_terminal_dispatches(b, 0), ("limit",)),
            (f"list_terminal_dispatches offset {bad!r}",
             lambda b=bad: store.list_terminal_dispatches(10, b), ("offset",)),
        ]

    check_cases(cases, record_unchanged(store, before))


def test_list_dispatches_rejects_unknown_status_filter(store: MailboxStore) -> None:
    store.enqueue(mk())
    before = load(store, "d1")
    cases: list[Case] = [
        (f"statuses {value!r}", lambda v=value: store.list_dispatches("t", v, 100, 0),
         (word,))
        for value, word in ((["Bogus"], "Bogus"), (["queued"], "queued"), ([42], "42"),
                            ([DispatchStatus.Queued, "Nope"], "Nope"))
    ]

    check_cases(cases, record_unchanged(store, before))


def test_count_dispatches_by_status_rejects_unknown_status(store: MailboxStore) -> None:
    cases: list[Case] = [
        (f"status {value!r}", lambda v=value: store.count_dispatches_by_status(v), (str(value),))
        for value in ("Bogus", "queued", None, 3)
    ]

    check_cases(cases, nothing_in_tables(store))


def test_status_arguments_accept_the_status_names(store: MailboxStore) -> None:
    store.enqueue(mk())

    assert store.count_dispatches_by_status("Queued") == 1
    assert store.count_dispatches_by_status(DispatchStatus.Queued) == 1
    assert len(store.list_dispatches("t", ["Queued"])) == 1


# ========================================================= times beyond the 64-bit range
# Store times are milliseconds within 0..MAX_MS (2**53 - 1): far past any clock, and small
# enough that `now + lease_ms` always fits the signed BIGINT columns. Anything larger is
# invalid input: refused as ValidationError before anything is written, never a driver error.
from mailbox.model import MAX_MS  # noqa: E402

HUGE_TIMES = [MAX_MS + 1, 2**63, 2**64]


def test_enqueue_rejects_times_beyond_64_bits(store: MailboxStore) -> None:
    builds: list[tuple[str, Callable[[], RunDispatch], str]] = [
        (f"{field} {value}", lambda f=field, v=value: mk().replace(**{f: v}), field)
        for field in ("created_at", "updated_at", "available_at")
        for value in HUGE_TIMES
    ]

    check_cases(_dispatch_cases(store, builds), nothing_in_tables(store))


def test_claims_reject_times_beyond_64_bits(store: MailboxStore) -> None:
    claims: list[tuple[str, Callable[[str, str], Any], str]] = []
    for value in HUGE_TIMES:
        claims += [
            (f"claim now {value}", lambda d, t, v=value: store.claim(t, "c1", LEASE, v, 1),
             "now"),
            (f"claim lease_ms {value}", lambda d, t, v=value: store.claim(t, "c1", v, 1000, 1),
             "lease"),
            (f"claim_dispatch now {value}",
             lambda d, t, v=value: store.claim_dispatch(d, "c1", LEASE, v), "now"),
            (f"claim_dispatch lease_ms {value}",
             lambda d, t, v=value: store.claim_dispatch(d, "c1", v, 1000), "lease"),
        ]
    # Each case gets a dispatch on a thread of its own, so one case's damage cannot hide
    # or cause another's.
    problems: list[str] = []
    for i, (name, claim, word) in enumerate(claims):
        store.enqueue(mk(f"d{i}", f"t{i}"))
        unchanged = record_unchanged(store, load(store, f"d{i}"), lease_token=None)
        for problem in (validation_problem(lambda c=claim, i=i: c(f"d{i}", f"t{i}"), (word,)),
                        unchanged()):
            if problem is not None:
                problems.append(f"{name}: {problem}")
    assert not problems, f"{len(problems)} problems in {len(claims)} cases:\n" + "\n".join(
        problems)


def test_claimed_operations_reject_times_beyond_64_bits(store: MailboxStore,
                                                       claimed: RunDispatch) -> None:
    tok = claimed.claim_token or ""
    cases: list[Case] = []
    for value in HUGE_TIMES:
        cases += [
            (f"ack now {value}", lambda v=value: store.ack("d1", tok, v), ("now",)),
            (f"nack retry_at {value}", lambda v=value: store.nack("d1", tok, v, "e", 2000),
             ("retry_at",)),
            (f"extend_lease extension_ms {value}",
             lambda v=value: store.extend_lease("d1", tok, v, 2000), ("extension_ms",)),
        ]

    check_cases(cases, record_unchanged(store, claimed, lease_token=claimed.claim_token))
