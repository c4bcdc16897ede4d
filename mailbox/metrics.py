"""Prometheus metrics of the mailbox (under the `mailbox_` prefix).

Recording is always on and cheap; exposition (an HTTP endpoint, multiprocess aggregation for
prefork workers) is wired by the worker and the CLI, not here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

OPERATIONS = Counter(
    "mailbox_operations_total",
    "Store and service operations by name and result.",
    ["operation", "result"],
)
OPERATION_SECONDS = Histogram(
    "mailbox_operation_duration_seconds",
    "Wall time of store and service operations.",
    ["operation", "result"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


@functools.lru_cache(maxsize=1024)
def _child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once: a dispatch records about twenty metrics, and
    `labels()` takes a lock and checks its values every time. The label values are a small
    fixed set (operations, results, outcomes). A child is safe to keep across a fork: in
    multiprocess mode its value moves to the new process's file on first use."""
    return metric.labels(*values)


def record_operation(operation: str, result: str, seconds: float) -> None:
    _child(OPERATIONS, operation, result).inc()
    _child(OPERATION_SECONDS, operation, result).observe(seconds)


def count_operation(operation: str, result: str, n: int = 1) -> None:
    if n:
        _child(OPERATIONS, operation, result).inc(n)

START_SECONDS = {
    name: Histogram(f"mailbox_dispatch_{name}_seconds", f"Dispatch {name.replace('_', ' ')}.",
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    for name in ("enqueue_to_start", "eligible_to_start", "claim_to_start")
}
RUNTIME_SECONDS = Histogram("mailbox_dispatch_runtime_seconds", "Attempt runtime by outcome.",
                            ["outcome"])
ENQUEUE_TO_COMPLETE_SECONDS = Histogram("mailbox_dispatch_enqueue_to_complete_seconds",
                                        "Submit to settled, by outcome.", ["outcome"])
RUNS = Counter("mailbox_runs_total", "Finished attempts by outcome.", ["outcome"])


RUN_DURATION_SECONDS = Histogram(
    "mailbox_run_duration_seconds",
    "From a run's submit to its end (all its attempts), by termination type.",
    ["termination"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
TERMINAL = Counter("mailbox_dispatch_terminal_total",
                   "Dispatches that reached a terminal status, by status.", ["status"])
ACK_RECOVERY_SECONDS = Histogram(
    "mailbox_ack_recovery_seconds", "Ack recovery after an ack of unknown outcome, by outcome.",
    ["outcome"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


def observe_start(name: str, seconds: float) -> None:
    START_SECONDS[name].observe(seconds)


def observe_completion(outcome: str, *, runtime_s: float, enqueue_to_complete_s: float) -> None:
    _child(RUNTIME_SECONDS, outcome).observe(runtime_s)
    _child(ENQUEUE_TO_COMPLETE_SECONDS, outcome).observe(enqueue_to_complete_s)
    _child(RUNS, outcome).inc()


def observe_run_end(termination: str, seconds: float) -> None:
    _child(RUN_DURATION_SECONDS, termination).observe(seconds)


def count_terminal(status: str, n: int = 1) -> None:
    if n:
        _child(TERMINAL, status).inc(n)


def observe_ack_recovery(outcome: str, seconds: float) -> None:
    """Ack recovery by outcome: landed (our ack had committed), acked (acked again),
    ack_failed (acking again failed), acked_elsewhere, refused, not_ours, missing."""
    OPERATIONS.labels("ack_recovery", outcome).inc()
    ACK_RECOVERY_SECONDS.labels(outcome).observe(seconds)


CANCEL_LATENCY = Histogram(
    "mailbox_cancel_latency_seconds",
    "From a cancel or interrupt signal to the running attempt seeing it.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class StoreCollector:
    """Gauges computed from the store at scrape time (docs/behaviour.md#d-gauges): dispatch depth by
    status, queue depth, active runs (Claimed dispatches) and the age of the oldest due
    Queued dispatch. Read from SQL, they are right across every worker and machine. With
    `clock_offset_s`, also the scraped host's clock offset from Redis's."""

    def __init__(self, counts: Callable[[], dict[str, int]],
                 oldest_due_age_s: Callable[[], float],
                 clock_offset_s: Callable[[], float | None] | None = None) -> None:
        self._counts = counts
        self._oldest = oldest_due_age_s
        self._clock_offset = clock_offset_s

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._clock()
        yield from self._store()

    def _clock(self) -> Iterator[GaugeMetricFamily]:
        """This host's clock minus Redis's (`mailbox.clock`), measured at the scrape; absent
        when Redis does not answer. Alert on its spread across the workers' hosts."""
        try:
            offset = self._clock_offset() if self._clock_offset is not None else None
        except Exception:  # a scrape must not crash because Redis is down
            offset = None
        if offset is not None:
            yield GaugeMetricFamily("mailbox_clock_offset_seconds",
                                    "This host's clock minus Redis's (positive: ahead).",
                                    value=offset)

    def _store(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._counts()
            oldest = self._oldest()
        except Exception:  # a scrape must not crash because the database is down
            up = GaugeMetricFamily("mailbox_store_up", "1 when the store answered the scrape.")
            up.add_metric([], 0)
            yield up
            return
        depth = GaugeMetricFamily("mailbox_dispatch_depth", "Dispatches by status.",
                                  labels=["status"])
        for status, n in counts.items():
            depth.add_metric([status], n)
        yield depth
        yield GaugeMetricFamily("mailbox_queue_depth", "Queued dispatches.",
                                value=counts.get("queued", 0))
        yield GaugeMetricFamily("mailbox_active_runs", "Claimed dispatches (runs in flight).",
                                value=counts.get("claimed", 0))
        yield GaugeMetricFamily("mailbox_oldest_queued_age_seconds",
                                "Age of the oldest due Queued dispatch.", value=oldest)
        up = GaugeMetricFamily("mailbox_store_up", "1 when the store answered the scrape.")
        up.add_metric([], 1)
        yield up
