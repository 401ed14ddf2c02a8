"""The arithmetic of `mesh bench load`: outcomes, latency summaries, busy backoff and the RSS trend.

Pure functions over plain values (no clock, no sockets); ``nodes/bench/load.py`` is the shell
that fires the asks and samples the processes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodes.bench.stats import mean, percentile

ANSWERED, ERROR, LOST = "answered", "error", "lost"


@dataclass
class AskRecord:
    """One ask of a load run, on the run's clock (seconds since its start)."""

    index: int
    subject: str
    outcome: str = LOST  # answered | error | lost (no answer and no error within the timeout)
    reason: str | None = None  # an error's reason ("busy-timeout", "no-node", "transport", ...)
    message: str | None = None  # the error's text, as the mesh or the client gave it
    node: str | None = None
    busy_retries: int = 0  # "busy" errors answered before this ask's final attempt
    start_s: float = 0.0  # first attempt published
    end_s: float = 0.0  # answer, final error or timeout
    ttft_s: float | None = None  # of the final attempt, client-measured
    ttlt_s: float | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    queue_s: float | None = None  # the node's own figure: time in its queue
    busy_nodes: list[str] = field(default_factory=list)

    @property
    def e2e_s(self) -> float:
        """Whole time of the ask including busy backoffs."""
        return self.end_s - self.start_s

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items()}
        for k in ("start_s", "end_s", "ttft_s", "ttlt_s", "queue_s"):
            if isinstance(out[k], float):
                out[k] = round(out[k], 6)
        out["e2e_s"] = round(self.e2e_s, 6)
        return out


def busy_backoff_s(attempt: int, base_s: float, cap_s: float, u: float) -> float:
    """Delay before retry ``attempt`` (0-based) after a "busy": exponential, capped, with jitter.

    ``u`` in [0, 1) is the caller's random draw; the delay lies in [half, full] of the
    exponential step so that asks refused together do not come back together.
    """
    if base_s <= 0 or cap_s <= 0:
        raise ValueError("backoff base and cap must be positive")
    step = min(cap_s, base_s * 2.0 ** min(attempt, 60))
    return step * (0.5 + 0.5 * min(max(u, 0.0), 1.0))


def latency_summary(values: Iterable[float | None]) -> dict[str, float | int | None]:
    xs = [float(v) for v in values if v is not None]
    rnd = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"n": len(xs), "p50": rnd(percentile(xs, 50)), "p90": rnd(percentile(xs, 90)),
            "p99": rnd(percentile(xs, 99)), "mean": rnd(mean(xs)),
            "max": rnd(max(xs)) if xs else None}


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float | None]:
    """Least-squares ``y = a + b x``: (slope b, intercept a, standard error of b or None)."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError("a line needs at least two points of equal-length series")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x values are equal: no slope")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    if n < 3:
        return b, a, None
    resid = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    return b, a, math.sqrt(resid / (n - 2) / sxx)


@dataclass(frozen=True)
class Trend:
    slope_mib_per_100_asks: float | None  # least squares over the window
    stderr_mib_per_100_asks: float | None
    half_slopes_mib_per_100_asks: tuple[float | None, float | None]  # the window's two halves
    points: int
    grows: bool | None  # None: too few points in the window to say
    first_mib: float | None
    last_mib: float | None

    def as_json(self) -> dict[str, Any]:
        rnd = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {"slope_mib_per_100_asks": rnd(self.slope_mib_per_100_asks),
                "stderr_mib_per_100_asks": rnd(self.stderr_mib_per_100_asks),
                "half_slopes_mib_per_100_asks": [rnd(v) for v in self.half_slopes_mib_per_100_asks],
                "points": self.points,
                "grows": self.grows, "window_first_mib": rnd(self.first_mib), "window_last_mib": rnd(self.last_mib)}


def _rises(xs: Sequence[float], ys: Sequence[float], threshold: float) -> tuple[bool, float | None]:
    """Whether a least-squares slope (per 100 asks) exceeds ``threshold`` by two standard errors."""
    if len(xs) < 3 or len(set(xs)) < 2:
        return False, None
    slope, _, se = fit_line(xs, ys)
    return slope * 100.0 - 2.0 * (se or 0.0) * 100.0 > threshold, slope * 100.0


def rss_trend(samples: Sequence[tuple[float, float]], total_asks: int, threshold_mib_per_100: float = 1.0,
              min_points: int = 6) -> Trend:
    """Trend of one process's memory over the second half of a run (the first half is warm-up).

    ``samples`` are (asks completed in the whole run, RSS MiB); slopes are in MiB per 100
    completed asks. Memory ``grows`` when the fitted slope exceeds the threshold by more than two
    standard errors over the whole window *and* over each of its halves: growth that persists.
    RSS moves in steps, and a single new high-water mark (the longest prompt so far needs bigger
    activations, once) lifts a line fitted across it but leaves one half flat, while a leak
    lifts both. The threshold says what a run of this length can resolve.
    """
    window = sorted((x, y) for x, y in samples if x >= total_asks / 2)
    if len(window) < min_points or len({x for x, _ in window}) < 2:
        ys = [y for _, y in window]
        return Trend(None, None, (None, None), len(window), None, ys[0] if ys else None, ys[-1] if ys else None)
    xs, ys = [x for x, _ in window], [y for _, y in window]
    slope, _, se = fit_line(xs, ys)
    slope100 = slope * 100.0
    se100 = None if se is None else se * 100.0
    mid = (xs[0] + xs[-1]) / 2
    halves = [[(x, y) for x, y in window if x < mid], [(x, y) for x, y in window if x >= mid]]
    rises = [_rises([x for x, _ in h], [y for _, y in h], threshold_mib_per_100) for h in halves]
    grows = slope100 - 2.0 * (se100 or 0.0) > threshold_mib_per_100 and all(r for r, _ in rises)
    return Trend(slope100, se100, (rises[0][1], rises[1][1]), len(window), grows, window[0][1], window[-1][1])


def tally(records: Sequence[AskRecord]) -> dict[str, Any]:
    """Counts of a run: outcomes, errors by reason, busy retries, answers per node."""
    errors = Counter(r.reason or "unknown" for r in records if r.outcome == ERROR)
    return {
        "answered": sum(r.outcome == ANSWERED for r in records),
        "errors": sum(r.outcome == ERROR for r in records),
        "lost": sum(r.outcome == LOST for r in records),
        "errors_by_reason": dict(sorted(errors.items())),
        "busy_retries": sum(r.busy_retries for r in records),
        "asks_with_busy_retries": sum(r.busy_retries > 0 for r in records),
        "busy_by_node": dict(sorted(Counter(n for r in records for n in r.busy_nodes).items())),
        "answers_per_node": dict(sorted(Counter(r.node for r in records if r.outcome == ANSWERED and r.node).items())),
    }


def throughput(records: Sequence[AskRecord]) -> float | None:
    """Answered asks per second of wall time, first publish to last completion."""
    done = [r for r in records if r.outcome == ANSWERED]
    if not done:
        return None
    span = max(r.end_s for r in records) - min(r.start_s for r in records)
    return len(done) / span if span > 0 else None
