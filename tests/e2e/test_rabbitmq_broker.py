"""Scaling out on RabbitMQ: the broker is Celery's choice (CELERY_BROKER_URL); leases, epochs
and events stay in Redis. Skipped where no RabbitMQ listens; CI has one and requires it
(MAILBOX_TEST_REQUIRE_SERVICES=rabbitmq turns the skip into a failure)."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from mailbox import DispatchStatus, Mailbox
from tests.support.services import listening, require
from tests.support.workers import ROOT, Stack

AMQP_URL = os.environ.get("MAILBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def rabbitmq() -> str:
    """The AMQP URL of a RabbitMQ that listens (else a skip, or in CI a failure)."""
    address = urlsplit(AMQP_URL)
    host, port = address.hostname or "127.0.0.1", address.port or 5672
    if not listening(host, port):
        require("rabbitmq", f"no RabbitMQ listening on {host}:{port} (MAILBOX_TEST_AMQP_URL)")
    return AMQP_URL


@pytest.mark.usefixtures("rabbitmq")
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


@pytest.mark.usefixtures("rabbitmq")
def test_on_rabbitmq_a_claimed_chain_overtakes_a_backlog_of_wake_ups(
        celery_stack: Stack, mailbox: Mailbox) -> None:
    """The queue is a RabbitMQ priority queue with the phases above the wake-ups, as on
    Redis: the chain claimed first runs its five phases while 300 wake-ups published after
    its first phase still wait (a FIFO queue would serve every wake-up before its second)."""
    from kombu.connection import Connection

    celery_stack.env_overrides["CELERY_BROKER_URL"] = AMQP_URL
    backlog = 300
    client = (
        "from tasks.publishing import publish_wake, start_next\n"
        "from tasks.runtime import mailbox, queue, runtime\n"
        "r = mailbox().submit('thread-overtake', 'echo', 'first through', wake=False)\n"
        "assert start_next(runtime(), 'thread-overtake') == r.dispatch_id\n"
        f"for n in range({backlog}):\n"
        "    publish_wake(queue(), f'thread-idle-{n}')\n"
        "print(r.dispatch_id)\n"
    )
    queue = celery_stack.namespace
    try:
        done = subprocess.run([sys.executable, "-c", client], cwd=ROOT, env=celery_stack.env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        dispatch_id = done.stdout.split()[-1]
        with Connection(AMQP_URL) as conn:  # type: ignore[no-untyped-call]
            declared = conn.default_channel.queue_declare(queue=queue, passive=True)
            assert declared.message_count == backlog + 1, declared
        celery_stack.start_worker(concurrency=1)
        final = mailbox.wait(dispatch_id, timeout_s=60)
        assert final.status == DispatchStatus.Acked, celery_stack.logs()
        with Connection(AMQP_URL) as conn:  # type: ignore[no-untyped-call]
            left = conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        # Not all of them: with acks on receipt the worker keeps taking messages into its
        # pool's buffer while its process runs a phase, and those it took are run in the
        # order they came. A FIFO queue would leave none (each phase behind all 300).
        assert left >= backlog // 2, f"only {left} of {backlog} wake-ups were still queued"
    finally:
        celery_stack.stop_all()
        with Connection(AMQP_URL) as conn:  # type: ignore[no-untyped-call]
            conn.default_channel.queue_delete(queue)
