from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbox import Mailbox
from tests.support.workers import Stack, stack


@pytest.fixture
def celery_stack(mailbox: Mailbox, tmp_path: Path, request: pytest.FixtureRequest,
                 broker_url: str) -> Iterator[Stack]:
    """Worker/beat launcher bound to the test's database, Redis and namespace. Environment
    overrides: `@pytest.mark.stack_env(MAILBOX_LEASE_MS="2000")`. When the test fails, the
    stack's logs are attached to its report (tests/conftest.py); when one of the stack's
    processes died without the test killing it, the test fails at teardown."""
    marker = request.node.get_closest_marker("stack_env")
    overrides = dict(marker.kwargs) if marker else {}
    settings = mailbox.settings
    assert settings.redis_url is not None
    with stack(settings.database_url, settings.redis_url, settings.namespace, tmp_path,
               broker_url=broker_url if broker_url != settings.redis_url else None,
               **overrides) as s:
        yield s


@pytest.fixture
def publisher(celery_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mailbox]:
    """Configure this process like an application that calls dispatch.delay(): by
    environment (database, Redis, namespace). Returns the Mailbox `tasks` uses."""
    for key, value in celery_stack.env().items():
        if key.startswith(("MAILBOX_", "CELERY_")):
            monkeypatch.setenv(key, value)
    import tasks.runtime
    from tests.support.e2e_helpers import point_app_at_broker

    point_app_at_broker(celery_stack.broker)
    tasks.runtime.reset()
    yield tasks.runtime.mailbox()
    tasks.runtime.reset()
