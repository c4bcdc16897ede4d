"""The development stack: embedded Redis, SQLite, a worker, beat, Flower and the HTTP API with
its dashboard as child processes.

`python -m mailbox up` runs it in the foreground and `make demo` runs a workload through it.
Everything lives under `var/` of the project; the Redis URL is written to `var/redis.url` so
every other process of the project (the CLI, `dispatch.delay()` callers) finds it without
configuration. Ctrl-C (or SIGTERM) stops every process the stack started, and a second start
works because nothing is left behind but files.

The API needs a token (mailbox/http/auth.py): the stack uses MAILBOX_API_TOKENS when set, else
generates one, prints it and keeps it in `var/api.token` (readable by its owner only) for
curl and the dashboard's login.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.errors import MailboxError
from mailbox.settings import DEV_REDIS_URL_FILE, PROJECT_ROOT, Settings

VAR = PROJECT_ROOT / "var"
LOGS = VAR / "log"
FLOWER_PORT = int(os.environ.get("MAILBOX_FLOWER_PORT", "5555"))
METRICS_PORT = int(os.environ.get("MAILBOX_METRICS_PORT", "9808"))
API_PORT = int(os.environ.get("MAILBOX_API_PORT", "8000"))
API_TOKEN_FILE = VAR / "api.token"


@dataclass
class DevStack:
    concurrency: int = 2
    flower: bool = True
    api: bool = True
    api_token: str | None = None
    """The token the API accepts: the first of MAILBOX_API_TOKENS, else generated."""
    api_token_generated: bool = False
    redis: EmbeddedRedis | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------------------ start
    def start(self, say: Callable[[str], None] = print) -> DevStack:
        LOGS.mkdir(parents=True, exist_ok=True)
        settings = Settings.from_env()
        redis_url = os.environ.get("MAILBOX_REDIS_URL")
        if not redis_url:
            self.redis = EmbeddedRedis(workdir=VAR / "redis")
            redis_url = self.redis.start()
            DEV_REDIS_URL_FILE.write_text(redis_url + "\n")
            say(f"embedded Redis      {redis_url}")
        self.env = {**os.environ, "MAILBOX_REDIS_URL": redis_url,
                    "CELERY_BROKER_URL": os.environ.get("CELERY_BROKER_URL", redis_url),
                    "MAILBOX_DATABASE_URL": settings.database_url,
                    "MAILBOX_METRICS_PORT": str(METRICS_PORT),
                    "PYTHONPATH": str(PROJECT_ROOT)}
        say(f"database            {settings.database_url}")
        self._run_checked([sys.executable, "-m", "mailbox", "db", "upgrade"], "migrate")
        celery = str(Path(sys.executable).parent / "celery")
        self._spawn("worker", [celery, "-A", "tasks", "worker", "-c", str(self.concurrency),
                               "-E", "-l", "INFO", "-n", f"dev-{os.getpid()}@%h",
                               f"--logfile={LOGS / 'worker.log'}"])
        self._spawn("beat", [celery, "-A", "tasks", "beat", "-l", "INFO",
                             "-s", str(VAR / "celerybeat-schedule"),
                             f"--logfile={LOGS / 'beat.log'}"])
        if self.flower:
            self._spawn("flower", [celery, "-A", "tasks", "flower", f"--port={FLOWER_PORT}",
                                   "--address=127.0.0.1", f"--logfile={LOGS / 'flower.log'}"],
                        FLOWER_UNAUTHENTICATED_API="true")
        if self.api:
            self._spawn("api", [sys.executable, "-m", "mailbox", "serve", "--host",
                                "127.0.0.1", "--port", str(API_PORT)], **self._api_env(settings))
        self._wait_for_worker()
        say(f"worker (-c {self.concurrency})       ready   logs: {LOGS}")
        if self.api:
            self._wait_for_api()
            token = self.api_token if self.api_token_generated else "one of MAILBOX_API_TOKENS"
            say(f"API + dashboard     ready   token: {token}")
        return self

    def _api_env(self, settings: Settings) -> dict[str, str]:
        """The API's token (generated unless MAILBOX_API_TOKENS has some) and Flower's URL."""
        tokens = list(settings.api_tokens)
        if not tokens:
            tokens = [secrets.token_urlsafe(24)]
            self.api_token_generated = True
            API_TOKEN_FILE.unlink(missing_ok=True)
            fd = os.open(API_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(tokens[0] + "\n")
        self.api_token = tokens[0]
        env = {"MAILBOX_API_TOKENS": ",".join(tokens)}
        if self.flower:
            env["MAILBOX_API_FLOWER_URL"] = f"http://127.0.0.1:{FLOWER_PORT}"
        return env

    def _wait_for_api(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            api = self.processes["api"]
            if api.poll() is not None:
                self.stop()
                raise MailboxError(f"the API server exited ({api.returncode}); see "
                                   f"{LOGS / 'api.out'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{API_PORT}/healthz",
                                            timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answers (503 names what it cannot reach yet)
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise MailboxError(f"the API server did not answer within {timeout_s:.0f}s; see {LOGS}")

    def _run_checked(self, args: list[str], name: str) -> None:
        done = subprocess.run(args, cwd=PROJECT_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            self.stop()
            raise MailboxError(f"{name} failed: {done.stderr.strip() or done.stdout.strip()}")

    def _spawn(self, name: str, args: list[str], **extra_env: str) -> None:
        with open(LOGS / f"{name}.out", "wb") as output:  # the child keeps its own copy
            self.processes[name] = subprocess.Popen(
                args, cwd=PROJECT_ROOT, env={**self.env, **extra_env}, start_new_session=True,
                stdout=output, stderr=subprocess.STDOUT)

    def _wait_for_worker(self, timeout_s: float = 60) -> None:
        log = LOGS / "worker.log"
        deadline = time.monotonic() + timeout_s
        offset = log.stat().st_size if log.exists() else 0
        while time.monotonic() < deadline:
            worker = self.processes["worker"]
            if worker.poll() is not None:
                self.stop()
                raise MailboxError(f"the worker exited ({worker.returncode}); see {LOGS}")
            if log.exists():
                with log.open(errors="replace") as handle:
                    handle.seek(offset)
                    if "ready." in handle.read():
                        return
            time.sleep(0.2)
        self.stop()
        raise MailboxError(f"the worker did not start within {timeout_s:.0f}s; see {LOGS}")

    def flower_ready(self, timeout_s: float = 20) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{FLOWER_PORT}/healthcheck",
                                            timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                time.sleep(0.3)
        return False

    # ------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
            DEV_REDIS_URL_FILE.unlink(missing_ok=True)
            self.redis = None
        if self.api_token_generated:
            API_TOKEN_FILE.unlink(missing_ok=True)

    def urls(self) -> dict[str, str]:
        urls = {"flower": f"http://127.0.0.1:{FLOWER_PORT}",
                "metrics": f"http://127.0.0.1:{METRICS_PORT}/metrics"}
        if self.api:
            urls.update(api=f"http://127.0.0.1:{API_PORT}/v1",
                        api_docs=f"http://127.0.0.1:{API_PORT}/docs",
                        dashboard=f"http://127.0.0.1:{API_PORT}/ui")
        return urls

    def wait_forever(self) -> None:
        """Block until Ctrl-C / SIGTERM or until a process of the stack dies."""
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while all(p.poll() is None for p in self.processes.values()):
                time.sleep(0.5)
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            print(f"stopping: {', '.join(dead)} exited (see {LOGS})")
        except KeyboardInterrupt:
            print("\nstopping the stack")
