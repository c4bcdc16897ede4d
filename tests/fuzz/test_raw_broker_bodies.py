"""Raw bytes straight on the broker's queue list, bypassing Celery's publisher.

kombu's Redis transport keeps a queue as Redis lists: the publisher LPUSHes one JSON
envelope per message — `{"body": <base64 of the serialized body>, "content-type",
"content-encoding", "headers": {"task", "id", ...}, "properties": {"delivery_tag",
"delivery_info", "body_encoding": "base64", "priority", ...}}` — and the worker BRPOPs it,
decodes the envelope, then the body (kombu.transport.redis `_put` / `_brpop_read`,
kombu.transport.virtual.base `Message`). Anyone with access to Redis can LPUSH anything
there. Each entry below breaks a different layer: the envelope is not JSON or not UTF-8, is
JSON but not an object, has no properties, has a body that is not base64, or that decodes to
bytes that are not JSON, has a content type the worker refuses, is 5 MB, names an unknown
task, has no headers, or is a well-formed wake-up whose thread id no submit could store.

A real `celery -A tasks worker` must stay alive through all of them, log a clear rejection
for each, write nothing (no row, no Redis key built from the junk), and then still complete
a normal `dispatch.delay()`. Before tasks/app.py's CheckedRedisTransport, the first entry
alone stopped the worker ("Unrecoverable error: JSONDecodeError").
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import sqlalchemy as sa

from mailbox import DispatchStatus, Mailbox
from mailbox.schema import metadata
from tasks import dispatch
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.fuzz.support import broker_depth, row_counts
from tests.support.e2e_helpers import KOMBU_UNACKED
from tests.support.workers import Stack

FIVE_MB = 5 * 1024 * 1024


def envelope(queue: str, payload: bytes, *, task: str = "mailbox.dispatch",
             content_type: str = "application/json", headers: dict[str, Any] | None = None,
             **fields: Any) -> bytes:
    """A kombu Redis envelope as Celery's publisher frames it (protocol 2 headers);
    `fields` replace top-level keys (`body=` a raw, not base64-encoded, body)."""
    message: dict[str, Any] = {
        "body": base64.b64encode(payload).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": str(uuid.uuid4()), "retries": 0,
                    "argsrepr": "", "kwargsrepr": ""} if headers is None else headers,
        "properties": {"correlation_id": str(uuid.uuid4()), "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    }
    message.update(fields)
    return json.dumps(message).encode()


def task_body(*args: Any, **kwargs: Any) -> bytes:
    return json.dumps([list(args), kwargs, {"callbacks": None, "errbacks": None,
                                            "chain": None, "chord": None}]).encode()


def raw_entries(queue: str) -> list[tuple[str, bytes, str]]:
    """(case, bytes to LPUSH, what the worker's log must say about it)."""
    not_json = "refused a malformed broker message: not JSON"
    return [
        ("invalid JSON", b'{"body": "unterminated', not_json),
        ("invalid UTF-8", b"\xff\xfe\x00\xc3(garbage", not_json),
        ("typed marker: bad datetime", b'{"__type__": "datetime", "__value__": "not a date"}',
         "undecodable entry (ValueError"),
        ("typed marker: bad decimal", b'{"__type__": "decimal", "__value__": "abc"}',
         "undecodable entry (InvalidOperation"),
        ("typed marker: bad uuid", b'{"__type__": "uuid", "__value__": "zz"}',
         "undecodable entry (TypeError"),
        ("typed marker: bytes of a number", b'{"__type__": "bytes", "__value__": 5}',
         "undecodable entry (AttributeError"),
        ("typed marker: unknown type", b'{"__type__": "nope", "__value__": 1}',
         "undecodable entry (ValueError"),
        ("nested past the recursion limit", b"[" * 100_000 + b"]" * 100_000,
         "undecodable entry (RecursionError"),
        ("typed marker in the body", envelope(queue, b'[["t"], {"dispatch_id": '
                                                    b'{"__type__": "decimal", '
                                                    b'"__value__": "abc"}}, {}]'),
         "Can't decode message body"),
        ("JSON array", b"[1, 2, 3]", "a JSON list, not an envelope object"),
        ("JSON string", b'"mailbox.dispatch"', "a JSON str, not an envelope object"),
        ("no properties", json.dumps({"body": "", "headers": {}}).encode(),
         "no 'properties' object"),
        ("body not base64", envelope(queue, b"", body="!!!not base64***"),
         "body is not base64"),
        ("body decodes to garbage", envelope(queue, b"\x00\xff\xfe binary garbage"),
         "Can't decode message body"),
        ("pickle content type", envelope(queue, b"\x80\x04K\x01.",
                                         content_type="application/x-python-serialize"),
         "Refusing to deserialize untrusted content of type pickle"),
        ("text content type", envelope(queue, b"hello", content_type="text/plain"),
         "Refusing to deserialize untrusted content of type text/plain"),
        ("5 MB of non-JSON", envelope(queue, b"x" * FIVE_MB), "Can't decode message body"),
        ("5 MB thread id", envelope(queue, task_body("t" * FIVE_MB)),
         "mailbox.dispatch refused a malformed message: thread_id must be at most 255"),
        ("unknown task", envelope(queue, task_body(), task="mailbox.nope"),
         "Received unregistered task of type 'mailbox.nope'"),
        ("missing headers", envelope(queue, task_body("t-headless"), headers={}),
         "Received and deleted unknown message"),
        ("NUL thread id", envelope(queue, task_body("t\x00nul")),
         "mailbox.dispatch refused a malformed message: thread_id must not contain NUL"),
    ]


def table_rows(box: Mailbox) -> dict[str, int]:
    with box.store.engine.connect() as conn:
        return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)
                                         ).scalar_one()) for t in metadata.sorted_tables}


def test_worker_refuses_raw_garbage_and_keeps_serving(celery_stack: Stack,  # noqa: F811
                                                      publisher: Mailbox) -> None:  # noqa: F811
    worker = celery_stack.start_worker(concurrency=1)
    queue = publisher.settings.namespace
    client = publisher.store.coordinator.client
    entries = raw_entries(queue)
    for _, raw, _ in entries:
        client.lpush(queue, raw)  # the default-priority list, which BRPOP serves first

    result = dispatch.delay("thread-after-garbage", "echo", "still alive")
    final = publisher.wait(result.id, timeout_s=60)
    log = (celery_stack.workdir / "worker1.log").read_text(errors="replace")
    assert final.status == DispatchStatus.Acked, celery_stack.logs()
    assert worker.poll() is None, f"the worker died\n{celery_stack.logs()}"
    assert "Unrecoverable error" not in log and "Connection to broker lost" not in log, log
    missing = [case for case, _, marker in entries if marker not in log]
    assert not missing, f"no clear rejection logged for {missing}\n{log[-6000:]}"

    # One dispatch, its run, and the conversation's two messages (the input, echo's answer).
    assert row_counts(publisher) == (1, 1, 2), "the garbage wrote dispatches/runs/messages"
    rows = table_rows(publisher)
    assert rows["thread_dispatch_epochs"] == 1, rows  # the real dispatch's thread only
    keys = list(client.scan_iter(f"{queue}:*"))
    assert all(len(k) < 200 and b"\x00" not in k for k in keys), \
        f"a Redis key was built from the junk: {[k[:80] for k in keys]}"
    assert broker_depth(client, queue) == 0, "entries left on the queue"
    leftovers = [tag for tag, raw in client.hgetall(KOMBU_UNACKED).items()
                 if queue.encode() in raw]
    assert not leftovers, f"unacked entries of the queue remain: {leftovers}"
