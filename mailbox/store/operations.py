"""The wrapper every public store operation runs in (docs/architecture.md#store).

One place decides what a caller of the store can see go wrong: a driver failure that means
"the database or Redis could not be reached" becomes `StoreUnavailableError` (the one thing to
retry on), the mailbox's own errors pass through, and every call is counted and timed under
its operation name for Prometheus.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import redis
from sqlalchemy import exc as sa_exc

from mailbox import metrics
from mailbox.errors import MailboxError, StoreUnavailableError

P = ParamSpec("P")
R = TypeVar("R")


def operation(name: str, *, empty_result: bool = False
              ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Record the operation's metric and turn driver failures into StoreUnavailableError.

    With `empty_result`, a None or [] return is labelled `empty` (claims that found nothing).
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            result = "error"
            try:
                value = func(*args, **kwargs)
                empty = empty_result and (value is None or value == [])
                result = "empty" if empty else "ok"
                return value
            except MailboxError:
                raise
            except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                    sa_exc.TimeoutError) as exc:
                raise StoreUnavailableError(f"database unreachable during {name}: "
                                            f"{short_error(exc)}") from exc
            except sa_exc.DBAPIError as exc:
                if exc.connection_invalidated:
                    raise StoreUnavailableError(f"database connection lost during {name}: "
                                                f"{short_error(exc)}") from exc
                raise
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise StoreUnavailableError(f"redis unreachable during {name}: {exc}") from exc
            finally:
                metrics.record_operation(name, result, time.perf_counter() - started)

        return wrapper

    return decorate


def short_error(exc: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's statement and parameters."""
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
