"""Services a test needs that a developer's machine may lack: skip there, fail in CI.

`make test` on a laptop without RabbitMQ (or without MAILBOX_TEST_POSTGRES_URL) skips the
tests that need it, saying what is missing. CI has every service, so a skip there would only
hide a broken service or configuration: `.ci/run` sets MAILBOX_TEST_REQUIRE_SERVICES to the
services it provides ("postgres,rabbitmq"), and a missing one fails the test instead.
"browser" is Debian's chromium with chromium-driver, which the dashboard tests drive
(tests/support/browser.py).
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest

KNOWN = ("postgres", "rabbitmq", "browser")


def required_services() -> set[str]:
    names = {n.strip().lower() for n in os.environ.get("MAILBOX_TEST_REQUIRE_SERVICES", ""
                                                       ).split(",") if n.strip()}
    unknown = names - set(KNOWN)
    if unknown:
        raise pytest.UsageError(f"MAILBOX_TEST_REQUIRE_SERVICES names unknown services "
                                f"{sorted(unknown)}; known: {', '.join(KNOWN)}")
    return names


def require(service: str, reason: str) -> NoReturn:
    """The test cannot run because `service` is unavailable (`reason`): a skip, or a failure
    when MAILBOX_TEST_REQUIRE_SERVICES names the service."""
    assert service in KNOWN, service
    if service in required_services():
        pytest.fail(f"{service} is required here (MAILBOX_TEST_REQUIRE_SERVICES) but "
                    f"unavailable: {reason}", pytrace=False)
    pytest.skip(f"{service} unavailable: {reason} (set MAILBOX_TEST_REQUIRE_SERVICES="
                f"{service} to make this a failure)")


def listening(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False
