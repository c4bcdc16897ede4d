"""dispatch.delay() with the broker down: the dispatch is durable, the caller gets a clear
error that says so, and a worker's sweep delivers it once a broker is back."""

from __future__ import annotations

import subprocess
import sys
import time

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.embedded_redis import free_port
from tests.support.workers import ROOT, Stack

CLIENT = """
import time
from tasks import dispatch, WakeNotPublishedError
started = time.monotonic()
try:
    dispatch.delay("thread-offline", "echo", "stored anyway")
except WakeNotPublishedError as exc:
    print("ERROR", exc.dispatch_id, round(time.monotonic() - started, 1))
    print(exc)
"""


def test_delay_with_the_broker_down_is_durable_and_says_so(celery_stack: Stack,
                                                            mailbox: Mailbox) -> None:
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = subprocess.run([sys.executable, "-c", CLIENT], cwd=ROOT, timeout=120,
                          env=celery_stack.env(CELERY_BROKER_URL=dead_broker),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, message = done.stdout.strip().splitlines()[:2]
    tag, dispatch_id, seconds = first.split()
    assert tag == "ERROR"
    assert float(seconds) < 60, "publishing must fail in bounded time"
    assert "stored durably" in message and "sweep will deliver it" in message
    stored = mailbox.get_dispatch(dispatch_id)
    assert stored is not None and stored.status == DispatchStatus.Queued
    celery_stack.start_worker(concurrency=1)  # its start-up sweep wakes the thread
    deadline = time.monotonic() + 60
    final = mailbox.wait(dispatch_id, timeout_s=max(1.0, deadline - time.monotonic()))
    assert final.status == DispatchStatus.Acked and final.run_response == "stored anyway"
