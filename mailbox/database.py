"""Engine creation for the two supported databases.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every write
transaction starts with BEGIN IMMEDIATE: it takes the write lock up front, so two processes
never both read under a shared lock and then deadlock upgrading it (SQLITE_BUSY that the busy
handler cannot retry). Reads use a plain deferred BEGIN and never block writers.

PostgreSQL runs at READ COMMITTED; the store serializes writers per thread by locking the
thread's epoch row, and the partial unique indexes back the invariants up.

Both engines hide statement parameters (`hide_parameters`): they are runs' inputs, responses
and claim tokens, and SQLAlchemy would otherwise write them into the text of every database
error, so into whatever log prints one (a worker's traceback, a CLI's message).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from mailbox.settings import normalize_database_url

READ_ONLY = "mailbox_read_only"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_engine(url: str, **kwargs: Any) -> sa.Engine:
    url = normalize_database_url(url)
    kwargs.setdefault("hide_parameters", True)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, **kwargs)
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 10)
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("connect_timeout", 5)
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        if not kwargs.get("pool_pre_ping"):
            _ping_when_idle(engine.pool)
        return engine
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


PING_AFTER_IDLE_S = 1.0
"""A pooled PostgreSQL connection unused this long is pinged before it is handed out."""


def _ping_when_idle(pool: sa.Pool) -> None:
    """Pessimistic disconnect handling, for connections that sat idle only.

    `pool_pre_ping` pings every checkout: one more round trip per transaction (four per
    dispatch). A connection checked in moments ago was just used successfully; one that sat
    idle may have been cut since (a database restart, a failover, an idle timeout on the way)
    and is pinged first: a dead one is replaced before anyone uses it (SQLAlchemy's
    documented checkout-event recipe: DisconnectionError makes the pool try a fresh
    connection, up to three times). A server that dies while connections are warm fails
    the statements that meet it, as it would mid-transaction with pre-ping too; those
    connections are invalidated and the store reports StoreUnavailableError."""

    @event.listens_for(pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("checked_in_at")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()  # leave no transaction open behind the ping
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"idle connection found dead: {exc}") from exc


def _sqlite_engine(url: str, **kwargs: Any) -> sa.Engine:
    database = make_url(url).database
    # A `file:` URI (uri=true) names its database in SQLite's URI syntax, not as a path: an
    # in-memory one (`file:/name?vfs=memdb`, mailbox.testing) has no directory to create.
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, **kwargs.pop("connect_args", {})}
    busy_ms = int(float(connect_args["timeout"]) * 1000)
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event, not the driver, decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_postgres(engine: sa.Engine) -> bool:
    return engine.dialect.name == "postgresql"


def schema_url(base_url: str, schema: str) -> str:
    """The PostgreSQL URL whose connections use `schema` (search_path), for isolated test and
    benchmark databases inside one server database."""
    base = normalize_database_url(base_url)
    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def scratch_postgres_schema(base_url: str, prefix: str) -> Iterator[str]:
    """Create a uniquely named schema, yield a URL bound to it, drop it afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(normalize_database_url(base_url))
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        try:
            yield schema_url(base_url, schema)
        finally:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        admin.dispose()
