"""The lease key's TTL is garbage collection only; the scripts that renew a lease
(lease_put.lua, lease_take_executor.lua) send its PEXPIRE only when the TTL set before no
longer covers the lease: with margin = ttl/3, the TTL is set again unless
`lease_until + margin <= expires <= now + ttl + margin`, `expires` being the hash field where
the last PEXPIRE recorded its end (now + ttl, in the caller's clock).

Real Redis. A skipped PEXPIRE is seen by lowering the key's TTL by hand first: the low TTL
stays when the script sent none, and is back near the full TTL when it did. Time passing for
the key is staged the same way (`Sim.advance` lowers the TTL by the time the clock moves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.context import PhaseContext
from mailbox.coordination import Coordinator, Lease, _lease_ttl
from mailbox.phases import run_chain
from mailbox.runtime import now_ms
from mailbox.store import MailboxStore
from tests.support.phase_kit import Wakes, claim, load, make_runtime, register

LEASE_MS = 30_000
TTL = _lease_ttl(LEASE_MS)  # 90 s
MARGIN = TTL // 3  # 30 s, exact
LOW = 5_000
"""A TTL set by hand: still this low after a call means the call sent no PEXPIRE."""
SLACK = 2_000
"""Real time the test itself takes between a call and the TTL read after it."""
T = TypeVar("T")


def key(c: Coordinator, thread: str) -> str:
    return c.lease_key(thread)


def pttl(c: Coordinator, thread: str) -> int:
    return int(c.client.pttl(key(c, thread)))


def field(c: Coordinator, thread: str, name: str) -> str | None:
    raw = c.client.hget(key(c, thread), name)
    return None if raw is None else raw.decode()


def lower_ttl(c: Coordinator, thread: str, ms: int = LOW) -> None:
    assert c.client.pexpire(key(c, thread), ms)


def assert_skipped(c: Coordinator, thread: str) -> None:
    assert 0 < pttl(c, thread) <= LOW, "the script sent a PEXPIRE"


def assert_refreshed(c: Coordinator, thread: str, now: int) -> None:
    assert TTL - SLACK <= pttl(c, thread) <= TTL, "the script sent no PEXPIRE"
    assert field(c, thread, "expires") == str(now + TTL)


def claimed(c: Coordinator, thread: str, now: int, token: str = "tok-1") -> Lease:
    """A claim's two calls: acquire (always sets the TTL) and the bind after the SQL claim."""
    assert c.acquire(thread, token, now + LEASE_MS, "c1", now, LEASE_MS) is None
    assert field(c, thread, "expires") == str(now + TTL)
    lease = Lease(token, "d1", now + LEASE_MS, "c1")
    assert c.put(thread, lease, expected_token=token, allow_missing=True, lease_ms=LEASE_MS,
                 now=now)
    return lease


def renew(c: Coordinator, thread: str, lease: Lease, now: int) -> Lease:
    renewed = replace(lease, lease_until=now + LEASE_MS)
    assert c.put(thread, renewed, expected_token=lease.token, allow_missing=True,
                 lease_ms=LEASE_MS, now=now)
    return renewed


def take(c: Coordinator, thread: str, lease: Lease, now: int, executor: str = "x1",
         *, with_now: bool = True) -> str:
    return c.take_executor(thread, lease.token, executor, lease.dispatch_id, now + LEASE_MS,
                           LEASE_MS, now=now if with_now else None)


# ------------------------------------------------------------------------ (1) no PEXPIRE
def test_bind_execute_renewal_and_hand_over_soon_after_a_claim_send_no_pexpire(
        store: MailboxStore) -> None:
    c, thread, t0 = store.coordinator, "ttl-skip", now_ms()
    assert c.acquire(thread, "tok-1", t0 + LEASE_MS, "c1", t0, LEASE_MS) is None
    lower_ttl(c, thread)
    lease = Lease("tok-1", "d1", t0 + LEASE_MS, "c1")
    assert c.put(thread, lease, expected_token="tok-1", allow_missing=True, lease_ms=LEASE_MS,
                 now=t0)
    assert_skipped(c, thread)  # the bind

    assert take(c, thread, lease, t0 + 20) == "ok"
    assert_skipped(c, thread)
    assert field(c, thread, "executor") == "x1"
    assert c.read_lease(thread) == replace(lease, lease_until=t0 + 20 + LEASE_MS)

    lease = renew(c, thread, lease, t0 + 10_000)  # a heartbeat's renewal
    assert_skipped(c, thread)
    assert c.gate_wake(thread, "w-1", t0 + 10_000, 60_000) == 0  # a submit marks the lease
    assert field(c, thread, "wake") == "1"

    handed = Lease("tok-2", "d2", t0 + 20_000 + LEASE_MS, "c2")  # a settle's hand-over
    assert c.put(thread, handed, expected_token="tok-1", allow_missing=True, lease_ms=LEASE_MS,
                 now=t0 + 20_000)
    assert_skipped(c, thread)
    assert c.read_lease(thread) == handed
    assert field(c, thread, "executor") == "" and field(c, thread, "wake") == "", \
        "a hand-over still clears the old attempt's executor and the submit's mark"
    assert field(c, thread, "expires") == str(t0 + TTL), "unchanged: no new TTL was set"


def test_a_dispatch_from_claim_to_the_settles_hand_over_sends_no_pexpire_after_acquire(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The normal path through the phases on the wall clock: the claim's acquire sets the TTL;
    its bind, execute's take_executor and the settle's hand-over to the thread's next
    dispatch send none."""
    name, calls = register(lambda ctx: f"did {ctx.input}")
    started: list[PhaseContext] = []
    rt = replace(make_runtime(mailbox, Wakes()), start=started.append)
    c, thread = mailbox.store.coordinator, "ttl-chain"
    mailbox.submit(thread, name, "one")
    second = mailbox.submit(thread, name, "two")
    real_acquire: Callable[..., Lease | None] = c.acquire

    def acquire_then_lower(*args: Any, **kwargs: Any) -> Lease | None:
        refused = real_acquire(*args, **kwargs)
        if refused is None:
            lower_ttl(c, thread, 20_000)
        return refused

    monkeypatch.setattr(c, "acquire", acquire_then_lower)
    ctx = claim(rt, thread)
    assert 0 < pttl(c, thread) <= 20_000, "the bind sent a PEXPIRE"
    assert run_chain(rt, ctx).settled == "completed" and calls.count == 1
    assert [s.dispatch_id for s in started] == [second.dispatch_id]
    lease = c.read_lease(thread)
    assert lease is not None and lease.token == started[0].token
    assert load(mailbox, second.dispatch_id).status == DispatchStatus.Claimed
    assert 0 < pttl(c, thread) <= 20_000, "take_executor or the hand-over sent a PEXPIRE"
    expires = field(c, thread, "expires")
    assert expires is not None and int(expires) >= lease.lease_until + MARGIN


# ------------------------------------------------------- (2) the TTL is set again in time
@pytest.mark.parametrize("call", ["renewal", "take_executor"])
def test_the_ttl_is_set_again_once_it_would_not_cover_the_lease_by_a_third(
        store: MailboxStore, call: str) -> None:
    """expires = t0 + TTL covers lease_until = now + LEASE_MS by MARGIN up to now = t0 + 30 s
    exactly; one millisecond later the call sets the TTL again."""
    c, thread, t0 = store.coordinator, f"ttl-due-{call}", now_ms()
    lease = claimed(c, thread, t0)

    def step(now: int) -> None:
        if call == "renewal":
            renew(c, thread, lease, now)
        else:
            assert take(c, thread, lease, now) == "ok"
        assert c.read_lease(thread) == replace(lease, lease_until=now + LEASE_MS)

    lower_ttl(c, thread)
    last_skip = t0 + TTL - MARGIN - LEASE_MS
    step(last_skip)
    assert_skipped(c, thread)
    assert field(c, thread, "expires") == str(t0 + TTL)
    step(last_skip + 1)
    assert_refreshed(c, thread, last_skip + 1)


def test_an_expiry_from_a_clock_ahead_of_the_callers_is_not_trusted(store: MailboxStore) -> None:
    """A stored expiry further out than the caller's own TTL would reach, by more than the
    margin (a writer whose clock runs ahead, or garbage), gets the TTL set again."""
    c, thread, t0 = store.coordinator, "ttl-ahead", now_ms()
    lease = claimed(c, thread, t0)
    c.client.hset(key(c, thread), "expires", str(t0 + TTL + MARGIN))
    lower_ttl(c, thread)
    renew(c, thread, lease, t0)
    assert_skipped(c, thread)  # at the edge: still trusted
    c.client.hset(key(c, thread), "expires", str(t0 + TTL + MARGIN + 1))
    renew(c, thread, lease, t0)
    assert_refreshed(c, thread, t0)


# ------------------------------------------------------ (3) a lease an older script wrote
@pytest.mark.parametrize("stored", [None, "", "soon"])
@pytest.mark.parametrize("call", ["renewal", "hand-over", "take_executor"])
def test_a_lease_without_a_readable_expiry_gets_its_ttl(store: MailboxStore, call: str,
                                                         stored: str | None) -> None:
    """An older lease_acquire / lease_put wrote no `expires` (None); a caller without `now`
    blanks it (''); anything unparseable counts the same."""
    c, thread, t0 = store.coordinator, f"ttl-old-{call}-{stored}", now_ms()
    lease = claimed(c, thread, t0)
    if stored is None:
        c.client.hdel(key(c, thread), "expires")
    else:
        c.client.hset(key(c, thread), "expires", stored)
    lower_ttl(c, thread)
    now = t0 + 10
    if call == "renewal":
        renew(c, thread, lease, now)
    elif call == "hand-over":
        assert c.put(thread, Lease("tok-2", "d2", now + LEASE_MS, "c2"), expected_token="tok-1",
                     allow_missing=True, lease_ms=LEASE_MS, now=now)
    else:
        assert take(c, thread, lease, now) == "ok"
    assert_refreshed(c, thread, now)


def test_a_lease_redis_forgot_gets_its_ttl_when_recreated(store: MailboxStore) -> None:
    c, thread, t0 = store.coordinator, "ttl-recreated", now_ms()
    lease = Lease("tok-1", "d1", t0 + LEASE_MS, "c1")
    assert take(c, thread, lease, t0) == "missing"
    assert c.take_executor(thread, "tok-1", "x1", "d1", t0 + LEASE_MS, LEASE_MS, create=True,
                           now=t0) == "ok"
    assert_refreshed(c, thread, t0)
    c.client.delete(key(c, thread))
    assert c.put(thread, lease, expected_token="tok-0", allow_missing=True, lease_ms=LEASE_MS,
                 now=t0)
    assert_refreshed(c, thread, t0)


# ---------------------------------------------------------------------- callers without now
@pytest.mark.parametrize("call", ["put", "take_executor"])
def test_a_caller_without_now_sets_the_ttl_every_time_and_blanks_the_expiry(
        store: MailboxStore, call: str) -> None:
    """As before `expires` existed (an older caller during a rolling deploy): every call sends
    the PEXPIRE; the expiry it does not record is blanked, so the next caller that passes
    `now` sets the TTL again rather than trusting an expiry this TTL may have cut short."""
    c, thread, t0 = store.coordinator, f"ttl-compat-{call}", now_ms()
    lease = claimed(c, thread, t0)
    for _ in range(2):
        lower_ttl(c, thread)
        if call == "put":
            assert c.put(thread, lease, expected_token="tok-1", allow_missing=True,
                         lease_ms=LEASE_MS)
        else:
            assert take(c, thread, lease, t0, with_now=False) == "ok"
        assert TTL - SLACK <= pttl(c, thread) <= TTL
        assert field(c, thread, "expires") == ""
    lower_ttl(c, thread)
    renew(c, thread, lease, t0 + 10)
    assert_refreshed(c, thread, t0 + 10)


def test_a_caller_without_now_recreating_a_lease_writes_no_expiry(store: MailboxStore) -> None:
    c, thread, t0 = store.coordinator, "ttl-compat-create", now_ms()
    assert c.take_executor(thread, "tok-1", "x1", "d1", t0 + LEASE_MS, LEASE_MS,
                           create=True) == "ok"
    assert TTL - SLACK <= pttl(c, thread) <= TTL
    assert field(c, thread, "expires") is None


# ------------------------------------------------------ (4) the key outlives lease_until
class Sim:
    """A clock for one lease key whose passing time the key feels: `advance` moves the
    clock and takes as much off the key's TTL, as real time would."""

    def __init__(self, c: Coordinator, thread: str) -> None:
        self.c, self.thread, self.now = c, thread, now_ms()
        self.refreshed: list[str] = []

    def advance(self, ms: int) -> None:
        self.now += ms
        left = pttl(self.c, self.thread) - ms
        assert left > 0, f"the lease key expired at {self.now}"
        lower_ttl(self.c, self.thread, left)

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(coordinator, thread, *args, **kwargs)`, then check the lease key."""
        before = pttl(self.c, self.thread)
        result = fn(self.c, self.thread, *args, **kwargs)
        after = pttl(self.c, self.thread)
        if after > before:
            self.refreshed.append(what)
        lease = self.c.read_lease(self.thread)
        assert lease is not None
        expires = field(self.c, self.thread, "expires")
        assert expires is not None and int(expires) >= lease.lease_until + MARGIN, what
        assert self.now + after >= lease.lease_until + MARGIN - SLACK, \
            f"{what}: the key would expire less than a margin after lease_until"
        return result


def test_the_key_always_outlives_lease_until_by_the_margin(store: MailboxStore) -> None:
    """Two claims of a thread, each executed and renewed every lease/3 for four leases, the
    second handed over by the first's settle. The claim's acquire sets the TTL; its bind,
    take_executor and the hand-over never do; a renewal does once in four (a 90 s TTL set
    with a 30 s lease covers three renewals more by the 30 s margin). After every call the
    key outlives lease_until by the margin."""
    c, thread = store.coordinator, "ttl-walk"
    sim = Sim(c, thread)
    lease = sim.call("claim", claimed, sim.now)
    for n in (1, 2):
        sim.advance(50)
        assert sim.call(f"take_executor {n}", take, lease, sim.now, f"x{n}") == "ok"
        for i in range(1, 13):
            sim.advance(LEASE_MS // 3)
            lease = sim.call(f"renewal {n}.{i}", renew, lease, sim.now)
        sim.advance(5_000)
        if n == 1:
            handed = Lease("tok-2", "d2", sim.now + LEASE_MS, "c1")
            assert sim.call("hand-over", Coordinator.put, handed, expected_token="tok-1",
                            allow_missing=True, lease_ms=LEASE_MS, now=sim.now)
            lease = handed
    assert sim.refreshed == ["claim", "renewal 1.3", "renewal 1.7", "renewal 1.11",
                             "renewal 2.2", "renewal 2.6", "renewal 2.10"]
