"""Everything that speaks SQL (docs/architecture.md#store).

- `statements`: every SQL statement and the row converters (the project's SQL text);
- `dispatches`: `MailboxStore`, the dispatch queue over SQL + Redis, and the public
  transaction API other stores write through;
- `runs`: `RunStore`, run records, the thread message log and pinned resolutions, written in
  the dispatch store's transactions;
- `inspection`: the read-only queries of audits and statistics;
- `operations`: the wrapper that times every operation and turns driver failures into
  `StoreUnavailableError`.
"""

from mailbox.store.dispatches import FencedWrite, MailboxStore, ReclaimPage, new_token
from mailbox.store.inspection import Inspection
from mailbox.store.runs import (
    MAX_INPUT_BYTES,
    Acked,
    AttemptFacts,
    BulkEntry,
    BulkEntryError,
    FinishedClaim,
    Message,
    Resolution,
    RunStore,
    Submission,
    encode_input,
)

__all__ = ["MAX_INPUT_BYTES", "Acked", "AttemptFacts", "BulkEntry", "BulkEntryError",
           "FencedWrite", "FinishedClaim", "Inspection", "MailboxStore", "Message",
           "ReclaimPage", "Resolution", "RunStore", "Submission", "encode_input", "new_token"]
