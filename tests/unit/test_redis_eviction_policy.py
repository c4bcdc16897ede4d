"""Whether the coordination Redis may evict the mailbox's keys (mailbox.redis_policy)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from mailbox import redis_policy


class OneRedis:
    def __init__(self, reply: Any) -> None:
        self.reply = reply

    def config_get(self, name: str) -> Any:
        assert name == "maxmemory-policy"
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


class Node:
    def __init__(self, name: str, policy: str) -> None:
        self.name, self.policy = name, policy


class Cluster:
    def __init__(self, *nodes: Node) -> None:
        self.nodes = nodes

    def get_primaries(self) -> tuple[Node, ...]:
        return self.nodes

    def config_get(self, name: str, target_nodes: Node) -> Any:
        return {name: target_nodes.policy}


def test_noeviction_is_safe_and_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailbox.redis_policy")
    assert redis_policy.check(OneRedis({"maxmemory-policy": "noeviction"})) == {}
    assert not caplog.records


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "allkeys-random"])
def test_every_other_policy_is_warned_about(policy: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailbox.redis_policy")
    assert redis_policy.check(OneRedis({"maxmemory-policy": policy})) == {"redis": policy}
    [record] = caplog.records
    assert f"{policy} on redis" in record.getMessage()
    assert "noeviction" in record.getMessage()


def test_a_cluster_names_each_master_that_may_evict() -> None:
    cluster = Cluster(Node("10.0.0.1:7000", "noeviction"), Node("10.0.0.2:7000", "allkeys-lfu"))
    assert redis_policy.eviction_policies(cluster) == {"10.0.0.1:7000": "noeviction",
                                                       "10.0.0.2:7000": "allkeys-lfu"}
    assert redis_policy.check(cluster) == {"10.0.0.2:7000": "allkeys-lfu"}


def test_a_server_that_refuses_config_is_unknown_not_unsafe(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailbox.redis_policy")
    refused = OneRedis(redis.ResponseError("unknown command 'CONFIG'"))
    assert redis_policy.eviction_policies(refused) == {}
    assert redis_policy.check(refused) == {}
    assert not caplog.records
    assert redis_policy.eviction_policies(OneRedis({"maxmemory-policy": b"allkeys-lru"})) == {
        "redis": "allkeys-lru"}


@pytest.mark.parametrize(("policy", "evicts"), [
    ("noeviction", False), ("volatile-lru", False), ("volatile-ttl", False),
    ("allkeys-lru", True), ("allkeys-lfu", True), ("allkeys-random", True)])
def test_a_broker_evicts_queued_messages_only_under_allkeys_policies(policy: str,
                                                                      evicts: bool) -> None:
    # Celery's queues carry no TTL: the volatile-* policies never pick them
    assert redis_policy.broker_evicting({"broker": policy}) == (
        {"broker": policy} if evicts else {})


@pytest.mark.parametrize(("broker", "coordination", "checked"), [
    (None, "redis://r:6379/0", None),
    ("redis://r:6379/0", "redis://r:6379/0", None),  # the coordination check covers it
    ("amqp://guest:guest@mq:5672//", "redis://r:6379/0", None),
    ("redis://broker:6379/0", "redis://r:6379/0", "redis://broker:6379/0"),
    ("rediss://broker:6380/1", None, "rediss://broker:6380/1"),
])
def test_which_broker_is_checked_on_its_own(broker: str | None, coordination: str | None,
                                            checked: str | None) -> None:
    assert redis_policy.separate_broker_url(broker, coordination) == checked


def test_a_broker_url_redis_cannot_parse_is_unknown_not_unsafe() -> None:
    assert redis_policy.broker_policies("redis://broker:notaport/0") == {}
