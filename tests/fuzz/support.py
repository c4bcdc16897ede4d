"""What the fuzz tests share: hostile values, and ways to see that nothing was written."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import redis
import sqlalchemy as sa
from hypothesis import strategies as st

from mailbox import Mailbox
from mailbox.schema import dispatches, messages, metadata, runs
from tests.support.e2e_helpers import queue_keys

# Values of every wrong type an argument can get from a buggy or hostile caller.
junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.binary(max_size=8), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()),
)
# Strings no id can be: blank, NUL, a lone surrogate, over the 255-character id columns.
bad_text = st.one_of(
    st.sampled_from(["", " ", "\t\n", "\x00", "id\x00", "a\udcff", "\ud800", "x" * 256,
                     "é" * 300, "x" * 100_000, "nope", "00000000-0000-0000-0000-000000000000"]),
    st.text(max_size=20), st.text(min_size=250, max_size=270),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def deep(depth: int) -> list[Any]:
    """A list nested `depth` levels: past the recursion limit of JSON encoding."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


# Inputs an agent must never receive: not JSON, too big, too deep, or JSON only in Python.
bad_inputs = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, [1, math.nan], {"k": math.inf}]),
    st.just(object()), st.binary(max_size=8), st.just({1, 2}), st.just({(1, 2): "tuple key"}),
    st.just("x" * (256 * 1024)), st.just(["y" * 1000] * 300), st.just(deep(100_000)),
    st.just({"s": "\x00 and \ud800"}), st.just("\udcff"),
)


def snapshot(box: Mailbox) -> str:
    """A digest of every row of every table, the namespace's Redis key names and the broker
    queue lists: any write shows, a read changes nothing."""
    digest = hashlib.sha256()
    with box.store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
            digest.update(repr((table.name, [tuple(r) for r in rows])).encode())
    client = box.store.coordinator.client
    namespace = box.settings.namespace
    digest.update(repr(sorted(client.scan_iter(f"{namespace}:*"))).encode())
    digest.update(repr(broker_depth(client, namespace)).encode())
    return digest.hexdigest()


def row_counts(box: Mailbox) -> tuple[int, int, int]:
    """(dispatches, runs, messages)."""
    with box.store.engine.connect() as conn:
        return tuple(int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                     for t in (dispatches, runs, messages))  # type: ignore[return-value]


def broker_depth(client: redis.Redis[bytes], namespace: str) -> int:
    """Messages waiting in the kombu lists of the queue named `namespace`."""
    return sum(int(client.llen(key)) for key in queue_keys(namespace))


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1
