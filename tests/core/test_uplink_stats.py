"""LinkStats: RTT EWMA and percentiles, lost and late replies, bandwidth, snapshot."""

from __future__ import annotations

import json

import pytest

from mesh.errors import ConfigError
from mesh.uplink_stats import LinkStats, LinkStatsConfig, Outcome, percentile


def stats(**kw: float) -> LinkStats:
    return LinkStats(LinkStatsConfig(**kw))  # type: ignore[arg-type]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_replies_classified_ok_late_and_rtt_figures() -> None:
    s = stats(late_s=0.05, timeout_s=1.0)
    for seq, rtt in enumerate([0.010, 0.020, 0.030, 0.200]):
        s.ping_sent(seq, at=10.0 + seq)
    outcomes = [s.reply_received(seq, at=10.0 + seq + rtt) for seq, rtt in enumerate([0.010, 0.020, 0.030, 0.200])]
    assert outcomes == [Outcome.OK, Outcome.OK, Outcome.OK, Outcome.LATE]
    snap = s.snapshot()
    assert snap["rtt_samples"] == 4 and snap["replies"] == 4
    assert snap["rtt_p50_ms"] == pytest.approx(20.0)
    assert snap["rtt_p99_ms"] == pytest.approx(200.0)
    assert snap["late_fraction"] == 0.25 and snap["loss_fraction"] == 0.0
    # EWMA with gain 1/8 starting from the first sample
    ewma = 0.010
    for rtt in (0.020, 0.030, 0.200):
        ewma = 0.875 * ewma + 0.125 * rtt
    assert snap["rtt_ewma_ms"] == pytest.approx(ewma * 1000, abs=1e-3)


def test_no_reply_within_timeout_is_lost_and_a_late_straggler_is_stale() -> None:
    s = stats(late_s=0.05, timeout_s=1.0)
    s.ping_sent(1, at=0.0)
    s.ping_sent(2, at=0.5)
    assert s.expire(now=1.2) == 1  # ping 1 is 1.2 s old, ping 2 only 0.7 s
    assert s.snapshot()["outstanding"] == 1
    assert s.reply_received(1, at=1.3) is None  # already counted lost
    assert s.reply_received(2, at=0.52) is Outcome.OK
    snap = s.snapshot()
    assert (snap["lost"], snap["stale"], snap["replies"]) == (1, 1, 1)
    assert snap["loss_fraction"] == 0.5


def test_reply_later_than_timeout_without_expire_still_counts_lost() -> None:
    s = stats(late_s=0.05, timeout_s=1.0)
    s.ping_sent(7, at=0.0)
    assert s.reply_received(7, at=5.0) is None
    snap = s.snapshot()
    assert snap["lost"] == 1 and snap["rtt_samples"] == 0 and snap["rtt_ewma_ms"] is None


def test_unknown_and_duplicate_replies_are_stale_not_errors() -> None:
    s = stats()
    assert s.reply_received(99, at=1.0) is None
    s.ping_sent(1, at=0.0)
    assert s.reply_received(1, at=0.01) is Outcome.OK
    assert s.reply_received(1, at=0.02) is None
    assert s.snapshot()["stale"] == 2 and s.snapshot()["replies"] == 1


def test_duplicate_outstanding_seq_is_a_caller_bug() -> None:
    s = stats()
    s.ping_sent(1, at=0.0)
    with pytest.raises(ValueError):
        s.ping_sent(1, at=0.1)


def test_window_keeps_only_recent_outcomes() -> None:
    s = stats(late_s=0.05, timeout_s=1.0, window=10)
    for seq in range(10):  # 10 lost pings
        s.ping_sent(seq, at=float(seq))
    s.expire(now=100.0)
    assert s.snapshot()["loss_fraction"] == 1.0
    for seq in range(10, 30):  # then 20 good ones: the window forgets the losses
        s.ping_sent(seq, at=200.0 + seq)
        s.reply_received(seq, at=200.0 + seq + 0.001)
    snap = s.snapshot()
    assert snap["loss_fraction"] == 0.0 and snap["resolved"] == 10 and snap["lost"] == 10


def test_outstanding_is_bounded_oldest_counts_lost() -> None:
    s = stats(max_outstanding=3)
    for seq in range(5):
        s.ping_sent(seq, at=0.0)
    snap = s.snapshot()
    assert snap["outstanding"] == 3 and snap["lost"] == 2 and snap["pings_sent"] == 5
    assert s.reply_received(0, at=0.01) is None  # evicted = lost


def test_transfer_bandwidth_ewma_last_and_max() -> None:
    s = stats(bw_alpha=0.5)
    s.record_transfer(2_625_000, 1.0)  # 21 Mbit/s
    s.record_transfer(2_625_000, 2.0)  # 10.5 Mbit/s
    snap = s.snapshot()
    assert snap["bw_last_mbit"] == pytest.approx(10.5)
    assert snap["bw_max_mbit"] == pytest.approx(21.0)
    assert snap["bw_ewma_mbit"] == pytest.approx(15.75)
    assert snap["transfers"] == 2
    with pytest.raises(ValueError):
        s.record_transfer(0, 1.0)
    with pytest.raises(ValueError):
        s.record_transfer(10, 0.0)


def test_empty_snapshot_is_json_with_nones() -> None:
    snap = stats(late_s=0.1, timeout_s=2.0).snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["rtt_p50_ms"] is None and snap["loss_fraction"] is None and snap["bw_ewma_mbit"] is None
    assert snap["late_ms"] == 100.0 and snap["timeout_ms"] == 2000.0


@pytest.mark.parametrize(
    "kw",
    [{"late_s": 2.0, "timeout_s": 1.0}, {"late_s": 0.0}, {"window": 0}, {"ewma_alpha": 0.0}, {"bw_alpha": 1.5}],
)
def test_bad_config_is_rejected(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LinkStatsConfig(**kw)  # type: ignore[arg-type]


def test_clock_going_backwards_clamps_rtt_to_zero() -> None:
    s = stats()
    s.ping_sent(1, at=5.0)
    assert s.reply_received(1, at=4.9) is Outcome.OK
    assert s.snapshot()["rtt_p50_ms"] == 0.0
