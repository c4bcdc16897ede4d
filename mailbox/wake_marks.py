"""How long a wake-up counts as pending (docs/behaviour.md#wake-marks).

A thread's pending-wake mark (`<ns>:wake-pending:<thread>`) names the one wake-up on its way
to the thread; while it stands, neither submits (the wake gate) nor the sweep publish another.
Its consumer clears it as its claim begins. A mark whose wake-up never arrives (dropped,
purged, lost with a broker, stuck in a dead worker's prefetch) would hold the thread back
forever, so every mark lapses: Redis expires it `wake_pending_ttl_ms` after it was last set or
renewed, and the next sweep wakes the thread again.

Under a backlog, though, a wake-up waits behind the phase messages (it has the lower
priority) for longer than that, and a sweep that re-woke each lapsed thread queued a duplicate
that later found its thread already claimed: under `make load` most of the sweep's wake-ups.
So the sweep renews a standing mark instead of letting it lapse while its wake-up may still be
queued, which it judges from three facts, none of which a lost wake-up can fake for long:

- the broker's queue holds messages (`queued`): when it is empty the wake-up is not in it;
- no wake-up published well after this one (`wake_pending_ttl_ms` later) has been consumed
  yet: wake-ups share one queue and one priority, so the broker hands them out in the order
  they were published, and once a later one has come out this one came out too or was lost.
  Consumers record the newest publish time they have seen, the *frontier*
  (`<ns>:wake-frontier`, `Coordinator.advance_wake_frontier`);
- the mark is younger than `wake_pending_max_ms` (ten times the TTL), a bound on how long any
  wake-up is trusted, so even one lost while the queue never empties and no other wake-up
  comes out is repaired (a renewal never carries a mark past it).

A wake-up's publish time is read from its id, a UUIDv7: a submit's wake-up carries its
dispatch id, the sweep's and the gate's own ids are minted here, stamped with the clock. An
id of another shape (one minted before these ids were) has no time: its mark is never
renewed, as before; nor is one stamped more than FUTURE_SLACK_MS ahead of the sweep's clock.
"""

from __future__ import annotations

import secrets

import uuid6

from mailbox.runtime import now_ms, uuid7_ms
from mailbox.settings import Settings

SWEEP_WAKE_PREFIX = "sweep-wake-"
"""Sweep wake-ups carry task ids with this prefix: Flower shows which wake-ups came from the
sweep, and `make load` counts them apart."""
WAKE_PENDING_SWEEPS = 4
WAKE_PENDING_MAX_FACTOR = 10
FUTURE_SLACK_MS = 10_000
"""How far ahead of the reader's clock a wake-up's publish time may be and still be trusted:
clocks of different hosts differ a little, and a process that mints many UUIDv7 ids within
one millisecond (a bulk submission) stamps them ahead of its clock (uuid6 keeps them ordered
by adding a millisecond each). A mark further ahead is never renewed (it lapses as without
renewal), and a consumer moves the frontier no further than its own clock."""
FRONTIER_STEP_MS = 1000
"""A process moves the frontier only when it has seen a publish time this much past the last
one it wrote: a few writes per second under load instead of one per wake-up, and a frontier
at most this far behind (the renewal rule allows a TTL of slack)."""


def wake_pending_ttl_ms(settings: Settings) -> int:
    """How long a wake-up counts as pending when nobody consumes it and no sweep renews it.

    This is how late a dropped wake-up is re-sent (plus up to one sweep interval), and how
    often a thread whose wake-up waits behind a backlog would get a duplicate if the sweep did
    not renew its mark. So: as long as we can afford. The lease is the recovery delay the
    deployment already accepts for a crashed attempt (lease + one sweep), so a lost message
    waits no longer than a lost worker; and never less than `WAKE_PENDING_SWEEPS` sweep
    intervals, or the mark would lapse before the sweeps it is meant to quiet (with the
    defaults, 30 s lease and 30 s sweeps: 120 s)."""
    return max(settings.lease_ms, WAKE_PENDING_SWEEPS * settings.sweep_interval_s * 1000)


def wake_pending_max_ms(settings: Settings) -> int:
    """The longest a mark is renewed while its wake-up may still be queued (20 minutes with
    the defaults): the bound on how late a wake-up lost during a backlog that never lets any
    other wake-up through is re-sent (plus one sweep interval)."""
    return WAKE_PENDING_MAX_FACTOR * wake_pending_ttl_ms(settings)


def _uuid7_at(ms: int) -> str:
    """A UUIDv7 (hex) stamped with exactly `ms`: `uuid6.uuid7()` stamps ids minted within one
    millisecond a millisecond apart, ahead of the clock, and a sweep mints one per due
    thread, so a page of them would run seconds ahead."""
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | secrets.randbits(76)
    return uuid6.UUID(int=value, version=7).hex


def new_wake_id() -> str:
    """The task id of a gated wake-up (cancel, resume, replay): a UUIDv7, so that its mark
    tells when it was published."""
    return _uuid7_at(now_ms())


def new_sweep_wake_id() -> str:
    return f"{SWEEP_WAKE_PREFIX}{_uuid7_at(now_ms())}"


def wake_time_ms(wake_id: str) -> int | None:
    """When the wake-up named `wake_id` was published (the ms timestamp of its UUIDv7); None
    for an id of any other shape."""
    if wake_id.startswith(SWEEP_WAKE_PREFIX):
        wake_id = wake_id[len(SWEEP_WAKE_PREFIX):]
    return uuid7_ms(wake_id)


def still_queued(published_at: int | None, now: int, *, queued: int | None,
                 frontier: int | None, ttl_ms: int, max_ms: int) -> bool:
    """May the wake-up published at `published_at` still be waiting in the broker's queue?
    Then the sweep renews its mark rather than let it lapse (module docstring). `queued`:
    messages in the queue (None: unknown); `frontier`: the newest publish time of a consumed
    wake-up (None: none recorded). A publish time more than FUTURE_SLACK_MS ahead of `now`
    is not trusted."""
    if published_at is None or not queued or queued <= 0:
        return False
    if published_at > now + FUTURE_SLACK_MS or now - published_at >= max_ms:
        return False
    return frontier is None or published_at >= frontier - ttl_ms


def renewal_ms(published_at: int, now: int, ttl_ms: int, max_ms: int) -> int:
    """How long a renewed mark stands: a whole TTL, but never past the bound, so that a mark
    renewed just before it lapses at `max_ms` after its publish time, and the next sweep
    wakes the thread."""
    return max(1, min(ttl_ms, published_at + max_ms - now))


__all__ = ["FRONTIER_STEP_MS", "FUTURE_SLACK_MS", "SWEEP_WAKE_PREFIX",
           "WAKE_PENDING_MAX_FACTOR", "WAKE_PENDING_SWEEPS", "new_sweep_wake_id", "new_wake_id",
           "renewal_ms", "still_queued", "wake_pending_max_ms", "wake_pending_ttl_ms",
           "wake_time_ms"]
