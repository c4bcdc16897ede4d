"""The mailbox's error hierarchy.

Callers catch `MailboxError` for anything the mailbox refuses, and the narrower classes when
they can act on the reason. Driver exceptions (SQLAlchemy, psycopg, redis-py) never escape the
store: an unreachable database or Redis becomes `StoreUnavailableError`, so callers have one
thing to retry on. Agent errors (`TransientError`, `PermanentError`) are a separate family:
agents raise them to steer retry versus dead letter, they are not store failures.
"""

from __future__ import annotations


class MailboxError(Exception):
    """Base of every error the mailbox raises on purpose."""

    prefix = "mailbox error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.prefix}: {self.message}" if self.message else self.prefix


class ValidationError(MailboxError):
    """Bad input or a transition the state machine does not allow. Nothing was written."""

    prefix = "validation error"


class NotFoundError(MailboxError):
    """The named dispatch (or run) does not exist."""

    prefix = "not found"


class AlreadyExistsError(MailboxError):
    """A duplicate dispatch id, or a dedupe key still held by a live dispatch of the thread."""

    prefix = "already exists"


class VersionConflictError(MailboxError):
    """A fenced write lost: the claim token is not ours (expected=0, actual=1), or the
    dispatch's epoch is older than the thread's (expected=dispatch epoch, actual=thread epoch).
    """

    prefix = "version conflict"

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"expected {expected}, actual {actual}")
        self.expected = expected
        self.actual = actual


class StaleEpochError(VersionConflictError):
    """The fenced write found the thread's epoch past the dispatch's (an interrupt): it
    superseded the dispatch (T13), and that change is committed. Expected = the dispatch's
    epoch, actual = the thread's. (A plain VersionConflictError(0, 1) means the claim was
    someone else's and nothing was written.)"""


class AlreadyStartedError(MailboxError):
    """The attempt's start is already recorded: a second delivery of the same execute is
    refused, so the agent never runs twice for one attempt. Nothing was written."""

    prefix = "already started"


class StoreUnavailableError(MailboxError):
    """The database or Redis could not be reached, so the operation's outcome is unknown.

    Usually nothing happened (the transaction rolled back before it could commit), but not
    always: a connection lost while COMMIT was under way, or after the server committed and
    before its answer arrived, surfaces as this error too, with the write in place. Retrying
    is safe because every write is fenced (claim token, epoch, status) and refused or a no-op
    when it already landed; a caller that must know re-reads instead of assuming — settle's
    ack recovery tells "our ack landed" from "nobody acked" that way
    (docs/behaviour.md#ack-recovery)."""

    prefix = "store unavailable"


class AgentError(Exception):
    """Base of the errors an agent raises to tell the mailbox how to treat a failure."""


class TransientError(AgentError):
    """A failure worth retrying with backoff (rate limit, timeout, provider hiccup)."""


class PermanentError(AgentError):
    """A failure no retry will fix: the dispatch goes to the dead letter after this attempt."""
