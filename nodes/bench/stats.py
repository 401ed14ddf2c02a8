"""Summary statistics for the benchmarks and the main job's report: mean, median, percentile.

Pure. Each takes any iterable of numbers, skips ``None`` (a figure an ask did not produce), and
returns ``None`` when nothing is left, so a report writes ``null`` rather than failing or NaN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def numbers(values: Iterable[float | None]) -> list[float]:
    """The values that are there, as floats."""
    return [float(v) for v in values if v is not None]


def mean(values: Iterable[float | None]) -> float | None:
    xs = numbers(values)
    return statistics.fmean(xs) if xs else None


def median(values: Iterable[float | None]) -> float | None:
    xs = numbers(values)
    return statistics.median(xs) if xs else None


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    if not 0 <= q <= 100:
        raise ValueError("percentile must be within 0..100")
    xs = sorted(numbers(values))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
