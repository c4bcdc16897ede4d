"""Every mailbox setting, read from the environment in one place
(docs/architecture.md#configuration).

Celery's own settings live in `celeryconfig.py`; this object holds what the mailbox itself
needs. Bad values fail loudly at start-up with the variable's name, never later mid-run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mailbox.errors import ValidationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = PROJECT_ROOT / "var" / "mailbox.sqlite3"
# Written by the dev launcher (`python -m mailbox up`, `make demo`) when it starts the embedded
# Redis, so that every process of the project finds it without configuration.
DEV_REDIS_URL_FILE = PROJECT_ROOT / "var" / "redis.url"
# Retention (docs/behaviour.md#gc) and the event streams' byte budget (docs/behaviour.md#events).
DEFAULT_DEAD_LETTER_RETENTION_S = 14 * 24 * 3600
DEFAULT_THREAD_RETENTION_S = 30 * 24 * 3600
DEFAULT_EVENT_STREAM_MAX_BYTES = 4 * 1024 * 1024
# Room for the largest single event (64 KiB of data and its envelope) twice over.
MIN_EVENT_STREAM_MAX_BYTES = 256 * 1024


def dev_redis_url() -> str | None:
    try:
        url = DEV_REDIS_URL_FILE.read_text().strip()
    except OSError:
        return None
    return url or None


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValidationError(f"{name} must be at least {minimum}, got {value}")
    return value


def normalize_database_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and use the psycopg 3 driver we ship."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str | None
    broker_url: str | None
    namespace: str = "mailbox"
    lease_ms: int = 30_000
    retry_base_ms: int = 250
    retry_max_ms: int = 30_000
    max_attempts: int = 5
    sweep_interval_s: int = 30
    gc_interval_s: int = 60
    retention_s: int = 86_400
    """Acked, Cancelled and Superseded dispatches, and event streams after their last event."""
    dead_letter_retention_s: int = DEFAULT_DEAD_LETTER_RETENTION_S
    """Dead letters: kept for an operator to list, replay or purge (docs/behaviour.md#gc)."""
    thread_retention_s: int = DEFAULT_THREAD_RETENTION_S
    """Finished runs no dispatch references, with their messages (the thread's conversation),
    and then the epoch rows of threads with nothing left."""
    event_stream_max_bytes: int = DEFAULT_EVENT_STREAM_MAX_BYTES
    """Per run: the oldest events are dropped while a stream's events exceed this."""
    agent_modules: str = ""
    history_limit: int = 100
    """`ctx.messages`: at most this many of the newest messages of the conversation."""
    history_max_bytes: int = 1024 * 1024
    """`ctx.messages`: at most this much JSON content (older messages are left out first)."""
    agent_timeout_s: int = 900
    """How long one attempt of an agent without its own `timeout_s` may run."""
    agent_timeout_grace_s: int = 30
    """After a stop (timeout, cancel): how long the agent has to return before the attempt
    is abandoned; twice that past the longest timeout, Celery kills the worker's child."""
    missing_agent_grace_s: int = 600
    """How long a dispatch whose pinned agent version no worker that took it had is put
    back (a rolling deploy in progress) before it is dead-lettered."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        redis_url = env.get("MAILBOX_REDIS_URL") or dev_redis_url()
        namespace = env.get("MAILBOX_NAMESPACE", "mailbox").strip() or "mailbox"
        validate_namespace(namespace)
        return cls(
            database_url=normalize_database_url(
                env.get("MAILBOX_DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE_PATH}"
            ),
            redis_url=redis_url,
            broker_url=env.get("CELERY_BROKER_URL") or redis_url,
            namespace=namespace,
            lease_ms=_int(env, "MAILBOX_LEASE_MS", 30_000, minimum=100),
            retry_base_ms=_int(env, "MAILBOX_RETRY_BASE_MS", 250),
            retry_max_ms=_int(env, "MAILBOX_RETRY_MAX_MS", 30_000),
            max_attempts=_int(env, "MAILBOX_MAX_ATTEMPTS", 5, minimum=1),
            sweep_interval_s=_int(env, "MAILBOX_SWEEP_INTERVAL_S", 30, minimum=1),
            gc_interval_s=_int(env, "MAILBOX_GC_INTERVAL_S", 60, minimum=1),
            retention_s=_int(env, "MAILBOX_RETENTION_S", 86_400),
            dead_letter_retention_s=_int(env, "MAILBOX_DEAD_LETTER_RETENTION_S",
                                         DEFAULT_DEAD_LETTER_RETENTION_S),
            thread_retention_s=_int(env, "MAILBOX_THREAD_RETENTION_S",
                                    DEFAULT_THREAD_RETENTION_S),
            event_stream_max_bytes=_int(env, "MAILBOX_EVENT_STREAM_MAX_BYTES",
                                        DEFAULT_EVENT_STREAM_MAX_BYTES,
                                        minimum=MIN_EVENT_STREAM_MAX_BYTES),
            agent_modules=env.get("MAILBOX_AGENT_MODULES", ""),
            history_limit=_int(env, "MAILBOX_HISTORY_LIMIT", 100, minimum=1),
            history_max_bytes=_int(env, "MAILBOX_HISTORY_MAX_BYTES", 1024 * 1024,
                                   minimum=1024),
            agent_timeout_s=_int(env, "MAILBOX_AGENT_TIMEOUT_S", 900, minimum=1),
            agent_timeout_grace_s=_int(env, "MAILBOX_AGENT_TIMEOUT_GRACE_S", 30, minimum=1),
            missing_agent_grace_s=_int(env, "MAILBOX_MISSING_AGENT_GRACE_S", 600),
        )


def validate_namespace(namespace: str) -> str:
    """Namespaces prefix Redis keys and queue names, so keep them to a safe alphabet."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not namespace or not set(namespace) <= allowed or len(namespace) > 64:
        raise ValidationError(
            f"namespace must be 1-64 characters of letters, digits, '-', '_' or '.', got "
            f"{namespace!r}"
        )
    return namespace
