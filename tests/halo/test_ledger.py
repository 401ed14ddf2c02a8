"""The coordinator's sync logic: pure rules (mesh.halo.ledger) and the engine (mesh.halo.engine)
over an in-memory bus with fake in-process workers and a tiny random-weight LLaMA."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mesh.halo.ledger import (
    EpochSwitch,
    Liveness,
    Presence,
    StepGather,
    SyncLedger,
    worker_figures,
)
from mesh.halo.engine import HaloEngine
from mesh.halo.placement import Plan
from tests.halo.rig import DEEP, POLICY, MemoryBus, forward, heartbeat, make_rig
from mesh.halo.sync import SyncPolicy


# -- pure rules ---------------------------------------------------------------------------------


def test_strict_gather_waits_for_every_worker_then_times_out() -> None:
    g = StepGather(5, {"a": (0, 1), "b": (2,)}, strict=True)
    kw: dict[str, Any] = dict(deadline_s=0.01, stalled=frozenset({"b"}), policy=POLICY, strict_timeout_s=5.0)
    assert g.decide(elapsed_s=1.0, **kw).wait  # strict ignores deadlines and stalls
    assert g.add("a", 5, "pa") and not g.add("a", 5, "again") and not g.add("b", 4, "old")
    assert g.decide(elapsed_s=4.9, **kw).wait
    assert g.decide(elapsed_s=5.0, **kw).reason == "strict-timeout"
    assert g.missing_groups() == (2,)
    assert g.decide(elapsed_s=0.0, gone=frozenset({"b"}), **kw).reason == "gone"
    g.add("b", 5, "pb")
    assert g.decide(elapsed_s=0.0, **kw).reason == "complete"


def test_relaxed_gather_drops_unimportant_late_groups_and_never_waits_for_stalled() -> None:
    g = StepGather(9, {"good": (0, 1), "lossy": (2, 3)}, must_wait=frozenset({0}), strict=False)
    kw: dict[str, Any] = dict(deadline_s=0.02, policy=POLICY, strict_timeout_s=5.0)
    assert g.decide(elapsed_s=0.0, stalled=frozenset(), **kw).wait
    g.add("good", 9, "p")
    late = g.decide(elapsed_s=0.021, stalled=frozenset(), **kw)
    assert not late.wait and late.reason == "deadline-passed"  # lossy's groups are not important
    assert g.decide(elapsed_s=0.0, stalled=frozenset({"lossy"}), **kw).reason == "stalled-only"
    imp = StepGather(9, {"a": (0,)}, must_wait=frozenset({0}), strict=False)
    assert imp.decide(elapsed_s=0.025, stalled=frozenset(), **kw).reason == "important"


def test_ledger_tracks_outstanding_steps_latency_and_late_rate() -> None:
    led = SyncLedger()
    for step in (1, 2, 3):
        led.sent("w", step, now=step * 1.0)
    assert led.stalled(2, now=2.0, overdue_s=0.5) == frozenset({"w"})  # step 1, sent 1 s ago
    assert led.stalled(2, now=1.2, overdue_s=0.5) == frozenset()  # sent only 0.2 s ago
    assert led.stalled(1, now=9.0, overdue_s=0.5) == frozenset()
    assert led.arrived("w", 2, now=2.004, on_time=True) == pytest.approx(0.004)
    assert led.outstanding() == {"w": [3]}  # step 1 settled by the in-order answer to step 2
    assert led.stalled(3, now=9.0, overdue_s=0.5) == frozenset()
    led.arrived("w", 3, now=3.5, on_time=False)
    assert led.counts()["w"] == {"on_time": 1, "late": 1, "zeroed": 0}
    for _ in range(100):  # the EWMA spans ~100 steps
        led.closed("w", got=False)
    assert 0.5 < led.late_rate("w") < 1.0
    # Late latencies count too (a deadline learnt from on-time ones only could only shrink) ...
    assert led.deadline(POLICY) == pytest.approx(POLICY.max_deadline_s)
    # ... but one lossy worker does not stretch the deadline of the healthy majority.
    for w in ("a", "b"):
        led.sent(w, 10, now=10.0)
        led.arrived(w, 10, now=10.012, on_time=True)
    assert led.deadline(POLICY) == pytest.approx(0.012 * POLICY.margin)


def test_ledger_first_arrival_is_the_lower_quartile_of_complete_decode_steps() -> None:
    led = SyncLedger()
    assert led.first_arrival() is None
    for step, firsts in enumerate([0.004, 0.001, 0.002, 0.003, 0.005]):
        led.spread(step, 2)
        for w, lat in (("a", firsts), ("b", firsts + 0.001)):
            led.sent(w, step, now=10.0 * step)
            led.arrived(w, step, now=10.0 * step + lat, on_time=True)
    assert led.first_arrival() == pytest.approx(0.002)  # of 1, 2, 3, 4, 5 ms
    led.spread(99, 2)  # a step with one partial missing adds nothing
    led.sent("a", 99, now=1000.0)
    led.arrived("a", 99, now=1000.0001, on_time=True)
    assert led.first_arrival() == pytest.approx(0.002)


def test_epoch_switch_waits_for_every_ack_of_the_pending_plan() -> None:
    a = Plan(1, "m", 64, 2, {"w1": ((0, 1),)}, ((),))
    b = Plan(2, "m", 64, 2, {"w1": ((0,),), "w2": ((1,),)}, ((),))
    sw = EpochSwitch()
    sw.propose(a, 0.0)
    sw.ack("w1", 1)
    assert sw.maybe_switch() is a
    sw.propose(b, 1.0)
    sw.ack("w1", 2)
    sw.ack("w2", 1)  # an old epoch's ack does not count
    assert sw.waiting_for() == frozenset({"w2"}) and sw.maybe_switch() is None and sw.active is a
    sw.ack("w2", 2)
    assert sw.maybe_switch() is b and sw.pending is None
    with pytest.raises(ValueError):
        sw.propose(a, 2.0)


def test_worker_figures_from_heartbeat() -> None:
    hb = {"roles": ["answer", "worker"], "model_key": "k", "halo": {"compute_rows_per_s": 5e5, "group_size": 64},
          "link": {"rtt_ewma_ms": 4.0, "late_fraction": 0.02, "loss_fraction": 0.01}}
    f = worker_figures("w", hb, True, "k", 64, late_rate=0.1)
    assert f is not None and f.speed == 5e5 and f.rtt_s == pytest.approx(0.004)
    assert f.late_rate == 0.1 and f.loss_rate == 0.01
    assert worker_figures("w", {**hb, "model_key": "other"}, True, "k", 64) is None
    assert worker_figures("w", {**hb, "roles": ["answer"]}, True, "k", 64) is None


# -- the engine over the in-memory rig (tests/halo/rig.py) ----------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[HaloEngine, MemoryBus]]:
    yield from make_rig(tmp_path)


@pytest.fixture
def deep_rig(tmp_path: Path) -> Iterator[tuple[HaloEngine, MemoryBus]]:
    # Long deadlines (0.1-0.2 s) against 10 ms answers: the test does not depend on how fast a
    # busy machine runs the coordinator's own step, only on it being well below 10 ms.
    yield from make_rig(tmp_path, layers=DEEP, policy=SyncPolicy(target_share=0.5, min_deadline_s=0.1,
                                                                 max_deadline_s=0.2, default_deadline_s=0.1,
                                                                 straggler_share=1.0))


def test_strict_waits_for_a_slow_worker_and_matches_the_unsplit_model(rig) -> None:
    engine, bus = rig
    ids = [3, 14, 15, 92, 65]
    with torch.inference_mode():
        ref = engine.model(input_ids=torch.tensor([ids])).logits
    bus.workers["lossy"].delay = {0: 0.2}
    logits, run, took = forward(engine, True, ids)
    assert took >= 0.2 and run.on_time == 4 and run.zeroed_groups == 0
    assert torch.allclose(logits, ref, atol=2e-3)  # fp16 on the wire


def test_relaxed_drops_late_low_importance_partials_and_discards_them_on_arrival(rig) -> None:
    engine, bus = rig
    bus.workers["lossy"].delay = {0: 1.0}
    logits, run, took = forward(engine, False, [1])  # one position, as in decode
    assert took < 0.8 and run.stops.get("deadline-passed", 0) >= 1  # did not wait for the late partial
    assert run.zeroed_steps >= 1 and run.zeroed_groups >= len(engine.switch.active.workers["lossy"][0])
    time.sleep(1.1)  # the late partial lands in the queue ...
    bus.workers["lossy"].delay = {}
    _, run2, _ = forward(engine, False, [1])
    assert run2.late >= 1 and run2.zeroed_groups == 0  # ... and is discarded, not summed
    assert engine.ledger.counts()["lossy"]["late"] >= 1


def test_a_stalled_worker_is_not_waited_for(rig) -> None:
    engine, bus = rig
    bus.workers["lossy"].delay = {0: None, 1: 0.5}  # never answers layer 0, layer 1 very late
    _, run, took = forward(engine, False, [4])
    # Layer 0 waits one deadline; at layer 1 "lossy" still owes layer 0, so it is not waited for.
    assert took < 0.4  # never waited for the 0.5 s partial
    assert run.zeroed_steps == 2 and run.stops.get("stalled-only") == 1
    assert engine.ledger.stalled(engine.step.next_step, time.perf_counter(), 0.0) == frozenset({"lossy"})


def test_a_worker_that_fell_behind_once_is_waited_for_again(deep_rig) -> None:
    """Run 4's ablation bug: a worker late once was "stalled" for the rest of the forward pass,
    because the step the coordinator had just sent without waiting for it counted as owed; the
    coordinator then ran ahead of its answers at every layer and summed its groups as zero."""
    engine, bus = deep_rig
    # Late once at layer 0 (a hiccup), then a steady 10 ms per answer: inside the 0.1 s deadline,
    # but slower than the coordinator's own step when it does not wait.
    bus.workers["lossy"].delay = {0: 2.0, **{layer: 0.01 for layer in range(1, DEEP)}}
    _, run, took = forward(engine, False, [4])
    # Layer 0 gave up at the deadline. "lossy" owes that overdue step until its answer to layer 1
    # lands, 10 ms later: the layers the coordinator runs meanwhile do not wait for it. From then
    # on it owes only the step sent a moment ago: waited for, and on time at every later layer.
    assert run.stops.get("deadline-passed") == 1, run.stops
    assert run.stops.get("complete", 0) >= DEEP // 2, run.stops
    assert took < 1.5  # never waited for the 2 s answer


def test_epoch_switch_happens_between_forward_passes_without_losing_a_step(rig) -> None:
    engine, bus = rig
    old = engine.switch.active
    bus.auto_ack = False
    views = [("good", heartbeat(1000.0), True)]  # "lossy" left: membership re-plan
    engine.replan(views, time.monotonic(), idle=False)
    new = engine.switch.pending
    assert new is not None and engine.switch.active is old
    _, run, _ = forward(engine, True, [7, 8])
    assert run.epochs == {old.epoch}  # still the old plan: the new one is not acknowledged
    bus.ack("good", new.epoch)
    with torch.inference_mode():
        ref = engine.model(input_ids=torch.tensor([[7, 8]])).logits
    logits, run, _ = forward(engine, True, [7, 8])
    assert run.epochs == {new.epoch} and run.zeroed_groups == 0
    assert torch.allclose(logits, ref, atol=2e-3)


def test_wiki_split_is_deterministic_in_file_order_and_disjoint() -> None:
    from nodes.halo_data import split_text

    paras = [f"paragraph {i} " + "x" * 300 for i in range(10)]
    got = split_text("\n\n".join(paras), train_fraction=0.8)
    assert got == split_text("\n\n".join(paras), train_fraction=0.8)
    assert list(got.train) + list(got.held_out) == paras and len(got.held_out) == 2
    assert not set(got.train) & set(got.held_out)


def test_presence_marks_offline_silent_and_timed_out_workers_gone() -> None:
    p = Presence(Liveness(factor=4.0, min_silence_s=1.5))
    p.heard("a", 10.0, period_s=0.5)  # silent after max(1.5, 4 x 0.5) = 2 s
    p.heard("b", 10.0, period_s=2.0)  # after 8 s
    p.heard("c", 10.0)  # no announced period: silence proves nothing
    assert p.gone(["a", "b", "c", "never-heard"], 11.9) == frozenset()
    assert p.gone(["a", "b", "c"], 12.1) == {"a"}
    assert p.gone(["a", "b", "c"], 18.1) == {"a", "b"}
    assert p.gone(["c"], 1e6) == frozenset()
    p.heard("a", 12.5, partial=True)  # a partial: alive again
    assert p.gone(["a"], 13.0) == frozenset()
    p.status("b", False, 13.0)  # its last will
    assert p.gone(["b"], 13.0) == {"b"}
    p.timed_out("a", 13.0)  # a strict step gave up on it: suspect until it serves again
    assert p.gone(["a"], 13.0) == {"a"}
    p.heard("a", 13.05, period_s=0.5)  # M4: a heartbeat proves it alive, not that it serves
    assert p.gone(["a"], 13.1) == {"a"}
    p.heard("a", 13.1, partial=True)
    assert p.gone(["a"], 13.2) == frozenset()
    p.timed_out("a", 20.0)  # planned out, it sends no partials: after suspect_s it is tried again
    for t in (20.5, 50.0, 79.9):
        p.heard("a", t, period_s=0.5)
    assert p.gone(["a"], 79.9) == {"a"} and p.gone(["a"], 80.1) == frozenset()
    p.status("b", True, 14.0)
    assert p.gone(["b"], 14.5) == frozenset()


def test_the_window_sample_is_predicted_on_the_planner_thread_not_the_token_path(rig) -> None:
    from types import SimpleNamespace

    from mesh.halo.engine import WINDOW_ALPHA

    engine, bus = rig
    groups = engine.window.shape[1]
    # A predictor whose importance is the layer number + 1 everywhere.
    engine.predictor = SimpleNamespace(predict=lambda layer, x: torch.full((x.shape[0], groups), float(layer + 1)))
    before = engine.window.clone()
    _, run, _ = forward(engine, False, [7])  # complete, relaxed: its first forward is sampled
    assert run.stops == {"complete": 2} and "predict" not in run.phases  # nothing predicted meanwhile
    assert len(engine._samples) == 1 and [layer for layer, _ in engine._samples[0]] == [0, 1]
    assert torch.equal(engine.window, before)
    assert engine.fold_samples() == 1 and engine._samples == [] and engine.fold_samples() == 0
    want = torch.maximum((1 - WINDOW_ALPHA) * before + WINDOW_ALPHA * torch.tensor([[1.0], [2.0]]),
                         engine._window_floor)
    assert torch.allclose(engine.window, want)
    _, run, _ = forward(engine, True, [7])  # strict never samples
    assert engine._samples == []


def test_a_plan_never_acknowledged_is_replaced_without_the_silent_worker(rig) -> None:
    """Review L2: a pending plan waited forever for an ack that never came (lost, or a stuck
    loader); after ``pending_timeout_s`` the workers that did not acknowledge are planned out."""
    engine, bus = rig
    bus.auto_ack = False
    t0 = time.monotonic()
    three = [("good", heartbeat(1000.0), True), ("lossy", heartbeat(1000.0, late=0.3), True),
             ("third", heartbeat(1000.0), True)]  # a worker joins (membership: a plan at once) ...
    engine.replan(three, t0, idle=False)
    pending = engine.switch.pending
    assert pending is not None and set(pending.workers) == {"good", "lossy", "third"}
    for w in ("good", "lossy"):
        bus.ack(w, pending.epoch)  # ... and never acknowledges it
    wait = engine.config.replan.pending_timeout_s
    engine.replan(three, t0 + wait / 2, idle=False)
    assert engine.switch.pending is pending  # not overdue yet
    engine.replan(three, t0 + wait + 1.0, idle=False)
    newer = engine.switch.pending
    assert newer is not None and newer.epoch > pending.epoch and set(newer.workers) == {"good", "lossy"}
    for w in ("good", "lossy"):
        bus.ack(w, newer.epoch)
    assert engine.plans.maybe_switch() is not None and set(engine.switch.active.workers) == {"good", "lossy"}
