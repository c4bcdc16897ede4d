"""A run's events as server-sent events, live from Redis (docs/behaviour.md#events).

Each event goes out as `id:` its stream id, `event:` its type and `data:` its JSON, so a
client that reconnects sends the last id back (`Last-Event-ID`, or `?after=`) and resumes
exactly after it: nothing lost, nothing repeated. The stream follows the run with bounded
blocking reads (`EventStreams.follow`), writes a comment line when it has had nothing to say
for `keepalive_s` (proxies and browsers drop silent connections), and ends after the run's
final `run_finish` — not after an attempt that will be retried, nor after a suspension (a
resumed run goes on). A run whose stream is gone (retention) while the run is done ends
after two quiet periods instead of idling forever.

Everything that can refuse the request — unknown run, malformed cursor, a cursor that
retention already passed (`CursorExpiredError`, 410) — is checked in `open_stream`, before
the response starts: once the 200 is out, an error can only be reported in the stream (an
`error` event, then the end; the client reconnects from its last id).

The reads block, so each stream runs in a worker thread of its own pool (`StreamSlots`),
apart from the threads that serve ordinary requests: a few hundred idle followers must not
starve the API. Past `max_streams` a new stream is refused with 503.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Generator
from typing import Any

import anyio
import redis

from mailbox.errors import MailboxError, NotFoundError
from mailbox.events import CursorExpiredError, Event
from mailbox.facade import Mailbox
from mailbox.http.errors import ApiError
from mailbox.model import RunStatus

log = logging.getLogger(__name__)
MAX_STREAMS = 200
_END = object()


def format_event(event: Event) -> bytes:
    data = json.dumps(event.to_json(), default=str, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


def format_error(message: str) -> bytes:
    return f"event: stream_error\ndata: {json.dumps({'error': message})}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


class StreamSlots:
    """At most `limit` open streams, each on a thread of this pool."""

    def __init__(self, limit: int = MAX_STREAMS) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()
        self.threads = anyio.CapacityLimiter(limit)

    def take(self) -> None:
        with self._lock:
            if self.open >= self.limit:
                raise ApiError(503, f"too many open event streams ({self.limit}); retry later",
                               "busy")
            self.open += 1

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


def open_stream(box: Mailbox, run_id: str, after: str | None) -> None:
    """Refuse before streaming: 404 unknown run, 400 malformed cursor, 410 expired cursor."""
    if box.get_run(run_id) is None:
        raise NotFoundError(f"no run with id {run_id!r}")
    if after is not None:
        box.events.read(run_id, after, count=1)  # checks the cursor, raises the errors above


def _quiet_and_done(box: Mailbox, run_id: str) -> bool:
    run = box.get_run(run_id)
    return run is None or run.status == RunStatus.done


def event_chunks(box: Mailbox, run_id: str, after: str | None, keepalive_s: float
                 ) -> Generator[bytes, None, None]:
    """The stream's bytes: events from the cursor on, a keep-alive whenever nothing was
    written for `keepalive_s`."""
    cursor = after
    quiet_done = 0
    block_ms = max(50, min(1000, int(keepalive_s * 1000)))
    last_write = time.monotonic()
    while True:
        due_in = keepalive_s - (time.monotonic() - last_write)
        if due_in <= 0:
            try:
                quiet_done = quiet_done + 1 if _quiet_and_done(box, run_id) else 0
            except (MailboxError, redis.RedisError):
                quiet_done = 0  # the follow below reports the outage
            if quiet_done >= 2:
                return  # done in SQL, and its stream has nothing more (expired?)
            yield KEEPALIVE
            last_write = time.monotonic()
            continue
        try:
            for event in box.events.follow(run_id, cursor, block_ms=block_ms,
                                           timeout_s=due_in):
                cursor, quiet_done = event.id, 0
                yield format_event(event)
                last_write = time.monotonic()
                if event.is_final:
                    return
        except CursorExpiredError as exc:
            yield format_error(str(exc))
            return
        except (MailboxError, redis.RedisError) as exc:
            log.warning("event stream of run %s ended: %s", run_id, exc)
            yield format_error(f"stream interrupted ({exc}); reconnect with Last-Event-ID "
                               f"{cursor or '(none)'}")
            return


async def pump(chunks: Generator[bytes, None, None], slots: StreamSlots) -> AsyncIterator[bytes]:
    """Drive the blocking iterator on the streams' own threads; give the slot back and
    close the iterator (its Redis connection) however the response ends."""
    try:
        yield b": stream open\n\n"  # headers and a first byte out at once
        while True:
            chunk: Any = await anyio.to_thread.run_sync(next, chunks, _END,
                                                        limiter=slots.threads)
            if chunk is _END:
                return
            yield chunk
    finally:
        slots.give_back()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(chunks.close, limiter=slots.threads)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
