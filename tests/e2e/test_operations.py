"""Operating the stack: docker-compose services run for real (without Docker), Flower sees
every phase through its HTTP API, and a worker's Prometheus endpoint answers a scrape."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import yaml

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.embedded_redis import free_port
from tasks import dispatch
from tests.support.workers import CELERY, ROOT, Stack

COMPOSE = ROOT / "docker-compose.yml"


def _substitute(text: str) -> str:
    """Compose-style ${VAR:-default} expansion against the environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), text)


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_compose_file_is_valid_and_complete() -> None:
    spec = _compose()
    services = spec["services"]
    assert set(services) == {"redis", "postgres", "migrate", "worker", "beat", "flower"}
    for name in ("redis", "postgres", "worker", "flower"):
        assert "healthcheck" in services[name], name
    for name in ("migrate", "worker", "beat", "flower"):
        env = services[name]["environment"]
        assert env["MAILBOX_DATABASE_URL"].startswith("postgresql://")
        assert env["MAILBOX_REDIS_URL"].startswith("redis://")
    assert "--basic-auth=" in " ".join(services["flower"]["command"])
    assert services["worker"]["depends_on"]["migrate"]["condition"] == \
        "service_completed_successfully"
    assert (ROOT / "Dockerfile").exists()


def _local_env(stack: Stack, service: dict[str, Any], **extra: str) -> dict[str, str]:
    """The service's environment with the compose hostnames swapped for this test's
    services (the same variables, local addresses)."""
    env = stack.env()
    for key in service["environment"]:
        if key in ("MAILBOX_DATABASE_URL", "MAILBOX_REDIS_URL", "CELERY_BROKER_URL",
                   "MAILBOX_NAMESPACE"):
            continue
        env[key] = str(service["environment"][key])
    env.update(extra)
    return env


def _command(service: dict[str, Any]) -> list[str]:
    """The service's command, with `python`/`celery` taken from this virtualenv (the image
    installs the project into its system Python; here the venv plays that part)."""
    command = [_substitute(part) for part in service["command"]]
    if command[0] == "python":
        command[0] = sys.executable
    elif command[0] == "celery":
        command[0] = CELERY
    return command


def test_compose_services_start_locally(celery_stack: Stack, mailbox: Mailbox) -> None:
    services = _compose()["services"]
    migrate = subprocess.run(_command(services["migrate"]), cwd=ROOT,
                             env=_local_env(celery_stack, services["migrate"]),
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    assert "revision" in migrate.stdout

    metrics_port, flower_port = free_port(), free_port()
    started: list[subprocess.Popen[bytes]] = []
    try:
        for name, extra in (("worker", {"MAILBOX_METRICS_PORT": str(metrics_port)}),
                            ("beat", {}), ("flower", {})):
            command = _command(services[name])
            if name == "beat":
                command = [c.replace("/app/var", str(celery_stack.workdir)) for c in command]
            if name == "flower":
                command = [c if not c.startswith("--port=") else f"--port={flower_port}"
                           for c in command]
            command += ["-Q", celery_stack.namespace] if name == "worker" else []
            log = celery_stack.workdir / f"compose-{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                                        env=_local_env(celery_stack, services[name], **extra),
                                        stdout=out, stderr=subprocess.STDOUT)
            started.append(proc)
            celery_stack.processes.append(proc)
        _wait_http(f"http://127.0.0.1:{metrics_port}/metrics", timeout_s=60)
        auth = base64.b64encode(b"admin:change-me").decode()
        body = _wait_http(f"http://127.0.0.1:{flower_port}/api/workers", timeout_s=60,
                          headers={"Authorization": f"Basic {auth}"})
        assert isinstance(json.loads(body), dict)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/api/workers", timeout=5)
        time.sleep(1)
        for proc in started:
            assert proc.poll() is None, (celery_stack.workdir / "compose-beat.log").read_text()
    finally:
        for proc in started:
            Stack.kill(proc)


def _wait_http(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> str:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=3) as response:
                return str(response.read().decode())
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout_s}s: {last}")


def test_worker_metrics_endpoint_reports_store_operations(celery_stack: Stack,
                                                          publisher: Mailbox) -> None:
    port = free_port()
    celery_stack.start_worker(concurrency=2, MAILBOX_METRICS_PORT=str(port))
    result = dispatch.delay("thread-metrics", "echo", "count me")
    assert publisher.wait(result.id, timeout_s=30).status == DispatchStatus.Acked
    text = _wait_http(f"http://127.0.0.1:{port}/metrics", timeout_s=30)
    assert 'mailbox_operations_total{operation="claim",result="ok"}' in text
    assert 'mailbox_operations_total{operation="ack",result="ok"}' in text
    assert 'mailbox_dispatch_depth{status="acked"} 1.0' in text
    assert "mailbox_dispatch_runtime_seconds_bucket" in text
    assert "mailbox_dispatch_enqueue_to_start_seconds_bucket" in text


def test_flower_sees_all_five_phases_with_ids_only(celery_stack: Stack,
                                                   publisher: Mailbox) -> None:
    port = free_port()
    flower = subprocess.Popen(
        [CELERY, "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT, env=celery_stack.env(FLOWER_UNAUTHENTICATED_API="true"),
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    celery_stack.processes.append(flower)
    _wait_http(f"http://127.0.0.1:{port}/healthcheck", timeout_s=60)
    celery_stack.start_worker(concurrency=2, MAILBOX_WORKER_EVENTS="1")
    time.sleep(1.0)  # Flower must be listening for events before the tasks run
    secret = "do-not-show-this-payload"
    result = dispatch.delay("thread-flower", "echo", secret)
    assert publisher.wait(result.id, timeout_s=30).status == DispatchStatus.Acked
    wanted = {"mailbox.dispatch", "mailbox.verify", "mailbox.reconstruct", "mailbox.resolve",
              "mailbox.execute", "mailbox.settle"}
    deadline = time.monotonic() + 30
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and not wanted <= set(seen):
        tasks = json.loads(_wait_http(f"http://127.0.0.1:{port}/api/tasks", timeout_s=10))
        for info in tasks.values():
            if info.get("name") in wanted and result.id in str(info.get("args", "")):
                seen[info["name"]] = info
        time.sleep(0.5)
    assert wanted <= set(seen), sorted(seen)
    for info in seen.values():
        assert result.id in str(info.get("args")), info
        assert "thread-flower" in str(info.get("args")), info
        assert secret not in str(info.get("args")) and secret not in str(info.get("kwargs"))
