"""Lease renewal while an agent runs (DESIGN.md §5, reference §4.2).

A thread of its own renews the lease every lease/3, so a CPU-bound or blocked agent never
starves it (the BullMQ stalled-job trap). When renewal says the claim is gone — reclaimed,
or fenced by an interrupt — the agent is cancelled cooperatively, because fencing alone
cannot stop side effects already under way. When renewal keeps failing on errors until the
lease has surely run out, the agent is cancelled too: past that point another worker may own
the dispatch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mailbox import metrics
from mailbox.errors import MailboxError
from mailbox.store import MailboxStore

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, store: MailboxStore, *, dispatch_id: str, token: str, lease_ms: int,
                 clock: Callable[[], int], on_lost: Callable[[str], None],
                 interval_s: float | None = None,
                 extra_check: Callable[[], str | None] | None = None) -> None:
        self.store = store
        self.dispatch_id = dispatch_id
        self.token = token
        self.lease_ms = lease_ms
        self.clock = clock
        self.on_lost = on_lost
        self.interval_s = interval_s if interval_s is not None else lease_ms / 3000
        self.extra_check = extra_check
        self.renewals = 0
        self.lost_reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{dispatch_id}",
                                        daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.on_lost(reason)

    def _loop(self) -> None:
        last_ok = self.clock()
        # Fast checks (cancel signals) run often; renewals every interval.
        tick = min(self.interval_s, 0.1) if self.extra_check else self.interval_s
        next_renewal = time.monotonic() + self.interval_s
        while not self._stop.wait(tick):
            if self.extra_check is not None:
                reason = self.extra_check()
                if reason:
                    self._lose(reason)
                    return
            if time.monotonic() < next_renewal:
                continue
            next_renewal = time.monotonic() + self.interval_s
            started = time.perf_counter()
            try:
                renewed = self.store.extend_lease(self.dispatch_id, self.token, self.lease_ms,
                                                  self.clock())
            except MailboxError as exc:
                metrics.record_operation("lease_renewal", "error", time.perf_counter() - started)
                log.warning("lease renewal of %s failed: %s", self.dispatch_id, exc)
                if self.clock() - last_ok >= self.lease_ms:
                    self._lose("lease renewal failing past the lease")
                    return
                continue
            if renewed:
                last_ok = self.clock()
                self.renewals += 1
                metrics.record_operation("lease_renewal", "ok", time.perf_counter() - started)
            else:
                metrics.record_operation("lease_renewal", "lost", time.perf_counter() - started)
                self._lose("lease lost")
                return
