"""Prometheus exposition for a worker (multiprocess mode) and Flower-friendly task naming.

The worker's main process serves /metrics on MAILBOX_METRICS_PORT (default 9808; 0 turns it
off) at MAILBOX_METRICS_ADDR (default 127.0.0.1: the endpoint has no authentication, so other
machines reach it only where the operator says so, as docker-compose.yml does for Prometheus
on the compose network). Prefork children write their samples to PROMETHEUS_MULTIPROC_DIR,
which `tasks` sets before anything imports prometheus_client; the exporter aggregates them and
adds the store gauges computed from SQL at scrape time.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_init, worker_process_shutdown

log = logging.getLogger(__name__)
DEFAULT_PORT = 9808
DEFAULT_ADDR = "127.0.0.1"


def prepare_multiprocess_dir(namespace: str) -> None:
    """Give this worker a fresh sample directory, before prometheus_client is imported."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # the operator chose the directory (and its clean-up)
    # Not mailbox.settings: importing the mailbox package would import prometheus_client.
    project_root = Path(__file__).resolve().parent.parent
    path = project_root / "var" / "metrics" / f"{namespace}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    # The celery CLI loads Flower's command plugin, which imports prometheus_client before
    # our code runs; switch its value class now, before any of our metrics exist.
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def metrics_port() -> int:
    return int(os.environ.get("MAILBOX_METRICS_PORT", str(DEFAULT_PORT)))


def metrics_addr() -> str:
    """The interface /metrics listens on: loopback unless MAILBOX_METRICS_ADDR widens it."""
    return os.environ.get("MAILBOX_METRICS_ADDR", "").strip() or DEFAULT_ADDR


def build_registry() -> Any:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from mailbox.metrics import StoreCollector
    from tasks.runtime import mailbox

    def counts() -> dict[str, int]:
        return {s.label: n for s, n in mailbox().store.counts_by_status().items()}

    def oldest() -> float:
        now = int(time.time() * 1000)
        since = mailbox().store.oldest_due_queued_at(now)
        return 0.0 if since is None else (now - since) / 1000

    registry = CollectorRegistry()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(StoreCollector(counts, oldest))
    return registry


@worker_init.connect
def serve_metrics(**_: Any) -> None:
    port, addr = metrics_port(), metrics_addr()
    if port <= 0:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=addr, registry=build_registry())
        log.info("Prometheus metrics on %s:%d/metrics", addr, port)
    except OSError as exc:
        log.warning("metrics port %d unavailable (%s): set MAILBOX_METRICS_PORT per worker", port,
                    exc)


@worker_process_shutdown.connect
def mark_child_dead(pid: int | None = None, **_: Any) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and Path(directory).exists():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), directory)  # type: ignore[no-untyped-call]
