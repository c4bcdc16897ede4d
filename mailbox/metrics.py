"""Prometheus metrics of the mailbox (reference §5, under the `mailbox_` prefix).

Recording is always on and cheap; exposition (an HTTP endpoint, multiprocess aggregation for
prefork workers) is wired by the worker and the CLI, not here.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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


def record_operation(operation: str, result: str, seconds: float) -> None:
    OPERATIONS.labels(operation, result).inc()
    OPERATION_SECONDS.labels(operation, result).observe(seconds)


def count_operation(operation: str, result: str, n: int = 1) -> None:
    if n:
        OPERATIONS.labels(operation, result).inc(n)
