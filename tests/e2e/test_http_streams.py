"""The HTTP API's event streams, thread control and dead letter, against a real uvicorn
process and real workers: a run streamed live while it runs, a reconnect with
`Last-Event-ID` (and `?after=`) that loses and repeats nothing, the stream closing after the
run's final run_finish, keep-alive comments on a quiet stream, 410 for an expired cursor;
cancel, interrupt and resume with their 200/404/409; dead letters listed with filters,
replayed (once), forced, purged."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from mailbox import Mailbox
from tests.support.http_server import api_server, wait_json
from tests.support.workers import Stack

KEEPALIVE_S = 2
pytestmark = pytest.mark.stack_env(MAILBOX_AGENT_MODULES="tests.support.custom_agents",
                                   MAILBOX_API_SSE_KEEPALIVE_S=str(KEEPALIVE_S))


@pytest.fixture
def api(celery_stack: Stack) -> Iterator[httpx.Client]:
    celery_stack.start_worker(concurrency=2)
    with api_server(celery_stack) as server, server.client() as client:
        yield client


def _submit(api: httpx.Client, thread: str, agent: str, value: Any, **options: Any
            ) -> dict[str, str]:
    response = api.post(f"/v1/threads/{thread}/dispatches",
                        json={"agent": agent, "input": value, **options})
    assert response.status_code == 202, response.text
    return dict(response.json())


def _run_status(api: httpx.Client, run_id: str, status: str) -> dict[str, Any]:
    return wait_json(api, f"/v1/runs/{run_id}", lambda r: r["status"] == status,
                     what=f"run {run_id} to be {status}")


def _token_text(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["data"]["data"]["text"] for e in events
                   if e.event == "output")


# ================================================================================ streams
def test_a_run_streams_live_and_a_reconnect_loses_and_repeats_nothing(
        api: httpx.Client, mailbox: Mailbox, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    tokens = [f"token-{n} " for n in range(8)]
    ids = _submit(api, "chat-live", "slow_tokens",
                  {"tokens": tokens, "delay_ms": 100, "gate": str(gate)})
    url = f"/v1/runs/{ids['run_id']}/events"
    seen: list[ServerSentEvent] = []
    with connect_sse(api, "GET", url) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = source.iter_sse()
        for event in events:
            seen.append(event)
            if event.event == "output":
                break
        # Live: the first token is here while the agent still waits at its gate.
        assert api.get(f"/v1/runs/{ids['run_id']}").json()["status"] == "running"
        assert _token_text(seen) == tokens[0]
        gate.touch()
        for event in events:
            seen.append(event)
            if sum(e.event == "output" for e in seen) == 3:
                break  # drop the connection mid-run
    with connect_sse(api, "GET", url, headers={"Last-Event-ID": seen[-1].id}) as source:
        rest = list(source.iter_sse())  # returns: the server closes after the final event
    streamed = seen + rest
    ids_streamed = [e.id for e in streamed]
    assert len(set(ids_streamed)) == len(ids_streamed), "an event was repeated"
    assert ids_streamed == [e.id for e in mailbox.events.read(ids["run_id"])], "one was lost"
    assert _token_text(streamed) == "".join(tokens)
    assert [e.event for e in streamed][:2] == ["run_queued", "run_started"]
    final = json.loads(rest[-1].data)
    assert rest[-1].event == "run_finish" and final["data"]["termination"]["type"] == \
        "natural_end"
    for event in streamed:  # data: the event's JSON, id and type as in the SSE fields
        body = json.loads(event.data)
        assert body["id"] == event.id and body["type"] == event.event
        assert body["run_id"] == ids["run_id"]
    # A finished run's stream replays from a cursor and closes at once; ?after= works too.
    with connect_sse(api, "GET", f"{url}?after={ids_streamed[1]}") as source:
        assert [e.id for e in source.iter_sse()] == ids_streamed[2:]
    with connect_sse(api, "GET", url) as source:
        assert [e.id for e in source.iter_sse()] == ids_streamed


def test_a_quiet_stream_sends_keepalives_and_an_expired_cursor_is_410(
        api: httpx.Client, mailbox: Mailbox) -> None:
    ids = _submit(api, "chat-quiet", "ask", "deploy?")
    _run_status(api, ids["run_id"], "waiting")  # suspended: its stream stays open
    comments: list[float] = []
    started = time.monotonic()
    with api.stream("GET", f"/v1/runs/{ids['run_id']}/events") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith(": keep-alive"):
                comments.append(time.monotonic() - started)
                if len(comments) == 3:
                    break
    gaps = [b - a for a, b in zip([0.0, *comments], comments, strict=False)]
    assert all(gap < KEEPALIVE_S + 1.5 for gap in gaps), gaps

    last = mailbox.events.read(ids["run_id"])[-1].id
    mailbox.events.forget([ids["run_id"]])  # what retention does to an old stream
    for response in (api.get(f"/v1/runs/{ids['run_id']}/events",
                             headers={"Last-Event-ID": last}),
                     api.get(f"/v1/runs/{ids['run_id']}/events", params={"after": last})):
        assert response.status_code == 410, response.text
        assert response.json()["kind"] == "cursor_expired"
        assert "re" in response.json()["error"] and last in response.json()["error"]
    bad = api.get(f"/v1/runs/{ids['run_id']}/events", params={"after": "yesterday"})
    assert bad.status_code == 400 and "invalid event cursor" in bad.json()["error"]


# ========================================================================= thread control
def test_cancel_interrupt_and_resume(api: httpx.Client) -> None:
    queued = _submit(api, "chat-ctl", "echo", "later", delay_ms=600_000)
    cancelled = api.post(f"/v1/dispatches/{queued['dispatch_id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["action"] == "cancelled" and cancelled.json()["status"] == \
        "Cancelled"
    again = api.post(f"/v1/dispatches/{queued['dispatch_id']}/cancel")
    assert again.status_code == 409 and "nothing to cancel" in again.json()["error"]

    running = _submit(api, "chat-ctl", "sleep", {"ms": 60_000})
    _run_status(api, running["run_id"], "running")
    stop = api.post(f"/v1/dispatches/{running['dispatch_id']}/cancel")
    assert stop.status_code == 200 and stop.json()["action"] == "stop_requested"
    run = _run_status(api, running["run_id"], "done")
    assert run["termination"]["type"] == "cancelled"

    long = _submit(api, "chat-int", "sleep", {"ms": 60_000})
    waiting_behind = _submit(api, "chat-int", "echo", "old news")
    _run_status(api, long["run_id"], "running")
    interrupted = api.post("/v1/threads/chat-int/interrupt")
    assert interrupted.status_code == 200, interrupted.text
    body = interrupted.json()
    assert body["active_dispatch"] == long["dispatch_id"] and body["stop_requested"] is True
    assert body["superseded"] == [waiting_behind["dispatch_id"]]
    assert _run_status(api, long["run_id"], "done")["termination"]["type"] == "cancelled"

    ask = _submit(api, "chat-ask", "ask", "ship it?")
    early = api.post(f"/v1/runs/{ask['run_id']}/resume", json={"decision": "too soon"})
    if early.status_code == 409:  # not suspended yet: refused, nothing queued
        assert "not waiting" in early.json()["error"]
    else:  # the workers were quicker: it was waiting already, and "too soon" decided it
        assert early.status_code == 200, early.text
        assert _run_status(api, ask["run_id"], "done")["response"] == "too soon"
        ask = _submit(api, "chat-ask", "ask", "ship it now?")
    _run_status(api, ask["run_id"], "waiting")
    assert api.post(f"/v1/runs/{ask['run_id']}/resume", json={}).status_code == 400
    resumed = api.post(f"/v1/runs/{ask['run_id']}/resume", json={"decision": "approved"})
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["run_id"] == ask["run_id"] and resumed.json()["resumed"] is True
    done = _run_status(api, ask["run_id"], "done")
    assert done["response"] == "approved"
    late = api.post(f"/v1/runs/{ask['run_id']}/resume", json={"decision": "again"})
    assert late.status_code == 409 and "not waiting" in late.json()["error"]


# ============================================================================ dead letters
def _dead(api: httpx.Client, thread: str) -> dict[str, str]:
    ids = _submit(api, thread, "fail", "cannot work")
    wait_json(api, f"/v1/dispatches/{ids['dispatch_id']}",
              lambda d: d["status"] == "DeadLetter", what="a dead letter")
    return ids


def test_dead_letters_listed_replayed_once_forced_and_purged(api: httpx.Client) -> None:
    dead = _dead(api, "chat-dl")
    acked = _submit(api, "chat-dl-ok", "echo", "fine")
    wait_json(api, f"/v1/dispatches/{acked['dispatch_id']}", lambda d: d["status"] == "Acked")

    def listed(**params: Any) -> list[str]:
        response = api.get("/v1/dead-letters", params=params)
        assert response.status_code == 200, response.text
        return [d["dispatch_id"] for d in response.json()]

    assert listed() == [dead["dispatch_id"]]
    assert listed(agent="fail") == listed(thread_id="chat-dl") == [dead["dispatch_id"]]
    assert listed(error="requested failure", since="1h") == [dead["dispatch_id"]]
    assert listed(agent="echo") == listed(thread_id="other") == listed(until="0") == []
    assert api.get("/v1/dead-letters", params={"since": "soon"}).status_code == 400

    replay = api.post(f"/v1/dead-letters/{dead['dispatch_id']}/replay")
    assert replay.status_code == 202, replay.text
    first = replay.json()
    assert first["replay_of"] == dead["dispatch_id"] and first["already_replayed"] is False
    assert first["run_id"] != dead["run_id"] and first["thread_id"] == "chat-dl"
    twice = api.post(f"/v1/dead-letters/{dead['dispatch_id']}/replay", json={"force": False})
    assert twice.status_code == 200 and twice.json()["already_replayed"] is True
    assert twice.json()["run_id"] == first["run_id"]
    not_dead = api.post(f"/v1/dead-letters/{acked['dispatch_id']}/replay")
    assert not_dead.status_code == 409 and "not a dead letter" in not_dead.json()["error"]
    assert api.post(f"/v1/dead-letters/{dead['dispatch_id']}/replay",
                    json={"force": "yes"}).status_code == 400

    moved_on = _dead(api, "chat-dl-moved")
    assert api.post("/v1/threads/chat-dl-moved/interrupt").status_code == 200
    refused = api.post(f"/v1/dead-letters/{moved_on['dispatch_id']}/replay")
    assert refused.status_code == 409 and "force" in refused.json()["error"]
    forced = api.post(f"/v1/dead-letters/{moved_on['dispatch_id']}/replay",
                      json={"force": True})
    assert forced.status_code == 202, forced.text

    assert api.delete(f"/v1/dead-letters/{acked['dispatch_id']}").status_code == 409
    purged = api.delete(f"/v1/dead-letters/{dead['dispatch_id']}")
    assert purged.status_code == 200 and purged.json()["purged"] == 1
    assert api.get(f"/v1/dispatches/{dead['dispatch_id']}").status_code == 404
    assert api.delete(f"/v1/dead-letters/{dead['dispatch_id']}").status_code == 404
