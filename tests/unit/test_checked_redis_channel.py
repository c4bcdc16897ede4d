"""`CheckedRedisChannel._connparams`: a channel whose connection is gone raises a connection
error (Celery reconnects), not kombu 5.7's AttributeError (Celery exits). No services: the
channel is built without kombu's `__init__` (which pings Redis); `_connparams` only reads the
transport and class attributes. The whole close path against a killed Redis is
tests/faults/test_chaos.py::test_closing_the_channel_after_losing_redis_raises_only_connection_errors.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import redis

from tasks.app import CheckedRedisChannel, CheckedRedisTransport

kombu: Any = importlib.import_module("kombu")  # untyped


def _channel(url: str = "redis://redis-host:6390/3") -> tuple[Any, Any]:
    conn = kombu.Connection(url, transport=CheckedRedisTransport)
    channel: Any = CheckedRedisChannel.__new__(CheckedRedisChannel)
    channel.connection = conn.transport  # lazy: nothing connects
    return conn, channel


def test_the_transport_uses_the_checked_channel() -> None:
    assert CheckedRedisTransport.Channel is CheckedRedisChannel


def test_connparams_of_a_live_channel_are_kombus() -> None:
    _conn, channel = _channel()
    params = channel._connparams()
    assert (params["host"], params["port"], params["db"]) == ("redis-host", 6390, 3)
    assert issubclass(params["connection_class"], redis.Connection)


def test_a_detached_transport_raises_a_connection_error() -> None:
    conn, channel = _channel()
    channel.connection.client = None  # what Connection.collect() leaves behind
    with pytest.raises(redis.exceptions.ConnectionError) as info:
        channel._connparams()
    assert isinstance(info.value, conn.connection_errors)  # so Celery reconnects


def test_a_channel_removed_from_its_transport_raises_a_connection_error() -> None:
    conn, channel = _channel()
    channel.connection = None  # what Transport.close_channel() leaves behind
    with pytest.raises(redis.exceptions.ConnectionError) as info:
        channel._get_pool(asynchronous=True)
    assert isinstance(info.value, conn.connection_errors)
