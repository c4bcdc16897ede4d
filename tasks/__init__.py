"""Celery glue only: the app, `dispatch`, the five phase tasks and the beat tasks.

`celery -A tasks worker` loads this package from the project root; importing it registers
every task. Applications call `from tasks import dispatch; dispatch.delay(...)` with the
project root on PYTHONPATH.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

if "worker" in sys.argv[1:]:  # a worker: prefork children report metrics through files
    from tasks.monitoring import prepare_multiprocess_dir

    prepare_multiprocess_dir(os.environ.get("MAILBOX_NAMESPACE", "mailbox"))

from celery.signals import before_task_publish, worker_init, worker_process_init

import mailbox  # noqa: F401  (first import of `mailbox`, while the root is on sys.path)
from mailbox import tracing
from tasks import maintenance, monitoring, phases
from tasks.app import app
from tasks.dispatch import WakeNotPublishedError, dispatch


@before_task_publish.connect
def _ids_only_in_flower(headers: dict[str, Any] | None = None, body: Any = None,
                        **_: Any) -> None:
    """Flower and logs show the phase's ids, never the run's input or the claim token.

    A phase's context is a dict when the claim publishes verify, and the previous phase's
    `tasks.phases.PhaseMessage` (a Mapping) for every later link."""
    if not headers or not str(headers.get("task", "")).startswith("mailbox."):
        return
    args = body[0] if isinstance(body, tuple | list) and body else ()
    if args and isinstance(args[0], Mapping):
        ctx = args[0]
        headers["argsrepr"] = (f"dispatch={ctx.get('dispatch_id')} "
                               f"thread={ctx.get('thread_id')}")
        headers["kwargsrepr"] = "{}"
    elif args:
        kwargs = body[1] if len(body) > 1 else {}
        headers["argsrepr"] = f"thread={args[0]}" + (
            f" dispatch={kwargs.get('dispatch_id')}" if kwargs.get("dispatch_id") else "")
        headers["kwargsrepr"] = "{}"


@worker_process_init.connect
def _trace_pool_process(**_: Any) -> None:
    """Celery's spans in a prefork child, with a tracer provider of the child's own (span
    processors' threads do not survive the fork)."""
    tracing.instrument_celery()


@worker_init.connect
def _trace_worker(sender: Any = None, **_: Any) -> None:
    """Celery's spans in a worker whose tasks run in its own process (threads, solo)."""
    if "prefork" not in str(getattr(sender, "pool_cls", "prefork")):
        tracing.instrument_celery()


if tracing.ENABLED and "worker" not in sys.argv[1:]:
    tracing.instrument_celery()  # a process that publishes: dispatch.delay, the API, beat


__all__ = ["WakeNotPublishedError", "app", "dispatch", "maintenance", "monitoring", "phases"]
celery = app
