from mailbox import DispatchStatus, RunDispatch
from mailbox.store import MailboxStore


def test_enqueue_claim_ack_round_trip(store: MailboxStore) -> None:
    store.enqueue(RunDispatch.queued("d1", "t", "r1", 1000))
    [claimed] = store.claim("t", "c1", 30_000, 1000)
    store.ack("d1", claimed.claim_token or "", 2000)
    loaded = store.load_dispatch("d1")
    assert loaded is not None and loaded.status == DispatchStatus.Acked
