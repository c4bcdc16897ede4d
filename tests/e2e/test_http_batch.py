"""`POST /v1/dispatches/batch` through a real uvicorn server and real workers
(docs/behaviour.md#bulk): one answer per item in order, a bad item refused by index with
nothing written, a refused chunk naming its item and listing what the chunks before stored."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from mailbox import Mailbox
from tests.support.http_server import api_server, wait_json
from tests.support.workers import Stack


@pytest.fixture
def api(celery_stack: Stack) -> Iterator[httpx.Client]:
    with api_server(celery_stack) as server, server.client() as client:
        yield client


def stored(box: Mailbox) -> int:
    return sum(box.store.counts_by_status().values())


def test_a_batch_answers_every_item_in_order_and_every_one_runs(
        celery_stack: Stack, api: httpx.Client) -> None:
    celery_stack.start_worker()
    items = [{"thread_id": f"batch-{i % 4}", "agent": "echo", "input": f"item {i}"}
             for i in range(20)]
    response = api.post("/v1/dispatches/batch", json={"items": items, "chunk_size": 6})
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["submitted"] == 20
    assert [d["thread_id"] for d in answer["dispatches"]] == [i["thread_id"] for i in items]
    assert all(d["resumed"] is False and d["run_id"] for d in answer["dispatches"])
    for item, receipt in zip(items, answer["dispatches"], strict=True):
        done = wait_json(api, f"/v1/dispatches/{receipt['dispatch_id']}",
                         lambda d: d["status"] == "Acked", what="the item to be Acked")
        assert done["run_response"] == item["input"]
    said = [m["content"] for m in api.get("/v1/threads/batch-1/messages").json()
            if m["role"] == "user"]
    assert said == [i["input"] for i in items if i["thread_id"] == "batch-1"]


@pytest.mark.parametrize(("body", "says"), [
    ({"items": []}, "body.items"),
    ({"items": [{"thread_id": "t", "agent": "echo", "input": 1}] * 1001}, "body.items"),
    ({"items": [{"thread_id": "t", "agent": "echo", "input": 1, "interrupt": True}]},
     "body.items.0.interrupt: Extra inputs"),
    ({"items": [{"thread_id": "t", "agent": "echo", "input": 1},
                {"thread_id": "t", "agent": "echo", "input": 1, "priority": "1"}]},
     "body.items.1.priority"),
    ({"items": [{"thread_id": "t", "agent": "echo", "input": 1},
                {"thread_id": "t", "agent": "nope", "input": 1}]}, "item 1: "),
    ({"items": [{"thread_id": "t", "agent": "echo", "input": 1}], "chunk_size": 0},
     "body.chunk_size"),
])
def test_a_bad_batch_is_a_400_naming_the_item_and_writes_nothing(
        api: httpx.Client, mailbox: Mailbox, body: dict[str, object], says: str) -> None:
    response = api.post("/v1/dispatches/batch", json=body)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]
    assert stored(mailbox) == 0


def test_a_held_dedupe_key_refuses_its_chunk_and_lists_what_was_stored(
        api: httpx.Client, mailbox: Mailbox) -> None:
    held = api.post("/v1/threads/held/dispatches",
                    json={"agent": "echo", "input": "first", "dedupe_key": "k",
                          "delay_ms": 60_000})
    assert held.status_code == 202, held.text
    items = [{"thread_id": f"t-{i}", "agent": "echo", "input": i} for i in range(4)]
    items.append({"thread_id": "held", "agent": "echo", "input": "x", "dedupe_key": "k"})
    response = api.post("/v1/dispatches/batch", json={"items": items, "chunk_size": 2})
    assert response.status_code == 409, response.text
    answer = response.json()
    assert answer["kind"] == "conflict" and answer["index"] == 4 and answer["written"]
    assert "item 4" in answer["error"] and "dedupe_key=k" in answer["error"]
    assert [d["thread_id"] for d in answer["dispatches"]] == [f"t-{i}" for i in range(4)]
    assert stored(mailbox) == 1 + 4
