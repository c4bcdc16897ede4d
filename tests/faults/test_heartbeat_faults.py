"""A Redis blip never runs one attempt twice at once (mailbox/heartbeat.py), with real
`celery worker` processes.

The finding: the heartbeat read the cancel signal outside any `try`, so one Redis error ended
its thread, renewals stopped, the lease ran out under the still-running agent, and once Redis
was back the sweep gave the attempt to another worker while the first still ran. Two ways in:
- errors injected into every attempt's cancel checks and renewals, in bursts shorter than a
  lease (tests/support/heartbeat_faults.py): nothing may change — one execution, no reclaim;
- the Redis that is broker and coordination at once, killed for 4 s under 2 s leases while
  10 s agents run (the reported reproduction): executions of one run must never overlap, and
  every dispatch ends.
The `probe` agent (tests/support/custom_agents.py) writes when each execution starts and ends.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.embedded_redis import EmbeddedRedis
from tests.e2e.conftest import celery_stack  # noqa: F401  (fixture)
from tests.support.e2e_helpers import events_of, wait_all_terminal, wait_until, worker_logs
from tests.support.heartbeat_faults import counts
from tests.support.workers import Stack, stack

LEASE_MS = 2000
AGENTS = "tests.support.custom_agents"


def executions(probe_file: Path) -> dict[str, list[tuple[float, float]]]:
    """(start, end) of every execution, by run. An execution that never ended fails here."""
    open_: dict[tuple[str, int], float] = {}
    done: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in probe_file.read_text().splitlines():
        note = json.loads(line)
        key = (note["run_id"], note["pid"])
        if note["event"] == "start":
            assert key not in open_, f"two open executions in one process: {note}"
            open_[key] = note["at"]
        else:
            done[note["run_id"]].append((open_.pop(key), note["at"]))
    assert not open_, f"executions that never ended: {open_}"
    return done


def assert_never_overlapping(runs: dict[str, list[tuple[float, float]]]) -> None:
    for run_id, spans in runs.items():
        spans = sorted(spans)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"run {run_id}: an execution started {end - start:.2f}s " \
                                 f"before the previous one ended: {spans}"


@pytest.mark.slow
@pytest.mark.stack_env(MAILBOX_LEASE_MS=str(LEASE_MS), MAILBOX_SWEEP_INTERVAL_S="1",
                       MAILBOX_AGENT_MODULES=AGENTS)
def test_redis_errors_in_every_heartbeat_change_nothing(celery_stack: Stack,  # noqa: F811
                                                        mailbox: Mailbox,
                                                        tmp_path: Path) -> None:
    faults, probe = tmp_path / "faults", tmp_path / "probe.jsonl"
    faults.mkdir()
    env = {"HEARTBEAT_FAULTS_DIR": str(faults), "PROBE_FILE": str(probe)}
    celery_stack.start_beat(**env)
    celery_stack.start_worker(concurrency=3, include=["tests.support.heartbeat_faults"], **env)
    agent_ms = 3 * LEASE_MS + 1500
    import tests.support.custom_agents  # noqa: F401  (the probe agent, for submit)

    receipts = [mailbox.submit(f"blip-{i}", "probe", {"ms": agent_ms}) for i in range(3)]
    final = wait_all_terminal(mailbox, [r.dispatch_id for r in receipts], 90, celery_stack)

    injected = counts(faults)
    for receipt in receipts:
        dispatch = final[receipt.dispatch_id]
        assert dispatch.status == DispatchStatus.Acked, (dispatch, worker_logs(celery_stack))
        assert dispatch.attempt_count == 0, "an attempt was reclaimed"
        assert dispatch.run_response == f"probed {agent_ms}"
        assert len(events_of(mailbox, receipt.run_id, "run_started")) == 1
    runs = executions(probe)
    assert sorted(len(spans) for spans in runs.values()) == [1, 1, 1], runs
    # The faults bit: every heartbeat saw failing checks and failing renewals.
    assert injected.get("cancel_check", 0) > 3 * 20, injected
    assert injected.get("renewal", 0) >= 3 * 3, injected
    logs = "".join(p.read_text() for p in tmp_path.glob("worker*.log"))
    assert "cancel check of" in logs and "lease renewal of" in logs
    assert "Exception in thread" not in logs, worker_logs(celery_stack)


@pytest.mark.slow
def test_redis_killed_for_four_seconds_under_running_agents_never_overlaps_an_attempt(
        make_mailbox: Callable[..., Mailbox], private_redis: EmbeddedRedis,
        tmp_path: Path) -> None:
    """The reported reproduction: broker and coordination on one Redis, killed for 4 s while
    10 s agents run under 2 s leases. The heartbeats cannot read cancel signals for longer
    than a lease, so they stop their agents (a transient failure, retried); whatever each
    dispatch ends as, no two executions of one run overlap, and every dispatch ends."""
    box = make_mailbox(private_redis.url)
    probe = tmp_path / "probe.jsonl"
    settings = box.settings
    with stack(settings.database_url, private_redis.url, settings.namespace, tmp_path,
               MAILBOX_LEASE_MS=str(LEASE_MS), MAILBOX_SWEEP_INTERVAL_S="1",
               MAILBOX_AGENT_MODULES=AGENTS, PROBE_FILE=str(probe)) as s:
        import tests.support.custom_agents  # noqa: F401

        receipts = [box.submit(f"outage-{i}", "probe", {"ms": 10_000}) for i in range(4)]
        s.start_beat()
        workers = [s.start_worker(concurrency=2) for _ in range(2)]

        def running() -> bool:
            current = [box.get_dispatch(r.dispatch_id) for r in receipts]
            return all(d is not None and d.dispatch_instance_id is not None for d in current)

        wait_until(running, 60, "all four agents to run", s)
        time.sleep(1.0)
        private_redis.kill()
        time.sleep(4.0)
        private_redis.start()
        final = wait_all_terminal(box, [r.dispatch_id for r in receipts], 120, s)

        assert_never_overlapping(executions(probe))
        assert all(d.status == DispatchStatus.Acked for d in final.values()), \
            ({k: (d.status, d.attempt_count, d.last_error) for k, d in final.items()},
             worker_logs(s))
        assert {d.run_response for d in final.values()} == {"probed 10000"}
        assert all(w.poll() is None for w in workers), \
            f"a worker died of the outage{worker_logs(s)}"
        assert "Exception in thread" not in s.logs(), worker_logs(s)
