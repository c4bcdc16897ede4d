"""A real `python -m mailbox serve` process (uvicorn) for the HTTP API and dashboard tests.

It shares the database, Redis and namespace of a worker `Stack` (its environment), so what a
test submits over HTTP is run by the stack's workers. Its log goes into the stack's workdir,
so a failed test shows it with the workers' logs (tests/conftest.py).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mailbox.dev.embedded_redis import free_port
from tests.support.workers import ROOT, Stack


@dataclass
class ApiServer:
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, **options: Any) -> httpx.Client:
        """A client that sends the bearer token."""
        headers = {"Authorization": f"Bearer {self.token}", **options.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **options)

    def anonymous(self, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **options)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_server(stack: Stack, *, name: str = "api", token: str | None = None,
                 **env: str) -> ApiServer:
    token = token if token is not None else secrets.token_urlsafe(24)
    port = free_port()
    log = stack.workdir / f"{name}.log"
    environment = stack.env(MAILBOX_API_HOST="127.0.0.1", MAILBOX_API_PORT=str(port),
                            MAILBOX_API_TOKENS=token, **env)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mailbox", "serve"], cwd=ROOT,
                                env=environment, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = ApiServer(f"http://127.0.0.1:{port}", token, proc, log)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the API server exited ({proc.returncode}):\n{server.logs()}")
        try:
            httpx.get(f"{server.url}/healthz", timeout=2)  # 200 or 503: it answers
            return server
        except httpx.TransportError:
            if time.monotonic() > deadline:
                stop_server(server)
                raise TimeoutError(f"the API server did not answer in 60 s:\n{server.logs()}"
                                   ) from None
            time.sleep(0.1)


def stop_server(server: ApiServer) -> None:
    Stack.kill(server.proc)


@contextmanager
def api_server(stack: Stack, **options: Any) -> Iterator[ApiServer]:
    server = start_server(stack, **options)
    try:
        yield server
    finally:
        stop_server(server)


def wait_json(client: httpx.Client, path: str, done: Any, timeout_s: float = 60,
              what: str = "") -> dict[str, Any]:
    """GET `path` until `done(body)` holds; the body. Fails naming what it waited for."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(path)
        if response.status_code == 200:
            body = response.json()
            if done(body):
                return body
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or path}; last: "
                         f"{body}")
