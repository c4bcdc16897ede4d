"""`benchmarks.soak.wake_counts`: wake-up tasks and no-op ones counted from worker logs, by
who sent them (the task id tells)."""

from __future__ import annotations

import uuid
from pathlib import Path

import uuid6

from benchmarks.soak import wake_counts


def line(task_id: str, result: str) -> str:
    return (f"[2026-12-07 03:00:00,000: INFO/ForkPoolWorker-1] Task mailbox.dispatch[{task_id}]"
            f" succeeded in 0.001s: {result}")


def test_wake_ups_are_counted_by_source_and_no_ops_by_their_none_result(tmp_path: Path) -> None:
    log = tmp_path / "worker1.log"
    log.write_text("\n".join([
        line("sweep-wake-1f2e", "None"),
        line(str(uuid6.uuid7()), "'01a24e5c-b766-7a6f-9634-e5535b5f211d'"),
        line(str(uuid6.uuid7()), "None"),
        line(str(uuid.uuid4()), "None"),
        "[2026-12-07 03:00:00,000: INFO/MainProcess] Task mailbox.dispatch[x] received",
        line("not-a-uuid", "'d'").replace("mailbox.dispatch", "mailbox.verify"),
    ]) + "\n")
    counts = wake_counts([log, tmp_path / "missing.log"], 8)
    assert (counts["ran"], counts["no_op"]) == (4, 3)
    assert (counts["per_dispatch"], counts["no_op_per_dispatch"]) == (0.5, 0.375)
    assert counts["by_source"] == {"sweep": {"ran": 1, "no_op": 1},
                                   "submit": {"ran": 2, "no_op": 1},
                                   "delayed or other": {"ran": 1, "no_op": 1}}


def test_no_dispatches_gives_no_rates(tmp_path: Path) -> None:
    counts = wake_counts([], None)
    assert counts["ran"] == 0 and counts["per_dispatch"] is None
