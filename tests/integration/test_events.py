"""Per-run event streams: resume from a cursor without gaps, explicit expiry, bounded size."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from mailbox import Mailbox
from mailbox import events as events_module
from mailbox.errors import MailboxError
from mailbox.events import CursorExpiredError, EventStreams
from tests.support.racers import racing


def test_reconnect_from_cursor_sees_every_event_once(mailbox: Mailbox) -> None:
    events = mailbox.events
    for i in range(5):
        events.emit("run-a", "d1", "output", {"i": i})
    first = events.read("run-a")[:2]
    for i in range(5, 8):
        events.emit("run-a", "d1", "output", {"i": i})
    rest = events.read("run-a", after=first[-1].id)
    assert [e.data["i"] for e in first + rest] == list(range(8))


def test_follow_yields_live_events_and_stops_after_run_finish(mailbox: Mailbox) -> None:
    events = mailbox.events
    events.emit("run-b", "d1", "run_started", {})
    seen: list[str] = []

    def produce() -> None:
        time.sleep(0.2)
        events.emit("run-b", "d1", "output", {"x": 1})
        time.sleep(0.2)
        events.emit("run-b", "d1", "run_finish", {"termination": {"type": "natural_end"}})

    with racing(produce):
        for event in events.follow("run-b", block_ms=100, timeout_s=10):
            seen.append(event.type)
    assert seen == ["run_started", "output", "run_finish"]


def test_follow_resumes_after_a_dropped_connection(mailbox: Mailbox) -> None:
    events = mailbox.events
    for i in range(3):
        events.emit("run-c", "d1", "output", {"i": i})
    stream = events.follow("run-c", block_ms=100, timeout_s=5)
    last = next(stream).id  # the client reads one event, then its connection drops
    stream.close()
    for i in range(3, 5):
        events.emit("run-c", "d1", "output", {"i": i})
    events.emit("run-c", "d1", "run_finish", {})
    resumed = list(events.follow("run-c", after=last, block_ms=100, timeout_s=5))
    assert [e.data.get("i") for e in resumed] == [1, 2, 3, 4, None]


def test_cursor_older_than_retention_is_an_explicit_error(mailbox: Mailbox) -> None:
    small = EventStreams(mailbox.store.coordinator.client, mailbox.settings.namespace,
                         retention_s=60, max_len=3)
    ids = [small.emit("run-d", "d1", "output", {"i": i}) for i in range(6)]
    assert [e.data["i"] for e in small.read("run-d")] == [3, 4, 5]
    with pytest.raises(CursorExpiredError):
        small.read("run-d", after=ids[0])
    assert [e.data["i"] for e in small.read("run-d", after=ids[3])] == [4, 5]


def test_unknown_stream_with_a_cursor_is_expired_not_empty(mailbox: Mailbox) -> None:
    with pytest.raises(CursorExpiredError):
        mailbox.events.read("never-existed", after="1-0")
    assert mailbox.events.read("never-existed") == []


def test_bad_cursor_and_bad_event_type_are_refused(mailbox: Mailbox) -> None:
    mailbox.events.emit("run-e", "d1", "output", {})
    with pytest.raises(MailboxError, match="invalid event cursor"):
        mailbox.events.read("run-e", after="not-a-cursor")
    with pytest.raises(MailboxError, match="unknown event type"):
        mailbox.events.emit("run-e", "d1", "bogus", {})


def test_big_payloads_are_kept_out_of_redis(mailbox: Mailbox) -> None:
    mailbox.events.emit("run-f", "d1", "output", {"blob": "x" * 200_000})
    [event] = mailbox.events.read("run-f")
    assert event.data["truncated"] is True
    assert len(event.data["preview"]) == 1024


def test_mailbox_events_is_callable_as_designed(mailbox: Mailbox) -> None:
    mailbox.events.emit("run-g", "d1", "run_started", {})
    mailbox.events.emit("run-g", "d1", "run_finish", {"status": "acked"})
    assert [e.type for e in mailbox.events("run-g")] == ["run_started", "run_finish"]
    followed = list(mailbox.events("run-g", follow=True, timeout_s=5))
    assert [e.type for e in followed] == ["run_started", "run_finish"]
    first = next(iter(mailbox.events("run-g")))
    assert [e.type for e in mailbox.events("run-g", after=first.id)] == ["run_finish"]


def test_cancel_and_interrupt_of_queued_work_end_each_stream_with_run_finish(
        mailbox: Mailbox) -> None:
    """A queued dispatch that is cancelled, or superseded by an interrupt, never ran: its
    run's stream still ends with one run_finish carrying the cancelled termination, with
    run_cancelled (if any) before it, and a follower returns after it."""
    cancelled = mailbox.submit("t-queued-cancel", "echo", "never runs")
    first = mailbox.submit("t-queued-interrupt", "echo", "one")
    second = mailbox.submit("t-queued-interrupt", "echo", "two")

    assert mailbox.cancel(cancelled.dispatch_id)
    interrupt = mailbox.interrupt("t-queued-interrupt")
    assert {d.dispatch_id for d in interrupt.superseded} == {first.dispatch_id,
                                                             second.dispatch_id}

    for receipt in (cancelled, first, second):
        types = [e.type for e in mailbox.events(receipt.run_id)]
        assert types.count("run_finish") == 1 and types[-1] == "run_finish", types
        assert "run_started" not in types, types
        finish = next(e for e in mailbox.events(receipt.run_id) if e.type == "run_finish")
        assert finish.data["termination"]["type"] == "cancelled", finish.data
        followed = list(mailbox.events(receipt.run_id, follow=True, timeout_s=5))
        assert followed[-1].type == "run_finish"


def test_a_stream_lives_its_retention_after_its_last_event_with_few_expiry_writes(
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """events_append.lua sets the stream's TTL again only once less than the retention
    remains, to 1.1 x the retention: a stream still lives at least its retention after its
    last event, and a run's later appends write no expiry. The stream is the only key."""
    streams = EventStreams(mailbox.store.coordinator.client, mailbox.settings.namespace,
                           retention_s=100)
    client = mailbox.store.coordinator.client
    stream, meta = streams._keys("run-ttl")
    start = events_module._now_ms()
    monkeypatch.setattr(events_module, "_now_ms", lambda: start)
    streams.emit("run-ttl", "d1", "run_queued", {})
    first = client.pttl(stream)
    assert 100_000 < first <= 110_000 and client.exists(meta) == 0
    client.pexpire(stream, 105_000)  # as if 5 s went by: more than the retention remains
    monkeypatch.setattr(events_module, "_now_ms", lambda: start + 5_000)
    streams.emit("run-ttl", "d1", "run_started", {})
    assert 100_000 < client.pttl(stream) <= 105_000, "no expiry written: enough remains"
    # 15 s went by: less than the retention remains, so the append sets it again
    client.pexpire(stream, 95_000)
    monkeypatch.setattr(events_module, "_now_ms", lambda: start + 15_000)
    streams.emit("run-ttl", "d1", "run_finish", {"status": "acked"})
    assert client.pttl(stream) > 100_000
    assert [e.type for e in streams.read("run-ttl")] == ["run_queued", "run_started",
                                                        "run_finish"]
    assert client.exists(meta) == 0


def _books(client: Any, stream: str) -> dict[str, str]:
    """The books the newest entry of a stream carries (events_append.lua)."""
    [(_, fields)] = client.xrevrange(stream, count=1)
    return {k.decode(): v.decode() for k, v in fields.items() if k != b"e"}


def test_each_append_is_one_read_and_one_write_of_the_stream(mailbox: Mailbox) -> None:
    """The books ride in the newest entry: a new run's first event is one XADD (and its
    TTL), a later one an XREVRANGE and an XADD: no meta hash to read, write or expire."""
    client = mailbox.store.coordinator.client
    streams = mailbox.events
    stream, _ = streams._keys("run-books")

    def commands(action: Callable[[], object]) -> dict[str, int]:
        return _commands_touching(client, stream, action)

    first = commands(lambda: streams.emit("run-books", "d1", "run_queued", {}, new_run=True))
    later = commands(lambda: streams.emit("run-books", "d1", "run_started", {}))
    assert first == {"evalsha": 1, "xadd": 1, "pexpire": 1}, first
    assert later == {"evalsha": 1, "xrevrange": 1, "xadd": 1}, later
    assert _books(client, stream)["n"] == "2"


def _commands_touching(client: Any, key: str, action: Callable[[], object]) -> dict[str, int]:
    """The Redis commands that `action` sent naming `key`, those its scripts ran included
    (MONITOR shows both; the calls of other tests sharing the server name other keys)."""
    sentinel = f"done-{uuid.uuid4().hex}"
    seen: dict[str, int] = {}
    with client.monitor() as monitor:
        action()
        client.echo(sentinel)
        while True:
            command = monitor.next_command()["command"]
            if sentinel in command:
                return seen
            words = command.split(" ")
            if key in words[1:]:
                name = words[0].lower()
                seen[name] = seen.get(name, 0) + 1


def test_a_stream_from_before_the_books_is_counted_once_and_still_trimmed(
        mailbox: Mailbox) -> None:
    """A stream written before entries carried the books (its meta hash lacking a count,
    or lost): the next append counts the stream once, keeps the old hash's final dispatch
    and dropped id, and the length budget holds."""
    client = mailbox.store.coordinator.client
    small = EventStreams(client, mailbox.settings.namespace, retention_s=60, max_len=3)
    stream, meta = small._keys("run-old")
    for i in range(3):  # what the previous append script left: bare entries and a meta hash
        entry = client.xadd(stream, {"e": json.dumps({
            "type": "output", "run_id": "run-old", "dispatch_id": "d1", "ts": 1,
            "data": {"i": i}})})
    client.hset(meta, mapping={"last_id": entry, "final": "d0", "dropped_upto": "1-0"})
    small.emit("run-old", "d1", "output", {"i": 3})
    assert [e.data["i"] for e in small.read("run-old")] == [1, 2, 3]
    books = _books(client, stream)
    assert books["n"] == "3" and books["f"] == "d0", books
    assert small.emit("run-old", "d0", "run_finish", {}, final=True) == \
        small.read("run-old")[-1].id, "d0 was reported final before the books moved"
    client.delete(meta)
    small.emit("run-old", "d1", "output", {"i": 4})
    assert [e.data["i"] for e in small.read("run-old")] == [2, 3, 4]


def test_the_report_that_ends_a_dispatch_is_appended_once(mailbox: Mailbox) -> None:
    """Two parties may report the same end (a settle, and the sweep repairing its run
    meanwhile): the final run_finish of a dispatch is appended once; another dispatch of the
    same run, or a non-final event, still is."""
    events = mailbox.events
    first = events.emit("run-once", "d1", "run_finish", {"status": "dead_letter"}, final=True)
    again = events.emit("run-once", "d1", "run_finish", {"status": "dead_letter"}, final=True)
    assert first is not None and again == first
    events.emit("run-once", "d1", "output", {"late": True})
    events.emit("run-once", "d2", "run_finish", {"status": "acked"}, final=True)
    assert [(e.type, e.dispatch_id) for e in events.read("run-once")] == [
        ("run_finish", "d1"), ("output", "d1"), ("run_finish", "d2")]
