"""A bare Celery app for the pipeline benchmark's baselines (a) and (b).

It is configured from the same `celeryconfig` module as the mailbox's app (broker, JSON,
acks, prefetch, no result backend, events off unless MAILBOX_WORKER_EVENTS=1), but consumes
its own queue, `<MAILBOX_NAMESPACE>-baseline`, so a baseline worker never sees mailbox
messages and the other way round. Its two tasks are what the mailbox's five phases would be
with the mailbox taken out:

- `baseline.noop`: pass the context on (baseline (a): Celery alone);
- `baseline.sqlwrite`: one SQL transaction inserting one row, on the mailbox's own database
  with the mailbox's engine settings (baseline (b): Celery plus one write per link).

Both count their hop in the context; the last link of a chain records the completion in
Redis (INCR of a counter and the completion time, one pipelined round trip), which is how
the benchmark detects and times the end of a run without a result backend.

Start a worker with `celery -A benchmarks.baseline_app worker -Q <namespace>-baseline` from
the project root (the benchmark does this itself).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery, chain
from celery.canvas import Signature

from mailbox.database import create_engine
from mailbox.settings import Settings

LINKS = 5
TABLE = "bench_baseline_writes"

_settings = Settings.from_env()
QUEUE = f"{_settings.namespace}-baseline"

app = Celery("baseline")
app.config_from_object("celeryconfig")
app.conf.task_default_queue = QUEUE
app.conf.task_routes = {"baseline.*": {"queue": QUEUE}}
celery = app

metadata = sa.MetaData()
writes = sa.Table(
    TABLE, metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("chain_key", sa.String(255), nullable=False),
    sa.Column("item", sa.Integer, nullable=False),
    sa.Column("hop", sa.Integer, nullable=False),
    sa.Column("at", sa.BigInteger, nullable=False),
)

# Connections are per process: prefork children are forked after the app is loaded.
_lock = threading.Lock()
_engines: dict[int, sa.Engine] = {}
_redis: dict[int, redis.Redis[bytes]] = {}


def engine() -> sa.Engine:
    pid = os.getpid()
    with _lock:
        if pid not in _engines:
            _engines[pid] = create_engine(Settings.from_env().database_url)
        return _engines[pid]


def redis_client() -> redis.Redis[bytes]:
    pid = os.getpid()
    with _lock:
        if pid not in _redis:
            url = Settings.from_env().redis_url
            if not url:
                raise RuntimeError("MAILBOX_REDIS_URL is not set")
            _redis[pid] = redis.Redis.from_url(url, socket_timeout=5,
                                               socket_connect_timeout=5)
        return _redis[pid]


def create_table(database_url: str) -> None:
    """Create the baseline's table in the mailbox database (idempotent)."""
    eng = create_engine(database_url)
    try:
        metadata.create_all(eng)
    finally:
        eng.dispose()


def counter_keys(run_key: str) -> tuple[str, str]:
    """(completed-chain counter, time of the last completion) for one measured run."""
    return f"{run_key}:done", f"{run_key}:last"


def _hop(ctx: dict[str, Any]) -> dict[str, Any]:
    ctx["hop"] = int(ctx.get("hop", 0)) + 1
    if ctx["hop"] >= int(ctx.get("links", LINKS)):
        done, last = counter_keys(str(ctx["key"]))
        pipe = redis_client().pipeline(transaction=False)
        pipe.incr(done)
        pipe.set(last, repr(time.time()))
        pipe.execute()
    return ctx


@app.task(name="baseline.noop")
def noop(ctx: dict[str, Any]) -> dict[str, Any]:
    """One link of baseline (a): nothing but the hop itself."""
    return _hop(ctx)


@app.task(name="baseline.sqlwrite")
def sqlwrite(ctx: dict[str, Any]) -> dict[str, Any]:
    """One link of baseline (b): one SQL transaction with one INSERT, then the hop."""
    with engine().begin() as conn:
        conn.execute(sa.insert(writes).values(chain_key=str(ctx["key"]), item=int(ctx["item"]),
                                              hop=int(ctx.get("hop", 0)),
                                              at=int(time.time() * 1000)))
    return _hop(ctx)


def build_chain(kind: str, run_key: str, item: int, links: int = LINKS) -> Signature:
    """The chain of `links` tasks of one item: `noop` for (a), `sqlwrite` for (b)."""
    task = noop if kind == "noop" else sqlwrite
    ctx = {"key": run_key, "item": item, "hop": 0, "links": links}
    return chain(task.s(ctx).set(queue=QUEUE), *[task.s().set(queue=QUEUE)
                                                 for _ in range(links - 1)])
