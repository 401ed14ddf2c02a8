"""The summary statistics every report uses (nodes.bench.stats)."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest

from nodes.bench.stats import mean, median, percentile


def test_percentiles_match_numpy_linear_interpolation() -> None:
    rng = random.Random(3)
    xs = [rng.expovariate(2.0) for _ in range(137)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_missing_values_are_skipped_and_nothing_gives_none() -> None:
    xs = [3.0, None, 1.0, 2.0, None, 10.0]
    present = [3.0, 1.0, 2.0, 10.0]
    assert mean(xs) == statistics.fmean(present)
    assert median(xs) == statistics.median(present) == 2.5
    assert percentile(xs, 50) == 2.5
    assert mean([]) is None and median([None]) is None and percentile([], 50) is None
    assert mean(x for x in (1, 2)) == 1.5  # any iterable, ints included
