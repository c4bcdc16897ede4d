"""Which of this worker's processes are stuck on an abandoned agent, and recycling a process
whose agent loop an abandoned coroutine poisoned (docs/behaviour.md#abandonment).

A pool child whose agent ignored its stop past the grace has its attempt ended by the
heartbeat, but the agent's code still runs in the process: a plain agent until it returns or
Celery's hard time limit kills the child, an async agent's coroutine until it ends or the
process is recycled. Meanwhile the process leaves a marker file in the worker's state
directory (beside its Prometheus samples: one directory per worker, shared by its children);
the main process's `/healthz` answers 503 while any live process has one, so an
orchestrator's health check sees the worker degraded. Markers of dead processes are ignored
and removed.

`recycle` (Runtime.recycle) ends a process whose shared agent loop still runs an abandoned
coroutine a grace after its abandonment: Celery's time limits no longer apply (the execute
task returned) and nothing else can end the coroutine. A prefork pool process exits as soon
as no task runs in it — the running one is not cut short — and Celery starts another; where
tasks run in the worker's main process (threads, solo pools) the worker takes a warm
shutdown (stops taking work, lets running tasks finish, exits) for its supervisor to restart.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun, worker_init, worker_process_init

log = logging.getLogger(__name__)

MARKERS = "stuck"
EXIT_POISONED = 70
"""A pool process's exit status when it recycles itself (EX_SOFTWARE): billiard logs it
("exited with 'exitcode 70'") and starts another process."""
IDLE_POLL_S = 0.05
IDLE_FOR_S = 0.2
"""How long no task may have run before a pool process exits: billiard reports a task's
result just after the task's postrun, and a process gone before that report would make a
finished task look lost."""


def _directory() -> Path | None:
    base = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return None if not base else Path(base) / MARKERS


def mark_stuck(dispatch_id: str, stuck: bool) -> None:
    """Runtime.stuck for a worker process: leave or remove this process's marker."""
    directory = _directory()
    if directory is None:
        return
    marker = directory / f"{os.getpid()}-{dispatch_id}"
    if stuck:
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"pid": os.getpid(), "dispatch_id": dispatch_id,
                                      "since": time.time()}))
    else:
        marker.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stuck_processes() -> list[dict[str, Any]]:
    """The live processes of this worker that are stuck, oldest first."""
    directory = _directory()
    if directory is None or not directory.exists():
        return []
    found = []
    for marker in directory.iterdir():
        try:
            entry = json.loads(marker.read_text())
            pid = int(entry["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            entry["stuck_for_s"] = round(time.time() - float(entry.get("since", 0)), 1)
            found.append(entry)
        else:
            marker.unlink(missing_ok=True)
    return sorted(found, key=lambda e: -e["stuck_for_s"])


# ------------------------------------------------------------------------------- recycling
_lock = threading.Lock()
_role: str | None = None  # "main": the worker's main process; "pool": a prefork pool process
_running = 0  # tasks running in this process now
_changed = 0.0  # when a task last started or ended here (monotonic)
_recycling = False
_in_test_worker = False  # this process runs an in-process test worker (celery.contrib.testing)


@worker_init.connect
def _in_worker_main(sender: Any = None, **_: Any) -> None:
    """A `celery worker` process. Not an in-process test worker
    (celery.contrib.testing.worker, mailbox.testing.celery_worker): a warm shutdown there
    would SIGTERM the test run itself, so such a process only logs what it would recycle."""
    global _role, _in_test_worker
    from celery.contrib.testing.worker import TestWorkController

    _in_test_worker = isinstance(sender, TestWorkController)
    _role = None if _in_test_worker else "main"


@worker_process_init.connect
def _in_pool_process(**_: Any) -> None:
    global _role, _running, _recycling
    with _lock:  # a forked child starts with its parent's view: nothing runs here yet
        # The solo pool of an in-process test worker sends this in the test run's process.
        _role, _running, _recycling = None if _in_test_worker else "pool", 0, False


@task_prerun.connect
def _task_started(**_: Any) -> None:
    global _running, _changed
    with _lock:
        _running += 1
        _changed = time.monotonic()


@task_postrun.connect
def _task_ended(**_: Any) -> None:
    global _running, _changed
    with _lock:
        _running = max(0, _running - 1)
        _changed = time.monotonic()


def recycle(reason: str) -> None:
    """Runtime.recycle for a worker: end this process, the least work lost (once; later
    calls add nothing). Outside a worker (a test or tool driving the phases) only logged."""
    global _recycling
    with _lock:
        if _recycling:
            return
        _recycling = True
        role = _role
    if role == "pool":
        threading.Thread(target=_exit_when_idle, args=(reason,), name="recycle",
                         daemon=True).start()
    elif role == "main":
        log.error("warm shutdown of this worker to recycle it (%s); its supervisor restarts "
                  "it", reason)
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        log.error("this process should be recycled, but it is not a worker: %s", reason)


def _exit_when_idle(reason: str) -> None:
    """Exit the pool process between two tasks. Checked and done under the lock that task
    starts take, so no task of this process begins in between; a message billiard handed
    over just then, before its task started, is lost with the process — a wake-up or a
    phase message, repaired like any crash (lease expiry, the sweep)."""
    while True:
        with _lock:
            if _running == 0 and time.monotonic() - _changed >= IDLE_FOR_S:
                log.error("pool process %d exits to be replaced: %s", os.getpid(), reason)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(EXIT_POISONED)
        time.sleep(IDLE_POLL_S)
