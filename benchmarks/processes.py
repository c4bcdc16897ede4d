"""The Celery processes a benchmark or soak run starts: workers and beat, each in its own
process group so that stopping one also stops its prefork children, with its log and stderr
in the run's work directory (shown when a process dies); `stack_env` is their environment."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import ROOT

CELERY = str(Path(sys.executable).parent / "celery")
WORKER_FLAGS = ("-P", "prefork", "--without-gossip", "--without-mingle",
                "--without-heartbeat")

# What `stack_env` sets; by default every other variable of the caller passes through.
STACK_SETTINGS = ("MAILBOX_DATABASE_URL", "MAILBOX_REDIS_URL", "MAILBOX_NAMESPACE",
                  "MAILBOX_BEAT_SCHEDULE", "MAILBOX_METRICS_PORT", "CELERY_BROKER_URL")


def stack_env(database_url: str, redis_url: str, namespace: str, workdir: Path, *,
              broker_url: str | None = None, inherit: Callable[[str], bool] | None = None
              ) -> dict[str, str]:
    """The environment of a run's Celery processes (and of a process publishing to them):
    this process's environment (the variables `inherit` accepts; default: all but those set
    here) plus the database, Redis, broker (default: the Redis), namespace, a beat schedule
    file in `workdir`, no metrics port, and the project root on PYTHONPATH."""
    keep = inherit or (lambda name: name not in STACK_SETTINGS)
    env = {k: v for k, v in os.environ.items() if keep(k)}
    env.update({
        "MAILBOX_DATABASE_URL": database_url,
        "MAILBOX_REDIS_URL": redis_url,
        "CELERY_BROKER_URL": broker_url or redis_url,
        "MAILBOX_NAMESPACE": namespace,
        "MAILBOX_METRICS_PORT": "0",
        "MAILBOX_BEAT_SCHEDULE": str(workdir / "beat-schedule"),
        "PYTHONPATH": str(ROOT),
    })
    return env


@dataclass
class ProcessGroup:
    """Started processes, stopped together: SIGTERM (warm shutdown), SIGKILL after 20 s."""

    workdir: Path
    env: dict[str, str]
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def spawn(self, label: str, app: str, args: list[str]) -> subprocess.Popen[bytes]:
        """`celery -A <app> <args>` from the project root, logging to <workdir>/<label>.log."""
        log = self.workdir / f"{label}.log"
        with open(log.with_suffix(".err"), "wb") as err:
            proc = subprocess.Popen([CELERY, "-A", app, *args, f"--logfile={log}"],
                                    cwd=ROOT, env=self.env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=err)
        self.started.append((label, proc, log))
        return proc

    def start_worker(self, label: str, app: str, queue: str, concurrency: int,
                     name: str, *, log_level: str = "WARNING") -> subprocess.Popen[bytes]:
        """A prefork worker consuming only `queue`, named `name` (`%h` allowed); at INFO it
        logs every task's end with its result."""
        return self.spawn(label, app, ["worker", "-c", str(concurrency), "-n", name,
                                       *WORKER_FLAGS, "-l", log_level, "-Q", queue])

    def dead(self) -> list[str]:
        return [f"{label} (exit {proc.returncode})" for label, proc, _ in self.started
                if proc.poll() is not None]

    def pids(self) -> list[int]:
        return [proc.pid for _, proc, _ in self.started]

    def stop(self) -> None:
        for _, proc, _ in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in self.started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_tails(self, chars: int = 3000) -> str:
        parts = []
        for label, _, log in self.started:
            for path in (log, log.with_suffix(".err")):
                if path.exists() and path.stat().st_size:
                    text = path.read_text(errors="replace")[-chars:]
                    parts.append(f"--- {label} {path.name}\n{text}")
        return "\n".join(parts)
