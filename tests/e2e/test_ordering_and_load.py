"""Per-thread ordering and exclusivity under load, with a real `celery -A tasks worker -c 4`.

DESIGN.md §4.1 (invariant 3: at most one Claimed dispatch per thread, ever) and reference
§3.1 (claim order: priority, then FIFO). All 200 dispatches are stored before the worker
starts, so the order in which each thread runs them is fully determined by the data.

What the code records and we read back: the `run_started` event (emitted by `execute` once the
attempt is recorded) and the `run_finish` event (emitted by `settle` after the ack) of every
run, both stamped by the worker with wall-clock milliseconds; and the dispatch's
`completed_at` (the ack). Within one thread these are causally ordered — the next claim only
happens after the previous settle released the lease — so sorting a thread's runs by their
`run_started` stamp gives the execution order, and consecutive runs must not overlap.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

from mailbox import DispatchStatus, Mailbox, RunStatus
from tasks import dispatch
from tests.support.e2e_helpers import (
    ClaimSampler,
    describe_events,
    events_of,
    status_counts,
    wait_all_terminal,
    wait_for_events,
    worker_logs,
)
from tests.support.workers import Stack

THREADS = 20
PER_THREAD = 10
PRIORITIES = (0, 10, 128, 128, 200, 255)  # repeats, so FIFO among equals is exercised too


@dataclass
class Submitted:
    thread_id: str
    index: int  # submission order within the thread
    priority: int
    dispatch_id: str
    run_id: str
    expected_response: str


def _submit_all(rng: random.Random) -> list[Submitted]:
    submitted: list[Submitted] = []
    # Round robin over threads, so created_at values of different threads interleave.
    for index in range(PER_THREAD):
        for t in range(THREADS):
            thread_id = f"order-{t:02d}"
            priority = rng.choice(PRIORITIES)
            if index % 2 == 0:
                text = f"{thread_id}#{index}"
                result = dispatch.delay(thread_id, "echo", text, priority=priority)
                expected = text
            else:
                ms = rng.choice((0, 5, 15))
                result = dispatch.delay(thread_id, "sleep", {"ms": ms}, priority=priority)
                expected = f"slept {ms}"
            submitted.append(Submitted(thread_id, index, priority, result.id, "", expected))
    return submitted


def test_priority_then_fifo_per_thread_and_one_claim_per_thread(
        celery_stack: Stack, publisher: Mailbox) -> None:
    rng = random.Random(20240611)
    began = time.monotonic()
    submitted = _submit_all(rng)
    submit_s = time.monotonic() - began
    for s in submitted:
        stored = publisher.get_dispatch(s.dispatch_id)
        assert stored is not None and stored.status == DispatchStatus.Queued
        s.run_id = stored.run_id

    with ClaimSampler(publisher) as sampler:
        celery_stack.start_worker(concurrency=4)
        began = time.monotonic()
        final = wait_all_terminal(publisher, [s.dispatch_id for s in submitted],
                                  timeout_s=200, stack=celery_stack)
    print(f"submitted {len(submitted)} in {submit_s:.1f}s, all terminal "
          f"{time.monotonic() - began:.1f}s after the worker was ready; {sampler.samples} "
          f"samples, at most {sampler.max_claimed} Claimed at once")

    logs = worker_logs(celery_stack)
    # ---- invariant 3, sampled from outside while the worker ran
    assert sampler.samples >= 20, f"sampler too slow: {sampler.samples} samples, " \
                                  f"errors={sampler.errors[:3]}"
    assert not sampler.violations, f"threads with >1 Claimed: {sampler.violations[:5]}{logs}"
    assert sampler.max_claimed >= 2, (
        f"never saw two threads Claimed at once (max {sampler.max_claimed}): the load did not "
        f"run in parallel, so the exclusivity checks prove nothing{logs}")

    # ---- everything acked, exactly once
    counts = status_counts(publisher)
    assert counts == {"Acked": THREADS * PER_THREAD}, f"{counts}{logs}"
    for s in submitted:
        d = final[s.dispatch_id]
        assert d.status == DispatchStatus.Acked and d.attempt_count == 0, (s, d)
        assert d.run_response == s.expected_response, (s, d)
        assert d.dispatch_instance_id is not None, d
        run = publisher.get_run(s.run_id)
        assert run is not None and run.status == RunStatus.done, (s, run)

    # ---- per thread: execution order and no overlap
    by_thread: dict[str, list[Submitted]] = {}
    for s in submitted:
        by_thread.setdefault(s.thread_id, []).append(s)
    failures: list[str] = []
    for thread_id, items in sorted(by_thread.items()):
        timing: dict[str, tuple[int, int]] = {}
        for s in items:
            started = events_of(publisher, s.run_id, "run_started")
            finished = wait_for_events(publisher, s.run_id, "run_finish", 1, celery_stack)
            assert len(started) == 1 and len(finished) == 1, (
                f"run {s.run_id} of {thread_id}: {len(started)} run_started, "
                f"{len(finished)} run_finish\n{describe_events(publisher, s.run_id)}{logs}")
            assert started[0].ts <= finished[0].ts, describe_events(publisher, s.run_id)
            timing[s.dispatch_id] = (started[0].ts, finished[0].ts)

        actual = sorted(items, key=lambda s: timing[s.dispatch_id])
        expected = sorted(items, key=lambda s: (s.priority, s.index))
        table = "\n".join(
            f"    ran #{n}: submitted #{s.index} priority {s.priority:3d} "
            f"started={timing[s.dispatch_id][0]} finished={timing[s.dispatch_id][1]} "
            f"acked={final[s.dispatch_id].completed_at}"
            for n, s in enumerate(actual))
        if [s.dispatch_id for s in actual] != [s.dispatch_id for s in expected]:
            failures.append(f"{thread_id}: order is not priority-then-FIFO; expected "
                            f"{[(s.priority, s.index) for s in expected]}\n{table}")
        for prev, nxt in itertools.pairwise(actual):
            prev_finish = timing[prev.dispatch_id][1]
            next_start = timing[nxt.dispatch_id][0]
            prev_acked = final[prev.dispatch_id].completed_at
            next_acked = final[nxt.dispatch_id].completed_at
            assert prev_acked is not None and next_acked is not None
            if prev_finish > next_start or prev_acked > next_start:
                failures.append(f"{thread_id}: runs overlap (#{prev.index} finished/acked at "
                                f"{prev_finish}/{prev_acked}, #{nxt.index} started at "
                                f"{next_start})\n{table}")
            if not prev_acked < next_acked:
                failures.append(f"{thread_id}: acks out of execution order\n{table}")
    assert not failures, "\n".join(failures[:5]) + logs
