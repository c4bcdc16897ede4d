"""`make demo` and `python -m mailbox up` on the embedded default (no external services)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mailbox.dev.embedded_redis import free_port
from tests.conftest import BACKENDS
from tests.support.workers import ROOT

# The dev stack always runs on SQLite: run these once, in the SQLite pass.
pytestmark = pytest.mark.skipif("sqlite" not in BACKENDS,
                                reason="the dev stack runs on SQLite; covered by that pass")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAILBOX_", "CELERY_", "PROMETHEUS_"))}
    env.update({"MAILBOX_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
                "MAILBOX_NAMESPACE": f"demo{os.getpid()}",
                "MAILBOX_METRICS_PORT": str(free_port()),
                "MAILBOX_FLOWER_PORT": str(free_port()),
                "MAILBOX_API_PORT": str(free_port()),
                "DEMO_EXIT": "1", "PYTHONPATH": str(ROOT)})
    return env


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:  # gone
        return False


@pytest.mark.slow
def test_demo_runs_the_workload_and_prints_the_summary(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mailbox", "demo"], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for expected in ("embedded Redis", "settling dispatches", "DeadLetter", "Superseded",
                     "human in the loop", "'approved by alice'", "p50", "Flower",
                     "/metrics", "Dashboard:", "/ui", "API token:", "Authorization: Bearer",
                     "stack stopped", "conversation on chat-conversation", "Turn 1:",
                     "Turn 2:", "Turn 3:", "the last turn streamed"):
        assert expected in output, f"{expected!r} missing from:\n{output}"
    streamed = output.split("the last turn streamed ")[1].split()[0]
    assert int(streamed) >= 10, output  # the third answer, word by word


@pytest.mark.slow
def test_up_starts_the_stack_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mailbox", "up", "--no-flower"], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "running; press Ctrl-C" in line or proc.poll() is not None:
            break
    assert any("running; press Ctrl-C" in line for line in lines), "".join(lines)
    # The API and its dashboard are up, behind the token the stack printed.
    token = next(line.split("token:")[1].strip() for line in lines if "token:" in line)
    dashboard = next(line.split()[-1] for line in lines if line.startswith("dashboard"))
    api = dashboard.removesuffix("/ui") + "/v1/stats"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(api, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(api, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert "counts" in json.loads(answer.read())
    children = _children_of(proc.pid)
    assert len(children) >= 3  # worker, beat and the API (each in its own session)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    # `up` returns once it has stopped them; the kernel may take a moment to reap them.
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in children if _running(pid)]) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == [], f"still running after Ctrl-C: {alive}"
    assert not (ROOT / "var" / "redis.url").exists() or \
        "MAILBOX_REDIS_URL" in os.environ
