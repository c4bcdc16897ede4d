"""Real Celery for a `MailboxHarness`: the project's app on kombu's in-memory transport, and
an in-process worker (README "Test your agents").

`dispatch.delay()` then does what it does in production — a durable submit, then a wake-up
published to the broker — and the worker, a `celery.contrib.testing.worker.start_worker`
thread of this process, consumes the namespace's queue and runs the `mailbox.dispatch` task
and the five phase tasks of `tasks/phases.py` as chained Celery messages. The memory
transport serializes every message as any broker does (kombu's JSON body, base64-encoded in a
virtual envelope), so each phase receives its context decoded from JSON, never the object the
previous phase returned. It keeps no priorities (wake-ups are published with one, which it
accepts and ignores: a FIFO queue, as on a broker without priority support) and it lives in
this process only, so the worker must be a thread of it; no Docker, no broker server.

`tasks.runtime` (the per-process Mailbox the task bodies use) is pointed at the harness's
database, Redis and namespace through the MAILBOX_* environment (`MailboxHarness.environment`)
and `tasks.runtime.reset()`; the app's broker settings are switched to `memory://`.
Everything — environment, app settings, connection pools, current app, runtime — is put back
when the block ends. The worker uses the wall clock (its own runtime), so do not `advance`
the harness's clock while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from celery import Celery
from celery.contrib.testing.app import setup_default_app
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

from mailbox.testing.harness import MailboxHarness
from tasks import runtime as tasks_runtime
from tasks.app import app as project_app  # importing `tasks` registers every task

MEMORY_BROKER = "memory://"
POLLING_INTERVAL_S = 0.01
"""How often the worker looks at an empty in-memory queue (kombu's default: 1 s)."""
_BROKER_SETTINGS = ("broker_url", "broker_read_url", "broker_write_url", "broker_transport",
                    "broker_transport_options")


def _drop_connections(app: Celery) -> None:
    """Forget the app's broker connection pool and producer pool, so that the next publish
    connects with the settings as they are now."""
    app.close()  # Celery: drops the connection pool
    vars(app).pop("amqp", None)  # a cached_property: its producer pool and queues go with it


@contextlib.contextmanager
def celery_app_for(harness: MailboxHarness) -> Iterator[Celery]:
    """`tasks.app.app`, publishing to `memory://`, with `tasks.runtime` using the harness's
    stores, for the duration of the block."""
    app = project_app
    with setup_default_app(app):  # restores the current and default apps afterwards
        saved_conf = {name: app.conf[name] for name in _BROKER_SETTINGS}  # loads celeryconfig
        env = {**harness.environment(), "CELERY_BROKER_URL": MEMORY_BROKER,
               # The worker's metrics endpoint: none in a test process.
               "MAILBOX_METRICS_PORT": "0"}
        saved_env = {name: os.environ.get(name) for name in env}
        # A starting worker sets the execute task's time limits (tasks/phases.py).
        execute = app.tasks["mailbox.execute"]
        saved_limits = (execute.soft_time_limit, execute.time_limit)
        try:
            os.environ.update(env)
            app.conf.update(broker_url=MEMORY_BROKER, broker_read_url=None,
                            broker_write_url=None, broker_transport=None,
                            broker_transport_options={"polling_interval": POLLING_INTERVAL_S})
            _drop_connections(app)
            tasks_runtime.reset()
            yield app
        finally:
            tasks_runtime.reset()
            with contextlib.suppress(Exception), app.connection_for_write() as conn:
                conn.default_channel.queue_delete(harness.namespace)  # delayed wake-ups
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            app.conf.update(saved_conf)
            execute.soft_time_limit, execute.time_limit = saved_limits
            _drop_connections(app)


@contextlib.contextmanager
def celery_worker_for(harness: MailboxHarness, *, app: Celery | None = None,
                      pool: str = "solo", concurrency: int = 1,
                      shutdown_timeout: float = 30.0, **worker_options: Any) -> Iterator[Any]:
    """An in-process Celery worker (a `WorkController` running in a thread) consuming the
    harness's queue, for the duration of the block. `app` is one `celery_app_for` gave;
    without it, this sets one up too. `pool` "solo" runs one task at a time in the worker's
    thread; "threads" with `concurrency` > 1 runs several, like a worker's pool."""
    with contextlib.ExitStack() as stack:
        if app is None:
            app = stack.enter_context(celery_app_for(harness))
        stack.enter_context(_logging_restored())
        worker = stack.enter_context(start_worker(
            app, concurrency=concurrency, pool=pool, perform_ping_check=False,
            shutdown_timeout=shutdown_timeout, queues=[harness.namespace], **worker_options))
        try:
            yield worker
        finally:
            _stop_now(app)


LoggerState = tuple[int, list[logging.Handler], bool, bool]


def _state_of(logger: logging.Logger) -> LoggerState:
    return logger.level, list(logger.handlers), logger.propagate, logger.disabled


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """Put logging back as it was once the worker stopped: starting one sets up Celery's
    logging (`app.log.setup`), which sets the root logger's level to the worker's (ERROR)
    and adds stream handlers to it, `celery.task` and `multiprocessing`, and a test process
    keeps running tests that read their logs (pytest's caplog) afterwards."""
    manager = logging.Logger.manager
    before = {name: _state_of(logger) for name, logger in manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    root = _state_of(logging.getLogger())
    try:
        yield
    finally:
        for name, logger in list(manager.loggerDict.items()):
            if not isinstance(logger, logging.Logger):
                continue
            level, handlers, propagate, disabled = before.get(name) or (
                logging.NOTSET, [h for h in logger.handlers
                                 if isinstance(h, logging.NullHandler)], True, False)
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate, logger.disabled = propagate, disabled
        top = logging.getLogger()
        top.setLevel(root[0])
        top.handlers[:] = root[1]


def _stop_now(app: Celery) -> None:
    """Ask the worker to stop (what start_worker's exit does), then ping it twice: its loop
    polls an idle in-memory queue for 2 s, then checks for a stop, then polls once more, so
    a stop would otherwise take 4 s. A ping (a remote-control broadcast, not a task) ends
    each of those polls."""
    worker_state.should_terminate = 0
    for _ in range(2):
        with contextlib.suppress(Exception):
            app.control.broadcast("ping", reply=False)


__all__ = ["MEMORY_BROKER", "celery_app_for", "celery_worker_for"]
