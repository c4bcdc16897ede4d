"""Per-run event streams in Redis Streams (docs/behaviour.md#execute).

Every run has a stream of JSON events `{id, type, run_id, dispatch_id, ts, data}`. Readers
resume from a cursor (the last id they saw) and get every later event, live or not. Retention
is bounded three ways: at most `max_len` events per run, at most `max_bytes` bytes of events
per run (an agent that emits big outputs would otherwise keep up to `max_len` times 64 KiB in
Redis for every run), and the whole stream expires `retention` (at most 1.1 x) after its last
event (events_append.lua sets the TTL again only once less than `retention` remains); garbage
collection deletes the streams of the runs it deletes (`forget`). A stream keeps its own books
(entries and bytes retained, expiry, what retention dropped, the last dispatch reported final)
in its newest entry, beside the payload: an append is one read and one write of one key. A
reader whose cursor points before what retention dropped gets `CursorExpiredError` — never a
silent gap. Events are advisory: the SQL records are the truth, and a failed emit never fails
a run.

Keys come from `coordination.KeyScheme`: on one Redis `<ns>:events:<run>` (and `:meta`, where
streams written before the books moved into their entries kept them: read, never written); on a
Redis Cluster `<ns>:{<thread>}:events:<run>`, in the run's thread's slot
(docs/redis-cluster.md#events). There the stream's name needs the run's thread: writers pass
`thread_id` (they all know it), and a reader that gives only the run id has its thread looked
up once in SQL (`thread_of`, the run record) and remembered.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from mailbox import metrics
from mailbox.coordination import (
    KeyScheme,
    ScriptCall,
    is_cluster_client,
    lua_source,
    run_calls,
    run_scripts,
)
from mailbox.errors import MailboxError

log = logging.getLogger(__name__)

EVENT_TYPES = frozenset({"run_queued", "run_started", "output", "suspended", "run_rescheduled",
                         "run_finish", "run_cancelled"})
DEFAULT_MAX_LEN = 1000
DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # MAILBOX_EVENT_STREAM_MAX_BYTES
_CURSOR = re.compile(r"[0-9]+(-[0-9]+)?\Z", re.ASCII)
MAX_DATA_BYTES = 64 * 1024
FORGET_BATCH = 1000  # keys per DEL
THREADS_REMEMBERED = 10_000  # run -> thread, on a cluster (a run never changes thread)


class CursorExpiredError(MailboxError):
    """The cursor points before events that retention already dropped."""

    prefix = "cursor expired"


class UnknownRunThreadError(MailboxError):
    """On a Redis Cluster: a run whose thread nobody gave and SQL does not know, so its
    stream has no key (a writer's emit is then dropped like one Redis refused)."""


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
                 max_len: int = DEFAULT_MAX_LEN, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 thread_of: Callable[[str], str | None] | None = None) -> None:
        """`thread_of(run_id)`: the run's thread, or None for a run SQL does not know; only
        a Redis Cluster needs it, for readers that name only the run."""
        self.client = client
        self.namespace = namespace
        self.keys = KeyScheme(namespace, cluster=is_cluster_client(client))
        self.retention_ms = max(1, retention_s) * 1000
        self.max_len = max_len
        self.max_bytes = max_bytes
        self.thread_of = thread_of
        self._threads: OrderedDict[str, str] = OrderedDict()
        self._threads_lock = threading.Lock()
        self.append_script = client.register_script(lua_source("events_append"))

    @staticmethod
    def _check_run(run_id: str) -> None:
        if not isinstance(run_id, str) or not run_id.strip() \
                or (not run_id.isascii() and run_id.encode(errors="replace").decode() != run_id):
            raise MailboxError(f"run_id must be a non-empty string of valid Unicode text, got "
                               f"{run_id!r:.60}")

    def _keys(self, run_id: str, thread_id: str | None = None) -> tuple[str, str]:
        """The run's stream and meta keys. On a cluster, MailboxError when the run's thread
        is neither given nor known (see `_thread`)."""
        self._check_run(run_id)
        if not self.keys.cluster:
            return self.keys.events("", run_id)
        thread = self._thread(run_id, thread_id)
        if thread is None:
            raise UnknownRunThreadError(f"run {run_id} is unknown: its event stream cannot be "
                                        f"located on the Redis Cluster without its thread")
        return self.keys.events(thread, run_id)

    def _thread(self, run_id: str, thread_id: str | None) -> str | None:
        """The run's thread on a cluster: as given (and remembered), else remembered, else
        looked up (`thread_of`); None when nobody knows it."""
        with self._threads_lock:
            if thread_id is not None:
                self._threads[run_id] = thread_id
            else:
                thread_id = self._threads.get(run_id)
            if thread_id is not None:
                self._threads.move_to_end(run_id)
                while len(self._threads) > THREADS_REMEMBERED:
                    self._threads.popitem(last=False)
                return thread_id
        if self.thread_of is None:
            return None
        found = self.thread_of(run_id)
        return None if found is None else self._thread(run_id, found)

    def _located(self, run_id: str, thread_id: str | None) -> tuple[str, str] | None:
        """`_keys` for a reader: None for a run whose stream cannot exist (a cluster, and a
        run SQL does not know — never submitted, or deleted by garbage collection)."""
        self._check_run(run_id)
        if self.keys.cluster and self._thread(run_id, thread_id) is None:
            return None
        return self._keys(run_id, thread_id)

    def _payload(self, run_id: str, dispatch_id: str | None, type_: str, data: Any,
                 ts: int | None) -> str:
        if type_ not in EVENT_TYPES:
            raise MailboxError(f"unknown event type {type_!r}")
        return json.dumps({"type": type_, "run_id": run_id, "dispatch_id": dispatch_id,
                           "ts": ts if ts is not None else _now_ms(),
                           "data": _bounded(data)})

    def emit(self, run_id: str, dispatch_id: str | None, type_: str, data: Any = None,
             ts: int | None = None, *, thread_id: str | None = None,
             new_run: bool = False, final: bool = False) -> str | None:
        """Append an event; returns its id, or None when Redis refused (logged, counted).
        `thread_id`: the run's thread (on a Redis Cluster it names the stream; without it
        the thread is looked up). `new_run`: the run was just created, so its stream cannot
        exist yet (the append script skips looking). `final`: the report that ends
        `dispatch_id` (its last run_finish), appended once per dispatch whoever else reports
        the same end (the stream's last id is returned then)."""
        try:
            call = self.append_call(run_id, dispatch_id, type_, data, ts, thread_id=thread_id,
                                    new_run=new_run, final=final)
            raw = self.append_script(keys=call.keys, args=call.args)
        except (redis.RedisError, UnknownRunThreadError) as exc:
            return self.failed(run_id, type_, exc)
        return self.appended(raw)

    def emit_along(self, along: ScriptCall, run_id: str, dispatch_id: str | None, type_: str,
                   data: Any = None, ts: int | None = None, *, thread_id: str | None = None,
                   new_run: bool = False, final: bool = False) -> Any:
        """`emit`, with another script call `along` (not touching this stream: a submit's
        wake gate, a settle's lease hand-over) in the same round trip. Returns `along`'s
        reply, an exception in its place when Redis refused it; the event's own failure is
        logged and counted as `emit`'s."""
        try:
            call = self.append_call(run_id, dispatch_id, type_, data, ts, thread_id=thread_id,
                                    new_run=new_run, final=final)
        except UnknownRunThreadError as exc:
            self.failed(run_id, type_, exc)
            calls = [along]
        else:
            calls = [call, along]
        try:
            replies = run_calls(self.client, calls)
        except redis.RedisError as exc:
            replies = [exc] * len(calls)
        if len(calls) == 2 and isinstance(replies[0], Exception):
            self.failed(run_id, type_, replies[0])
        return replies[-1]

    def append_call(self, run_id: str, dispatch_id: str | None, type_: str, data: Any = None,
                    ts: int | None = None, *, thread_id: str | None = None,
                    new_run: bool = False, final: bool = False) -> ScriptCall:
        """`emit`'s call of the append script, not yet sent: for a caller that sends it in
        one round trip with its own (a submit, with its wake gate). Its reply goes through
        `appended`, its failure through `failed`. UnknownRunThreadError as `emit`'s."""
        payload = self._payload(run_id, dispatch_id, type_, data, ts)
        self._check_run(run_id)
        return ScriptCall(self.append_script, list(self._keys(run_id, thread_id)),
                          [payload, self.max_len, self.retention_ms, self.max_bytes, _now_ms(),
                           _flag(new_run), (dispatch_id or "") if final else ""])

    @staticmethod
    def appended(reply: Any) -> str:
        """The event id an append call answered."""
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    @staticmethod
    def failed(run_id: str, type_: str, exc: BaseException) -> None:
        """An append Redis refused: logged and counted, never raised (events are advisory)."""
        metrics.count_operation("event_emit", "error")
        log.warning("event %s for run %s not recorded: %s", type_, run_id, exc)
        return None

    def emit_many(self, run_id: str, dispatch_id: str | None,
                  items: Sequence[tuple[str, Any, int | None]], *,
                  thread_id: str | None = None) -> int:
        """Append (type, data, ts) events of one run in order, in one round trip (one call
        of the append script with every event: each is still its own trimmed append). How
        many were recorded; a Redis error is logged and counted, never raised (events are
        advisory)."""
        return self.emit_batch([(run_id, dispatch_id, type_, data, ts)
                                for type_, data, ts in items], thread_id=thread_id)

    def emit_batch(self, entries: Sequence[tuple[str, str | None, str, Any, int | None]], *,
                   thread_id: str | None = None,
                   threads: Mapping[str, str] | None = None,
                   new_runs: Collection[str] = ()) -> int:
        """Append (run_id, dispatch_id, type, data, ts) events, each run's in order, in one
        round trip (bulk submission queues hundreds of runs at once): one append call per
        run, pipelined. The runs' threads: `thread_id` for all of them, or `threads` by run
        (on a Redis Cluster; looked up when missing); `new_runs`, those just created (see
        `emit`). Same guarantees as emit_many."""
        if not entries:
            return 0
        by_run: dict[str, list[str]] = {}
        for run_id, dispatch_id, type_, data, ts in entries:
            self._check_run(run_id)
            by_run.setdefault(run_id, []).append(
                self._payload(run_id, dispatch_id, type_, data, ts))
        try:
            calls = [(list(self._keys(run_id, thread_id or (threads or {}).get(run_id))),
                      [payloads[0], self.max_len, self.retention_ms, self.max_bytes,
                       _now_ms(), _flag(run_id in new_runs), "", *payloads[1:]])
                     for run_id, payloads in by_run.items()]
            if len(calls) == 1:  # one run (emit_many): one call, reloaded by redis-py
                self.append_script(keys=calls[0][0], args=calls[0][1])
            else:  # one call per run: independent calls, as run_scripts wants them
                run_scripts(self.client, self.append_script, calls)
        except (redis.RedisError, UnknownRunThreadError) as exc:
            metrics.count_operation("event_emit", "error", len(entries))
            log.warning("%d events (first for run %s) not recorded: %s", len(entries),
                        entries[0][0], exc)
            return 0
        return len(entries)

    def forget(self, run_ids: Sequence[str], threads: Mapping[str, str] | None = None
               ) -> int:
        """Delete these runs' streams (garbage collection deleted the runs); how many streams
        went. A follower of one of them gets CursorExpiredError, as after expiry. On a
        Redis Cluster each run's thread comes from `threads` (the runs are gone from SQL);
        a stream whose thread is not known is left to expire. The meta hash of a stream from
        before the books moved into its entries goes with it (not counted)."""
        streams: list[str] = []
        metas: list[str] = []
        for run_id in run_ids:
            self._check_run(run_id)
            if self.keys.cluster:
                thread = (threads or {}).get(run_id)
                with self._threads_lock:
                    thread = thread or self._threads.pop(run_id, None)
                if thread is None:
                    continue
                stream, meta = self.keys.events(thread, run_id)
            else:
                stream, meta = self._keys(run_id)
            streams.append(stream)
            metas.append(meta)
        deleted = 0
        for start in range(0, len(streams), FORGET_BATCH):
            deleted += int(self.client.delete(*streams[start:start + FORGET_BATCH]))
            self.client.delete(*metas[start:start + FORGET_BATCH])
        return deleted

    def __call__(self, run_id: str, after: str | None = None, follow: bool = False,
                 timeout_s: float | None = None, *, thread_id: str | None = None
                 ) -> Iterator[Event]:
        """`mailbox.events(run_id, after=None, follow=False)` of the facade: the run's
        events after the cursor; with `follow`, live until the run's final event."""
        if follow:
            return self.follow(run_id, after, timeout_s=timeout_s, thread_id=thread_id)
        return iter(self.read(run_id, after, thread_id=thread_id))

    def read(self, run_id: str, after: str | None = None, count: int = 1000, *,
             thread_id: str | None = None) -> list[Event]:
        """Events after the cursor (all retained events when `after` is None)."""
        located = self._located(run_id, thread_id)
        self._check_cursor(run_id, after, located)
        if located is None:
            return []
        start = "-" if after is None else f"({after}"
        entries = self.client.xrange(located[0], min=start, max="+", count=count)
        return [self._decode(run_id, entry_id, fields) for entry_id, fields in entries]

    def follow(self, run_id: str, after: str | None = None, *, block_ms: int = 1000,
               stop_after_finish: bool = True, timeout_s: float | None = None,
               thread_id: str | None = None) -> Iterator[Event]:
        """Yield events as they come, from the cursor on. Ends after the run's final
        `run_finish` (when asked; an attempt that will be retried is not final) or at the
        timeout. Reconnecting with the last yielded id loses nothing."""
        located = self._located(run_id, thread_id)
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(
                timeout_s, int | float) or not math.isfinite(timeout_s) or timeout_s < 0):
            # NaN and strings would fail (or never expire) only once the first read is done.
            raise MailboxError(f"timeout_s must be None or a finite number of seconds >= 0, "
                               f"got {timeout_s!r:.60}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cursor = after
        for event in self.read(run_id, cursor, thread_id=thread_id):
            cursor = event.id
            yield event
            if stop_after_finish and event.is_final:
                return
        while deadline is None or time.monotonic() < deadline:
            # Never block past the deadline: a 50 ms timeout must not wait a whole block_ms.
            block = block_ms if deadline is None else max(
                1, min(block_ms, int((deadline - time.monotonic()) * 1000)))
            if located is None:  # a cluster, and a run SQL does not know (yet)
                located = self._located(run_id, thread_id)
                if located is None:
                    self._check_cursor(run_id, cursor, None)
                    time.sleep(block / 1000)
                    continue
            self._check_cursor(run_id, cursor, located)
            reply = self.client.xread({located[0]: cursor or "0-0"}, block=block, count=100)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    event = self._decode(run_id, entry_id, fields)
                    cursor = event.id
                    yield event
                    if stop_after_finish and event.is_final:
                        return

    def _check_cursor(self, run_id: str, after: str | None,
                      located: tuple[str, str] | None) -> None:
        if after is None:
            return
        # Checked here: Redis answers a malformed id (or one past 64 bits) with a raw
        # ResponseError, and `int()` alone would accept " 1", "1_0" and non-ASCII digits.
        match = _CURSOR.match(after) if isinstance(after, str) else None
        if match is None or max(_id_tuple(after)) >= 2**64:
            raise MailboxError(f"invalid event cursor {after!r:.60} (an event id looks like "
                               f"1712345678901-0)")
        cursor = _id_tuple(after)
        dropped, last = (None, None) if located is None else self._books(*located)
        if dropped is not None and cursor < _id_tuple(dropped):
            raise CursorExpiredError(
                f"events of run {run_id} after {after} were dropped by retention (kept from "
                f"{dropped} on); re-read from the start")
        if last is None and after != "0-0":
            raise CursorExpiredError(
                f"the event stream of run {run_id} expired or never existed; cursor {after} "
                f"cannot be resumed")

    def _books(self, stream: str, meta: str) -> tuple[str | None, str | None]:
        """(the newest id retention dropped, the stream's last id): from the newest entry's
        books (events_append.lua), or, for a stream written before entries carried them,
        from its old meta hash."""
        newest = self.client.xrevrange(stream, count=1)
        if not newest:
            return None, None
        entry_id, fields = newest[0]
        if b"n" in fields or "n" in fields:
            dropped = fields.get(b"d") or fields.get("d")
        else:
            dropped = self.client.hget(meta, "dropped_upto")
        return (None if dropped is None else _text(dropped)), _text(entry_id)

    @staticmethod
    def _decode(run_id: str, entry_id: Any, fields: Any) -> Event:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        raw = fields.get(b"e") or fields.get("e")
        body = json.loads(raw)
        return Event(eid, body["type"], run_id, body.get("dispatch_id"), body["ts"],
                     body.get("data"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _now_ms() -> int:
    """The writer's clock, for the append script's expiry bookkeeping (events_append.lua)."""
    return int(time.time() * 1000)


def _bounded(data: Any) -> Any:
    """Keep big payloads out of Redis: events carry summaries, the SQL run holds the rest."""
    text = json.dumps(data, default=str)
    if len(text) <= MAX_DATA_BYTES:
        return json.loads(text)
    return {"truncated": True, "bytes": len(text), "preview": text[:1024]}
