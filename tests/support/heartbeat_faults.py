"""Errors injected into every attempt's heartbeat, inside real worker processes.

Loaded into a worker with `Stack.start_worker(include=["tests.support.heartbeat_faults"],
HEARTBEAT_FAULTS_DIR=<dir>)`: Celery imports `-I` modules in the main process before it forks
the pool, so every pool child runs with these in place. (A Redis key cannot steer them: the
faults are Redis errors.) Each failure is one line in `<dir>/<pid>.faults`, so the test can
prove that the faults really happened.

- The cancel check (`Mailbox._cancel_signal`) fails in bursts: HEARTBEAT_CANCEL_FAIL_S of
  errors, then HEARTBEAT_CANCEL_OK_S of normal reads, over and over (the wall clock decides,
  so every attempt sees bursts).
- Every other lease renewal (`MailboxStore.extend_lease`) fails.
Errors alternate between a raw redis ConnectionError and the store's StoreUnavailableError.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import redis

from mailbox.errors import StoreUnavailableError
from mailbox.facade import Mailbox
from mailbox.store import MailboxStore

DIRECTORY = os.environ.get("HEARTBEAT_FAULTS_DIR")
FAIL_S = float(os.environ.get("HEARTBEAT_CANCEL_FAIL_S", "0.9"))
OK_S = float(os.environ.get("HEARTBEAT_CANCEL_OK_S", "0.15"))
_renewals = itertools.count()
_failures = itertools.count()


def _fail(what: str) -> Exception:
    assert DIRECTORY is not None
    with open(Path(DIRECTORY) / f"{os.getpid()}.faults", "a") as log:
        log.write(f"{what}\n")
    if next(_failures) % 2:
        return StoreUnavailableError(f"injected: redis unreachable during {what}")
    return redis.ConnectionError(f"injected: Error 111 connecting during {what}")


def counts(directory: Path) -> dict[str, int]:
    """Failures injected so far, by call, over every worker process."""
    found: dict[str, int] = {}
    for path in directory.glob("*.faults"):
        for line in path.read_text().split():
            found[line] = found.get(line, 0) + 1
    return found


if DIRECTORY:
    _real_check = Mailbox._cancel_signal
    _real_extend = MailboxStore.extend_lease

    def _flaky_check(self: Mailbox, thread_id: str, token: str) -> str | None:
        if time.time() % (FAIL_S + OK_S) < FAIL_S:
            raise _fail("cancel_check")
        return _real_check(self, thread_id, token)

    def _flaky_extend(self: MailboxStore, *args: Any, **kwargs: Any) -> bool:
        if next(_renewals) % 2 == 0:
            raise _fail("renewal")
        return _real_extend(self, *args, **kwargs)

    Mailbox._cancel_signal = _flaky_check  # type: ignore[method-assign]
    MailboxStore.extend_lease = _flaky_extend  # type: ignore[method-assign]
