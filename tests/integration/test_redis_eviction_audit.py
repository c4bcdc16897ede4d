"""A coordination Redis that may evict keys, met where an operator meets it: the audit (in
process and `python -m mailbox audit`) and the check a worker's sweep runs. Each test starts a
Redis of its own: changing the policy of the shared test Redis would reach other tests."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner

from mailbox import Mailbox, redis_policy
from mailbox.audit import audit
from mailbox.cli.group import main
from mailbox.coordination import Coordinator
from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.store import MailboxStore


@pytest.fixture
def evicting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = EmbeddedRedis(workdir=tmp_path_factory.mktemp("evicting-redis"))
    server.start()
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        yield client
    finally:
        client.close()
        server.stop()


def on(box: Mailbox, client: redis.Redis) -> Mailbox:
    return Mailbox(MailboxStore(box.store.engine, Coordinator(client, box.settings.namespace)),
                   box.settings)


def test_the_audit_warns_about_an_evicting_redis_and_keeps_exit_0(
        mailbox: Mailbox, evicting: redis.Redis) -> None:
    assert "redis_evicts" in audit(mailbox).checks
    assert [f.check for f in audit(mailbox).warnings] == [], "the test Redis does not evict"

    report = audit(on(mailbox, evicting))
    [finding] = [f for f in report.warnings if f.check == "redis_evicts"]
    assert finding.sample == ("redis: allkeys-lru",) and report.ok

    port = evicting.connection_pool.connection_kwargs["port"]
    result = CliRunner().invoke(main, ["--database-url", mailbox.settings.database_url or "",
                                       "--redis-url", f"redis://127.0.0.1:{port}/0",
                                       "--namespace", mailbox.settings.namespace,
                                       "--json", "audit"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [w["check"] for w in out["warnings"]] == ["redis_evicts"]
    assert out["warnings"][0]["sample"] == ["redis: allkeys-lru"]


def test_the_check_on_an_evicting_redis_logs_why_it_matters(
        evicting: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailbox.redis_policy")
    assert redis_policy.check(evicting) == {"redis": "allkeys-lru"}
    [record] = caplog.records
    assert "allkeys-lru on redis" in record.getMessage()
    assert "cancel signal" in record.getMessage() and "noeviction" in record.getMessage()


def test_a_separate_redis_broker_is_checked_by_the_broker_rule(
        mailbox: Mailbox, evicting: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    port = evicting.connection_pool.connection_kwargs["port"]
    broker_url = f"redis://127.0.0.1:{port}/0"
    with_broker = Mailbox(mailbox.store, dataclasses.replace(mailbox.settings,
                                                             broker_url=broker_url))
    report = audit(with_broker)
    assert "broker_evicts" in report.checks and report.ok
    [finding] = [f for f in report.warnings if f.check == "broker_evicts"]
    assert finding.sample == ("broker: allkeys-lru",)

    caplog.set_level(logging.WARNING, logger="mailbox.redis_policy")
    assert redis_policy.check_broker(broker_url) == {"broker": "allkeys-lru"}
    [record] = caplog.records
    assert "broker may evict queued messages" in record.getMessage()
    assert "allkeys-lru" in record.getMessage()

    result = CliRunner().invoke(main, ["--database-url", mailbox.settings.database_url or "",
                                       "--redis-url", mailbox.settings.redis_url or "",
                                       "--namespace", mailbox.settings.namespace,
                                       "--json", "audit"],
                                env={"CELERY_BROKER_URL": broker_url})
    assert result.exit_code == 0, result.output
    assert [w["check"] for w in json.loads(result.stdout)["warnings"]] == ["broker_evicts"]

    # volatile-* policies never pick Celery's queues (no TTL): checked, nothing to report
    evicting.config_set("maxmemory-policy", "volatile-lru")
    report = audit(with_broker)
    assert "broker_evicts" in report.checks
    assert [f.check for f in report.warnings] == []


def test_the_coordination_redis_as_broker_is_not_checked_twice(mailbox: Mailbox) -> None:
    same = Mailbox(mailbox.store, dataclasses.replace(
        mailbox.settings, broker_url=mailbox.settings.redis_url))
    assert "broker_evicts" not in audit(same).checks
