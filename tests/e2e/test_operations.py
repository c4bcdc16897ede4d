"""Operating the stack: docker-compose.yml's services run for real (without Docker), with their
passwords, health checks, Flower's basic auth and the API's bearer tokens; a dispatch
through them never shows its claim token or payload to Flower; Flower sees every phase by
its ids; a worker's Prometheus endpoint answers a scrape."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mailbox import DispatchStatus, Mailbox
from mailbox.database import scratch_postgres_schema
from mailbox.dev.embedded_redis import EmbeddedRedis, free_port
from tasks import dispatch
from tests.conftest import BACKENDS, POSTGRES_URL
from tests.support.e2e_helpers import wait_until
from tests.support.local_compose import LocalCompose, http_get
from tests.support.services import require
from tests.support.workers import CELERY, ROOT, Stack

SECRETS = {"REDIS_PASSWORD": uuid.uuid4().hex, "POSTGRES_PASSWORD": uuid.uuid4().hex,
           "FLOWER_PASSWORD": uuid.uuid4().hex, "MAILBOX_API_TOKENS": uuid.uuid4().hex}
FLOWER_AUTH = ("admin", SECRETS["FLOWER_PASSWORD"])
PHASES = ("mailbox.verify", "mailbox.reconstruct", "mailbox.resolve", "mailbox.execute",
          "mailbox.settle")
PAYLOAD = "do-not-show-this-payload"


@pytest.fixture(scope="module", params=BACKENDS)
def compose_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('compose') / 'mailbox.sqlite3'}"
        return
    if not POSTGRES_URL:
        require("postgres", "MAILBOX_TEST_POSTGRES_URL is not set")
    with scratch_postgres_schema(POSTGRES_URL, "compose") as url:
        yield url


@pytest.fixture(scope="module")
def local_compose(compose_database: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[LocalCompose]:
    """Every service of docker-compose.yml but PostgreSQL, started in the order its
    depends_on gives, each healthy by its own health check."""
    local = LocalCompose(SECRETS, compose_database, tmp_path_factory.mktemp("compose-run"))
    try:
        for name in ("redis", "redis-broker"):
            local.start_redis(name)
            local.wait_healthy(name)
        migrate = local.run("migrate")
        assert migrate.returncode == 0, migrate.stderr
        assert "revision" in migrate.stdout
        for name in ("worker", "beat", "flower", "api"):
            local.spawn(name)
        for name in ("worker", "beat", "flower", "api"):
            local.wait_healthy(name)
        yield local
    finally:
        local.stop()


def test_compose_services_start_locally_and_stay_up(local_compose: LocalCompose) -> None:
    time.sleep(1)
    for proc in local_compose.processes:
        assert proc.poll() is None, local_compose.logs()
    metrics = http_get(f"http://127.0.0.1:{local_compose.ports['worker']}/metrics", 30)
    assert "mailbox_operations_total" in metrics or "mailbox_dispatch_depth" in metrics


def test_compose_services_refuse_callers_without_the_secrets(
        local_compose: LocalCompose) -> None:
    flower = f"http://127.0.0.1:{local_compose.ports['flower']}/api/workers"
    assert isinstance(json.loads(http_get(flower, 30, auth=FLOWER_AUTH)), dict)
    for headers in ({}, {"Authorization": "Basic YWRtaW46d3Jvbmc="}):  # admin:wrong
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(flower, headers=headers), timeout=5)
        assert refused.value.code == 401
    for name in ("redis", "redis-broker"):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=local_compose.ports[name]).ping()
        assert local_compose.healthcheck(name, REDISCLI_AUTH="wrong").returncode != 0
        info = redis.Redis(port=local_compose.ports[name], password=SECRETS["REDIS_PASSWORD"]
                           ).config_get("maxmemory*")
        assert info["maxmemory-policy"] == "noeviction" and int(info["maxmemory"]) > 0
    api = f"http://127.0.0.1:{local_compose.ports['api']}/v1/stats"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=5)
        assert refused.value.code == 401
    bearer = {"Authorization": f"Bearer {SECRETS['MAILBOX_API_TOKENS']}"}
    with urllib.request.urlopen(urllib.request.Request(api, headers=bearer), timeout=5) as ok:
        assert "counts" in json.loads(ok.read())
    broker_down = local_compose.healthcheck(
        "beat", CELERY_BROKER_URL=f"redis://:wrong@127.0.0.1:"
                                  f"{local_compose.ports['redis-broker']}/0")
    assert broker_down.returncode != 0


def test_flower_never_sees_a_claim_token_or_payload(local_compose: LocalCompose,
                                                    compose_database: str) -> None:
    """The compose worker runs with -E: the task-succeeded events carry each phase's return
    value, and Flower shows it as the task's result."""
    def submit(thread_id: str, agent: str, input: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mailbox", "submit", thread_id, agent, input, "--json"],
            cwd=ROOT, env=local_compose.env("worker"), capture_output=True, text=True,
            timeout=60)
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["dispatch_id"])

    _until_flower_listens(local_compose.ports["flower"], FLOWER_AUTH,
                          lambda thread_id: submit(thread_id, "echo", "probe"))
    dispatch_id = submit("thread-compose", "sleep", json.dumps({"ms": 1500, "note": PAYLOAD}))
    box = Mailbox.connect(compose_database, local_compose.env("worker")["MAILBOX_REDIS_URL"],
                          namespace="mailbox")
    try:
        token = _claim_token(box, dispatch_id)
        assert box.wait(dispatch_id, timeout_s=60).status == DispatchStatus.Acked
    finally:
        box.close()
    flower = local_compose.ports["flower"]
    tasks = _phase_tasks(flower, dispatch_id, FLOWER_AUTH, wanted=frozenset(PHASES))
    everything = http_get(f"http://127.0.0.1:{flower}/api/tasks", 10, auth=FLOWER_AUTH)
    assert token not in everything and PAYLOAD not in everything
    for name in PHASES:
        assert tasks[name]["result"] == f"dispatch={dispatch_id} thread=thread-compose", \
            tasks[name]


def _until_flower_listens(port: int, auth: tuple[str, str] | None,
                          submit: Callable[[str], str], timeout_s: float = 90) -> None:
    """Flower must receive the task events before the tasks under test run: submit probe
    dispatches (each on a thread of its own) until Flower has shown one of their tasks."""
    deadline = time.monotonic() + timeout_s
    probes: list[str] = []
    while True:
        probes.append(f"flower-probe-{len(probes)}")
        submit(probes[-1])
        shows_by = min(deadline, time.monotonic() + 10)
        while time.monotonic() < shows_by:
            tasks = json.loads(http_get(f"http://127.0.0.1:{port}/api/tasks", 10, auth=auth))
            if any(probe in str(info.get("args", "")) for info in tasks.values()
                   for probe in probes):
                return
            time.sleep(0.2)
        assert time.monotonic() < deadline, (
            f"Flower showed none of the tasks of {len(probes)} probe dispatches in "
            f"{timeout_s}s")


def _claim_token(box: Mailbox, dispatch_id: str, timeout_s: float = 30) -> str:
    """The dispatch's claim token, read from the database while its agent runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = box.get_dispatch(dispatch_id)
        if current is not None and current.status == DispatchStatus.Claimed:
            assert current.claim_token
            return current.claim_token
        time.sleep(0.02)
    raise AssertionError(f"{dispatch_id} was not claimed within {timeout_s}s")


def _phase_tasks(port: int, dispatch_id: str, auth: tuple[str, str] | None = None,
                 wanted: frozenset[str] = frozenset({"mailbox.dispatch", *PHASES}),
                 timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    """Flower's record of the dispatch's tasks (by default its wake-up, which only
    `dispatch.delay` names by dispatch id, and its five phases), once all have succeeded."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        tasks = json.loads(http_get(f"http://127.0.0.1:{port}/api/tasks", 10, auth=auth))
        seen = {info["name"]: info for info in tasks.values()
                if info.get("name") in wanted and dispatch_id in str(info.get("args", ""))
                and info.get("state") == "SUCCESS"}
        if wanted <= set(seen):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"Flower saw only {sorted(seen)}")


def test_worker_metrics_endpoint_reports_store_operations(celery_stack: Stack,
                                                          publisher: Mailbox) -> None:
    port = free_port()
    celery_stack.start_worker(concurrency=2, MAILBOX_METRICS_PORT=str(port))
    result = dispatch.delay("thread-metrics", "echo", "count me")
    assert publisher.wait(result.id, timeout_s=30).status == DispatchStatus.Acked
    text = http_get(f"http://127.0.0.1:{port}/metrics", 30)
    assert 'mailbox_operations_total{operation="claim",result="ok"}' in text
    assert 'mailbox_operations_total{operation="ack",result="ok"}' in text
    assert 'mailbox_dispatch_depth{status="acked"} 1.0' in text
    assert "mailbox_dispatch_runtime_seconds_bucket" in text
    assert "mailbox_dispatch_enqueue_to_start_seconds_bucket" in text
    [offset] = [line for line in text.splitlines()
                if line.startswith("mailbox_clock_offset_seconds ")]
    assert abs(float(offset.split()[1])) < 1, offset


def test_flower_sees_all_five_phases_with_ids_only(celery_stack: Stack,
                                                   publisher: Mailbox) -> None:
    port = free_port()
    flower = subprocess.Popen(
        [CELERY, "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT, env=celery_stack.env(FLOWER_UNAUTHENTICATED_API="true"),
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    celery_stack.processes.append(flower)
    http_get(f"http://127.0.0.1:{port}/healthcheck", 60)
    celery_stack.start_worker(concurrency=2, MAILBOX_WORKER_EVENTS="1")
    _until_flower_listens(port, None,
                          lambda thread_id: dispatch.delay(thread_id, "echo", "probe").id)
    result = dispatch.delay("thread-flower", "echo", PAYLOAD)
    assert publisher.wait(result.id, timeout_s=30).status == DispatchStatus.Acked
    seen = _phase_tasks(port, result.id)
    ids = f"dispatch={result.id} thread=thread-flower"
    for name, info in seen.items():
        assert result.id in str(info.get("args")), info
        assert "thread-flower" in str(info.get("args")), info
        assert PAYLOAD not in json.dumps(info), info
        if name in PHASES:
            assert info.get("result") == ids, info


# Which Redis of the worker is one of its own, set to evict any key (the shared test Redis
# must not change), and what the worker's log then says. The coordination Redis is checked
# by the sweep the worker publishes as it starts; a broker of its own is where the worker
# consumes that sweep from, and the sweep checks it by the broker's rule.
EVICTING = {
    "coordination": ("MAILBOX_REDIS_URL", ["may evict the mailbox's keys",
                                           "allkeys-lru on redis"]),
    "broker": ("CELERY_BROKER_URL", ["broker may evict queued messages", "allkeys-lru"]),
}


@pytest.mark.parametrize("which", list(EVICTING))
def test_a_worker_on_a_redis_that_may_evict_says_so_in_its_log(
        celery_stack: Stack, tmp_path: Path, which: str) -> None:
    variable, expected = EVICTING[which]
    server = EmbeddedRedis(workdir=tmp_path / f"evicting-{which}")
    server.start()
    try:
        client = redis.Redis(port=server.port)
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.close()
        celery_stack.start_worker(concurrency=1, **{variable: server.url})

        def warned() -> bool:
            text = "".join(log.read_text(errors="replace")
                           for log in celery_stack.workdir.glob("worker*.log"))
            return all(part in text for part in expected)

        wait_until(warned, 60, f"the {which} eviction warning in the worker's log",
                   celery_stack)
    finally:
        server.stop()
