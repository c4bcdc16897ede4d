"""The HTTP API (`python -m mailbox serve`) as a client sees it: a real uvicorn process over
the test's database, Redis and namespace, real workers behind it, httpx in front.

This file: submitting and reading back, every error answer of the submit and of the reads
(400 with nothing written, 409, 404, 413), 401 on every route of the app (enumerated from the
app itself, so a new route is covered without touching this file) with nothing written, the
two 503s of a submit (store down: nothing written; broker down: stored, ids given, delivered
by a worker's sweep) and /healthz naming what is down, and the server refusing to start
without a token. tests/e2e/test_http_streams.py has the event streams, thread control and the
dead letter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from mailbox import Mailbox
from mailbox.http.app import ROUTERS
from tests.support.http_server import ApiServer, api_server, wait_json
from tests.support.workers import ROOT, Stack

pytestmark = pytest.mark.stack_env(MAILBOX_AGENT_MODULES="tests.support.custom_agents",
                                   MAILBOX_API_SSE_KEEPALIVE_S="2")


@pytest.fixture
def server(celery_stack: Stack) -> Iterator[ApiServer]:
    with api_server(celery_stack) as running:
        yield running


@pytest.fixture
def api(server: ApiServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def _submit(api: httpx.Client, thread: str, agent: str, value: object, **options: object
            ) -> dict[str, str]:
    response = api.post(f"/v1/threads/{thread}/dispatches",
                        json={"agent": agent, "input": value, **options})
    assert response.status_code == 202, response.text
    return dict(response.json())


# ============================================================================ submit, read
def test_a_submit_answers_202_and_its_records_read_back(celery_stack: Stack, api: httpx.Client
                                                        ) -> None:
    celery_stack.start_worker()
    ids = _submit(api, "chat-1", "echo", "hello")
    assert set(ids) == {"dispatch_id", "run_id", "thread_id"} and ids["thread_id"] == "chat-1"
    dispatch = wait_json(api, f"/v1/dispatches/{ids['dispatch_id']}",
                         lambda d: d["status"] == "Acked", what="the dispatch to be Acked")
    assert dispatch["run_id"] == ids["run_id"] and dispatch["run_response"] == "hello"
    assert "claim_token" not in dispatch, "the fencing token never leaves the server"
    run = api.get(f"/v1/runs/{ids['run_id']}").json()
    assert run["status"] == "done" and run["response"] == "hello"
    assert run["termination"] == {"type": "natural_end"}

    listed = api.get("/v1/threads/chat-1/dispatches").json()
    assert [d["dispatch_id"] for d in listed] == [ids["dispatch_id"]]
    assert api.get("/v1/threads/chat-1/dispatches", params={"status": "Acked"}).json() == listed
    assert api.get("/v1/threads/chat-1/dispatches?status=Queued,Claimed").json() == []
    messages = api.get("/v1/threads/chat-1/messages").json()
    assert [(m["role"], m["content"]) for m in messages] == [("user", "hello"),
                                                             ("assistant", "hello")]
    assert api.get("/v1/threads/chat-1/messages", params={"limit": 1}).json() == messages[1:]
    older = api.get("/v1/threads/chat-1/messages", params={"before": messages[1]["seq"]})
    assert older.json() == messages[:1]

    # Any thread id: a slash and a space travel percent-encoded.
    odd = _submit(api, "team%2Fa%20b", "echo", {"json": [1, 2]}, priority=0)
    assert odd["thread_id"] == "team/a b"
    done = wait_json(api, f"/v1/dispatches/{odd['dispatch_id']}",
                     lambda d: d["status"] == "Acked")
    assert done["thread_id"] == "team/a b" and done["priority"] == 0
    assert json.loads(done["run_response"]) == {"json": [1, 2]}
    assert len(api.get("/v1/threads/team%2Fa%20b/dispatches").json()) == 1


BAD_SUBMITS: list[tuple[str, object, str]] = [
    ("chat-bad", {"agent": "nope", "input": "x"}, "unknown agent 'nope'"),
    ("chat-bad", {"agent": "echo"}, "body.input: Field required"),
    ("chat-bad", {"agent": "echo", "input": "x", "priority": 256}, "priority must be an "
                                                                    "integer within 0..255"),
    ("chat-bad", {"agent": "echo", "input": "x", "priority": "1"}, "body.priority"),
    ("chat-bad", {"agent": "echo", "input": "x", "interrupt": "no"}, "body.interrupt"),
    ("chat-bad", {"agent": "echo", "input": "x", "priorty": 1}, "body.priorty: Extra inputs"),
    ("chat-bad", {"agent": "echo", "input": "x", "delay_ms": -1}, "delay_ms"),
    ("chat-bad", {"agent": "echo", "input": "x", "max_attempts": 0}, "max_attempts"),
    ("chat-bad", {"agent": "echo", "input": "x" * (300 * 1024)}, "input"),
    ("chat-bad", {"agent": "flaky", "input": "not an object"}, "fail_times"),
    ("chat-bad", ["agent", "echo"], "must be a JSON object"),
    ("%20", {"agent": "echo", "input": "x"}, "thread_id must be a non-empty string"),
]


def test_every_bad_submit_is_a_400_naming_the_problem_and_writes_nothing(
        api: httpx.Client, mailbox: Mailbox) -> None:
    for thread, body, expected in BAD_SUBMITS:
        response = api.post(f"/v1/threads/{thread}/dispatches", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()
        assert error["kind"] == "validation" and expected in error["error"], (body, error)
    for raw, expected in ((b'{"agent": "echo", "input": ', "not valid JSON"),
                          (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
                          (b"\xff\xfe", "not valid JSON")):
        response = api.post("/v1/threads/chat-bad/dispatches", content=raw,
                            headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and expected in response.json()["error"], \
            response.text
    big = json.dumps({"agent": "echo", "input": "x" * (2 * 1024 * 1024)}).encode()
    response = api.post("/v1/threads/chat-bad/dispatches", content=big,
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "MAILBOX_API_MAX_BODY_BYTES" in response.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused once past the limit
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    response = api.post("/v1/threads/chat-bad/dispatches", content=chunks(),
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert mailbox.store.list_dispatches("chat-bad") == []
    assert sum(api.get("/v1/stats").json()["counts"].values()) == 0, "something was written"


def test_conflicts_and_unknown_ids(api: httpx.Client) -> None:
    first = _submit(api, "chat-dedupe", "echo", "x", dedupe_key="k1", delay_ms=600_000)
    again = api.post("/v1/threads/chat-dedupe/dispatches",
                     json={"agent": "echo", "input": "y", "dedupe_key": "k1"})
    assert again.status_code == 409 and again.json()["kind"] == "conflict"
    assert "k1" in again.json()["error"]
    assert [d["dispatch_id"] for d in api.get("/v1/threads/chat-dedupe/dispatches").json()] \
        == [first["dispatch_id"]]
    for method, path, body in (
            ("GET", "/v1/dispatches/nope", None), ("GET", "/v1/runs/nope", None),
            ("POST", "/v1/dispatches/nope/cancel", None),
            ("POST", "/v1/threads/no-such-thread/interrupt", None),
            ("POST", "/v1/runs/nope/resume", {"decision": "yes"}),
            ("GET", "/v1/runs/nope/events", None),
            ("POST", "/v1/dead-letters/nope/replay", None),
            ("DELETE", "/v1/dead-letters/nope", None)):
        response = api.request(method, path, json=body)
        assert response.status_code == 404, (path, response.text)
        error = response.json()
        assert error["kind"] == "not_found", error
        assert "nope" in error["error"] or "no-such-thread" in error["error"], error
    unknown = api.get("/v1/no-such-route")
    assert unknown.status_code == 404 and "no such route" in unknown.json()["error"]
    assert api.delete("/v1/stats").status_code == 405
    for params, expected in (({"status": "Bogus"}, "unknown status 'Bogus'"),
                             ({"limit": "many"}, "query.limit"),
                             ({"limit": 5000}, "query.limit")):
        response = api.get("/v1/threads/chat-dedupe/dispatches", params=params)
        assert response.status_code == 400 and expected in response.json()["error"]


# ==================================================================================== auth
def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app includes (mailbox.http.app.ROUTERS)."""
    found = []
    for router in ROUTERS:
        for route in router.routes:
            assert isinstance(route, APIRoute), route
            found += [(method, route.path) for method in sorted(route.methods) if
                      method != "HEAD"]
    return found


OPEN = {"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/ui/login"}


def test_every_v1_and_ui_route_refuses_a_missing_or_wrong_token_and_writes_nothing(
        server: ApiServer, api: httpx.Client, mailbox: Mailbox) -> None:
    queued = _submit(api, "chat-401", "echo", "x", delay_ms=600_000)
    fill = {"{thread_id:path}": "chat-401", "{dispatch_id}": queued["dispatch_id"],
            "{run_id}": queued["run_id"]}
    routes = _routes()
    guarded = [(m, p) for m, p in routes if p not in OPEN]
    assert {p for _, p in guarded} >= {"/v1/threads/{thread_id:path}/dispatches", "/ui",
                                       "/ui/runs/{run_id}/events", "/v1/stats"}
    assert all(p.startswith(("/v1/", "/ui")) for _, p in guarded), guarded
    bodies = {"POST": {"agent": "echo", "input": "sneaky", "decision": "yes", "force": True}}
    wrong = [{}, {"Authorization": "Bearer wrong-token-000000000000"},
             {"Authorization": f"Basic {server.token}"}, {"Authorization": server.token},
             {"Cookie": "mailbox_session=forged.eyJjc3JmIjoieCJ9.abc.def"}]
    with server.anonymous() as anonymous:
        for method, template in guarded:
            path = template
            for key, value in fill.items():
                path = path.replace(key, value)
            for headers in wrong:
                response = anonymous.request(method, path, json=bodies.get(method),
                                             headers=headers)
                if path.startswith("/ui") and response.status_code == 303:
                    assert method == "GET", (method, path)
                    assert response.headers["location"].startswith("/ui/login?next=")
                    login = anonymous.get(response.headers["location"])
                    assert login.status_code == 401, (path, login.status_code)
                    continue
                assert response.status_code == 401, (method, path, headers, response.text)
                if path.startswith("/v1"):
                    assert "bearer token" in response.json()["error"]
                    assert response.headers["www-authenticate"].startswith("Bearer")
            html = anonymous.get(path, headers={"Accept": "text/html"}) \
                if method == "GET" and path.startswith("/ui") else None
            if html is not None:
                assert html.status_code == 303, path
        for path in ("/healthz", "/docs", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
    # Nothing of it happened: one dispatch, still queued, thread not interrupted.
    listed = api.get("/v1/threads/chat-401/dispatches").json()
    assert [(d["dispatch_id"], d["status"]) for d in listed] == [(queued["dispatch_id"],
                                                                   "Queued")]
    assert listed[0]["dispatch_epoch"] == mailbox.store.sql_epoch("chat-401")
    assert mailbox.dead_letters() == []


# ==================================================================================== 503
def _unreachable_database(mailbox: Mailbox, tmp_path: Path) -> str:
    if mailbox.settings.database_url.startswith("sqlite"):
        blocker = tmp_path / "a-directory"  # SQLite cannot open a directory as a database
        blocker.mkdir()
        return f"sqlite:///{blocker}"
    return "postgresql://postgres@127.0.0.1:1/test"


def test_store_down_is_503_with_nothing_written_and_healthz_names_the_database(
        celery_stack: Stack, mailbox: Mailbox, tmp_path: Path) -> None:
    with api_server(celery_stack, name="api-db-down",
                    MAILBOX_DATABASE_URL=_unreachable_database(mailbox, tmp_path)) as down, \
            down.client() as api:
        response = api.post("/v1/threads/chat-503/dispatches",
                            json={"agent": "echo", "input": "x"})
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["kind"] == "store_unavailable" and body["written"] is False, body
        health = api.get("/healthz")
        assert health.status_code == 503 and health.json()["error"] == "unreachable: database"
        assert health.json()["checks"]["redis"] == {"ok": True}
        assert health.json()["checks"]["broker"] == {"ok": True}
        assert api.get("/v1/stats").status_code == 503
    assert mailbox.store.list_dispatches("chat-503") == []


def test_broker_down_is_503_stored_with_the_ids_and_a_worker_delivers_it(
        celery_stack: Stack, mailbox: Mailbox) -> None:
    with api_server(celery_stack, name="api-broker-down",
                    CELERY_BROKER_URL="redis://127.0.0.1:1/0") as down, down.client() as api:
        response = api.post("/v1/threads/chat-nobroker/dispatches",
                            json={"agent": "echo", "input": "still durable"})
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["kind"] == "wake_not_published" and body["stored"] is True, body
        assert body["thread_id"] == "chat-nobroker" and body["run_id"] and body["dispatch_id"]
        assert "stored durably" in body["error"]
        stored = api.get(f"/v1/dispatches/{body['dispatch_id']}").json()
        assert stored["status"] == "Queued" and stored["run_id"] == body["run_id"]
        health = api.get("/healthz")
        assert health.status_code == 503 and health.json()["error"] == "unreachable: broker"
    celery_stack.start_worker()  # its start-up sweep wakes the stranded thread
    assert mailbox.wait(body["dispatch_id"], timeout_s=60).run_response == "still durable"


def test_healthz_and_stats(celery_stack: Stack, api: httpx.Client) -> None:
    health = api.get("/healthz")
    assert health.status_code == 200 and health.json()["ok"] is True
    assert set(health.json()["checks"]) == {"database", "redis", "broker"}
    _submit(api, "chat-stats", "echo", "x", delay_ms=600_000)
    stats = api.get("/v1/stats").json()
    assert stats["counts"]["Queued"] == 1 and stats["threads_with_queued"] == 1
    assert stats["oldest_queued_age_ms"] >= 0 and stats["runs_waiting"] == 0
    assert abs(stats["clock_offset_ms"]) < 1000 and stats["clock_beyond_limit"] is False
    assert set(stats["settled"]) == {"last_60s", "last_300s", "last_3600s"}


# ================================================================= refusing to start
def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILBOX_API")}
    return subprocess.run([sys.executable, "-m", "mailbox", "serve", *args], cwd=ROOT,
                          env={**base, **env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=60)


def test_the_server_refuses_to_start_without_a_usable_token() -> None:
    missing = _serve({})
    assert missing.returncode == 1 and "MAILBOX_API_TOKENS" in missing.stderr, missing
    short = _serve({"MAILBOX_API_TOKENS": "secret"})
    assert short.returncode == 1 and "at least 16" in short.stderr, short
    exposed = _serve({"MAILBOX_API_INSECURE_NO_AUTH": "1"}, "--host", "0.0.0.0")
    assert exposed.returncode == 1 and "loopback" in exposed.stderr, exposed
