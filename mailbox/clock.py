"""How far this host's clock is from Redis's, and when that is too far (docs/behaviour.md#clocks).

Leases are wall-clock times: the holder writes `lease_until` from its own clock and the sweep,
on whichever worker runs it, reclaims a claim whose `lease_until` is behind *its* clock. Two
hosts whose clocks disagree by more than the margin a renewal leaves (two thirds of a lease:
the heartbeat renews every third) make the sweep reclaim a live claim — the attempt's next
renewal is refused and it stops, but until then it runs beside the new claim's attempt, the
one thing the mailbox promises never to do. Nothing in the protocol can tell a skewed clock
from a late renewal, so the workers measure their clocks against the one every worker
reaches, Redis's (`TIME`), when they run the sweep (at most once a minute), warn when one
is off by more than `limit_ms`, and export the offset (`mailbox_clock_offset_seconds`) for
an alert on its spread across hosts.

Warn, never refuse: Redis's own clock may be the wrong one, and a sweep that refused to
reclaim on every host would strand every expired claim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHECK_EVERY_S = 60.0
"""How often a process that keeps running the checks (the sweep) runs them at most."""


@dataclass(frozen=True)
class ClockOffset:
    """This host's clock minus Redis's, in milliseconds (positive: this host is ahead), and
    the round trip of the measurement: the true offset lies within half of it."""

    offset_ms: float
    round_trip_ms: float

    def beyond(self, limit_ms: float) -> bool:
        """True when the offset is past `limit_ms` even with the measurement's uncertainty
        counted in this host's favour."""
        return abs(self.offset_ms) - self.round_trip_ms / 2 > limit_ms

    def describe(self) -> str:
        side = "ahead of" if self.offset_ms >= 0 else "behind"
        return (f"{_seconds(abs(self.offset_ms))} {side} Redis's "
                f"(measured within ±{_seconds(self.round_trip_ms / 2)})")


def limit_ms(lease_ms: int) -> float:
    """The largest offset from Redis's clock a host may have: a sixth of a lease. Two hosts
    within it differ by at most a third of a lease, which leaves a third of the two thirds a
    renewal gives for the renewal's own delays (a slow database, a paused process)."""
    return lease_ms / 6


def measure(client: Any, clock: Callable[[], float] = time.time) -> ClockOffset:
    """One `TIME` round trip, compared with the midpoint of `clock()` around it. A Redis
    Cluster may answer per node ({node: reply}); the first node's reply is taken (its nodes'
    clocks are the operator's to keep together, like the workers')."""
    before = clock()
    reply = client.time()
    after = clock()
    if isinstance(reply, dict):
        reply = next(iter(reply.values()))
    seconds, micros = reply
    redis_ms = int(seconds) * 1000 + int(micros) / 1000
    return ClockOffset(offset_ms=(before + after) * 500 - redis_ms,
                       round_trip_ms=(after - before) * 1000)


def read(client: Any, clock: Callable[[], float] = time.time) -> ClockOffset | None:
    """`measure`, or None when Redis could not answer (logged at debug: whatever shows the
    offset — a scrape, `stats`, the audit — reports a Redis that is down in its own way)."""
    try:
        return measure(client, clock)
    except Exception as exc:
        log.debug("could not read Redis's clock: %s", exc)
        return None


def check(client: Any, lease_ms: int, clock: Callable[[], float] = time.time
          ) -> ClockOffset | None:
    """`read`, and log a warning when this host is past `limit_ms(lease_ms)`."""
    reading = read(client, clock)
    if reading is not None and reading.beyond(limit_ms(lease_ms)):
        log.warning("this host's clock is %s, more than the %s a host may be off "
                    "(MAILBOX_LEASE_MS / 6): a sweep on a host whose clock runs ahead, or "
                    "a worker whose clock runs behind, lets the sweep reclaim a claim that "
                    "is still running, and its attempt then runs twice at once until its "
                    "next renewal stops it. Keep the hosts' clocks synchronised (NTP).",
                    reading.describe(), _seconds(limit_ms(lease_ms)))
    return reading


class AtMostEvery:
    """True at the first call, then at most once per `seconds`: the checks of a task that
    runs every few seconds (the sweep) measure and warn at most once a minute."""

    def __init__(self, seconds: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._monotonic = monotonic
        self._last: float | None = None

    def __call__(self) -> bool:
        at = self._monotonic()
        if self._last is not None and at - self._last < self.seconds:
            return False
        self._last = at
        return True


def _seconds(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s" if ms < 10_000 else f"{ms / 1000:.1f} s"
