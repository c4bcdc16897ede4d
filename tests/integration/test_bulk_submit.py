"""Bulk submission (docs/behaviour.md#bulk): `Mailbox.submit_many` validates every item
before it writes anything, writes each chunk in one transaction (all or nothing, the
refused item named by its index), keeps each thread's items in order, and wakes each thread
once. Real SQL and Redis; the phases run by hand (tests/support/phase_kit.py); the
`dispatch.delay_many` publishing path is tested against a real broker at the end.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa

from mailbox import DispatchStatus, Mailbox
from mailbox.agents import AgentContext
from mailbox.errors import AlreadyExistsError, ValidationError
from mailbox.facade import BulkSubmitError
from mailbox.phases import claim_next, run_chain
from mailbox.schema import dispatches, messages, runs
from tests.support.phase_kit import Clock, Wakes, load, make_runtime, register


def count(box: Mailbox, table: sa.Table) -> int:
    with box.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def echo() -> str:
    return register(lambda ctx: f"done {ctx.input}")[0]


def test_every_item_is_stored_queued_in_order_with_its_run_and_input(mailbox: Mailbox) -> None:
    name = echo()
    items = [{"thread_id": f"t-{i % 3}", "agent": name, "input": {"n": i}} for i in range(10)]
    receipts = mailbox.submit_many(items, chunk_size=4)
    assert [r.thread_id for r in receipts] == [item["thread_id"] for item in items]
    assert len({r.dispatch_id for r in receipts}) == 10
    for receipt, item in zip(receipts, items, strict=True):
        dispatch = load(mailbox, receipt.dispatch_id)
        assert dispatch.status == DispatchStatus.Queued and dispatch.run_id == receipt.run_id
        assert [m.content for m in mailbox.thread_messages(receipt.thread_id, limit=100)
                if m.run_id == receipt.run_id] == [item["input"]]
        assert [e.type for e in mailbox.events(receipt.run_id)] == ["run_queued"]
    assert count(mailbox, runs) == 10 and count(mailbox, messages) == 10


@pytest.mark.parametrize(("bad", "says"), [
    ({"thread_id": "t", "agent": "no-such-agent", "input": 1}, "no-such-agent"),
    ({"thread_id": "t", "agent": "AGENT"}, "input is missing"),
    ({"thread_id": "", "agent": "AGENT", "input": 1}, "thread_id"),
    ({"thread_id": "t", "agent": "AGENT", "input": 1, "priority": 999}, "priority"),
    ({"thread_id": "t", "agent": "AGENT", "input": 1, "interrupt": True}, "unknown fields"),
    ("just a string", "an item must be an object"),
])
def test_a_bad_item_anywhere_is_named_and_nothing_is_written(
        mailbox: Mailbox, bad: Any, says: str) -> None:
    name = echo()
    wakes = Wakes()
    mailbox.waker = wakes
    if isinstance(bad, dict) and bad.get("agent") == "AGENT":
        bad = {**bad, "agent": name}
    items: list[Any] = [{"thread_id": f"t-{i}", "agent": name, "input": i} for i in range(700)]
    items[612] = bad
    with pytest.raises(BulkSubmitError) as caught:
        mailbox.submit_many(items, chunk_size=100)
    assert caught.value.index == 612 and caught.value.submitted == []
    assert "item 612" in str(caught.value) and says in str(caught.value)
    assert count(mailbox, dispatches) == 0 and count(mailbox, runs) == 0
    assert count(mailbox, messages) == 0 and wakes.calls == []


def test_items_must_be_a_list(mailbox: Mailbox) -> None:
    for wrong in ({"thread_id": "t"}, "items", None):
        with pytest.raises(ValidationError, match="items must be a list"):
            mailbox.submit_many(wrong)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="chunk_size"):
        mailbox.submit_many([], chunk_size=0)
    assert mailbox.submit_many([]) == []


def test_a_refused_item_rolls_back_its_whole_chunk_and_keeps_the_ones_before(
        mailbox: Mailbox) -> None:
    name = echo()
    wakes = Wakes()
    mailbox.waker = wakes
    mailbox.submit("t-held", name, "first", dedupe_key="k")  # live: holds the key
    wakes.calls.clear()
    items = [{"thread_id": f"t-{i}", "agent": name, "input": i} for i in range(10)]
    items[7] = {"thread_id": "t-held", "agent": name, "input": "again", "dedupe_key": "k"}
    with pytest.raises(BulkSubmitError) as caught:
        mailbox.submit_many(items, chunk_size=5)
    error = caught.value
    assert error.index == 7 and isinstance(error.error, AlreadyExistsError)
    assert "dedupe_key=k" in str(error)
    assert [r.thread_id for r in error.submitted] == [f"t-{i}" for i in range(5)]
    assert count(mailbox, dispatches) == 1 + 5 and count(mailbox, runs) == 1 + 5
    for i in range(5, 10):
        assert mailbox.store.list_dispatches(f"t-{i}") == []
    # the chunk written before the refusal is woken; the rolled-back one is not
    assert sorted(t for t, _ in wakes.calls) == [f"t-{i}" for i in range(5)]


def test_a_key_repeated_within_a_chunk_is_refused_naming_the_second(mailbox: Mailbox) -> None:
    name = echo()
    items = [{"thread_id": "t", "agent": name, "input": i, "dedupe_key": f"k{i % 3}"}
             for i in range(4)]
    with pytest.raises(BulkSubmitError) as caught:
        mailbox.submit_many(items)
    assert caught.value.index == 3 and "entry 0 of this chunk" in str(caught.value)
    assert count(mailbox, dispatches) == 0
    # the same key on other threads is no conflict
    spread = [{**item, "thread_id": f"t-{i}"} for i, item in enumerate(items)]
    assert len(mailbox.submit_many(spread)) == 4


def test_each_thread_runs_its_items_in_submission_order(mailbox: Mailbox) -> None:
    seen: list[tuple[str, Any]] = []
    name = register(lambda ctx: seen.append((ctx.thread_id, ctx.input)))[0]
    items = [{"thread_id": f"t-{i % 4}", "agent": name, "input": i} for i in range(40)]
    mailbox.submit_many(items, chunk_size=7)
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    for thread in sorted({item["thread_id"] for item in items}):
        while (ctx := claim_next(rt, thread)) is not None:
            run_chain(rt, ctx)
    for thread in {item["thread_id"] for item in items}:
        assert [n for t, n in seen if t == thread] == \
            [item["input"] for item in items if item["thread_id"] == thread]
    assert {d.status for d in mailbox.store.list_dispatches("t-0")} == {DispatchStatus.Acked}


def test_one_wake_up_per_thread_after_its_shortest_delay(mailbox: Mailbox) -> None:
    name = echo()
    wakes = Wakes()
    mailbox.waker = wakes
    items = [{"thread_id": f"t-{i % 5}", "agent": name, "input": i,
              "delay_ms": 1000 * (i % 7)} for i in range(50)]
    mailbox.submit_many(items, chunk_size=8)
    expected = {f"t-{t}": min(1000 * (i % 7) for i in range(50) if i % 5 == t)
                for t in range(5)}
    assert sorted(wakes.calls) == sorted(expected.items())
    for item, dispatch in zip(items[:5], [mailbox.store.list_dispatches(f"t-{t}")[0]
                                          for t in range(5)], strict=True):
        assert dispatch.available_at - dispatch.created_at == item["delay_ms"]


def test_an_input_for_a_waiting_thread_resumes_its_run_as_submit_does(
        mailbox: Mailbox) -> None:
    decisions: list[Any] = []

    def ask_once(ctx: AgentContext) -> Any:
        if ctx.decision is None:
            return ctx.suspend({"question": "go?"})
        decisions.append(ctx.decision)
        return "went"

    name = register(ask_once)[0]
    first = mailbox.submit("t-wait", name, "start")
    rt = make_runtime(mailbox, Wakes(), clock=Clock())
    ctx = claim_next(rt, "t-wait")
    assert ctx is not None
    run_chain(rt, ctx)
    receipts = mailbox.submit_many([
        {"thread_id": "t-wait", "agent": name, "input": "yes"},
        {"thread_id": "t-new", "agent": name, "input": "start"}])
    assert receipts[0].resumed and receipts[0].run_id == first.run_id
    assert not receipts[1].resumed
    ctx = claim_next(rt, "t-wait")
    assert ctx is not None
    run_chain(rt, ctx)
    assert decisions == ["yes"]


def test_overlapping_batches_from_many_clients_never_deadlock_or_lose_an_item(
        make_mailbox: Any) -> None:
    """Several clients submitting batches over the same threads in different orders at
    once: each transaction locks its threads in thread-id order, so none waits on another
    in a cycle; every item lands and each thread's items keep their batch's order."""
    boxes = [make_mailbox() for _ in range(4)]
    name = echo()
    threads = [f"t-{i}" for i in range(30)]
    errors: list[BaseException] = []
    submitted: dict[int, list[Any]] = {}
    start = threading.Barrier(len(boxes))

    def client(index: int, box: Mailbox) -> None:
        order = threads if index % 2 == 0 else list(reversed(threads))
        items = [{"thread_id": t, "agent": name, "input": [index, n]}
                 for n in range(3) for t in order]
        start.wait()
        try:
            submitted[index] = box.submit_many(items, chunk_size=25)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(i, box)) for i, box in enumerate(boxes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not any(w.is_alive() for w in workers) and errors == []
    assert count(boxes[0], dispatches) == 4 * 3 * 30
    for thread in threads:
        inputs = [m.content for m in boxes[0].thread_messages(thread, limit=100)]
        for index in range(4):
            assert [n for i, n in inputs if i == index] == [0, 1, 2]
