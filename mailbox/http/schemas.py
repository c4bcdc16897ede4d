"""Request bodies and the JSON form of records (OpenAPI shows both at /docs).

Bodies are strict: a field of the wrong JSON type is refused rather than coerced (`"1"` is
not a priority, `"no"` is not `false`, which would otherwise interrupt a thread), and an
unknown field is refused by name (a typo such as `priorty` must not be silently ignored).
Ranges and the input itself are checked by the facade, which names the value it refuses;
either way the answer is 400 and nothing is written.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mailbox.model import RunDispatch, RunRecord

MAX_BATCH_ITEMS = 1000
"""Items per batch request (the body limit, MAILBOX_API_MAX_BODY_BYTES, also applies)."""
MAX_OFFSET = 1_000_000_000
"""Paging offsets beyond any table we keep: a bigger one would overflow the SQL parameter."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DispatchRequest(_Body):
    """What `dispatch.delay(thread_id, agent, input, ...)` takes, the thread from the path."""

    agent: str = Field(description="A registered agent's name (e.g. `echo`).")
    input: Any = Field(description="Any JSON value (at most 256 KiB as JSON).")
    priority: int = Field(128, description="0..255, 0 the highest; FIFO within a priority.")
    dedupe_key: str | None = Field(None, description="Refused (409) while a live dispatch "
                                                     "of the thread holds this key.")
    delay_ms: int = Field(0, description="Not claimable before this many milliseconds.")
    max_attempts: int | None = Field(None, description="Attempt budget (default: "
                                                       "MAILBOX_MAX_ATTEMPTS).")
    interrupt: bool = Field(False, description="Latest wins: supersede the thread's queued "
                                               "work and stop its running run first.")


class BatchItem(_Body):
    """One submission of a batch: `dispatch.delay()`'s arguments by name (no `interrupt`:
    "latest wins" is a decision about one thread, not a batch)."""

    thread_id: str = Field(description="The conversation thread.")
    agent: str = Field(description="A registered agent's name.")
    input: Any = Field(description="Any JSON value (at most 256 KiB as JSON).")
    priority: int = Field(128, description="0..255, 0 the highest.")
    dedupe_key: str | None = Field(None, description="Refuses the batch's chunk (409) "
                                                     "while a live dispatch holds it.")
    delay_ms: int = Field(0, description="Not claimable before this many milliseconds.")
    max_attempts: int | None = Field(None, description="Attempt budget.")


class BatchRequest(_Body):
    items: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS,
                                   description=f"1..{MAX_BATCH_ITEMS} submissions; items on "
                                               f"one thread keep their order.")
    chunk_size: int = Field(500, ge=1, le=MAX_BATCH_ITEMS,
                            description="Items per transaction (each chunk all or nothing).")


class ResumeRequest(_Body):
    decision: Any = Field(description="The human decision: any JSON value.")


class ReplayRequest(_Body):
    force: bool = Field(False, description="Replay even though the thread was interrupted "
                                           "after the dead letter was queued.")


class Receipt(BaseModel):
    dispatch_id: str
    run_id: str
    thread_id: str


class BatchReceipt(Receipt):
    resumed: bool = Field(description="The input resumed the thread's waiting run.")


class BatchAnswer(BaseModel):
    submitted: int
    dispatches: list[BatchReceipt]


def dispatch_json(dispatch: RunDispatch) -> dict[str, Any]:
    """A dispatch as the API shows it: without its claim token, the fencing secret of the
    worker holding it (whoever knows it could forge that worker's phase messages)."""
    out = dispatch.to_json()
    out.pop("claim_token", None)
    return out


def run_json(run: RunRecord) -> dict[str, Any]:
    return run.to_json()
