"""Helpers shared by the store test modules (the reference's `mk` and friends)."""

from __future__ import annotations

from mailbox import RunDispatch
from mailbox.store import MailboxStore


def mk(dispatch_id: str, thread: str, run: str, prio: int = 128, t: int = 1000) -> RunDispatch:
    """The reference helper: created_at = available_at = T, max_attempts 5."""
    return RunDispatch.queued(dispatch_id, thread, run, created_at=t, priority=prio,
                              available_at=t, max_attempts=5)


def load(store: MailboxStore, dispatch_id: str) -> RunDispatch:
    loaded = store.load_dispatch(dispatch_id)
    assert loaded is not None, f"dispatch {dispatch_id} should exist"
    return loaded


def token_of(d: RunDispatch) -> str:
    assert d.claim_token is not None and d.claim_token.strip()
    return d.claim_token


def assert_no_claim(d: RunDispatch) -> None:
    assert d.claim_token is None
    assert d.claimed_by is None
    assert d.lease_until is None
