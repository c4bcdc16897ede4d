"""Real `celery -A tasks worker` (and beat) processes for end-to-end and fault tests.

Each stack shares one database, Redis and namespace with the test; the namespace is also the
queue name, so stacks of different tests never see each other's messages.

No process of a stack may die unless the test kills it (`Stack.kill`, `kill_pool_child`): a
worker or beat process that exited on its own, or a pool process its worker had to replace
("Process 'ForkPoolWorker-n' pid:… exited with …"), fails the test when its stack ends, with
the logs. Every stack made during a test is listed in `STACKS`, so that tests/conftest.py can
attach the stack's logs to the report of a test that failed.
"""

from __future__ import annotations

import contextlib
import os
import re
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

# Pids a test signalled on purpose (Stack.kill is static: tests call it on any process).
KILLED_ON_PURPOSE: set[int] = set()
# The stacks made since the current test began (tests/conftest.py clears it before each test).
STACKS: list[Stack] = []
# billiard's line when the worker's main process finds a pool process gone and replaces it.
POOL_EXIT = re.compile(r"Process '(?P<name>[^']+)' pid:(?P<pid>\d+) exited with '(?P<how>[^']*)'")


@dataclass
class Stack:
    database_url: str
    redis_url: str
    namespace: str
    workdir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    died: list[str] = field(default_factory=list)  # see unexpected_exits()
    _count: int = 0
    broker_url: str | None = None
    """Celery's broker when it is not the coordination Redis (which a Redis Cluster cannot
    be: MAILBOX_TEST_REDIS_CLUSTER)."""

    def __post_init__(self) -> None:
        STACKS.append(self)

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBOX_")}
        env.update({
            "MAILBOX_DATABASE_URL": self.database_url,
            "MAILBOX_REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.broker,
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
        KILLED_ON_PURPOSE.add(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_warm(self, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
        """A warm shutdown, as a deploy stops a worker: SIGTERM to the main process only (it
        finishes what its pool runs, gives back what it reserved, then ends its pool)."""
        KILLED_ON_PURPOSE.update([proc.pid, *self.pool_children(proc)])
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(proc)

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
        KILLED_ON_PURPOSE.add(pid)
        os.kill(pid, sig)

    def unexpected_exits(self) -> list[str]:
        """Processes of this stack that died although the test did not kill them: a worker or
        beat process that exited, or a pool process its worker had to replace."""
        found = [f"{' '.join(map(str, proc.args[1:5]))}… (pid {proc.pid}) exited with "
                 f"{proc.returncode}" for proc in self.processes
                 if proc.poll() is not None and proc.pid not in KILLED_ON_PURPOSE]
        for log in sorted(self.workdir.glob("*.log")):
            for match in POOL_EXIT.finditer(log.read_text(errors="replace")):
                if int(match["pid"]) not in KILLED_ON_PURPOSE:
                    found.append(f"{log.name}: pool process {match['name']} (pid "
                                 f"{match['pid']}) exited with {match['how']!r} and was "
                                 f"replaced")
        return found

    def stop_all(self) -> None:
        """End of a test: the whole group at once (a warm shutdown waits ~2 s per worker,
        and the test's database, Redis keys and queue are its own). Processes that had died
        on their own are remembered in `died` first."""
        self.died += [d for d in self.unexpected_exits() if d not in self.died]
        for proc in self.processes:
            if proc.poll() is None:
                self.kill(proc, signal.SIGKILL)
        self.processes.clear()

    def logs(self, tail_chars: int = 4000) -> str:
        """The tail of every log of the stack, and of every non-empty stderr capture (a
        process that dies before its logging starts says why there)."""
        files = sorted([*self.workdir.glob("*.log"), *self.workdir.glob("*.err")])
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail_chars:]}"
                         for p in files if p.suffix == ".log" or p.stat().st_size)


@contextmanager
def stack(database_url: str, redis_url: str, namespace: str, workdir: Path, *,
          broker_url: str | None = None, **env_overrides: str) -> Iterator[Stack]:
    """A stack for the block; it fails (with the logs) when one of its processes died that
    the test did not kill. `broker_url`: Celery's broker, when not the Redis at
    `redis_url`."""
    s = Stack(database_url, redis_url, namespace, workdir, dict(env_overrides),
              broker_url=broker_url)
    try:
        yield s
    finally:
        s.stop_all()
    if s.died:
        raise AssertionError("processes of the stack died without the test killing them "
                             "(no worker restart is expected unless a test kills one):\n  "
                             + "\n  ".join(s.died) + f"\n===== worker logs =====\n{s.logs()}")
