"""pytest fixtures for testing agents against the real mailbox (README "Test your agents").

Enable them in your `conftest.py` with `pytest_plugins = ["mailbox.testing.pytest_plugin"]`:

- `mailbox_harness`: a started `MailboxHarness` per test (in-memory SQLite, its own Redis
  namespace on a session-wide embedded Redis); override `mailbox_harness_options` to pass
  settings (`{"retry_base_ms": 10}`);
- `mailbox_celery_app` / `mailbox_celery_worker`: the project's Celery app on the in-memory
  broker and an in-process worker on the harness's stores, so that `dispatch.delay()` goes
  through real Celery messages and the five phase tasks in this process.

The worker comes from Celery's own pytest machinery (`celery.contrib.pytest`, which this
plugin loads, and `celery.contrib.testing.worker.start_worker`), so Celery's
`celery_worker_pool` and `celery_worker_parameters` fixtures configure it as they configure
Celery's `celery_worker` ("solo" by default; return "threads" for a pool). pytest-celery 1.x
registers that module under the plugin name `celery` together with Docker-based fixtures;
with `-p no:celery` (no Docker) this plugin still brings the in-process ones.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.testing.celery_worker import celery_app_for, celery_worker_for
from mailbox.testing.harness import MailboxHarness

pytest_plugins = ["celery.contrib.pytest"]


@pytest.fixture(scope="session")
def mailbox_redis_url() -> Iterator[str]:
    """One embedded redis-server for the session; every harness keeps to its namespace."""
    server = EmbeddedRedis(workdir=Path(tempfile.mkdtemp(prefix="mailbox-test-redis-")))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def mailbox_harness_options() -> dict[str, Any]:
    """Keyword arguments of every `mailbox_harness` (Settings fields, `auto_advance`, ...).
    Override it in a module or conftest to change them."""
    return {}


@pytest.fixture
def mailbox_harness(mailbox_redis_url: str, mailbox_harness_options: dict[str, Any]
                    ) -> Iterator[MailboxHarness]:
    """A started harness: in-memory SQLite, a fresh Redis namespace, its own clock."""
    with MailboxHarness(redis_url=mailbox_redis_url, **mailbox_harness_options) as box:
        yield box


@pytest.fixture
def mailbox_celery_app(mailbox_harness: MailboxHarness) -> Iterator[Any]:
    """`tasks.app.app` on the in-memory broker, its task bodies using the harness's stores
    (`dispatch.delay()` publishes there); everything is restored afterwards."""
    with celery_app_for(mailbox_harness) as app:
        yield app


@pytest.fixture
def mailbox_celery_worker(mailbox_harness: MailboxHarness, mailbox_celery_app: Any,
                          celery_worker_pool: str, celery_worker_parameters: dict[str, Any]
                          ) -> Iterator[Any]:
    """An in-process Celery worker consuming the harness's queue (a WorkController in a
    thread), stopped after the test."""
    with celery_worker_for(mailbox_harness, app=mailbox_celery_app, pool=celery_worker_pool,
                           **celery_worker_parameters) as worker:
        yield worker
