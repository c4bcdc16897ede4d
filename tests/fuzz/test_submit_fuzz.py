"""Hypothesis fuzzing of the submit path: any input is either accepted whole or refused with
a ValidationError that names the problem, and a refusal writes nothing."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbox import Mailbox, ValidationError
from mailbox.schema import dispatches, messages, runs

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
anything = json_values | st.just(float("nan")) | st.just(object()) | st.binary(max_size=10)


def _counts(box: Mailbox) -> tuple[int, int, int]:
    with box.store.engine.connect() as conn:
        return tuple(int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                     for t in (dispatches, runs, messages))  # type: ignore[return-value]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thread=st.one_of(st.text(max_size=300), st.integers(), st.none()),
       agent=st.sampled_from(["echo", "sleep", "flaky", "nope", "", " "]),
       payload=anything,
       priority=st.one_of(st.integers(min_value=-5, max_value=300), st.booleans(),
                          st.floats()),
       delay_ms=st.one_of(st.integers(min_value=-10, max_value=10**6), st.none()),
       dedupe=st.one_of(st.none(), st.text(max_size=20)))
def test_submit_accepts_whole_or_refuses_without_writing(mailbox: Mailbox, thread: Any,
                                                         agent: str, payload: Any,
                                                         priority: Any, delay_ms: Any,
                                                         dedupe: Any) -> None:
    before = _counts(mailbox)
    try:
        receipt = mailbox.submit(thread, agent, payload, priority=priority, delay_ms=delay_ms,
                                 dedupe_key=dedupe)
    except ValidationError as exc:
        assert str(exc).startswith("validation error: ") and len(str(exc)) > 20
        assert _counts(mailbox) == before, "a refused submit wrote something"
        return
    except Exception as exc:  # AlreadyExists is the only other refusal allowed
        from mailbox import AlreadyExistsError

        assert isinstance(exc, AlreadyExistsError), repr(exc)
        assert _counts(mailbox) == before
        return
    after = _counts(mailbox)
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1), (before, after)
    stored = mailbox.get_dispatch(receipt.dispatch_id)
    assert stored is not None and stored.priority == priority
