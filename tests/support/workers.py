"""Real `celery -A tasks worker` (and beat) processes for end-to-end and fault tests.

Each stack shares one database, Redis and namespace with the test; the namespace is also the
queue name, so stacks of different tests never see each other's messages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).parent / "celery")


@dataclass
class Stack:
    database_url: str
    redis_url: str
    namespace: str
    workdir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _count: int = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBOX_")}
        env.update({
            "MAILBOX_DATABASE_URL": self.database_url,
            "MAILBOX_REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.redis_url,
            "MAILBOX_NAMESPACE": self.namespace,
            "MAILBOX_BEAT_SCHEDULE": str(self.workdir / "beat-schedule"),
            "PYTHONPATH": str(ROOT),
            "MAILBOX_METRICS_PORT": "0",
        })
        env.update(self.env_overrides)
        env.update(extra)
        return env

    def start_worker(self, concurrency: int = 2, *, wait: bool = True, pool: str = "prefork",
                     include: Sequence[str] = (), **extra_env: str) -> subprocess.Popen[bytes]:
        """`include`: modules celery imports in the main process before it forks the pool
        (`-I`), e.g. tests.support.fault_hooks, so every pool child starts with them."""
        self._count += 1
        name = f"w{self._count}-{self.namespace}@%h"
        log = self.workdir / f"worker{self._count}.log"
        extra_args = ["-I", ",".join(include)] if include else []
        with open(log.with_suffix(".err"), "wb") as err:
            proc = subprocess.Popen(
                [CELERY, "-A", "tasks", "worker", "-c", str(concurrency), "-P", pool, "-n",
                 name, "-l", "INFO", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "-Q", self.namespace, f"--logfile={log}", *extra_args],
                cwd=ROOT, env=self.env(**extra_env), start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=err)
        self.processes.append(proc)
        if wait:
            self._wait_for(log, "ready.", proc)
        return proc

    def start_beat(self, **extra_env: str) -> subprocess.Popen[bytes]:
        log = self.workdir / "beat.log"
        with open(self.workdir / "beat.err", "wb") as err:
            proc = subprocess.Popen(
                [CELERY, "-A", "tasks", "beat", "-l", "INFO", f"--logfile={log}",
                 "-s", str(self.workdir / "beat-schedule")],
                cwd=ROOT, env=self.env(**extra_env), start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=err)
        self.processes.append(proc)
        return proc

    @staticmethod
    def _wait_for(log: Path, marker: str, proc: subprocess.Popen[bytes],
                  timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = log.with_suffix(".err")
                raise RuntimeError(f"worker exited {proc.returncode}: "
                                   f"{err.read_text() if err.exists() else ''}")
            if log.exists() and marker in log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker did not report {marker!r} in {timeout_s}s")

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group (main process and pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @staticmethod
    def pool_children(proc: subprocess.Popen[bytes]) -> list[int]:
        """The pids whose parent is `proc` (a prefork worker's pool processes)."""
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and fields[1] == str(proc.pid):
                children.append(int(entry.name))
        return sorted(children)

    def kill_pool_child(self, proc: subprocess.Popen[bytes], pid: int,
                        sig: int = signal.SIGKILL) -> None:
        """SIGKILL one pool process of `proc` (the worker's main process forks a new one),
        after checking that it really is one of ours."""
        if pid not in self.pool_children(proc):
            raise RuntimeError(f"pid {pid} is not a pool process of worker {proc.pid}")
        os.kill(pid, sig)

    def stop_all(self) -> None:
        """End of a test: the whole group at once (a warm shutdown waits ~2 s per worker,
        and the test's database, Redis keys and queue are its own)."""
        for proc in self.processes:
            if proc.poll() is None:
                self.kill(proc, signal.SIGKILL)
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.workdir.glob("*.log")))


@contextmanager
def stack(database_url: str, redis_url: str, namespace: str, workdir: Path,
          **env_overrides: str) -> Iterator[Stack]:
    s = Stack(database_url, redis_url, namespace, workdir, dict(env_overrides))
    try:
        yield s
    finally:
        s.stop_all()
