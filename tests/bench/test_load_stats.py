"""The arithmetic of `mesh bench load` (nodes.bench.load_stats)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nodes.bench import load_stats as loadstats
from nodes.bench.load_stats import ANSWERED, ERROR, LOST, AskRecord


def test_a_latency_summary_skips_missing_values() -> None:
    s = loadstats.latency_summary([3.0, None, 1.0, 2.0])
    assert (s["n"], s["p50"], s["max"], s["mean"]) == (3, 2.0, 3.0, 2.0)


def test_fit_line_recovers_a_known_slope_and_its_error() -> None:
    rng = random.Random(7)
    xs = list(range(200))
    ys = [5.0 + 0.25 * x + rng.gauss(0, 1.0) for x in xs]
    b, a, se = loadstats.fit_line(xs, ys)
    ref_b, ref_a = np.polyfit(xs, ys, 1)
    assert b == pytest.approx(ref_b) and a == pytest.approx(ref_a)
    assert se is not None and abs(b - 0.25) < 4 * se < 0.05
    with pytest.raises(ValueError):
        loadstats.fit_line([1.0, 1.0], [2.0, 3.0])


def test_rss_trend_flags_a_leak_but_not_noise_or_warm_up() -> None:
    rng = random.Random(11)
    asks = list(range(0, 500, 2))
    # 5 MiB per 100 asks plus allocator noise: grows.
    leak = [(x, 900 + 0.05 * x + rng.gauss(0, 2.0)) for x in asks]
    t = loadstats.rss_trend(leak, 500)
    assert t.grows is True and t.slope_mib_per_100_asks == pytest.approx(5.0, abs=1.5)
    # Flat with the same noise: does not grow.
    flat = [(x, 900 + rng.gauss(0, 2.0)) for x in asks]
    assert loadstats.rss_trend(flat, 500).grows is False
    # Steep rise while warming up (first half), flat afterwards: the window ignores the warm-up.
    warm = [(x, 800 + min(x, 200) * 0.5 + rng.gauss(0, 1.0)) for x in asks]
    t = loadstats.rss_trend(warm, 500)
    assert t.grows is False and t.points == sum(x >= 250 for x in asks)
    # Flat, then one step up (a new high-water mark of activations): no trend.
    step = [(x, 1780 + (26 if x >= 400 else 0) + rng.gauss(0, 0.05)) for x in asks]
    t = loadstats.rss_trend(step, 500)
    assert t.grows is False and t.slope_mib_per_100_asks > 1.0 and abs(t.half_slopes_mib_per_100_asks[0]) < 0.5
    # A leak in small steps (every 20 asks) is still a leak.
    stairs = [(x, 2000 + 3.0 * (x // 20)) for x in asks]
    t = loadstats.rss_trend(stairs, 500)
    assert t.grows is True and all(v == pytest.approx(15.0, abs=4.0) for v in t.half_slopes_mib_per_100_asks)
    # Too few points in the window: no verdict rather than a guess.
    assert loadstats.rss_trend([(10, 1.0), (300, 2.0)], 500).grows is None


def test_busy_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    full = [loadstats.busy_backoff_s(k, 0.05, 2.0, 1.0) for k in range(10)]
    assert full[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4]) and max(full) == 2.0
    assert loadstats.busy_backoff_s(3, 0.05, 2.0, 0.0) == pytest.approx(0.2)  # half the step
    assert loadstats.busy_backoff_s(10_000, 0.05, 2.0, 0.5) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        loadstats.busy_backoff_s(0, 0.0, 1.0, 0.5)


def test_tally_counts_outcomes_busy_retries_and_throughput() -> None:
    recs = [AskRecord(0, "a", ANSWERED, node="n1", busy_retries=2, busy_nodes=["n1", "n2"], start_s=0.0, end_s=2.0),
            AskRecord(1, "a", ANSWERED, node="n2", start_s=0.5, end_s=1.0),
            AskRecord(2, "b", ERROR, reason="no-node", start_s=1.0, end_s=1.5),
            AskRecord(3, "b", LOST, reason="no-reply", start_s=1.0, end_s=4.0)]
    t = loadstats.tally(recs)
    assert (t["answered"], t["errors"], t["lost"], t["busy_retries"], t["asks_with_busy_retries"]) == (2, 1, 1, 2, 1)
    assert t["errors_by_reason"] == {"no-node": 1} and t["busy_by_node"] == {"n1": 1, "n2": 1}
    assert t["answers_per_node"] == {"n1": 1, "n2": 1}
    assert loadstats.throughput(recs) == pytest.approx(2 / 4.0)
    assert recs[0].as_json()["e2e_s"] == 2.0
