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


def observe_start(name: str, seconds: float) -> None:
    START_SECONDS[name].observe(seconds)


def observe_completion(outcome: str, *, runtime_s: float, enqueue_to_complete_s: float) -> None:
    RUNTIME_SECONDS.labels(outcome).observe(runtime_s)
    ENQUEUE_TO_COMPLETE_SECONDS.labels(outcome).observe(enqueue_to_complete_s)
    RUNS.labels(outcome).inc()

CANCEL_LATENCY = Histogram(
    "mailbox_cancel_latency_seconds",
    "From a cancel or interrupt signal to the running attempt seeing it.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
