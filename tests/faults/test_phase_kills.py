"""SIGKILL a pool process in each of the five phases, ten times each (issue 6; DESIGN.md §5).

`tests.support.fault_hooks` runs inside the worker: a trap armed for a thread makes the first
call of one phase on that thread — before or after the real phase function — record its pid
and wait, and the test SIGKILLs exactly that pool process. The worker's main process forks a
replacement, as it does after an OOM kill. Messages are acked on receipt, so the killed
phase's message is gone: the dispatch stays Claimed until its lease runs out, then the sweep
(beat, every second) takes it back and wakes the thread.

Where the kill lands decides what happens:
- before execute recorded a start (verify, reconstruct, resolve, execute-before): the agent
  never ran; the sweep reclaims the claim as one failed attempt and the retry runs the agent
  (run_started only for attempt 1);
- after execute recorded the outcome (execute-after, settle-before): the run is already done;
  the sweep acks the claim, no attempt is lost and the agent never runs again (run_started
  only for attempt 0);
- after settle: the dispatch was acked and its thread woken before the kill; nothing is lost.
Every dispatch must end Acked, and the workload audit must pass.

MAILBOX_FAULT_SCALE multiplies the kills per phase (default 1: ten per phase, five before and
five after the phase function); MAILBOX_FAULT_LEASE_MS sets the lease (default 1500 ms).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.workload_audit import WorkloadAudit
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.support.e2e_helpers import events_of, worker_logs
from tests.support.fault_hooks import PHASES, WHENS, Driver, Faults, Item
from tests.support.workers import Stack

SCALE = float(os.environ.get("MAILBOX_FAULT_SCALE", "1"))
KILLS_PER_PHASE = max(1, round(10 * SCALE))
ROUNDS = 2  # dispatches per thread: the trapped one, and one queued behind it
CLEAN_THREADS = 10
# A steady load, not one burst: see the module docstring of test_chaos.py (backlog finding).
MAX_OUTSTANDING = 8
MAX_ATTEMPTS = 10  # room for leases that run out under load on top of the kill
HOOKS = ["tests.support.fault_hooks"]

# See test_chaos.py: a machine much busier than an idle 2-core one needs a longer lease.
LEASE_MS = os.environ.get("MAILBOX_FAULT_LEASE_MS", "1500")
pytestmark = pytest.mark.stack_env(MAILBOX_LEASE_MS=LEASE_MS, MAILBOX_SWEEP_INTERVAL_S="1")


def test_sigkill_in_each_phase_ten_times(celery_stack: Stack,  # noqa: F811
                                         publisher: Mailbox) -> None:  # noqa: F811
    started = time.monotonic()
    namespace = publisher.settings.namespace
    faults = Faults(publisher.store.coordinator.client, namespace)
    traps: dict[str, tuple[str, str]] = {}
    for i in range(KILLS_PER_PHASE):
        for phase in PHASES:
            when = WHENS[i % 2]
            thread_id = f"kill-{phase}-{when}-{i}"
            faults.trap(thread_id, phase, when)
            traps[thread_id] = (phase, when)
    threads = list(traps)
    for i in range(CLEAN_THREADS):  # spread untrapped threads among the trapped ones
        threads.insert(i * len(threads) // CLEAN_THREADS, f"clean-{i}")
    plan = [Item(t, "echo", f"{t} #{n}", max_attempts=MAX_ATTEMPTS) for n in range(ROUNDS)
            for t in threads]

    celery_stack.start_beat()
    worker = celery_stack.start_worker(concurrency=3, include=HOOKS, FAULT_HOOKS="1")
    audit = WorkloadAudit(publisher)
    driver = Driver(audit, publisher, plan, max_outstanding=MAX_OUTSTANDING)
    kills: list[dict[str, Any]] = []
    with audit.sampling():
        driver.start()
        while len(kills) < len(traps):
            hit = faults.next_hit(timeout_s=30)
            assert hit is not None, (
                f"only {len(kills)} of {len(traps)} traps fired; still armed: "
                f"{sorted(faults.armed_traps())}{worker_logs(celery_stack)}")
            driver.exempt.add(str(hit["dispatch_id"]))  # it waits for its lease: no load
            celery_stack.kill_pool_child(worker, int(hit["pid"]))
            kills.append(hit)
        driver.join(timeout_s=60)
        assert driver.not_published == 0, "dispatch.delay could not publish its wake-ups"
        audit.wait_terminal(timeout_s=60)
    report = audit.check()
    print(f"\nphase kills: {len(kills)} kills, {len(plan)} dispatches in "
          f"{time.monotonic() - started:.1f}s; {report.to_json()}")
    report.raise_if_failed()

    assert worker.poll() is None, "the worker's main process must survive its children"
    assert report.by_status == {"Acked": len(plan)}, report.by_status
    first = {thread_id: ids[0] for thread_id, ids in audit.by_thread().items()}
    assert Counter(hit["phase"] for hit in kills) == dict.fromkeys(PHASES, KILLS_PER_PHASE)
    extra_attempts = recorded_kills = 0
    for hit in kills:
        thread_id = str(hit["thread_id"])
        place, killed = traps[thread_id], int(hit["attempt"])
        assert hit["dispatch_id"] == first[thread_id], hit
        assert (hit["phase"], hit["when"]) == place, hit
        final = publisher.get_dispatch(first[thread_id])
        assert final is not None and final.status == DispatchStatus.Acked, final
        assert final.run_response == f"{thread_id} #0", final
        # The kill cost one attempt, except once the outcome was recorded: the sweep acks
        # such a claim (and after settle, the dispatch had acked already).
        cost = 0 if hit["outcome_recorded"] or place == ("settle", "after") else 1
        assert final.attempt_count >= killed + cost, (place, hit, final)
        if hit["outcome_recorded"]:
            assert final.attempt_count == killed, (place, hit, final)
        extra_attempts += final.attempt_count - killed - cost
        # Once an attempt recorded the outcome, no later attempt runs the agent: the sweep
        # acks it. Killed earlier, a later attempt runs it (execution is at least once:
        # an attempt whose lease ran out after it started may have run it too).
        ran = [e.data["attempt"] for e in events_of(publisher, final.run_id, "run_started")]
        if hit["outcome_recorded"]:
            assert ran and ran[-1] == killed, (
                f"killed {place} in attempt {killed} after its outcome was recorded: the agent "
                f"ran in attempts {ran}")
            recorded_kills += 1
        else:
            assert ran and ran[-1] > killed, (
                f"killed {place} in attempt {killed}: the agent ran in attempts {ran}")
    # Half of the execute kills and all settle kills come after the recorded outcome.
    assert recorded_kills >= KILLS_PER_PHASE, recorded_kills
    killed_ids = {str(hit["dispatch_id"]) for hit in kills}
    extra_attempts += sum(d.attempt_count for d in map(publisher.get_dispatch, audit.dispatch_ids)
                          if d is not None and d.dispatch_id not in killed_ids)
    # Attempts lost to leases that ran out under load, not to a kill (see test_chaos.py's
    # backlog finding): legitimate retries, reported so that a trend shows.
    print(f"attempts beyond the kills: {extra_attempts}")
