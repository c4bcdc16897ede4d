"""Which of this worker's processes are stuck on an abandoned agent (docs/behaviour.md#time-limits).

A pool child whose agent ignored its stop past the grace has its attempt ended by the
heartbeat, but the agent still occupies the process until it returns or Celery's hard time
limit kills the child. Meanwhile the child leaves a marker file in the worker's state
directory (beside its Prometheus samples: one directory per worker, shared by its children);
the main process's `/healthz` answers 503 while any live child has one, so an orchestrator's
health check sees the worker degraded. Markers of dead children are ignored and removed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MARKERS = "stuck"


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
