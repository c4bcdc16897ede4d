"""Retry backoff (reference §4.7, service test 16) and error classification (§4.5, service
test 15) of the phase functions. Pure functions: no services.

The port's agents signal failures with two exception classes, so the §4.5 matrix collapses to:
`PermanentError` (and subclasses) → permanent, anything else an agent raises → transient
("unknown/unstructured failures default to transient", reference §7 point 14). A successful
return is never passed to `classify`; it is Completed by construction in `execute`.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbox import (
    MailboxError,
    PermanentError,
    StoreUnavailableError,
    TransientError,
    ValidationError,
)
from mailbox.agent_run import classify, error_text
from mailbox.context import COMPLETED, PERMANENT, TRANSIENT
from mailbox.phases import retry_delay_ms
from mailbox.settings import Settings

DEFAULT_BASE = 250
DEFAULT_CAP = 30_000


# ------------------------------------------------------------------------------- backoff
@pytest.mark.parametrize(
    ("attempt_count", "expected"),
    [(0, 250), (1, 250), (2, 500), (3, 1000), (4, 2000), (5, 4000), (6, 8000), (7, 16000),
     (8, 16000), (100, 16000)],
)
def test_default_backoff_table(attempt_count: int, expected: int) -> None:
    """§4.7 table with the defaults (base 250 ms, cap 30 s): the exponent stops at 6, so the
    30 s cap is never reached with the default base."""
    assert retry_delay_ms(attempt_count, DEFAULT_BASE, DEFAULT_CAP) == expected


def test_settings_defaults_match_the_reference_backoff_config() -> None:
    settings = Settings.from_env({})
    assert (settings.retry_base_ms, settings.retry_max_ms) == (DEFAULT_BASE, DEFAULT_CAP)
    assert settings.max_attempts == 5


def test_cap_binds_with_a_larger_base() -> None:
    """base 1000 / cap 5000: attempt_count 4 (exponent 3 → 8000) is capped to 5000."""
    assert retry_delay_ms(3, 1000, 5000) == 4000
    assert retry_delay_ms(4, 1000, 5000) == 5000
    assert retry_delay_ms(7, 1000, 5000) == 5000


def test_high_attempt_stays_at_the_cap() -> None:
    assert retry_delay_ms(100, DEFAULT_BASE, 10_000) == 10_000


def test_zero_attempt_is_the_base_delay() -> None:
    assert retry_delay_ms(0, DEFAULT_BASE, DEFAULT_CAP) == DEFAULT_BASE
    assert retry_delay_ms(0, 1000, 5000) == 1000


def test_base_and_cap_of_600_seconds_give_600_seconds() -> None:
    """Service test 6 configures base = cap = 600_000 ms: every retry is 10 min ahead."""
    for attempt in (0, 1, 5, 50):
        assert retry_delay_ms(attempt, 600_000, 600_000) == 600_000


def test_delay_is_an_int() -> None:
    assert isinstance(retry_delay_ms(3, 250, 30_000), int)


@given(attempt=st.integers(min_value=0, max_value=10_000),
       base=st.integers(min_value=0, max_value=1_000_000),
       cap=st.integers(min_value=0, max_value=10_000_000))
def test_delay_never_exceeds_the_cap_and_never_decreases(attempt: int, base: int, cap: int
                                                         ) -> None:
    delay = retry_delay_ms(attempt, base, cap)
    nxt = retry_delay_ms(attempt + 1, base, cap)
    assert 0 <= delay <= cap
    assert delay <= nxt, "backoff must be monotone non-decreasing in attempt_count"
    assert delay >= min(base, cap), "never below the base delay (unless capped lower)"


@given(attempt=st.integers(min_value=7, max_value=1_000_000),
       base=st.integers(min_value=1, max_value=100_000),
       cap=st.integers(min_value=1, max_value=100_000_000))
def test_exponent_is_capped_at_six(attempt: int, base: int, cap: int) -> None:
    assert retry_delay_ms(attempt, base, cap) == min(base * 64, cap)


# ------------------------------------------------------------------------ classification
def test_outcome_labels_are_the_reference_metric_labels() -> None:
    assert (COMPLETED, TRANSIENT, PERMANENT) == ("completed", "transient_error",
                                                 "permanent_error")


def test_transient_error_is_transient() -> None:
    assert classify(TransientError("429 too many requests")) == TRANSIENT


def test_permanent_error_is_permanent() -> None:
    assert classify(PermanentError("403 unauthorized")) == PERMANENT


def test_subclass_of_permanent_error_is_permanent() -> None:
    class QuotaExhausted(PermanentError):
        pass

    assert classify(QuotaExhausted("quota")) == PERMANENT


@pytest.mark.parametrize("error", [
    RuntimeError("boom"), ValueError("bad"), KeyError("k"), ZeroDivisionError(),
    TimeoutError("slow"), OSError("io"), AssertionError("assert"),
    # A store failure surfacing through an agent is an infrastructure hiccup: retry.
    StoreUnavailableError("db down"), MailboxError("odd"), ValidationError("odd"),
])
def test_unexpected_exceptions_are_transient(error: Exception) -> None:
    assert classify(error) == TRANSIENT


ERROR_CLASSES: list[type[Exception]] = [
    TransientError, PermanentError, RuntimeError, ValueError, KeyError, OSError, TypeError,
    MailboxError, StoreUnavailableError,
]


@given(cls=st.sampled_from(ERROR_CLASSES), message=st.text(max_size=50))
def test_classification_is_never_completed_and_permanent_iff_permanent_error(
        cls: type[Exception], message: str) -> None:
    error = cls(message)
    outcome = classify(error)
    assert outcome != COMPLETED
    assert (outcome == PERMANENT) == isinstance(error, PermanentError)


def test_error_text_of_agent_errors_is_their_message() -> None:
    assert error_text(TransientError("rate limited: 429")) == "rate limited: 429"
    assert error_text(PermanentError("requested failure")) == "requested failure"


def test_error_text_of_an_empty_agent_error_names_its_class() -> None:
    assert error_text(TransientError()) == "TransientError"
    assert error_text(PermanentError()) == "PermanentError"


def test_error_text_of_unexpected_exceptions_carries_the_class() -> None:
    assert error_text(RuntimeError("boom")) == "RuntimeError: boom"
    assert error_text(KeyError("k")) == "KeyError: 'k'"
