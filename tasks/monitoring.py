"""Prometheus exposition and the health endpoint of a worker (multiprocess mode).

The worker's main process serves /metrics and /healthz on MAILBOX_METRICS_PORT (default
9808; 0 turns it off) at MAILBOX_METRICS_ADDR (default 127.0.0.1: the endpoint has no
authentication, so other machines reach it only where the operator says so, as
docker-compose.yml does for Prometheus on the compose network). Prefork children write their
samples to PROMETHEUS_MULTIPROC_DIR, which `tasks` sets before anything imports
prometheus_client; the exporter aggregates them and adds the store gauges computed from SQL
at scrape time. /healthz answers 200, or 503 while a pool child is stuck on an agent
abandoned past its time limit (`tasks.health`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery.signals import worker_init, worker_process_shutdown

from tasks import health

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

    from mailbox import clock
    from mailbox.metrics import StoreCollector
    from tasks.runtime import mailbox

    def counts() -> dict[str, int]:
        return {s.label: n for s, n in mailbox().store.counts_by_status().items()}

    def oldest() -> float:
        now = int(time.time() * 1000)
        since = mailbox().store.oldest_due_queued_at(now)
        return 0.0 if since is None else (now - since) / 1000

    def clock_offset() -> float | None:  # None (Redis down): left out of this scrape
        reading = clock.read(mailbox().store.coordinator.client)
        return None if reading is None else reading.offset_ms / 1000

    registry = CollectorRegistry()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(StoreCollector(counts, oldest, clock_offset))
    return registry


Environ = dict[str, Any]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def health_app(metrics_app: Callable[[Environ, StartResponse], Iterable[bytes]]
               ) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """/healthz (stuck children) in front of the Prometheus WSGI app (everything else)."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)
        stuck = health.stuck_processes()
        body = json.dumps({"ok": not stuck, "stuck": stuck}).encode()
        start_response("503 Service Unavailable" if stuck else "200 OK",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(body)))])
        return [body]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


@worker_init.connect
def serve_metrics(**_: Any) -> None:
    port, addr = metrics_port(), metrics_addr()
    if port <= 0:
        return
    from prometheus_client import make_wsgi_app

    try:
        server = make_server(addr, port, health_app(make_wsgi_app(build_registry())),
                             _ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        log.warning("metrics port %d unavailable (%s): set MAILBOX_METRICS_PORT per worker", port,
                    exc)
        return
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("Prometheus metrics on %s:%d/metrics, health on /healthz", addr, port)


@worker_process_shutdown.connect
def mark_child_dead(pid: int | None = None, **_: Any) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and Path(directory).exists():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), directory)  # type: ignore[no-untyped-call]
