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


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value > 65535:
        raise ValidationError(f"{name} must be a TCP port (0..65535), got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValidationError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")


def _tokens(raw: str) -> tuple[str, ...]:
    """MAILBOX_API_TOKENS: comma-separated, blanks around and between them ignored. Their
    strength is checked where they are used (mailbox/http/auth.py): a worker that never
    serves HTTP must not fail to start over them."""
    return tuple(token.strip() for token in raw.split(",") if token.strip())


def _is_cluster_url(url: str | None) -> bool:
    """`redis+cluster://` / `rediss+cluster://`: a Redis Cluster (mailbox/coordination.py
    reads it; kept apart here so that settings import nothing of redis)."""
    return bool(url) and str(url).split("://", 1)[0].lower() in ("redis+cluster",
                                                                  "rediss+cluster")


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
    """The coordination Redis: `redis://…` for one server, `redis+cluster://h:p,h:p…` for a
    Redis Cluster (docs/redis-cluster.md)."""
    broker_url: str | None
    """Celery's broker; by default the coordination Redis — unless that is a cluster, which
    Celery cannot use as a broker: then CELERY_BROKER_URL must be set."""
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
    # ------------------------------------------------ the HTTP API and dashboard (mailbox/http)
    api_host: str = "127.0.0.1"
    """Where `python -m mailbox serve` listens (MAILBOX_API_HOST)."""
    api_port: int = 8000
    api_tokens: tuple[str, ...] = ()
    """Bearer tokens the API and the dashboard accept (MAILBOX_API_TOKENS, comma-separated).
    None configured: the server refuses to start unless `api_insecure_no_auth`."""
    api_insecure_no_auth: bool = False
    """MAILBOX_API_INSECURE_NO_AUTH=1: serve without tokens, on a loopback address only (local
    development); every caller on the machine can then drive the mailbox."""
    api_max_body_bytes: int = 1024 * 1024
    """Request bodies above this are refused with 413 before they are read whole."""
    api_sse_keepalive_s: int = 10
    """An event stream with nothing to say sends a comment this often (at most 15 s)."""
    api_flower_url: str = ""
    """Flower's address, linked from the dashboard (none when empty)."""

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
            broker_url=env.get("CELERY_BROKER_URL") or (
                None if _is_cluster_url(redis_url) else redis_url),
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
            api_host=env.get("MAILBOX_API_HOST", "").strip() or "127.0.0.1",
            api_port=_port(env, "MAILBOX_API_PORT", 8000),
            api_tokens=_tokens(env.get("MAILBOX_API_TOKENS", "")),
            api_insecure_no_auth=_flag(env, "MAILBOX_API_INSECURE_NO_AUTH"),
            api_max_body_bytes=_int(env, "MAILBOX_API_MAX_BODY_BYTES", 1024 * 1024,
                                    minimum=1024),
            api_sse_keepalive_s=_int(env, "MAILBOX_API_SSE_KEEPALIVE_S", 10, minimum=1),
            api_flower_url=env.get("MAILBOX_API_FLOWER_URL", "").strip().rstrip("/"),
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
