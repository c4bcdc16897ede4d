"""Test your agents against the real mailbox (README "Test your agents").

`MailboxHarness` runs submissions through the real phases, store, fencing, heartbeat and
event streams, in-process and synchronously, on an in-memory SQLite and an embedded Redis.
`mailbox.testing.celery_worker` adds real Celery messages and an in-process worker, and
`mailbox.testing.pytest_plugin` offers both as pytest fixtures. Imports no Celery itself.
"""

from mailbox.testing.harness import (
    Attempt,
    HarnessClock,
    HarnessError,
    MailboxHarness,
    PhaseCrashedError,
    RunResult,
)
from mailbox.testing.memory_db import MemoryDatabase

__all__ = ["Attempt", "HarnessClock", "HarnessError", "MailboxHarness", "MemoryDatabase",
           "PhaseCrashedError", "RunResult"]
