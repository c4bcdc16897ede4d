"""The Celery processes a benchmark or soak run starts: workers and beat, each in its own
process group so that stopping one also stops its prefork children, with its log and stderr
in the run's work directory (shown when a process dies)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).parent / "celery")
WORKER_FLAGS = ("-P", "prefork", "-l", "WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat")


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
                     name: str) -> subprocess.Popen[bytes]:
        """A prefork worker consuming only `queue`, named `name` (`%h` allowed)."""
        return self.spawn(label, app, ["worker", "-c", str(concurrency), "-n", name,
                                       *WORKER_FLAGS, "-Q", queue])

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
