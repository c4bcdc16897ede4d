"""Scaling out on RabbitMQ: the broker is Celery's choice (CELERY_BROKER_URL); leases, epochs
and events stay in Redis. Skipped where no RabbitMQ listens (CI has one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from mailbox import DispatchStatus, Mailbox
from tests.support.workers import ROOT, Stack

AMQP_URL = os.environ.get("MAILBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbit_listening() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbit_listening(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_dispatch_through_rabbitmq_with_two_workers(celery_stack: Stack,
                                                    mailbox: Mailbox) -> None:
    celery_stack.env_overrides["CELERY_BROKER_URL"] = AMQP_URL
    celery_stack.start_worker(concurrency=1)
    celery_stack.start_worker(concurrency=1)
    client = (
        "from tasks import dispatch\n"
        "ids = [dispatch.delay(f't{i % 4}', 'echo', f'm{i}').id for i in range(12)]\n"
        "print(' '.join(ids))\n"
    )
    done = subprocess.run([sys.executable, "-c", client], cwd=ROOT, env=celery_stack.env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 12
    for dispatch_id in ids:
        final = mailbox.wait(dispatch_id, timeout_s=60)
        assert final.status == DispatchStatus.Acked, celery_stack.logs()
    assert "amqp://" in (celery_stack.workdir / "worker1.log").read_text() or \
        "5672" in (celery_stack.workdir / "worker1.log").read_text()
