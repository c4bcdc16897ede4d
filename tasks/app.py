"""The Celery app. `celery -A tasks worker` and `celery -A tasks beat` find it here.

Also the Redis transport the workers use (celeryconfig selects it for `redis://` brokers):
kombu's own lets one malformed entry on a queue list stop the worker. Its consumer decodes
every entry it pops as a kombu envelope (JSON object → `properties.delivery_tag` → body
decoded by `body_encoding`), and an entry that is not one — bytes that are not JSON, a JSON
array, a body that is not base64 — raises out of the event loop: Celery logs "Unrecoverable
error" and the worker exits. Anyone who can LPUSH to the broker could stop every worker that
way. `CheckedRedisTransport` refuses such an entry with one log line and goes on; the entry is
already popped, so nothing loops on it, and since a mailbox message is only a wake-up, dropping
one loses nothing (the sweep re-wakes due threads). Well-formed envelopes are delivered as
before, so Celery's own checks (content type, unknown task, undecodable body) still apply.
Its channel also turns kombu's AttributeError on closing a channel after losing Redis into a
connection error, which Celery reconnects on (`CheckedRedisChannel._connparams`).
"""

from __future__ import annotations

import binascii
import json
import logging
from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)
PREVIEW_CHARS = 200


def envelope_problem(message: Any) -> str | None:
    """Why a decoded queue entry is not a kombu envelope this transport can deliver."""
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__}, not an envelope object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "no 'properties' object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no string 'properties.delivery_tag'"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "'properties.delivery_info' is not an object"
    if message.get("headers") is not None and not isinstance(message["headers"], dict):
        return "'headers' is not an object"
    for key in ("content-type", "content-encoding"):
        if message.get(key) is not None and not isinstance(message[key], str):
            return f"'{key}' is not a string"
    body = message.get("body")
    if body is None or body == "":
        return None
    if not isinstance(body, str):
        return f"'body' is a {type(body).__name__}, not a string"
    encoding = properties.get("body_encoding")
    if encoding is None or str(encoding).lower() == "utf-8":
        return None
    if encoding != "base64":
        return f"unknown body_encoding {encoding!r}"
    try:
        binascii.a2b_base64(body.encode())
    except (binascii.Error, UnicodeEncodeError) as exc:
        return f"body is not base64 ({exc})"
    return None


def _preview(value: Any) -> str:
    text = repr(value[:PREVIEW_CHARS + 1] if isinstance(value, str) else value)
    return text if len(text) <= PREVIEW_CHARS else f"{text[:PREVIEW_CHARS]}... ({len(text)} chars)"


class CheckedRedisChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        """kombu's, but a channel whose connection is gone raises a connection error.

        kombu 5.7 builds a channel's connection pool lazily, from `self.connection.client` (the
        transport's kombu Connection). When Redis goes away, Celery's consumer runs
        `connection.collect()`: its first `Channel.close()` disconnects the pools, then fails
        draining the pending BRPOP, and the transport is detached (`client = None`). Celery
        then closes the connection, closing the channel again, and restoring the received,
        unacked messages (`QoS.restore_unacked`) needs a client, so a new pool, so this method:
        `None.hostname` raised AttributeError, which Celery does not recover from ("Unrecoverable
        error"), and the worker exited. A redis ConnectionError is one of the transport's
        `connection_errors`: the close swallows it (`maybe_close_channel`, `ignore_errors`) and
        Celery reconnects. The messages it could not restore stay in Redis' unacked set,
        restored after the visibility timeout (`restore_visible`), or lost with Redis itself.
        The same holds for a channel already removed from its transport (`connection = None`).
        """
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError(
                "the Redis channel has no connection (closed after losing Redis)")
        return dict(super()._connparams(asynchronous=asynchronous))  # type: ignore[no-untyped-call]

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        except DECODE_ERRORS as exc:
            if not raised_decoding_the_entry(exc):
                raise  # a delivery's own failure: not ours to swallow
            # The popped entry did not decode: not JSON, not UTF-8, or JSON kombu's decoder
            # refuses (typed markers with bad values, nesting past the recursion limit).
            if isinstance(exc, json.JSONDecodeError):
                log.error("refused a malformed broker message: not JSON (%s): %s", exc,
                          _preview(exc.doc))
            else:
                log.error("refused a malformed broker message: undecodable entry (%s: %.200s)",
                          type(exc).__name__, exc)
            return True


DECODE_ERRORS = (ValueError, TypeError, AttributeError, ArithmeticError, RecursionError)
"""What kombu's decoding of a popped entry raises on hostile input, measured: JSONDecodeError
and UnicodeDecodeError (ValueError), typed markers with bad values — datetime, set, unknown
types (ValueError), uuid (TypeError), bytes (AttributeError), decimal (InvalidOperation, an
ArithmeticError) — and RecursionError for deep nesting."""
_DECODING = frozenset({"loads", "bytes_to_str"})


def raised_decoding_the_entry(exc: BaseException) -> bool:
    """True when `exc` came out of kombu's decoding of the popped entry (`loads` or
    `bytes_to_str`, called by its `_brpop_read`), not out of the delivery that follows."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_brpop_read" \
                and frame.f_globals.get("__name__") == kombu_redis.__name__:
            return tb.tb_next is not None and tb.tb_next.tb_frame.f_code.co_name in _DECODING
        tb = tb.tb_next
    return False


class CheckedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, refusing queue entries that are not kombu envelopes."""

    Channel = CheckedRedisChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            log.error("refused a malformed broker message on queue %s: %s: %s", queue, problem,
                      _preview(message))
            return
        super()._deliver(message, queue)  # type: ignore[no-untyped-call]


app = Celery("mailbox")
app.config_from_object("celeryconfig")
