"""Dispatch Mailbox: a durable mailbox for AI-agent runs on Celery, Redis and SQLAlchemy.

The public names live here; everything else is internal. This package shadows the standard
library's `mailbox` module when the project root is first on `sys.path`
(docs/architecture.md#layout).
"""

from mailbox.agents import agent
from mailbox.errors import (
    AlreadyExistsError,
    AlreadyStartedError,
    MailboxError,
    NotFoundError,
    PermanentError,
    StoreUnavailableError,
    TransientError,
    ValidationError,
    VersionConflictError,
)
from mailbox.facade import Mailbox
from mailbox.model import (
    DispatchStatus,
    MailboxInterrupt,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    Termination,
)

IS_DISPATCH_MAILBOX = True

__all__ = [
    "AlreadyExistsError",
    "AlreadyStartedError",
    "DispatchStatus",
    "Mailbox",
    "MailboxError",
    "MailboxInterrupt",
    "NotFoundError",
    "PermanentError",
    "RunDispatch",
    "RunDispatchResult",
    "RunRecord",
    "RunStatus",
    "StoreUnavailableError",
    "Termination",
    "TransientError",
    "ValidationError",
    "VersionConflictError",
    "agent",
]
