"""Malformed messages put straight on the broker queue: wrong types, unknown ids, huge
payloads. The worker refuses them with a clear log line, writes nothing, and keeps serving."""

from __future__ import annotations

from mailbox import DispatchStatus, Mailbox
from tasks import app, dispatch
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.support.workers import Stack

BAD_CONTEXTS = [
    None, "a string", 42, [1, 2, 3], {}, {"dispatch_id": 1},
    {"dispatch_id": "d", "thread_id": "t", "run_id": "r", "token": "x", "attempt": "zero",
     "created_at": 0, "available_at": 0, "claimed_at": 0},
    {"dispatch_id": "unknown", "thread_id": "t", "run_id": "r", "token": "x", "attempt": 0,
     "created_at": 0, "available_at": 0, "claimed_at": 0},
    {"blob": "x" * 300_000},
]


def test_worker_survives_malformed_messages(celery_stack: Stack,  # noqa: F811
                                            publisher: Mailbox) -> None:  # noqa: F811
    worker = celery_stack.start_worker(concurrency=1)
    queue = publisher.settings.namespace
    for name in ("mailbox.verify", "mailbox.reconstruct", "mailbox.resolve",
                 "mailbox.execute", "mailbox.settle"):
        for ctx in BAD_CONTEXTS:
            app.send_task(name, args=(ctx,), queue=queue)
    for thread in (None, 7, "", "   ", {"x": 1}):
        app.send_task("mailbox.dispatch", args=(thread,), queue=queue)
    app.send_task("mailbox.dispatch", args=(), queue=queue)  # missing argument entirely
    for group in (None, "t", [], ["t"] * 1000, [None, 7, "", "\x00"], {"t": 1}):
        app.send_task("mailbox.dispatch_many", args=(group,), queue=queue)
    result = dispatch.delay("thread-after-garbage", "echo", "still alive")
    final = publisher.wait(result.id, timeout_s=60)
    assert final.status == DispatchStatus.Acked, celery_stack.logs()
    assert worker.poll() is None, "the worker died"
    log = (celery_stack.workdir / "worker1.log").read_text()
    assert "refused a malformed message" in log
    assert "mailbox.dispatch_many refused a malformed message" in log
    assert "mailbox.dispatch_many skipped a malformed thread id" in log
    counts = publisher.store.counts_by_status()
    assert sum(counts.values()) == 1, counts  # garbage wrote no dispatch
