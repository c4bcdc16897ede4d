"""The lease rebuilt after a Redis flush must not outlive the claim it stands for.

A claimer that finds the thread busy in SQL while Redis has forgotten the lease rebuilds it
from the Claimed row. If the holder acks and releases between that read and the rebuild, the
holder's compare-and-delete finds the claimer's pending token and deletes nothing; the rebuilt
lease would then stand for a finished claim and stall the thread until it ran out. The
claimer looks at the row again after the rebuild and drops such a lease.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from mailbox import DispatchStatus, Mailbox, RunDispatch
from mailbox.dev.embedded_redis import EmbeddedRedis

T = "t-rebuild"


def _flushall(server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        assert client.flushall()
    finally:
        client.close()


def _queued(dispatch_id: str) -> RunDispatch:
    return RunDispatch.queued(dispatch_id, T, f"run-{dispatch_id}", 1000)


def test_holder_acking_between_the_read_and_the_rebuild_does_not_stall_the_thread(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_mailbox(private_redis.url).store
    store.enqueue(_queued("d1"))
    store.enqueue(_queued("d2"))
    [held] = store.claim(T, "holder", 30_000, 1000)
    assert held.claim_token is not None
    _flushall(private_redis)  # Redis forgets the holder's lease; SQL does not

    real_put = store.coordinator.put
    acked: list[str] = []

    def put_after_the_holder_finished(thread_id: str, lease: Any, **kwargs: Any) -> bool:
        if not kwargs["allow_missing"] and not acked:
            # The holder acks (SQL) and releases (Redis) right before the rebuild lands.
            store.ack("d1", held.claim_token or "", 1200)
            acked.append("d1")
        return bool(real_put(thread_id, lease, **kwargs))

    monkeypatch.setattr(store.coordinator, "put", put_after_the_holder_finished)
    assert store.claim(T, "claimer", 30_000, 1100) == []  # busy when it read the row
    assert acked == ["d1"], "the rebuild path was not taken"
    d1 = store.load_dispatch("d1")
    assert d1 is not None and d1.status == DispatchStatus.Acked

    assert store.coordinator.read_lease(T) is None, "a lease outlived its finished claim"
    [nxt] = store.claim(T, "next", 30_000, 1300)
    assert nxt.dispatch_id == "d2"


def test_a_rebuilt_lease_of_a_live_claim_stays(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis) -> None:
    store = make_mailbox(private_redis.url).store
    store.enqueue(_queued("d1"))
    store.enqueue(_queued("d2"))
    [held] = store.claim(T, "holder", 30_000, 1000)
    _flushall(private_redis)
    assert store.claim(T, "claimer", 30_000, 1100) == []
    lease = store.coordinator.read_lease(T)
    assert lease is not None and lease.token == held.claim_token
