"""The wake gate (docs/behaviour.md#wake-gate): a submit publishes a wake-up only when one
would find work — not while a claim of its thread is in flight (the lease is marked and its
holder claims again on release) nor while a wake-up is already on its way (its claim clears
the pending mark first, then sees the submit). Real Redis and SQL; publishing is recorded
(`tasks.publishing.wake_thread` with `publish_wake` replaced), claims run the store's code.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from mailbox import DispatchStatus, Mailbox
from mailbox.coordination import WAKE_HELD, WAKE_PENDING, WAKE_PUBLISH, WAKE_REQUESTED
from mailbox.phases import claim_next, run_chain
from mailbox.runtime import now_ms
from tasks import publishing


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """What `wake_thread` hands to the broker: (thread, wake id)."""
    sent: list[tuple[str, str | None]] = []

    def record(queue: str, thread_id: str, delay_ms: int = 0, *,
               wake_id: str | None = None, dispatch_id: str | None = None) -> None:
        sent.append((thread_id, wake_id))

    monkeypatch.setattr(publishing, "publish_wake", record)
    return sent


def submit(box: Mailbox, thread: str, text: str) -> tuple[str, bool]:
    """A submit as `dispatch.delay()` does it: the durable write, the gate asked with the
    run_queued event, then the wake-up the gate asked for."""
    receipt, gate = box.submit_gated(thread, "echo", text)
    sent = publishing.publish_gated(box.store.coordinator, box.settings, thread, gate,
                                    wake_id=receipt.dispatch_id,
                                    dispatch_id=receipt.dispatch_id)
    return receipt.dispatch_id, sent


def test_a_submit_asks_the_gate_in_the_round_trip_of_its_event(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit_gated` (dispatch.delay's submit) sends its run_queued event and the wake gate
    in one pipeline, and answers as `gate_wake` would."""
    client = mailbox.store.coordinator.client
    # Load the scripts first: a Redis that never saw them answers NOSCRIPT, and run_calls
    # loads them and sends the refused calls again (a second pipeline, once).
    mailbox.submit_gated("g-one-trip-warm", "echo", "warm")
    pipelines: list[int] = []
    direct: list[Any] = []
    make_pipeline, execute_command = client.pipeline, client.execute_command

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipelines.append(1)
        return make_pipeline(*args, **kwargs)

    def counting_command(*args: Any, **kwargs: Any) -> Any:
        direct.append(args[0])
        return execute_command(*args, **kwargs)

    monkeypatch.setattr(client, "pipeline", counting_pipeline)
    monkeypatch.setattr(client, "execute_command", counting_command)
    first, gate = mailbox.submit_gated("g-one-trip", "echo", "one")
    assert (len(pipelines), direct, gate) == (1, [], WAKE_PUBLISH)
    assert [e.type for e in mailbox.events(first.run_id)] == ["run_queued"]
    assert mailbox.submit_gated("g-one-trip", "echo", "two")[1] == WAKE_PENDING
    delayed, gate = mailbox.submit_gated("g-one-trip", "echo", "later", delay_ms=60_000)
    assert gate == WAKE_PUBLISH, "a delayed dispatch is never held back by the gate"
    assert [e.type for e in mailbox.events(delayed.run_id)] == ["run_queued"]


def test_a_redis_that_forgot_the_scripts_still_answers_the_gate_and_records_the_event(
        mailbox: Mailbox) -> None:
    """A restarted Redis has no scripts: both pipelined calls come back NOSCRIPT, each
    script is loaded and both calls are sent again (coordination.run_calls)."""
    mailbox.submit_gated("g-noscript", "echo", "first")  # the mark: a wake-up is pending
    mailbox.store.coordinator.client.script_flush()
    receipt, gate = mailbox.submit_gated("g-noscript", "echo", "second")
    assert gate == WAKE_PENDING
    assert [e.type for e in mailbox.events(receipt.run_id)] == ["run_queued"]


def test_a_gate_redis_did_not_answer_says_publish_and_the_submit_stands(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailbox import events

    def refused(*args: Any) -> list[Any]:
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(events, "run_calls", refused)
    receipt, gate = mailbox.submit_gated("g-no-redis", "echo", "one")
    assert gate == WAKE_PUBLISH
    stored = mailbox.get_dispatch(receipt.dispatch_id)
    assert stored is not None and stored.status == DispatchStatus.Queued


def test_only_the_first_submit_to_an_idle_thread_publishes_until_a_claim_consumes_it(
        mailbox: Mailbox, published: list[tuple[str, str | None]]) -> None:
    first, sent = submit(mailbox, "g-idle", "one")
    assert sent and published == [("g-idle", first)]
    for n in range(5):  # the wake-up is still on its way: its claim will see these
        assert submit(mailbox, "g-idle", f"more {n}")[1] is False
    assert published == [("g-idle", first)]
    rt = mailbox.runtime()
    ctx = claim_next(rt, "g-idle", wake_id=first)  # the wake-up's claim clears the mark
    assert ctx is not None and ctx.dispatch_id == first
    # … and the claim is in flight now: later submits mark its lease instead of publishing
    assert submit(mailbox, "g-idle", "during")[1] is False
    assert published == [("g-idle", first)]


def test_a_claim_in_flight_is_marked_and_its_release_says_so(mailbox: Mailbox) -> None:
    coordinator = mailbox.store.coordinator
    mailbox.submit("g-held", "echo", "one", wake=False)
    ctx = claim_next(mailbox.runtime(), "g-held")
    assert ctx is not None
    now = now_ms()
    assert coordinator.gate_wake("g-held", "w1", now, 60_000) == WAKE_HELD
    assert coordinator.gate_wake("g-held", "w2", now, 60_000) == WAKE_HELD
    assert coordinator.release("g-held", ctx.token) == WAKE_REQUESTED
    assert coordinator.gate_wake("g-held", "w3", now, 60_000) == WAKE_PUBLISH
    assert coordinator.gate_wake("g-held", "w4", now, 60_000) == WAKE_PENDING


def test_a_claim_that_found_nothing_claims_again_for_a_submit_that_counted_on_it(
        mailbox: Mailbox, published: list[tuple[str, str | None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the mark closes: a claim takes its pending lease and finds the thread empty;
    before it releases, a submit commits, sees the lease and skips its wake-up. The release
    finds the mark and the claim looks again: the submit is claimed, not stranded until a
    sweep."""
    store = mailbox.store
    looked = store._has_due
    arrived: list[str] = []

    def has_due_then_submit(thread_id: str, now: int) -> bool:
        found = looked(thread_id, now)
        if not arrived:
            arrived.append(submit(mailbox, thread_id, "meanwhile")[0])
        return found

    monkeypatch.setattr(store, "_has_due", has_due_then_submit)
    ctx = claim_next(mailbox.runtime(), "g-race")
    assert published == [], "the submit saw the pending lease and did not publish"
    assert ctx is not None and ctx.dispatch_id == arrived[0]
    dispatch = store.load_dispatch(arrived[0])
    assert dispatch is not None and dispatch.status == DispatchStatus.Claimed


def test_a_failed_publish_leaves_no_mark_behind(mailbox: Mailbox,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broker_down(*_: Any, **__: Any) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(publishing, "publish_wake", broker_down)
    with pytest.raises(ConnectionError):
        submit(mailbox, "g-fail", "one")
    key = mailbox.store.coordinator.wake_pending_key("g-fail")
    assert mailbox.store.coordinator.client.exists(key) == 0
    assert mailbox.store.coordinator.gate_wake("g-fail", "w", now_ms(), 60_000) == WAKE_PUBLISH


def test_without_redis_for_the_gate_the_wake_up_is_published(
        mailbox: Mailbox, published: list[tuple[str, str | None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    def unreachable(*_: Any, **__: Any) -> int:
        raise redis.ConnectionError("Redis down")

    receipt = mailbox.submit("g-noredis", "echo", "one", wake=False)
    monkeypatch.setattr(mailbox.store.coordinator, "gate_wake", unreachable)
    assert publishing.wake_thread(mailbox.store.coordinator, mailbox.settings, "g-noredis", 0,
                                  wake_id=receipt.dispatch_id)
    assert published == [("g-noredis", receipt.dispatch_id)]


def test_delayed_wake_ups_are_not_gated(mailbox: Mailbox,
                                        published: list[tuple[str, str | None]]) -> None:
    mailbox.submit("g-later", "echo", "one", wake=False)
    claim_next(mailbox.runtime(), "g-later")  # a claim in flight
    assert publishing.wake_thread(mailbox.store.coordinator, mailbox.settings, "g-later",
                                  5_000)
    assert [t for t, _ in published] == ["g-later"]


# ========================================== a settle claims next only when something is due
def run_through_settle(box: Mailbox, thread: str, claimed: list[str]) -> Any:
    """Claim the thread's next dispatch and run its chain with a runtime whose wake-ups
    claim inline as a worker's do (`tasks.publishing.worker_wake`), recording each claim."""
    rt = box.runtime()

    def wake(thread_id: str, delay_ms: int) -> None:
        ctx = claim_next(rt, thread_id, expect_due=True)
        claimed.append("nothing" if ctx is None else ctx.dispatch_id)

    rt.wake = wake
    ctx = claim_next(rt, thread)
    assert ctx is not None
    return run_chain(rt, ctx)


def test_an_ack_that_sees_nothing_due_claims_nothing(
        mailbox: Mailbox, published: list[tuple[str, str | None]]) -> None:
    submit(mailbox, "g-last", "only")
    claimed: list[str] = []
    assert run_through_settle(mailbox, "g-last", claimed).settled == "completed"
    assert claimed == [], "the ack's own transaction saw the thread empty"
    assert mailbox.store.coordinator.read_lease("g-last") is None


def test_an_ack_that_sees_the_next_dispatch_claims_it(
        mailbox: Mailbox, published: list[tuple[str, str | None]]) -> None:
    submit(mailbox, "g-next", "first")
    claimed: list[str] = []
    rt = mailbox.runtime()
    ctx = claim_next(rt, "g-next")
    assert ctx is not None
    second, sent = submit(mailbox, "g-next", "second")
    assert sent is False, "the claim was in flight: the submit marked its lease"

    def wake(thread_id: str, delay_ms: int) -> None:
        got = claim_next(rt, thread_id, expect_due=True)
        claimed.append("nothing" if got is None else got.dispatch_id)

    rt.wake = wake
    assert run_chain(rt, ctx).settled == "completed"
    assert claimed == [second]


def test_a_submit_between_the_acks_read_and_its_release_is_claimed(
        mailbox: Mailbox, published: list[tuple[str, str | None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the release's answer closes: the ack's transaction saw nothing due; before
    the lease is given back a submit commits, finds the lease standing and skips its wake-up
    (the holder will claim). The release says a submit counted on it, and settle claims."""
    coordinator = mailbox.store.coordinator
    real_release = coordinator.release
    arrived: list[str] = []

    def submit_then_release(thread_id: str, token: str) -> int:
        if not arrived:
            dispatch_id, sent = submit(mailbox, thread_id, "meanwhile")
            assert sent is False, "the lease stood: the submit left its wake-up to us"
            arrived.append(dispatch_id)
        return real_release(thread_id, token)

    submit(mailbox, "g-between", "first")
    monkeypatch.setattr(coordinator, "release", submit_then_release)
    claimed: list[str] = []
    assert run_through_settle(mailbox, "g-between", claimed).settled == "completed"
    assert arrived and claimed == arrived, "the submit's dispatch was claimed, not stranded"
    assert published[-1][0] == "g-between" and len(published) == 1, \
        "only the first submit published"
