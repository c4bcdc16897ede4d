"""Dead-letter replay is idempotent: one replay per dead letter, however often it is asked
for, even by two callers at once (real SQL, real Redis, real threads)."""

from __future__ import annotations

from mailbox import DispatchStatus, Mailbox
from mailbox.facade import Receipt
from mailbox.phases import claim_next, run_chain
from tests.support.racers import race


def _dead_letter(box: Mailbox, thread_id: str) -> str:
    receipt = box.submit(thread_id, "fail", "x", wake=False)
    rt = box.runtime(consumer_id="replay-test")
    ctx = claim_next(rt, thread_id)
    assert ctx is not None
    run_chain(rt, ctx)
    dead = box.get_dispatch(receipt.dispatch_id)
    assert dead is not None and dead.status == DispatchStatus.DeadLetter, dead
    return receipt.dispatch_id


def test_a_second_replay_returns_the_first(mailbox: Mailbox) -> None:
    dead = _dead_letter(mailbox, "t-replay-twice")
    first = mailbox.replay(dead)
    assert not first.already_replayed
    second = mailbox.replay(dead)
    assert second.already_replayed
    assert (second.dispatch_id, second.run_id) == (first.dispatch_id, first.run_id)
    queued = mailbox.store.list_dispatches("t-replay-twice", [DispatchStatus.Queued])
    assert [d.dispatch_id for d in queued] == [first.dispatch_id]


def test_concurrent_replays_of_one_dead_letter_make_one_run(mailbox: Mailbox) -> None:
    dead = _dead_letter(mailbox, "t-replay-race")
    receipts: list[Receipt] = race(*[lambda: mailbox.replay(dead)] * 6, start_together=True)
    assert len({(r.dispatch_id, r.run_id) for r in receipts}) == 1, receipts
    assert sum(not r.already_replayed for r in receipts) == 1
    queued = mailbox.store.list_dispatches("t-replay-race", [DispatchStatus.Queued])
    assert len(queued) == 1


def test_a_failed_replay_can_itself_be_replayed(mailbox: Mailbox) -> None:
    dead = _dead_letter(mailbox, "t-replay-chain")
    first = mailbox.replay(dead)
    rt = mailbox.runtime(consumer_id="replay-test")
    ctx = claim_next(rt, "t-replay-chain")
    assert ctx is not None and ctx.dispatch_id == first.dispatch_id
    run_chain(rt, ctx)
    again = mailbox.replay(first.dispatch_id)
    assert not again.already_replayed and again.run_id not in (first.run_id,)
