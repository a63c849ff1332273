"""The statistics of `orch ab report`, as pure functions: the Wilson score interval of a rate,
percentiles, and the paired bootstrap interval of a mean difference.

No I/O and no third-party code: each is a few lines whose method the docstring names, so a
reader can check a figure by hand (docs/experiments.md says how to read them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95 % interval
RESAMPLES = 10_000  # bootstrap resamples, unless that would take more than MAX_DRAWS draws
MAX_DRAWS = 10_000_000  # keeps a bootstrap under about half a second in pure Python
MIN_RESAMPLES = 2_000  # ... but never fewer resamples than this


def wilson(successes: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the rate `successes / n` (95 % by default; Wilson 1927,
    Newcombe 1998 method 3, no continuity correction). Unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 or n successes. (0.0, 1.0) when n is 0: nothing is known."""
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n} is not a rate")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0 to 100) by linear interpolation between the closest ranks (the
    default of numpy and of R's type 7): p50 of [1, 2, 3, 4] is 2.5. None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Interval:
    """A bootstrap interval of a mean difference, with how it was made."""

    low: float
    high: float
    level: float
    resamples: int
    seed: int


def paired_bootstrap(groups: Sequence[Sequence[float]], *, seed: int, level: float = 0.95,
                     resamples: int = RESAMPLES) -> Interval | None:
    """The percentile bootstrap interval of the mean of paired differences (arm minus baseline).

    Each group holds the differences of one input (one per repeat): a resample draws as many
    inputs as there are, with replacement, each with all its differences (repeats of one input
    are not independent, so they are never drawn apart), and takes the mean of the differences
    drawn. The interval is the (1 - level) / 2 and (1 + level) / 2 percentiles of those means.
    `random.Random(seed)` draws: the same groups and seed give the same interval. Fewer
    resamples than asked when inputs * resamples would pass MAX_DRAWS (never below
    MIN_RESAMPLES). None when there is no difference at all."""
    kept = [(math.fsum(g), len(g)) for g in groups if g]
    if not kept:
        return None
    rounds = max(min(resamples, MAX_DRAWS // len(kept)), min(resamples, MIN_RESAMPLES))
    rng = random.Random(seed)
    sums = [s for s, _ in kept]
    counts = {c for _, c in kept}
    if len(counts) == 1:  # every input has as many differences: the mean of the drawn sums will do
        per = len(kept) * counts.pop()
        means = [math.fsum(rng.choices(sums, k=len(kept))) / per for _ in range(rounds)]
    else:
        indices = range(len(kept))
        means = []
        for _ in range(rounds):
            drawn = rng.choices(indices, k=len(kept))
            means.append(math.fsum(kept[i][0] for i in drawn) / sum(kept[i][1] for i in drawn))
    tail = (1 - level) / 2 * 100
    low, high = percentile(means, tail), percentile(means, 100 - tail)
    assert low is not None and high is not None
    return Interval(low=low, high=high, level=level, resamples=rounds, seed=seed)
