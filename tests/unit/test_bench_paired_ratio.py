"""`benchmarks.pipeline.analysis.paired_ratio`: the reference (c)/(a) is the median of each
round's own ratio, so a machine that slows down between rounds does not move it, where the
ratio of two medians does."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.pipeline.analysis import paired_ratio, paired_ratios, round_rates, throughput
from benchmarks.pipeline.inprocess import scaling_pairs
from benchmarks.pipeline.run import build_plan


def config(**per_s: float) -> dict[str, Any]:
    """A configuration's steps: throughput_c_3=40.0 is round 3 of kind c at 40 items/s."""
    return {"steps": {f"throughput_{key}": {"per_s": value} for key, value in per_s.items()}}


def test_a_machine_that_slows_between_rounds_leaves_each_rounds_ratio_alone() -> None:
    # Round 1 on a fast machine, rounds 2 and 3 on one at 60% of its speed: c is half of a
    # in every round, and the paired ratio says so exactly.
    cfg = config(a_1=100.0, c_1=50.0, a_2=60.0, c_2=30.0, a_3=61.0, c_3=30.5)
    assert paired_ratios(cfg, "c", "a") == [0.5, 0.5, 0.5]
    assert paired_ratio(cfg, "c", "a") == 0.5


def test_the_paired_ratio_is_the_median_round_not_the_ratio_of_the_medians() -> None:
    # The machine's speed moves between rounds and a little within one: the rounds' own
    # ratios are 0.45, 0.5 and 0.571, their median 0.5; the medians of the kinds (70 and 40,
    # both round 3's) give that one round's 0.571.
    cfg = config(a_1=100.0, c_1=45.0, a_2=62.0, c_2=31.0, a_3=70.0, c_3=40.0)
    assert [round(x, 3) for x in paired_ratios(cfg, "c", "a")] == [0.45, 0.5, 0.571]
    assert paired_ratio(cfg, "c", "a") == 0.5
    assert round(throughput(cfg, "c") / throughput(cfg, "a"), 3) == 0.571


def test_only_rounds_that_ran_both_kinds_are_paired_and_none_gives_nan() -> None:
    cfg = config(a_1=100.0, c_1=40.0, a_2=90.0, b_2=70.0, c_3=30.0, a_4=0.0, c_4=10.0)
    assert round_rates(cfg, "a") == {1: 100.0, 2: 90.0, 4: 0.0}
    assert paired_ratios(cfg, "c", "a") == [0.4]  # round 4's a of 0 items/s is no divisor
    assert math.isnan(paired_ratio(config(a_1=1.0, c_2=1.0), "c", "a"))
    assert math.isnan(paired_ratio(None, "c", "a"))


def test_rounds_alternate_which_kind_runs_first() -> None:
    from types import SimpleNamespace

    from benchmarks.pipeline.config import Configuration

    cfg = Configuration("ref", "t", "redis", "sqlite", 2, ("a", "b", "c"), 3)
    opts = SimpleNamespace(dispatches=250, delay_calls=10, idle=5)
    services = SimpleNamespace(redis_owned=False)
    order = [step["id"] for pass_no in (1, 2)
             for step in build_plan(cfg, opts, services, "ns", pass_no, False)["steps"]  # type: ignore[arg-type]
             if step["kind"] == "throughput"]
    assert order == ["throughput_a_1", "throughput_b_1", "throughput_c_1",
                     "throughput_c_2", "throughput_b_2", "throughput_a_2",
                     "throughput_a_3", "throughput_b_3", "throughput_c_3",
                     "throughput_c_4", "throughput_b_4", "throughput_a_4",
                     "throughput_a_5", "throughput_b_5", "throughput_c_5",
                     "throughput_c_6", "throughput_b_6", "throughput_a_6"]


def run(processes: int, per_s: float) -> dict[str, Any]:
    return {"processes": processes, "per_s": per_s}


def test_two_processes_over_one_is_paired_by_consecutive_runs() -> None:
    # 1 2, 2 1, 1 2 on a machine that runs the middle pair at 70% speed: two processes do
    # 1.8x one in every pair, and each pair says so, whichever run of the pair came first.
    runs = [run(1, 100.0), run(2, 180.0), run(2, 126.0), run(1, 70.0),
            run(1, 101.0), run(2, 181.8)]
    assert [round(r, 3) for r in scaling_pairs(runs)] == [1.8, 1.8, 1.8]


def test_a_pair_without_both_counts_or_with_nothing_done_in_one_process_is_skipped() -> None:
    assert scaling_pairs([run(1, 100.0), run(1, 90.0), run(2, 150.0), run(1, 0.0)]) == []
    assert scaling_pairs([run(1, 100.0), run(2, 150.0), run(2, 140.0)]) == [1.5]
