"""The statistics of `orch ab report` (cli/_stats.py) against known values: the Wilson score
interval against Newcombe's published figures, percentiles against numpy's default method,
and the paired bootstrap against a sample whose true mean difference is known."""

from __future__ import annotations

import math
import random

import pytest

from statemachine_orch.cli._stats import MIN_RESAMPLES, RESAMPLES, mean, paired_bootstrap, percentile, wilson

# Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven
# methods", Statistics in Medicine 17 (1998) 857-872, Table I, method 3 (Wilson score, no
# continuity correction); the 10-trial rows are the same formula's, as any Wilson calculator gives them.
PUBLISHED = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
]


@pytest.mark.parametrize(("k", "n", "low", "high"), PUBLISHED)
def test_the_wilson_interval_matches_the_published_figures(k: int, n: int, low: float, high: float) -> None:
    got = wilson(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_the_wilson_interval_of_nothing_is_everything_and_a_count_past_n_is_refused() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="not a rate"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="not a rate"):
        wilson(-1, 10)


def test_percentiles_interpolate_between_ranks_as_numpy_does() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile(list(range(1, 11)), 90) == pytest.approx(9.1)
    assert percentile(list(range(1, 11)), 0) == 1
    assert percentile(list(range(1, 11)), 100) == 10
    assert percentile([7.0], 90) == 7.0
    assert percentile([], 50) is None
    assert mean([]) is None and mean([1, 2]) == 1.5
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1], 101)


def sample(n: int, seed: int) -> list[float]:
    """Differences from a population with mean 0.3: +1 half the time, 0 three times in ten, -1 otherwise."""
    draw = random.Random(seed)
    return [1.0 if (u := draw.random()) < 0.5 else 0.0 if u < 0.8 else -1.0 for _ in range(n)]


def test_the_bootstrap_interval_contains_the_true_difference_and_has_the_width_theory_gives() -> None:
    differences = sample(400, seed=1)
    interval = paired_bootstrap([[d] for d in differences], seed=0)
    assert interval is not None
    assert interval.low < 0.3 < interval.high
    assert interval.low < mean(differences) < interval.high  # type: ignore[operator]
    sd = math.sqrt(sum((d - mean(differences)) ** 2 for d in differences) / len(differences))  # type: ignore[operator]
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * sd / math.sqrt(400), rel=0.1)
    assert (interval.level, interval.resamples, interval.seed) == (0.95, RESAMPLES, 0)
    assert paired_bootstrap([[d] for d in differences], seed=0) == interval  # the seed fixes it
    assert paired_bootstrap([[d] for d in differences], seed=1) != interval


def test_the_bootstrap_covers_the_true_difference_about_95_times_in_100() -> None:
    covered = 0
    for trial in range(100):
        interval = paired_bootstrap([[d] for d in sample(40, seed=100 + trial)], seed=trial, resamples=1000)
        assert interval is not None
        covered += interval.low <= 0.3 <= interval.high
    assert 88 <= covered <= 100


def test_repeats_of_one_input_are_resampled_together() -> None:
    differences = sample(50, seed=2)
    twice = paired_bootstrap([[d, d] for d in differences], seed=0)
    once = paired_bootstrap([[d] for d in differences], seed=0)
    apart = paired_bootstrap([[d] for d in differences + differences], seed=0)
    assert twice is not None and once is not None and apart is not None
    assert (twice.low, twice.high) == pytest.approx((once.low, once.high))  # a repeat adds no information
    assert apart.high - apart.low < 0.8 * (twice.high - twice.low)  # drawn apart, it would seem to


def test_unequal_groups_weigh_each_difference_once() -> None:
    interval = paired_bootstrap([[1.0, 1.0, 1.0], [0.0]], seed=0)
    assert interval is not None
    assert interval.low == 0.0 and interval.high == 1.0  # all-zero and all-one resamples happen
    assert paired_bootstrap([[0.25], [0.25, 0.25]], seed=0) is not None
    degenerate = paired_bootstrap([[0.25], [0.25, 0.25]], seed=0)
    assert degenerate is not None and degenerate.low == degenerate.high == 0.25


def test_no_difference_gives_no_interval_and_many_inputs_fewer_resamples() -> None:
    assert paired_bootstrap([], seed=0) is None
    assert paired_bootstrap([[], []], seed=0) is None
    many = paired_bootstrap([[d] for d in sample(4000, seed=3)], seed=0)
    assert many is not None and MIN_RESAMPLES <= many.resamples < RESAMPLES
    assert many.low < 0.3 < many.high
