"""Status values are rendered into the SQL text once, at compile time
(mailbox/store/statements.py, `_status_literal`): the text the partial indexes and prepared
plans need, and never anything but a status name."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from mailbox.model import DispatchStatus
from mailbox.store import statements as q


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()])
def test_claim_statements_carry_the_statuses_in_their_text(dialect: object) -> None:
    text = str(q.SELECT_BLOCKERS.compile(dialect=dialect))  # type: ignore[arg-type]
    assert "status IN ('Claimed', 'Queued')" in text
    assert "status = 'Claimed'" in text
    wake = str(q.SELECT_THREAD_WAKE_STATE.compile(dialect=dialect))  # type: ignore[arg-type]
    assert "status = 'Queued'" in wake and "status = 'Claimed'" in wake


@pytest.mark.parametrize("status", list(DispatchStatus))
def test_every_status_can_be_a_literal(status: DispatchStatus) -> None:
    literal = q._status_literal(status.value)
    assert str(literal.compile(dialect=sqlite.dialect())) == f"'{status.value}'"


@pytest.mark.parametrize("value", ["Queued'; DROP TABLE run_dispatches; --", "", "Acked "])
def test_anything_but_a_status_name_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="not a status name"):
        q._status_literal(value)
