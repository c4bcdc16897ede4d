"""The sweep wakes a due thread only when no wake-up of its previous sweep is still pending
(`mailbox.maintenance`, module docstring), and never loses one: a consumed wake-up clears the
thread's mark before the claim, a dropped one is re-sent once its mark expires, and Redis
errors fall back to waking every due thread. Real Redis and SQL; the last tests go through
the Celery tasks' bodies (`mailbox.sweep`, `mailbox.dispatch`) in this process."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator

import pytest

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.maintenance import sweep
from mailbox.phases import claim_next
from mailbox.runtime import Runtime, now_ms
from mailbox.settings import Settings
from mailbox.wake_marks import SWEEP_WAKE_PREFIX, wake_pending_ttl_ms
from tests.support import sweep_kit
from tests.support.sweep_kit import Published, no_inline_wake, task_runtime_of

THREADS = ["wd-a", "wd-b", "wd-c"]


def backlog(box: Mailbox, threads: list[str] = THREADS, per_thread: int = 2) -> None:
    sweep_kit.backlog(box, threads, per_thread)


@pytest.fixture
def rt(mailbox: Mailbox) -> Runtime:
    return mailbox.runtime(wake=no_inline_wake)


def test_two_sweeps_publish_one_wake_per_due_thread(mailbox: Mailbox, rt: Runtime) -> None:
    backlog(mailbox)
    published = Published()
    first = sweep(rt, now_ms(), publish=published)
    assert (first.woken, first.already_pending) == (THREADS, [])
    second = sweep(rt, now_ms(), publish=published)
    assert (second.woken, second.already_pending) == ([], THREADS)
    assert published.threads() == THREADS  # one wake-up each, not two
    client, coordinator = mailbox.store.coordinator.client, mailbox.store.coordinator
    ttl = wake_pending_ttl_ms(mailbox.settings)
    for thread_id, wake_id in published.wakes:
        assert wake_id.startswith(SWEEP_WAKE_PREFIX)
        key = coordinator.wake_pending_key(thread_id)
        assert key.startswith(f"{mailbox.settings.namespace}:")
        assert client.get(key) == wake_id.encode()
        assert 0 < client.pttl(key) <= ttl


def test_a_start_up_sweep_wakes_due_threads_whose_wake_up_is_marked_pending(
        mailbox: Mailbox, rt: Runtime) -> None:
    """A worker's start-up sweep (`wake_all`) does not trust the marks: the wake-ups they
    stand for may have gone with a broker that restarted. It wakes every due thread once and
    its wake-ups now own the marks (their consumers clear them)."""
    backlog(mailbox)
    published = Published()
    sweep(rt, now_ms(), publish=published)  # marks every thread; these messages are "lost"
    lost = dict(published.wakes)
    assert sweep(rt, now_ms(), publish=published).already_pending == THREADS

    start_up = sweep(rt, now_ms(), publish=published, wake_all=True)

    assert (start_up.woken, start_up.already_pending) == (THREADS, [])
    coordinator = mailbox.store.coordinator
    for thread_id in THREADS:
        resent = published.last(thread_id)
        assert resent != lost[thread_id]
        assert coordinator.client.get(coordinator.wake_pending_key(thread_id)) == \
            resent.encode()
        # The re-sent wake-up's claim clears the mark and starts the thread's head.
        ctx = claim_next(rt, thread_id, wake_id=resent)
        assert ctx is not None
        assert coordinator.client.get(coordinator.wake_pending_key(thread_id)) is None


def test_marks_are_set_in_one_round_trip(mailbox: Mailbox, rt: Runtime) -> None:
    threads = [f"wd-many-{i:03d}" for i in range(50)]
    backlog(mailbox, threads, per_thread=1)
    coordinator = mailbox.store.coordinator
    before = coordinator.round_trips
    report = sweep(rt, now_ms(), publish=Published())
    assert len(report.woken) == 50 and coordinator.round_trips - before == 1
    before = coordinator.round_trips
    report = sweep(rt, now_ms(), publish=Published())
    assert len(report.already_pending) == 50 and coordinator.round_trips - before == 1


def test_due_threads_beyond_one_page_are_all_woken(mailbox: Mailbox, rt: Runtime,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """More due threads than one page of the due-thread query: every one is woken, by both
    kinds of sweep."""
    monkeypatch.setattr("mailbox.maintenance.DUE_THREADS_PAGE", 2)
    threads = [f"wd-page-{i}" for i in range(5)]
    backlog(mailbox, threads, per_thread=1)
    assert sweep(rt, now_ms(), publish=Published()).woken == threads
    woken: list[str] = []
    inline = mailbox.runtime(wake=lambda thread_id, delay_ms: woken.append(thread_id))
    assert sweep(inline, now_ms()).woken == threads and woken == threads


def test_consumed_wake_lets_the_next_sweep_wake_the_thread_again(mailbox: Mailbox,
                                                                 rt: Runtime) -> None:
    backlog(mailbox)
    published = Published()
    sweep(rt, now_ms(), publish=published)
    coordinator = mailbox.store.coordinator
    # The consumer of wd-a's wake-up clears the mark as its claim begins, then claims (and
    # runs) one dispatch.
    worker = mailbox.runtime()
    ctx = claim_next(worker, "wd-a", wake_id=published.last("wd-a"))
    assert coordinator.client.exists(coordinator.wake_pending_key("wd-a")) == 0
    assert ctx is not None
    mailbox.store.ack(ctx.dispatch_id, ctx.token, now_ms())
    # wd-a still has a due dispatch and nothing Claimed: woken again; the others are pending.
    report = sweep(rt, now_ms(), publish=published)
    assert (report.woken, report.already_pending) == (["wd-a"], ["wd-b", "wd-c"])
    assert published.threads() == [*THREADS, "wd-a"]


def test_only_the_marked_wake_clears_the_mark(mailbox: Mailbox, rt: Runtime) -> None:
    """The claims of a duplicate of an older sweep wake-up, and of wake-ups that are not the
    sweep's (submit, settle, retry), leave a newer mark alone; the marked one clears it."""
    backlog(mailbox, ["wd-a"])
    coordinator = mailbox.store.coordinator
    old = Published()
    sweep(rt, now_ms(), publish=old, pending_ttl_ms=1)
    time.sleep(0.01)
    new = Published()
    sweep(rt, now_ms(), publish=new)  # the old mark expired: a new wake-up, a new mark
    assert new.threads() == ["wd-a"] and new.last("wd-a") != old.last("wd-a")
    [dispatch] = mailbox.store.list_dispatches("wd-a", limit=1)
    key = coordinator.wake_pending_key("wd-a")
    busy = mailbox.runtime()
    held = claim_next(busy, "wd-a")  # the thread busy: the claims below take no lease
    assert held is not None
    for other in (old.last("wd-a"), dispatch.dispatch_id, "5f0c3c1e-0000-4000-8000-0000",
                  SWEEP_WAKE_PREFIX + "x" * 100, None):
        assert claim_next(mailbox.runtime(), "wd-a", wake_id=other) is None
        assert coordinator.client.get(key) == new.last("wd-a").encode(), other
    assert claim_next(mailbox.runtime(), "wd-a", wake_id=new.last("wd-a")) is None  # busy…
    assert coordinator.client.exists(key) == 0  # …but the mark is its to clear


def test_dropped_wake_is_resent_once_its_mark_expires(mailbox: Mailbox, rt: Runtime) -> None:
    backlog(mailbox)
    published = Published()  # nothing consumes: every wake-up here is dropped
    ttl_ms = 2000  # the second sweep must come within it, even on a busy machine
    first = sweep(rt, now_ms(), publish=published, pending_ttl_ms=ttl_ms)
    assert first.woken == THREADS
    assert sweep(rt, now_ms(), publish=published, pending_ttl_ms=ttl_ms).woken == []
    coordinator = mailbox.store.coordinator
    deadline = time.monotonic() + 30  # until Redis has expired every mark
    while any(coordinator.client.exists(coordinator.wake_pending_key(t)) for t in THREADS):
        assert time.monotonic() < deadline, "the wake marks never expired"
        time.sleep(0.05)
    again = sweep(rt, now_ms(), publish=published, pending_ttl_ms=ttl_ms)
    assert (again.woken, again.already_pending) == (THREADS, [])
    assert published.threads() == THREADS * 2
    assert len({w for _, w in published.wakes}) == 6  # each re-sent wake-up has its own id


def test_redis_down_still_wakes_every_due_thread(make_mailbox: Callable[..., Mailbox],
                                                 private_redis: EmbeddedRedis) -> None:
    box = make_mailbox(private_redis.url)
    backlog(box)
    published = Published()
    rt = box.runtime(wake=no_inline_wake)
    assert sweep(rt, now_ms(), publish=published).woken == THREADS  # marked
    private_redis.kill()
    for _ in range(2):  # the marks are out of reach: never skip, wake all, every sweep
        report = sweep(rt, now_ms(), publish=published)
        assert (report.woken, report.already_pending) == (THREADS, [])
    assert published.threads() == THREADS * 3


def test_failed_publish_clears_the_marks_it_did_not_send(mailbox: Mailbox,
                                                         rt: Runtime) -> None:
    backlog(mailbox)
    sent: list[str] = []

    def broker_down_after_one(thread_id: str, wake_id: str) -> None:
        if sent:
            raise ConnectionError("broker unreachable")
        sent.append(thread_id)

    with pytest.raises(ConnectionError):
        sweep(rt, now_ms(), publish=broker_down_after_one)
    coordinator = mailbox.store.coordinator
    assert [t for t in THREADS if coordinator.client.exists(coordinator.wake_pending_key(t))
            ] == ["wd-a"]
    report = sweep(rt, now_ms(), publish=Published())
    assert (report.woken, report.already_pending) == (["wd-b", "wd-c"], ["wd-a"])


def test_without_a_publisher_the_sweep_wakes_every_time(mailbox: Mailbox) -> None:
    """An in-process waker claims right away (the facade, worker lifecycle): no marks."""
    backlog(mailbox, ["wd-a"])
    woken: list[str] = []
    rt = mailbox.runtime(wake=lambda thread_id, delay_ms: woken.append(thread_id))
    for _ in range(2):
        assert sweep(rt, now_ms()).woken == ["wd-a"]
    assert woken == ["wd-a", "wd-a"]
    coordinator = mailbox.store.coordinator
    assert coordinator.client.exists(coordinator.wake_pending_key("wd-a")) == 0


def test_ttl_follows_the_settings() -> None:
    base = Settings.from_env({})
    assert wake_pending_ttl_ms(base) == 120_000  # 4 sweeps of 30 s, above the 30 s lease
    fast = Settings.from_env({"MAILBOX_SWEEP_INTERVAL_S": "1", "MAILBOX_LEASE_MS": "1500"})
    assert wake_pending_ttl_ms(fast) == 4_000
    long_lease = Settings.from_env({"MAILBOX_LEASE_MS": "600000"})
    assert wake_pending_ttl_ms(long_lease) == 600_000


# ========================================================== through the Celery task bodies
@pytest.fixture
def tasks_runtime(mailbox: Mailbox) -> Iterator[Mailbox]:
    with task_runtime_of(mailbox) as box:
        yield box


def test_dispatch_task_clears_the_mark_before_it_claims(tasks_runtime: Mailbox,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    import tasks  # noqa: F401  (registers the tasks)

    # `tasks.dispatch` the attribute is the task; the module is only in sys.modules.
    dispatch_module = sys.modules["tasks.dispatch"]
    box = tasks_runtime
    backlog(box, ["wd-a"], per_thread=1)
    published = Published()
    sweep(box.runtime(wake=no_inline_wake), now_ms(), publish=published)
    coordinator = box.store.coordinator
    key = coordinator.wake_pending_key("wd-a")
    claims: list[str | None] = []
    marked_after_claim: list[int] = []

    def claim_only(rt: Runtime, thread_id: str, *, wake_id: str | None = None,
                   expect_due: bool = False) -> str | None:  # start_next, no publish
        ctx = claim_next(box.runtime(), thread_id, wake_id=wake_id, expect_due=expect_due)
        marked_after_claim.append(coordinator.client.exists(key))
        claims.append(None if ctx is None else ctx.dispatch_id)
        return claims[-1]

    monkeypatch.setattr(dispatch_module, "start_next", claim_only)
    # A submit's wake-up (task id = a dispatch id) leaves the sweep's mark alone…
    other = dispatch_module.dispatch.apply(args=("wd-a",), task_id="not-a-sweep-wake")
    assert other.successful() and coordinator.client.exists(key) == 1
    [queued] = box.store.list_dispatches("wd-a")
    assert queued.status == DispatchStatus.Claimed and claims == [queued.dispatch_id]
    assert marked_after_claim == [1]
    box.store.ack(queued.dispatch_id, queued.claim_token or "", now_ms())
    box.submit("wd-a", "echo", "later", wake=False)  # due after that sweep, before its wake-up
    # …the sweep's own clears it in the claim's first step (the lease script), then claims
    # what is due.
    result = dispatch_module.dispatch.apply(args=("wd-a",), task_id=published.last("wd-a"))
    assert result.successful() and len(claims) == 2 and claims[1] is not None
    assert marked_after_claim == [1, 0], "the sweep's wake-up left its mark"
    assert coordinator.client.exists(key) == 0


def test_sweep_task_queues_one_wake_per_thread(tasks_runtime: Mailbox) -> None:
    """`mailbox.sweep` twice: the namespace's queue holds one wake-up per due thread, each
    with the task id its mark names; the task reports the rest as already pending."""
    import tasks.maintenance as maintenance_task
    from tasks.app import app

    box = tasks_runtime
    backlog(box)
    queue = box.settings.namespace
    with app.pool.acquire(block=True) as conn:
        channel = conn.default_channel
        try:
            first = maintenance_task.sweep()
            second = maintenance_task.sweep()
            count = channel.queue_declare(queue=queue, passive=True).message_count
        finally:
            channel.queue_purge(queue)
    assert (first["woken"], first["already_pending"]) == (3, 0)
    assert (second["woken"], second["already_pending"]) == (0, 3)
    assert count == 3
