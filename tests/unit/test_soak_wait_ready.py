"""`benchmarks.soak.Processes.wait_ready`: a worker is ready once it answers a ping or its log
says `<name>@<host> ready.`; one that does neither within the timeout fails the wait."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.soak import Processes


@pytest.fixture
def alive() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def group(tmp_path: Path, proc: subprocess.Popen[bytes], *lines: str) -> Processes:
    logs = []
    for n, text in enumerate(lines, start=1):
        log = tmp_path / f"worker{n}.log"
        log.write_text(text)
        logs.append((f"worker{n}", proc, log))
    return Processes(workdir=tmp_path, env={}, started=logs)


def no_pings(monkeypatch: pytest.MonkeyPatch, replies: list[dict[str, Any]]) -> None:
    from tasks.app import app

    monkeypatch.setattr(app.control, "ping", lambda timeout: replies)


def test_a_worker_that_logged_ready_needs_no_ping(
        tmp_path: Path, alive: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    no_pings(monkeypatch, [])
    procs = group(tmp_path, alive,
                  "[2026-12-07 22:56:00,167: INFO/MainProcess] soak1-q@vm ready.\n",
                  "[2026-12-07 22:56:00,201: INFO/MainProcess] soak2-q@vm ready.\n")
    procs.wait_ready(["soak1-q@", "soak2-q@"], timeout_s=5)


def test_a_ping_answers_for_a_worker_whose_log_does_not_say(
        tmp_path: Path, alive: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    no_pings(monkeypatch, [{"soak2-q@vm": {"ok": "pong"}}])
    procs = group(tmp_path, alive, "[…] soak1-q@vm ready.\n", "")
    procs.wait_ready(["soak1-q@", "soak2-q@"], timeout_s=5)


def test_a_worker_neither_ready_nor_answering_times_out(
        tmp_path: Path, alive: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    no_pings(monkeypatch, [])
    procs = group(tmp_path, alive, "[…] soak1-q@vm ready.\n",
                  "[…] xsoak2-q@vm ready.\n")  # another worker's name, not soak2's
    with pytest.raises(TimeoutError, match="did not answer"):
        procs.wait_ready(["soak1-q@", "soak2-q@"], timeout_s=1)
