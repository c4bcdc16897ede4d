"""The racer helper itself: a racer that crashes or hangs fails the test that started it."""

from __future__ import annotations

import threading
import time
import traceback

import pytest

from tests.support.racers import RacerTimeoutError, race, racing


def test_results_come_back_in_the_order_of_the_targets() -> None:
    assert race(lambda: 1, lambda: 2, lambda: 3) == [1, 2, 3]


def test_one_crashed_racer_fails_the_race_with_its_own_traceback() -> None:
    def crash() -> int:
        raise KeyError("racer 1 crashed")

    with pytest.raises(KeyError, match="racer 1 crashed") as caught:
        race(lambda: 0, crash, lambda: 2)
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "crash" in frames, frames  # the racer's own frame, not only the join's
    assert any("racer-1" in note for note in caught.value.__notes__), caught.value.__notes__


def test_the_first_failure_is_raised_and_the_others_are_attached() -> None:
    first_failed = threading.Event()

    def first() -> None:
        first_failed.set()
        raise ValueError("first")

    def second() -> None:
        assert first_failed.wait(5)
        time.sleep(0.01)
        raise RuntimeError("second")

    with pytest.raises(ValueError, match="first") as caught:
        race(second, first)
    assert any("RuntimeError: second" in note for note in caught.value.__notes__)


def test_an_assertion_in_a_racer_fails_the_test() -> None:
    def check() -> None:
        assert 1 + 1 == 3, "a racer's own assertion"

    with pytest.raises(AssertionError, match="a racer's own assertion"):
        race(check, lambda: None)


def test_a_racer_that_does_not_finish_in_time_fails_with_its_stack() -> None:
    release = threading.Event()

    def stuck_here() -> None:
        release.wait(30)

    try:
        with pytest.raises(RacerTimeoutError, match=r"1 racer\(s\) still running") as caught:
            race(lambda: None, stuck_here, timeout_s=0.3)
        assert "stuck_here" in str(caught.value), str(caught.value)
    finally:
        release.set()


def test_start_together_releases_every_racer_from_one_barrier() -> None:
    inside = threading.Barrier(3, timeout=5)  # passes only if all three run at once
    assert race(*(inside.wait for _ in range(3)), start_together=True) is not None


def test_start_together_does_not_leave_racers_waiting_for_a_crashed_one() -> None:
    with pytest.raises(ZeroDivisionError):
        race(lambda: 1 // 0, lambda: None, start_together=True, timeout_s=10)


def test_racing_runs_the_body_meanwhile_and_raises_a_racer_failure_after_it() -> None:
    started = threading.Event()

    def crash_after_start() -> None:
        started.set()
        raise OSError("racer in the background crashed")

    with pytest.raises(OSError, match="crashed"), racing(crash_after_start):
        assert started.wait(5)


def test_racing_keeps_the_body_failure_and_notes_the_racer_failure() -> None:
    def crash() -> None:
        raise OSError("racer crashed too")

    with pytest.raises(AssertionError, match="the body failed") as caught, racing(crash):
        time.sleep(0.05)
        raise AssertionError("the body failed")
    assert any("racer crashed too" in note for note in caught.value.__notes__)


def test_a_racer_crashing_after_the_start_does_not_break_the_others_start() -> None:
    """Only a racer lost before the barrier aborts it: one that crashes right after the
    start must not turn the others' start into a BrokenBarrierError."""
    for _ in range(20):
        with pytest.raises(ZeroDivisionError) as caught:
            race(lambda: 1 // 0, lambda: None, start_together=True, timeout_s=10)
        assert any("1 of 2 racers failed" in note for note in caught.value.__notes__)
