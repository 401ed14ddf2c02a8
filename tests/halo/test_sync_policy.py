"""Relaxed sync for multi-token steps and the adaptive straggler wait: the pure rules
(mesh.halo.sync, mesh.halo.ledger) and the engine over the in-memory rig (tests/halo/rig.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mesh.halo import sync as s
from mesh.halo.ledger import StepGather, SyncLedger
from mesh.halo.engine import HaloEngine
from tests.halo.rig import POLICY, MemoryBus, forward, make_rig

GAP_POLICY = s.SyncPolicy(straggler_share=0.25, straggler_quantile=0.9, straggler_margin=2.0,
                          min_straggler_s=0.0005, min_gap_samples=16)


def test_a_multi_token_step_gets_a_deadline_scaled_by_its_positions() -> None:
    pol = s.SyncPolicy(margin=1.5, quantile=0.8, max_multi_deadline_s=1.0)
    assert s.step_deadline(0.016, 1, [1e-4], pol) == 0.016  # decode keeps its deadline
    # No multi-token sample yet: T decode deadlines, capped.
    assert s.step_deadline(0.016, 10, [], pol) == pytest.approx(0.16)
    assert s.step_deadline(0.016, 300, [], pol) == pytest.approx(1.0)
    # Measured 0.1 ms per position: 300 positions get 1.5 x 0.1 ms x 300 = 45 ms ...
    assert s.step_deadline(0.016, 300, [1e-4] * 10, pol) == pytest.approx(0.045)
    # ... and never less than the decode deadline.
    assert s.step_deadline(0.016, 2, [1e-4] * 10, pol) == 0.016


def test_prefill_latencies_do_not_stretch_the_decode_deadline() -> None:
    pol = s.SyncPolicy(margin=1.5, quantile=0.8, min_deadline_s=0.002, max_deadline_s=0.1)
    led = SyncLedger()
    for step in range(1, 11):  # decode steps: 4 ms
        led.sent("w", step, now=float(step), tokens=1)
        led.arrived("w", step, now=step + 0.004, on_time=True)
    for step in range(11, 41):  # a 300-position prefill: 30 ms per step
        led.sent("w", step, now=float(step), tokens=300)
        led.arrived("w", step, now=step + 0.030, on_time=True)
    assert led.deadline(pol) == pytest.approx(0.006)  # 1.5 x 4 ms: the prefill is not in it
    assert led.deadline(pol, tokens=300) == pytest.approx(0.045)  # 1.5 x 0.1 ms x 300


def test_every_missing_group_of_a_multi_token_step_is_computed_locally() -> None:
    missing, important = (1, 4, 7), frozenset({4})
    assert s.fallback_groups(missing, important, 1, "important") == (4,)
    assert s.fallback_groups(missing, important, 1, "none") == ()
    assert s.fallback_groups(missing, important, 37, "none") == missing
    assert s.fallback_groups(missing, important, 37, "important") == missing
    off = s.SyncPolicy(exact_multi=False)
    assert s.fallback_groups(missing, important, 37, "important", off) == (4,)


def test_the_straggler_wait_follows_the_measured_arrival_spread() -> None:
    # Too few steps measured: the fixed share of the deadline.
    assert s.straggler_wait([0.0002] * 15, 0.016, GAP_POLICY) == pytest.approx(0.004)
    # Healthy workers within 0.1-0.3 ms of each other: 2 x the 0.9 quantile, not 4 ms.
    gaps = [0.0001, 0.0002, 0.0003] * 10
    assert s.straggler_wait(gaps, 0.016, GAP_POLICY) == pytest.approx(0.0006)
    # Tiny spreads are floored, wide ones (a busy machine) capped at the share of the deadline.
    assert s.straggler_wait([0.0] * 20, 0.016, GAP_POLICY) == pytest.approx(0.0005)
    assert s.straggler_wait([0.01] * 20, 0.016, GAP_POLICY) == pytest.approx(0.004)
    # A few retransmission stalls among healthy steps do not move a high quantile far.
    assert s.straggler_wait([0.0003] * 95 + [0.25] * 5, 0.016, GAP_POLICY) == pytest.approx(0.0006)


def test_the_wait_decision_cuts_stragglers_at_the_adaptive_wait() -> None:
    kw = dict(pending={"lossy": (3,)}, must_wait=frozenset(), stalled=frozenset(), deadline_s=0.016,
              policy=GAP_POLICY, last_arrival_s=0.002)
    d = s.wait_decision(elapsed_s=0.0021, straggler_s=0.0006, **kw)
    assert d.wait and d.until_s == pytest.approx(0.0026) and d.reason == "straggler"
    assert s.wait_decision(elapsed_s=0.0027, straggler_s=0.0006, **kw).reason == "straggler-cut"
    # None: the policy's share of the deadline (the earlier fixed rule).
    assert s.wait_decision(elapsed_s=0.0027, straggler_s=None, **kw).until_s == pytest.approx(0.006)
    g = StepGather(5, {"a": (0,), "b": (1,)}, strict=False, straggler_s=0.0006)
    g.add("a", 5, "pa", at_s=0.002)
    assert g.decide(elapsed_s=0.0027, deadline_s=0.016, stalled=frozenset(), policy=GAP_POLICY,
                    strict_timeout_s=5.0).reason == "straggler-cut"


def test_the_ledger_measures_the_largest_arrival_gap_late_partials_included() -> None:
    led = SyncLedger()
    led.spread(7, 3)
    for w in "abc":
        led.sent(w, 7, now=1.0)
    led.arrived("a", 7, now=1.0020, on_time=True)
    led.arrived("b", 7, now=1.0023, on_time=True)
    assert not led.gaps  # c still owes its partial
    led.arrived("c", 7, now=1.0060, on_time=False)  # cut, arrived late: its gap counts
    assert list(led.gaps) == [pytest.approx(0.0037)]
    led.spread(8, 1)  # one worker: no spread
    led.sent("a", 8, now=2.0)
    led.arrived("a", 8, now=2.001, on_time=True)
    assert len(led.gaps) == 1


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[HaloEngine, MemoryBus]]:
    yield from make_rig(tmp_path)


def test_a_relaxed_prefill_is_exact_when_a_worker_is_late(rig) -> None:
    """The MMLU score of a question is one prefill: relaxed sync used to zero a late worker's
    groups of every prefill step cut by the decode deadline, on a loss-free link too."""
    engine, bus = rig
    ids = [3, 14, 15, 92, 65]
    with torch.inference_mode():
        ref = engine.model(input_ids=torch.tensor([ids])).logits
    bus.workers["lossy"].delay = {0: 1.0}  # far beyond the 5-position deadline (5 x 20 ms)
    logits, run, took = forward(engine, False, ids)
    assert took < 0.8  # did not wait for the late partial ...
    assert run.incomplete_per_forward == [1] and run.multi_steps == 2
    assert run.zeroed_groups == 0 and run.local_fallback_groups >= 1  # ... and computed its groups here
    assert torch.allclose(logits, ref, atol=2e-3)
    # A decode step with the same late worker still counts its unimportant groups as zero.
    _, run1, _ = forward(engine, False, [3])
    assert run1.zeroed_groups >= 1 and POLICY.straggler_share >= 1


def test_a_worker_cut_from_a_step_and_silent_since_is_stalled_at_once() -> None:
    sent = {"lossy": {10: 1.000, 11: 1.003}, "good": {11: 1.003}}
    heard = {"lossy": 0.999, "good": 1.0025}
    # Step 10 closed without lossy's partial; at step 11, 4 ms later (well inside the 16 ms
    # deadline, twice its usual 1.5 ms answer), nothing came from it since: stalled, not waited
    # for a second time.
    after = {"lossy": 0.003}
    assert s.stalled_workers(sent, 11, 1.004, 0.016, heard, {"lossy": {10}}, after) == frozenset({"lossy"})
    assert s.stalled_workers(sent, 11, 1.004, 0.016, heard) == frozenset()  # the deadline rule alone
    # Not yet its usual answer time: a slow (busy) worker is not skipped at once.
    assert s.stalled_workers(sent, 11, 1.002, 0.016, heard, {"lossy": {10}}, after) == frozenset()
    # Anything heard from it since step 10 was sent (its late partial): only behind, waited for.
    assert s.stalled_workers(sent, 11, 1.004, 0.016, {**heard, "lossy": 1.0035}, {"lossy": {10}}, after) == frozenset()
    led = SyncLedger()
    for w in ("lossy", "good"):
        led.sent(w, 9, now=0.990)
        led.arrived(w, 9, now=0.9915, on_time=True)  # 1.5 ms answers
        led.sent(w, 10, now=1.000)
    led.arrived("good", 10, now=1.002, on_time=True)
    led.closed("good", True, 10)
    led.closed("lossy", False, 10)
    for w in ("lossy", "good"):
        led.sent(w, 11, now=1.003)
    assert led.stalled(11, now=1.004, overdue_s=0.016, cut_factor=2.0) == frozenset({"lossy"})
    led.arrived("lossy", 10, now=1.0045, on_time=False)  # late: settles step 10
    assert led.stalled(12, now=1.005, overdue_s=0.016, cut_factor=2.0) == frozenset()
    # Its median answer is now 3 ms (1.5 and 4.5): a step cut 5 ms ago is not overdue yet, 10 ms ago it is.
    led.sent("lossy", 12, now=1.006)
    led.closed("lossy", False, 12)
    assert led.stalled(13, now=1.010, overdue_s=0.016, cut_factor=2.0) == frozenset()
    assert led.stalled(13, now=1.013, overdue_s=0.016, cut_factor=2.0) == frozenset({"lossy"})
