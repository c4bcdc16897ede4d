"""`POST /v1/dispatches/batch`: many submissions in one request (`dispatch.delay_many`).

For clients in other languages with a burst to send — a batch evaluation, a back-fill, a
fan-out to many threads. The facade checks every item before it writes anything (400 naming
the item's index, nothing written); each chunk is one transaction, all or nothing; a refused
item (a live dedupe key: 409) or a store outage (503) names its index and lists the
dispatches the chunks before it stored, which stay queued — so a client retries only from
that index. Each thread gets one wake-up, not one per item.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from mailbox.errors import AlreadyExistsError, StoreUnavailableError, ValidationError
from mailbox.facade import BulkSubmitError, Receipt
from mailbox.http import state
from mailbox.http.errors import ApiError
from mailbox.http.publishing import BatchStoredNotPublishedError
from mailbox.http.schemas import BatchAnswer, BatchRequest

router = APIRouter(prefix="/v1", tags=["runs"])


@router.post("/dispatches/batch", status_code=202, response_model=BatchAnswer,
             responses={400: {"description": "a bad item (its index given); nothing written"},
                        409: {"description": "an item's dedupe key is held by a live "
                                             "dispatch; its chunk was not written, the "
                                             "chunks before it were (listed)"},
                        503: {"description": "store down (what was stored before is listed),"
                                             " or stored but wake-ups not published"}})
def submit_batch(body: BatchRequest,
                 services: Annotated[state.Services, Depends(state.services)]
                 ) -> JSONResponse:
    """Queue many runs at once, one answer per item in order."""
    items = [item.model_dump(exclude_unset=True) for item in body.items]
    try:
        receipts = services.publisher().submit_many(items, body.chunk_size)
    except BulkSubmitError as exc:
        raise _refused(exc) from exc
    except BatchStoredNotPublishedError as exc:
        raise ApiError(503, str(exc), "wake_not_published", stored=True,
                       **_answer(exc.receipts)) from exc
    return JSONResponse(_answer(receipts), status_code=202)


def _answer(receipts: list[Receipt]) -> dict[str, Any]:
    return {"submitted": len(receipts),
            "dispatches": [{"dispatch_id": r.dispatch_id, "run_id": r.run_id,
                            "thread_id": r.thread_id, "resumed": r.resumed}
                           for r in receipts]}


def _refused(exc: BulkSubmitError) -> ApiError:
    status, kind = 400, "validation"
    if isinstance(exc.error, AlreadyExistsError):
        status, kind = 409, "conflict"
    elif isinstance(exc.error, StoreUnavailableError):
        status, kind = 503, "store_unavailable"
    elif not isinstance(exc.error, ValidationError):
        status, kind = 400, "invalid"
    return ApiError(status, str(exc), kind, index=exc.index,
                    written=bool(exc.submitted), **_answer(exc.submitted))
