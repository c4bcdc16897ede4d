"""`/healthz`: can this server reach what it needs — the database, Redis and the broker?

Each check is one cheap round trip with a short timeout, run side by side so that one
hanging service does not hide the others; the answer names every one that is down (503) so
an operator, or compose's health check, knows where to look.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from mailbox.facade import Mailbox
from mailbox.store import Inspection

CHECK_TIMEOUT_S = 5.0


def _database(box: Mailbox) -> None:
    with Inspection.open(box.store) as inspect:
        inspect.ping()


def _redis(box: Mailbox) -> None:
    box.store.coordinator.client.ping()


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0]}" if text else type(orig).__name__


def check(box: Mailbox, broker: Callable[[], None]) -> tuple[bool, dict[str, Any]]:
    """(all reachable, {"database": {"ok": ...}, "redis": ..., "broker": ...})."""
    checks: dict[str, Callable[[], None]] = {
        "database": lambda: _database(box), "redis": lambda: _redis(box), "broker": broker}
    results: dict[str, Any] = {}
    pool = concurrent.futures.ThreadPoolExecutor(len(checks), thread_name_prefix="healthz")
    try:
        futures = {name: pool.submit(fn) for name, fn in checks.items()}
        for name, future in futures.items():
            try:
                future.result(timeout=CHECK_TIMEOUT_S)
                results[name] = {"ok": True}
            except concurrent.futures.TimeoutError:
                results[name] = {"ok": False,
                                 "error": f"no answer within {CHECK_TIMEOUT_S:g} s"}
            except Exception as exc:  # any driver's error means: unreachable from here
                results[name] = {"ok": False, "error": _describe(exc)}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return all(r["ok"] for r in results.values()), results
