"""Per-run event streams in Redis Streams (docs/behaviour.md#execute).

Every run has a stream of JSON events `{id, type, run_id, dispatch_id, ts, data}`. Readers
resume from a cursor (the last id they saw) and get every later event, live or not. Retention
is bounded three ways: at most `max_len` events per run, at most `max_bytes` bytes of events
per run (an agent that emits big outputs would otherwise keep up to `max_len` times 64 KiB in
Redis for every run), and the whole stream expires `retention` after its last event; garbage
collection deletes the streams of the runs it deletes (`forget`). A reader whose cursor points
before what retention dropped gets `CursorExpiredError` — never a silent gap. Events are
advisory: the SQL records are the truth, and a failed emit never fails a run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from mailbox import metrics
from mailbox.coordination import LUA_DIR
from mailbox.errors import MailboxError

log = logging.getLogger(__name__)

EVENT_TYPES = frozenset({"run_queued", "run_started", "output", "suspended", "run_rescheduled",
                         "run_finish", "run_cancelled"})
DEFAULT_MAX_LEN = 1000
DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # MAILBOX_EVENT_STREAM_MAX_BYTES
_CURSOR = re.compile(r"[0-9]+(-[0-9]+)?\Z", re.ASCII)
MAX_DATA_BYTES = 64 * 1024
FORGET_BATCH = 1000  # keys per DEL


class CursorExpiredError(MailboxError):
    """The cursor points before events that retention already dropped."""

    prefix = "cursor expired"


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    run_id: str
    dispatch_id: str | None
    ts: int
    data: Any

    @property
    def is_final(self) -> bool:
        """The last event of a run (not of an attempt that will be retried, nor of one that
        suspended: a resumed run goes on with more events)."""
        if self.type != "run_finish":
            return False
        data = self.data if isinstance(self.data, dict) else {}
        termination = data.get("termination") or {}
        return data.get("status") != "retrying" and termination.get("type") != "suspended"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "run_id": self.run_id,
                "dispatch_id": self.dispatch_id, "ts": self.ts, "data": self.data}


def _id_tuple(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class EventStreams:
    def __init__(self, client: redis.Redis[bytes], namespace: str, retention_s: int,
                 max_len: int = DEFAULT_MAX_LEN, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.client = client
        self.namespace = namespace
        self.retention_ms = max(1, retention_s) * 1000
        self.max_len = max_len
        self.max_bytes = max_bytes
        self.append_script = client.register_script((LUA_DIR / "events_append.lua").read_text())

    def _keys(self, run_id: str) -> tuple[str, str]:
        if not isinstance(run_id, str) or not run_id.strip() \
                or (not run_id.isascii() and run_id.encode(errors="replace").decode() != run_id):
            raise MailboxError(f"run_id must be a non-empty string of valid Unicode text, got "
                               f"{run_id!r:.60}")
        base = f"{self.namespace}:events:{run_id}"
        return base, base + ":meta"

    def _payload(self, run_id: str, dispatch_id: str | None, type_: str, data: Any,
                 ts: int | None) -> str:
        if type_ not in EVENT_TYPES:
            raise MailboxError(f"unknown event type {type_!r}")
        return json.dumps({"type": type_, "run_id": run_id, "dispatch_id": dispatch_id,
                           "ts": ts if ts is not None else int(time.time() * 1000),
                           "data": _bounded(data)})

    def emit(self, run_id: str, dispatch_id: str | None, type_: str, data: Any = None,
             ts: int | None = None) -> str | None:
        """Append an event; returns its id, or None when Redis refused (logged, counted)."""
        payload = self._payload(run_id, dispatch_id, type_, data, ts)
        try:
            raw = self.append_script(keys=list(self._keys(run_id)),
                                     args=[payload, self.max_len, self.retention_ms,
                                           self.max_bytes])
        except redis.RedisError as exc:
            metrics.count_operation("event_emit", "error")
            log.warning("event %s for run %s not recorded: %s", type_, run_id, exc)
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def emit_many(self, run_id: str, dispatch_id: str | None,
                  items: Sequence[tuple[str, Any, int | None]]) -> int:
        """Append (type, data, ts) events of one run in order, in one round trip (a
        pipeline of the append script: each is still its own trimmed append). How many
        were recorded; a Redis error is logged and counted, never raised (events are
        advisory)."""
        return self.emit_batch([(run_id, dispatch_id, type_, data, ts)
                                for type_, data, ts in items])

    def emit_batch(self, entries: Sequence[tuple[str, str | None, str, Any, int | None]]
                   ) -> int:
        """Append (run_id, dispatch_id, type, data, ts) events, in order, in one round trip
        (bulk submission queues hundreds of runs at once). Same guarantees as emit_many."""
        if not entries:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for run_id, dispatch_id, type_, data, ts in entries:
            self.append_script(keys=list(self._keys(run_id)), args=[
                self._payload(run_id, dispatch_id, type_, data, ts), self.max_len,
                self.retention_ms, self.max_bytes], client=pipe)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            metrics.count_operation("event_emit", "error", len(entries))
            log.warning("%d events (first for run %s) not recorded: %s", len(entries),
                        entries[0][0], exc)
            return 0
        return len(entries)

    def forget(self, run_ids: Sequence[str]) -> int:
        """Delete these runs' streams (garbage collection deleted the runs); how many keys
        went. A follower of one of them gets CursorExpiredError, as after expiry."""
        keys = [key for run_id in run_ids for key in self._keys(run_id)]
        deleted = 0
        for start in range(0, len(keys), FORGET_BATCH):
            deleted += int(self.client.delete(*keys[start:start + FORGET_BATCH]))
        return deleted

    def __call__(self, run_id: str, after: str | None = None, follow: bool = False,
                 timeout_s: float | None = None) -> Iterator[Event]:
        """`mailbox.events(run_id, after=None, follow=False)` of the facade: the run's
        events after the cursor; with `follow`, live until the run's final event."""
        if follow:
            return self.follow(run_id, after, timeout_s=timeout_s)
        return iter(self.read(run_id, after))

    def read(self, run_id: str, after: str | None = None, count: int = 1000) -> list[Event]:
        """Events after the cursor (all retained events when `after` is None)."""
        stream, _ = self._keys(run_id)
        self._check_cursor(run_id, after)
        start = "-" if after is None else f"({after}"
        entries = self.client.xrange(stream, min=start, max="+", count=count)
        return [self._decode(run_id, entry_id, fields) for entry_id, fields in entries]

    def follow(self, run_id: str, after: str | None = None, *, block_ms: int = 1000,
               stop_after_finish: bool = True, timeout_s: float | None = None
               ) -> Iterator[Event]:
        """Yield events as they come, from the cursor on. Ends after the run's final
        `run_finish` (when asked; an attempt that will be retried is not final) or at the
        timeout. Reconnecting with the last yielded id loses nothing."""
        stream, _ = self._keys(run_id)
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(
                timeout_s, int | float) or not math.isfinite(timeout_s) or timeout_s < 0):
            # NaN and strings would fail (or never expire) only once the first read is done.
            raise MailboxError(f"timeout_s must be None or a finite number of seconds >= 0, "
                               f"got {timeout_s!r:.60}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cursor = after
        for event in self.read(run_id, cursor):
            cursor = event.id
            yield event
            if stop_after_finish and event.is_final:
                return
        while deadline is None or time.monotonic() < deadline:
            self._check_cursor(run_id, cursor)
            # Never block past the deadline: a 50 ms timeout must not wait a whole block_ms.
            block = block_ms if deadline is None else max(
                1, min(block_ms, int((deadline - time.monotonic()) * 1000)))
            reply = self.client.xread({stream: cursor or "0-0"}, block=block, count=100)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    event = self._decode(run_id, entry_id, fields)
                    cursor = event.id
                    yield event
                    if stop_after_finish and event.is_final:
                        return

    def _check_cursor(self, run_id: str, after: str | None) -> None:
        if after is None:
            return
        # Checked here: Redis answers a malformed id (or one past 64 bits) with a raw
        # ResponseError, and `int()` alone would accept " 1", "1_0" and non-ASCII digits.
        match = _CURSOR.match(after) if isinstance(after, str) else None
        if match is None or max(_id_tuple(after)) >= 2**64:
            raise MailboxError(f"invalid event cursor {after!r:.60} (an event id looks like "
                               f"1712345678901-0)")
        cursor = _id_tuple(after)
        _, meta = self._keys(run_id)
        dropped, last = self.client.hmget(meta, ["dropped_upto", "last_id"])
        if dropped is not None and cursor < _id_tuple(dropped.decode()):
            raise CursorExpiredError(
                f"events of run {run_id} after {after} were dropped by retention (kept from "
                f"{dropped.decode()} on); re-read from the start")
        if last is None and after != "0-0":
            raise CursorExpiredError(
                f"the event stream of run {run_id} expired or never existed; cursor {after} "
                f"cannot be resumed")

    @staticmethod
    def _decode(run_id: str, entry_id: Any, fields: Any) -> Event:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        raw = fields.get(b"e") or fields.get("e")
        body = json.loads(raw)
        return Event(eid, body["type"], run_id, body.get("dispatch_id"), body["ts"],
                     body.get("data"))


def _bounded(data: Any) -> Any:
    """Keep big payloads out of Redis: events carry summaries, the SQL run holds the rest."""
    text = json.dumps(data, default=str)
    if len(text) <= MAX_DATA_BYTES:
        return json.loads(text)
    return {"truncated": True, "bytes": len(text), "preview": text[:1024]}
