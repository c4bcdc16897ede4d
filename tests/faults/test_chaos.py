"""Whole-stack faults under load, each run ending with the workload audit (issue 6).

Real `celery -A tasks worker` and `celery -A tasks beat` processes, real Redis and SQL:
- Redis flushed (FLUSHALL) and then restarted empty in the middle of 1,000 dispatches (with
  MAILBOX_TEST_REDIS_CLUSTER=1: every master of a three-master Redis Cluster flushed, then
  one master restarted empty);
- PostgreSQL restarted (fast, then immediate) in the middle of a load (PostgreSQL pass only);
- every wake-up message published three times (clients and workers), execute messages too;
- broker messages dropped: every first-hand wake-up (only the sweep's get through) and one
  phase message of every first attempt, and every message of some threads (they
  dead-letter);
- beat stopped and restarted in the middle of a load.
`tests.support.fault_hooks` injects the message faults, in the workers (`-I`) and in this
process. `mailbox.dev.workload_audit.WorkloadAudit` samples "one Claimed per thread" and "epochs
never go back" throughout and audits the end: every dispatch terminal, none lost, one result
per attempt, per-thread order, the store's own audit.

Loads are steady (`Driver`, at most a few dispatches in flight). A burst longer than the lease
once burned attempts without any fault: every sweep claimed every due thread at once and the
claims' leases ran out while their chains queued behind each other. The sweep now wakes due
threads with wake-ups, which ride behind phase messages, so claims follow capacity;
`test_backlog_longer_than_the_lease_completes` holds that.

MAILBOX_FAULT_SCALE multiplies the workload sizes (default 1: the issue's counts);
MAILBOX_FAULT_LEASE_MS sets the lease (default 1500 ms, for an idle 2-core machine).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mailbox import DispatchStatus, Mailbox
from mailbox.dev.embedded_redis import EmbeddedRedis, free_port
from mailbox.dev.workload_audit import WorkloadAudit, WorkloadReport
from tests.conftest import BACKENDS, POSTGRES_URL
from tests.e2e.conftest import celery_stack, publisher  # noqa: F401  (fixtures)
from tests.support.e2e_helpers import (
    events_of,
    point_app_at_broker,
    received_count,
    worker_logs,
)
from tests.support.fault_hooks import PHASES, Driver, Faults, Item, installed
from tests.support.racers import race
from tests.support.redis_cluster import LocalRedisCluster, cluster_mode
from tests.support.services import require
from tests.support.workers import Stack, stack

SCALE = float(os.environ.get("MAILBOX_FAULT_SCALE", "1"))
HOOKS = ["tests.support.fault_hooks"]
# Short leases keep lease-expiry recovery cheap. The lease must cover claim -> execute (four
# queue hops, nothing extends it before execute): a machine much busier than an idle 2-core
# one needs more (MAILBOX_FAULT_LEASE_MS), see the backlog finding.
LEASE_MS = os.environ.get("MAILBOX_FAULT_LEASE_MS", "1500")
FAST = {"MAILBOX_LEASE_MS": LEASE_MS, "MAILBOX_SWEEP_INTERVAL_S": "1"}
CONCURRENCY = 3


def scaled(n: int) -> int:
    return max(1, round(n * SCALE))


def plan(threads: int, per_thread: int, prefix: str, agent: str = "echo",
         max_attempts: int = 5, interrupt_every: int = 0) -> list[Item]:
    """`per_thread` dispatches on each of `threads` threads, round-robin; with
    `interrupt_every`, every n-th submission of a thread interrupts it first (its epoch
    rises, its queued work is superseded)."""
    return [Item(f"{prefix}-{t}", agent, f"{prefix}-{t} #{n}", max_attempts,
                 interrupt=bool(interrupt_every) and n % interrupt_every == interrupt_every - 1)
            for n in range(per_thread) for t in range(threads)]


def epochs(box: Mailbox, threads: list[str]) -> dict[str, int]:
    return {t: box.store.sql_epoch(t) for t in threads}


@contextlib.contextmanager
def publishing_to(s: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mailbox]:
    """This process as an application calling dispatch.delay() against the stack `s` (like
    the e2e `publisher` fixture, but for a stack with its own Redis or database): the
    environment, and the Celery app's broker connection pools, reset before and after."""
    import tasks.runtime
    from tasks import app as celery_app

    for key, value in s.env().items():
        if key.startswith(("MAILBOX_", "CELERY_")):
            monkeypatch.setenv(key, value)
    before = celery_app.conf.broker_url

    point_app_at_broker(s.broker)
    tasks.runtime.reset()
    try:
        yield tasks.runtime.mailbox()
    finally:
        tasks.runtime.reset()
        point_app_at_broker(before)


def audited(audit: WorkloadAudit, s: Stack) -> WorkloadReport:
    """The final audit; on failure its violations and the stack's logs."""
    report = audit.check()
    print(f"\naudit: {report.to_json()}")
    if not report.ok:
        raise AssertionError(f"{report.violations[:20]}{worker_logs(s)}")
    return report


# ============================================================ Redis flushed and restarted
class Supervisor:
    """Restarts the worker when it exits, as a process supervisor (systemd, a container
    restart policy) would, so that the load goes on and the audit still shows what a lost
    worker cost. No restart is expected: a worker must survive Redis going away (the
    channel's errors are connection errors: see
    test_closing_the_channel_after_losing_redis_raises_only_connection_errors). The restarts
    are counted, and `check()` fails the test on any (the stack fails it too, at its end:
    the dead worker was not killed by the test)."""

    def __init__(self, s: Stack, worker: subprocess.Popen[bytes]) -> None:
        self.stack, self.worker = s, worker
        self.restarts: list[str] = []  # how each dead worker ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)
        assert not self._thread.is_alive(), "the supervisor did not stop"

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.2):
                if self.worker.poll() is not None:
                    self.restarts.append(f"pid {self.worker.pid} exited with "
                                         f"{self.worker.returncode} at {time.time():.1f}")
                    self.worker = self.stack.start_worker(concurrency=CONCURRENCY)
        except BaseException as exc:  # check() reports it
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the supervisor failed: {self.error!r}") from self.error
        assert not self.restarts, (
            f"the worker died {len(self.restarts)} time(s) and was restarted; no restart is "
            f"expected: {self.restarts}{worker_logs(self.stack)}")


class LossyRedis:
    """The Redis that the Redis-loss test wipes, of the test's own.

    One server (the default): leases, epochs, event streams and the broker queue all live
    there; `flush` is FLUSHALL, `crash_restart` a SIGKILL and a start, empty.
    MAILBOX_TEST_REDIS_CLUSTER=1: the coordination state on a three-master Redis Cluster, the
    broker a plain Redis beside it (a cluster cannot be one); `flush` empties every master
    and the broker, `crash_restart` kills ONE master and starts it again — it rejoins with
    its slots and nothing else, while the other masters keep serving theirs."""

    def __init__(self, server: EmbeddedRedis, cluster: LocalRedisCluster | None) -> None:
        self.server = server
        self.cluster = cluster
        self.restarted_empty = False
        """A killed master came back as a new process (another run id): its data is gone."""

    def _run_id(self, index: int) -> str:
        assert self.cluster is not None
        with self.cluster.nodes[index].client() as client:
            return str(client.info("server")["run_id"])

    @property
    def url(self) -> str:
        return self.cluster.url if self.cluster else self.server.url

    @property
    def broker_url(self) -> str | None:
        return self.server.url if self.cluster else None

    def flush(self) -> None:
        if self.cluster:
            self.cluster.flushall()
        client = redis.Redis.from_url(self.server.url)
        pipe = client.pipeline(transaction=True)  # the live system writes right after
        assert pipe.flushall().dbsize().execute() == [True, 0]
        client.close()

    def crash_restart(self, down_s: float) -> None:
        """A crash: no persistence, it comes back empty."""
        if self.cluster:
            before = self._run_id(0)
            self.cluster.kill(0)
            time.sleep(down_s)
            self.cluster.start_node(0)
            self.restarted_empty = self._run_id(0) != before
        else:
            self.server.kill()
            time.sleep(down_s)
            self.server.start()


@pytest.fixture
def lossy_redis(private_redis: EmbeddedRedis) -> Iterator[LossyRedis]:
    if not cluster_mode():
        yield LossyRedis(private_redis, None)
        return
    cluster = LocalRedisCluster()
    cluster.start()
    try:
        yield LossyRedis(private_redis, cluster)
    finally:
        cluster.stop()


@pytest.fixture
def redis_stack(make_mailbox: object, lossy_redis: LossyRedis, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Stack, Mailbox]]:
    box = make_mailbox(lossy_redis.url)  # type: ignore[operator]
    settings = box.settings
    with stack(settings.database_url, lossy_redis.url, settings.namespace, tmp_path,
               broker_url=lossy_redis.broker_url, **FAST) as s, \
            publishing_to(s, monkeypatch) as pub:
        yield s, pub


def test_redis_flushed_then_restarted_during_1000_dispatches(
        redis_stack: tuple[Stack, Mailbox], lossy_redis: LossyRedis) -> None:
    """A Redis of the test's own (leases, epochs, event streams and the broker queue): after
    a third of the dispatches FLUSHALL, after two thirds SIGKILL and start it again, empty.
    Lost wake-ups and chain messages leave work Queued or Claimed; the sweep recovers it.
    On a Redis Cluster (MAILBOX_TEST_REDIS_CLUSTER=1): every master and the broker flushed,
    then one master killed and started again, empty (`LossyRedis`)."""
    s, box = redis_stack
    # 90 threads of plain work, 10 whose every third submission interrupts the thread: their
    # epochs rise, and the Redis epoch cache that FLUSHALL and the restart wipe is refilled.
    work = plan(threads=90, per_thread=scaled(10), prefix="r")
    work += plan(threads=10, per_thread=scaled(10), prefix="ri", interrupt_every=3)
    work.sort(key=lambda item: int(item.input.rsplit("#", 1)[1]))  # round-robin again
    s.start_beat()
    supervisor = Supervisor(s, s.start_worker(concurrency=CONCURRENCY))
    # Streams die with FLUSHALL: their events are checked where they survived.
    audit = WorkloadAudit(box, redis_data_loss=True, sample_interval_s=0.1)
    driver = Driver(audit, box, work, max_outstanding=8)
    started = time.monotonic()
    marks: dict[str, float] = {}
    with audit.sampling(), supervisor:
        driver.start()
        driver.wait_submitted(len(work) // 3, timeout_s=120)
        lossy_redis.flush()
        marks["flushed"] = time.monotonic() - started
        driver.wait_submitted(2 * len(work) // 3, timeout_s=120)
        lossy_redis.crash_restart(down_s=0.5)
        marks["restarted"] = time.monotonic() - started
        driver.join(timeout_s=180)
        audit.wait_terminal(timeout_s=120)
    marks["done"] = time.monotonic() - started
    print(f"\nredis flush+restart: {len(work)} dispatches, {marks}, retried submits "
          f"{driver.retried}, stored without wake {driver.not_published}, worker restarts "
          f"{len(supervisor.restarts)}")
    supervisor.check()
    report = audited(audit, s)
    assert set(report.by_status) <= {"Acked", "Superseded"}, report.by_status
    assert report.by_status["Acked"] >= len(work) - 10 * scaled(10) // 3, report.by_status
    # On one Redis the audit's samples see it down. A cluster client retries with backoff and
    # may ride out the outage unseen: there, the master coming back as a new, empty process
    # is the proof.
    assert report.sample_errors > 0 or lossy_redis.restarted_empty, \
        "Redis was never seen down: the restart did not bite"
    assert min(epochs(box, [f"ri-{t}" for t in range(10)]).values()) >= scaled(10) // 3
    # The flush and the restart each wiped the streams of the work before them; the streams
    # of the last third are whole and were checked event by event.
    assert report.events_unverified <= 3 * len(work) // 4, report.events_unverified


# ====================================================================== PostgreSQL restart
class PrivatePostgres:
    """A PostgreSQL cluster of this test alone (initdb in a temporary directory), free to be
    restarted. The binaries refuse to run as root, so they run as the `postgres` user then."""

    def __init__(self) -> None:
        self.bin = Path(shutil.which("pg_ctl") or "/usr/local/bin/pg_ctl").parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailbox-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.prefix, *args], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}"
                               f"{self.log.read_text() if self.log.exists() else ''}")

    def init(self) -> None:
        if self.prefix:
            shutil.chown(self.dir, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "--no-sync")

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                        f"-c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if "postgres" not in BACKENDS or not POSTGRES_URL:
        pytest.skip("PostgreSQL pass only (MAILBOX_TEST_BACKENDS with postgres and "
                    "MAILBOX_TEST_POSTGRES_URL)")
    if shutil.which("pg_ctl") is None and not Path("/usr/local/bin/pg_ctl").exists():
        require("postgres", "no pg_ctl/initdb binaries for a private cluster")
    cluster = PrivatePostgres()
    started = time.monotonic()
    try:
        cluster.init()
        cluster.start()
    except (RuntimeError, OSError) as exc:
        cluster.destroy()
        require("postgres", f"cannot run a private PostgreSQL cluster: {exc}")
    print(f"\nprivate PostgreSQL up in {time.monotonic() - started:.1f}s")
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_postgres_restarted_during_a_load(private_postgres: PrivatePostgres, redis_url: str,
                                          namespace: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    box = Mailbox.connect(private_postgres.url, redis_url, namespace=namespace)
    box.create_schema()
    work = plan(threads=15, per_thread=scaled(8), prefix="pg")
    downtimes: list[float] = []
    try:
        with stack(private_postgres.url, redis_url, namespace, tmp_path, **FAST) as s, \
                publishing_to(s, monkeypatch) as pub:
            s.start_beat()
            s.start_worker(concurrency=3)
            audit = WorkloadAudit(pub)
            driver = Driver(audit, pub, work, max_outstanding=8)
            with audit.sampling():
                driver.start()
                for mark, mode in ((1, "fast"), (2, "immediate")):  # a restart, then a crash
                    driver.wait_submitted(mark * len(work) // 3, timeout_s=120)
                    down = time.monotonic()
                    private_postgres.stop(mode)
                    time.sleep(0.5)
                    private_postgres.start()
                    downtimes.append(round(time.monotonic() - down, 2))
                driver.join(timeout_s=180)
                audit.wait_terminal(timeout_s=120)
            print(f"\npostgres restarts: downtimes {downtimes}s, retried submits "
                  f"{driver.retried}")
            report = audited(audit, s)
            assert report.by_status == {"Acked": len(work)}, report.by_status
            assert report.sample_errors > 0, "the database was never seen down"
    finally:
        box.store.engine.dispose()
        with contextlib.suppress(Exception):
            keys = list(box.store.coordinator.client.scan_iter(f"{namespace}:*"))
            if keys:
                box.store.coordinator.client.delete(*keys)
        box.close()


# ============================================================== duplicated wake messages
# Nothing here waits for a lease to run out, so the lease is long: with 1.5 s, an instant
# agent's lease (never extended: no heartbeat tick) sometimes runs out between execute and
# settle under load, the retry is a replay, and the tripled execute of a replay reports the
# result twice — the replay finding, pinned deterministically further down.
@pytest.mark.stack_env(MAILBOX_LEASE_MS="5000", MAILBOX_SWEEP_INTERVAL_S="1")
def test_every_wake_message_tripled(celery_stack: Stack,  # noqa: F811
                                    publisher: Mailbox) -> None:  # noqa: F811
    """Every wake-up is published three times by every process (dispatch.delay here, delayed
    retry wake-ups in the workers), every execute message too; interrupts on some threads.
    Each dispatch still runs once per attempt, in order, and the audit passes."""
    namespace = publisher.settings.namespace
    faults = Faults(publisher.store.coordinator.client, namespace)
    faults.publish_rule("mailbox.dispatch", copies=3)  # every wake-up, in every process
    faults.publish_rule("mailbox.execute", copies=3)  # and every execute phase message
    # Echo threads, and flaky ones whose retries are woken from the workers (with a delay).
    work = plan(threads=10, per_thread=scaled(5), prefix="dup", interrupt_every=3)
    work += plan(threads=4, per_thread=scaled(3), prefix="flaky", agent="flaky")
    work = [Item(i.thread_id, i.agent, {"fail_times": 1} if i.agent == "flaky" else i.input,
                 interrupt=i.interrupt) for i in work]
    celery_stack.start_beat()
    celery_stack.start_worker(concurrency=3, include=HOOKS, FAULT_HOOKS="1")
    audit = WorkloadAudit(publisher)
    with installed(celery_stack.redis_url, namespace), audit.sampling():
        driver = Driver(audit, publisher, work, max_outstanding=8).start()
        driver.join(timeout_s=120)
        assert driver.not_published == 0, "dispatch.delay could not publish its wake-ups"
        audit.wait_terminal(timeout_s=60)
    report = audited(audit, celery_stack)
    assert set(report.by_status) <= {"Acked", "Superseded"}, report.by_status
    if scaled(5) >= 3:  # each dup thread's third submission interrupted it
        assert min(epochs(publisher, [f"dup-{t}" for t in range(10)]).values()) >= 1
    counters = faults.counters()["duplicated"]
    print(f"duplicated: {counters}")
    # Every execute is tripled; wake-ups are fewer than dispatches (a thread whose wake-up
    # still waits is not woken again, docs/behaviour.md#wake-gate) but each thread's are.
    threads = len({i.thread_id for i in work})
    assert counters.get("mailbox.dispatch", 0) >= 2 * threads, counters
    assert counters.get("mailbox.execute", 0) >= 2 * len(work), counters
    wakes = received_count(celery_stack, "mailbox.dispatch")
    assert wakes >= 3 * threads, f"only {wakes} wake-ups reached the worker"
    for dispatch_id in audit.dispatch_ids:
        final = publisher.get_dispatch(dispatch_id)
        assert final is not None
        started = [e.data["attempt"] for e in events_of(publisher, final.run_id,
                                                        "run_started")]
        expected = [0, 1] if final.thread_id.startswith("flaky") else [0]
        if final.status == DispatchStatus.Superseded:
            # Interrupted before it ran, or while it ran (its epoch went stale before the
            # result or the ack: superseded there): each attempt it began, begun once.
            assert started == expected[:len(started)], (final, started)
            continue
        assert started == expected, (final, started)


# ================================================================= dropped broker messages
@pytest.mark.stack_env(**FAST)
def test_dropped_broker_messages_are_recovered_by_the_sweep(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    """Every wake-up is dropped — dispatch.delay's, and those the workers publish after a
    settle or for a retry — except the sweep's own: only the sweep (beat) starts any work.
    Each dispatch's first attempt also loses one phase message (rotating over the five phases
    by thread), so its claim is only recovered when the lease runs out. Those end Acked:
    by a second attempt, or, when the lost message was the settle, by the sweep, which finds
    the run done by the first.
    Threads `void-*` lose every phase message too: nothing of theirs ever runs, each
    attempt's lease runs out, and they end in the dead letter with max_attempts=2 —
    terminal, not lost."""
    namespace = publisher.settings.namespace
    faults = Faults(publisher.store.coordinator.client, namespace)
    faults.publish_rule("mailbox.dispatch", copies=0, not_from="mailbox.sweep")
    for phase in PHASES:
        faults.publish_rule(f"mailbox.{phase}", copies=0, thread_prefix="void-")
        faults.publish_rule(f"mailbox.{phase}", copies=0, attempt=0,
                            thread_prefix=f"drop-{phase}-")
    work = [item for phase in PHASES
            for item in plan(threads=2, per_thread=scaled(2), prefix=f"drop-{phase}")]
    void = plan(threads=4, per_thread=1, prefix="void", max_attempts=2)
    celery_stack.start_beat()
    celery_stack.start_worker(concurrency=3, include=HOOKS, FAULT_HOOKS="1")
    audit = WorkloadAudit(publisher)
    started = time.monotonic()
    with installed(celery_stack.redis_url, namespace), audit.sampling():
        driver = Driver(audit, publisher, void + work, max_outstanding=16).start()
        driver.join(timeout_s=120)
        audit.wait_terminal(timeout_s=90)
    print(f"\ndropped: {faults.counters()['dropped']} in {time.monotonic() - started:.1f}s")
    report = audited(audit, celery_stack)
    assert report.by_status == {"Acked": len(work), "DeadLetter": len(void)}, report.by_status
    dropped = faults.counters()["dropped"]
    # At least each thread's first wake-up (while one waits, a thread is not woken again:
    # docs/behaviour.md#wake-gate).
    assert dropped.get("mailbox.dispatch", 0) >= len({i.thread_id for i in work + void}), \
        dropped
    for phase in PHASES:
        assert dropped.get(f"mailbox.{phase}", 0) >= 1, (phase, dropped)
    for dispatch_id in audit.dispatch_ids:
        final = publisher.get_dispatch(dispatch_id)
        assert final is not None
        if final.thread_id.startswith("void"):
            assert final.status == DispatchStatus.DeadLetter, final
            assert final.last_error == "lease expired; max attempts reached", final
            assert not events_of(publisher, final.run_id, "run_started"), final
        elif final.thread_id.startswith("drop-settle-"):
            # The attempt wrote its outcome; only the ack was lost. The sweep acks it: no
            # second attempt, and the agent ran once.
            assert final.status == DispatchStatus.Acked and final.attempt_count == 0, final
            assert len(events_of(publisher, final.run_id, "run_started")) == 1, final
        else:  # the first attempt lost a message: a later one completed it
            assert final.status == DispatchStatus.Acked and final.attempt_count >= 1, final


# ============================================================== beat stopped and restarted
@pytest.mark.stack_env(**FAST)
def test_beat_stopped_and_restarted_during_a_load(
        celery_stack: Stack, publisher: Mailbox) -> None:  # noqa: F811
    """Without beat, work whose wake-up arrives still runs; what needs the sweep waits: a
    dispatch whose wake-up was lost stays Queued, and one whose worker process was killed
    stays Claimed past its lease. Beat back: everything completes."""
    namespace = publisher.settings.namespace
    faults = Faults(publisher.store.coordinator.client, namespace)
    # Their first-hand wake-ups are lost; the sweep's would get through, were beat running.
    faults.publish_rule("mailbox.dispatch", copies=0, thread_prefix="lost-",
                        not_from="mailbox.sweep")
    beat = celery_stack.start_beat()
    worker = celery_stack.start_worker(concurrency=3, include=HOOKS, FAULT_HOOKS="1")
    audit = WorkloadAudit(publisher)
    with installed(celery_stack.redis_url, namespace), audit.sampling():
        before = Driver(audit, publisher, plan(threads=6, per_thread=scaled(4), prefix="pre"),
                        max_outstanding=8).start()
        before.join(timeout_s=60)
        celery_stack.kill(beat, signal.SIGTERM)
        stopped_at = time.monotonic()

        for i in range(3):
            faults.trap(f"killed-{i}", "execute", "before")
        during = (plan(threads=4, per_thread=scaled(3), prefix="live")
                  + plan(threads=3, per_thread=1, prefix="lost")
                  + plan(threads=3, per_thread=1, prefix="killed"))
        driver = Driver(audit, publisher, during, max_outstanding=20).start()
        assert before.not_published == 0, "dispatch.delay could not publish its wake-ups"
        for _ in range(3):
            hit = faults.next_hit(timeout_s=30)
            assert hit is not None, worker_logs(celery_stack)
            celery_stack.kill_pool_child(worker, int(hit["pid"]))
        driver.join(timeout_s=60)
        by_thread = audit.by_thread()
        live = [d for t, ids in by_thread.items() if t.startswith(("pre", "live")) for d in ids]
        waiting = [d for t, ids in by_thread.items() if t.startswith(("lost", "killed"))
                   for d in ids]
        # Wait until each waiting dispatch is overdue by three sweep intervals: beat, were it
        # running, would have woken or reclaimed it by then.
        def overdue(d: str) -> bool:
            current = publisher.get_dispatch(d)
            assert current is not None, d
            since = (current.lease_until if current.status == DispatchStatus.Claimed
                     else current.created_at)
            return since is not None and since + 3000 < int(time.time() * 1000)

        deadline = time.monotonic() + 30
        while not all(map(overdue, waiting)):
            assert time.monotonic() < deadline, worker_logs(celery_stack)
            time.sleep(0.1)
        audit.wait_terminal(timeout_s=30, only=live)
        for d in waiting:
            current = publisher.get_dispatch(d)
            assert current is not None, d
            expected = (DispatchStatus.Queued if current.thread_id.startswith("lost")
                        else DispatchStatus.Claimed)
            assert current.status == expected, (current, worker_logs(celery_stack))
        print(f"\nbeat stopped {time.monotonic() - stopped_at:.1f}s: {len(live)} live "
              f"dispatches Acked, {len(waiting)} waiting for a sweep")
        celery_stack.start_beat()
        audit.wait_terminal(timeout_s=60)
    report = audited(audit, celery_stack)
    assert report.by_status == {"Acked": len(audit.dispatch_ids)}, report.by_status


def audit_thread(audit: WorkloadAudit, dispatch_id: str) -> str:
    return next(t for t, ids in audit.by_thread().items() if dispatch_id in ids)


# ============================================================== finding: backlog > lease
BACKLOG = 60


@pytest.mark.stack_env(MAILBOX_LEASE_MS="1000", MAILBOX_SWEEP_INTERVAL_S="1")
def test_backlog_longer_than_the_lease_completes(celery_stack: Stack,  # noqa: F811
                                                 publisher: Mailbox) -> None:  # noqa: F811
    if not publisher.settings.database_url.startswith("sqlite"):
        pytest.skip("checked on the SQLite pass only (the cause was not in the database)")
    # Stored without wake-ups (as after a broker outage): the start-up sweep finds them all.
    ids = [publisher.submit(f"backlog-{i}", "echo", str(i), max_attempts=1, wake=False)
           for i in range(BACKLOG)]
    celery_stack.start_beat()
    celery_stack.start_worker(concurrency=2)
    counts = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = {s.value: n for s, n in publisher.store.counts_by_status().items() if n}
        if set(counts) <= {"Acked", "DeadLetter"}:
            break
        time.sleep(0.2)
    assert counts == {"Acked": len(ids)}, counts


# ================================================== finding: worker dies on broker loss
def test_closing_the_channel_after_losing_redis_raises_only_connection_errors(
        private_redis: EmbeddedRedis) -> None:
    """The end state a worker reaches when Redis dies while its BRPOP is pending and it holds
    a received, unacked message (seen in the 1,000-dispatch test: "Unrecoverable error:
    AttributeError: 'NoneType' object has no attribute 'hostname'", then the worker exits):
    `Consumer.on_connection_error_after_connected` ran `connection.collect()` — the first
    `Channel.close()` failed draining the BRPOP after it had disconnected the pools, and the
    transport was detached (`client = None`) — then `connection.close()` closes the channel
    again and restoring the unacked message builds a pool from the detached connection.
    Celery reconnects after connection errors; anything else stops the worker. kombu 5.7
    raised AttributeError there; `CheckedRedisChannel._connparams` raises ConnectionError."""
    import importlib

    from tasks.app import CheckedRedisTransport  # what celeryconfig uses for redis://

    kombu: Any = importlib.import_module("kombu")  # untyped
    conn = kombu.Connection(private_redis.url, transport=CheckedRedisTransport)
    queue = kombu.Queue("q", kombu.Exchange("q"), "q")
    with conn.Producer() as producer:
        producer.publish({"wake": 1}, exchange="", routing_key="q", declare=[queue])
    held: list[object] = []
    consumer = conn.Consumer([queue], callbacks=[lambda _body, message: held.append(message)])
    consumer.consume()
    conn.drain_events(timeout=5)
    assert len(held) == 1  # received, not acked
    private_redis.kill()
    channel = consumer.channel
    channel._disconnect_pools()  # the first close(), interrupted by the failed BRPOP drain
    conn.transport.client = None  # collect() -> _do_close_transport()
    with contextlib.suppress(*conn.connection_errors):  # Celery reconnects after those
        channel.close()


# ============================================ finding: a replayed attempt settled twice
def test_a_replayed_attempt_delivered_twice_reports_its_result_once(mailbox: Mailbox) -> None:
    """Seen in test_every_wake_message_tripled on PostgreSQL: attempt 0 recorded the outcome
    (run done), its lease ran out before settle acked, the retry is a replay (reconstruct
    finds the run done), and the tripled execute message of the retry reached three settles.
    Here in-process and deterministic: two deliveries of the replay's settle, both past
    record_run_result before either acks (a barrier), as two pool processes do."""
    from dataclasses import replace

    from mailbox.phases import claim_next, execute, reconstruct, resolve, settle, verify

    rt = mailbox.runtime()
    receipt = mailbox.submit("t", "echo", "once")
    ctx = claim_next(rt, "t")
    assert ctx is not None
    for phase in (verify, reconstruct, resolve, execute):
        ctx = phase(rt, ctx)
    assert ctx.outcome.recorded, ctx  # the run is done; the worker dies before settle
    stored = mailbox.get_dispatch(receipt.dispatch_id)
    assert stored is not None and stored.lease_until is not None
    later = stored.lease_until + 1
    assert mailbox.store.reclaim_expired_leases(later, 10)  # what the sweep does
    retry_rt = replace(rt, clock=lambda: later + 1)
    retry = claim_next(retry_rt, "t")
    assert retry is not None and retry.attempt == 1
    for phase in (verify, reconstruct, resolve, execute):
        retry = phase(retry_rt, retry)
    assert retry.outcome.replayed, retry

    # Both deliveries must be inside settle, past record_run_result, at the same moment:
    # each records the result, then waits for the other before it goes on to ack.
    barrier = threading.Barrier(2, timeout=30)
    record = mailbox.store.record_run_result
    recorded: list[str] = []
    passed: list[str] = []

    def record_then_wait(*args: object, **kwargs: object) -> None:
        record(*args, **kwargs)  # type: ignore[arg-type]
        recorded.append(threading.current_thread().name)
        barrier.wait()  # broken (a delivery never came): the racer fails, and the test
        passed.append(threading.current_thread().name)

    mailbox.store.record_run_result = record_then_wait  # type: ignore[method-assign]
    race(*(lambda: settle(retry_rt, copy.deepcopy(retry)) for _ in range(2)),
         start_together=True, timeout_s=60, name="delivery")
    assert not barrier.broken, "the two deliveries were never inside settle at once"
    assert sorted(recorded) == sorted(passed) == ["delivery-0", "delivery-1"], (
        f"both deliveries must record the result and meet past it: recorded {recorded}, "
        f"met {passed}")
    final = mailbox.get_dispatch(receipt.dispatch_id)
    assert final is not None and final.status == DispatchStatus.Acked, final
    acked = [e for e in events_of(mailbox, final.run_id, "run_finish")
             if e.data.get("status") == "acked"]
    assert len(acked) == 1, f"the attempt's result was reported {len(acked)} times"
