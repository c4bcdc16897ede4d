"""Load: thousands of dispatches over hundreds of threads through two real workers (-c 2
each) and beat, audited by `WorkloadAudit` — the path `python -m benchmarks.soak` runs.

`test_small_load_is_audited` runs in CI on every backend (200 dispatches, 20 threads, about
20 s); `test_10k_dispatches_over_500_threads` is the issue's load run, skipped unless
MAILBOX_LOAD=1 (`make load`), and writes its report to
benchmarks/results/load-<backend>.json. Both must end with every dispatch terminal, the
expected mix of outcomes (retries and dead letters happen), work running on several threads
at once, and no audit violation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.soak import DEFAULT_MIX, RESULTS, SoakOptions, drop_namespace, parse_mix, run_soak

# The soak's mix: echo, flaky (retried then Acked), exhaust (retried until its budget is
# spent: the last attempt's run_finish must say "dead_letter"), sleep and fail.
CI_MIX = DEFAULT_MIX


def run(options: SoakOptions, database_url: str, redis_url: str, namespace: str,
        workdir: Path) -> dict[str, Any]:
    try:
        return run_soak(options, database_url, redis_url, namespace, workdir, out=print)
    finally:
        drop_namespace(redis_url, namespace)


def check(report: dict[str, Any]) -> None:
    """Every dispatch terminal, the mix's outcomes happened, parallel work, no violation."""
    audit = report["audit"]
    problems = "\n  ".join(audit["violations"][:20])
    assert report["ok"], (f"audit failed: {len(audit['violations'])} violation(s), dead "
                          f"processes {report['dead_processes']}\n  {problems}\n"
                          f"{report.get('log_tails', '')[-4000:]}")
    by_status = report["by_status"]
    assert sum(by_status.values()) == report["dispatches"], by_status
    assert set(by_status) <= {"Acked", "DeadLetter"}, by_status  # nothing cancelled here
    assert report["retried_dispatches"] > 0, "the flaky agent's retries did not happen"
    assert report["dead_letters"] > 0, "the fail agent's dead letters did not happen"
    assert audit["samples"] > 0 and audit["max_claimed"] > 1, \
        "the sampler never saw work running on two threads at once"
    wakes = report["wake_ups"]
    assert wakes["ran"] > 0 and 0 <= wakes["no_op"] <= wakes["ran"], wakes


def test_small_load_is_audited(database_url: str, redis_url: str, namespace: str,
                               tmp_path: Path) -> None:
    options = SoakOptions(dispatches=200, threads=20, workers=2, concurrency=2,
                          agent_mix=parse_mix(CI_MIX), timeout_s=240, progress_s=10)
    report = run(options, database_url, redis_url, namespace, tmp_path / "soak")
    check(report)
    assert report["dispatches"] == 200
    print("wake-ups:", report["wake_ups"])


@pytest.mark.load
@pytest.mark.timeout(3 * 3600)
@pytest.mark.skipif(os.environ.get("MAILBOX_LOAD") != "1",
                    reason="the 10k-dispatch load run: set MAILBOX_LOAD=1 (`make load`)")
def test_10k_dispatches_over_500_threads(database_url: str, redis_url: str, namespace: str,
                                         tmp_path: Path) -> None:
    # The soak's mix (MAILBOX_LOAD_MIX overrides it).
    options = SoakOptions(dispatches=10_000, threads=500, workers=2, concurrency=2,
                          agent_mix=parse_mix(os.environ.get("MAILBOX_LOAD_MIX", DEFAULT_MIX)),
                          timeout_s=2 * 3600, progress_s=15)
    report = run(options, database_url, redis_url, namespace, tmp_path / "soak")
    backend = database_url.split(":", 1)[0].split("+", 1)[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"load-{backend}.json").write_text(json.dumps(report, indent=1, default=str))
    check(report)
    assert report["dispatches"] == 10_000
