"""Placement (mesh.halo.placement): shares, importance order, hysteresis, the plan's wire dict."""

from __future__ import annotations

import cbor2
import pytest

from mesh.halo import placement as s
from mesh.errors import ProtocolError

L, G = 6, 24


def _importance() -> list[list[float]]:
    """Distinct importances with a different ranking in every layer."""
    return [[float((g * 7 + layer * 5) % G) + 0.01 * g for g in range(G)] for layer in range(L)]


def _figures() -> list[s.WorkerFigures]:
    return [
        s.WorkerFigures("lossy", speed=2000.0, rtt_s=0.004, loss_rate=0.05, late_rate=0.10),
        s.WorkerFigures("fast", speed=3000.0, rtt_s=0.002),
        s.WorkerFigures("slow", speed=1000.0, rtt_s=0.003),
    ]


def _plan(figs: list[s.WorkerFigures] | None = None, **kw) -> s.Plan:
    return s.plan_groups(figs if figs is not None else _figures(), _importance(), epoch=3,
                         model_key="smollm2-135m@abc", group_size=64, **kw)


def _covers_once(plan: s.Plan) -> bool:
    for layer in range(plan.n_layers):
        got = [*plan.local[layer], *(g for w in plan.workers.values() for g in w[layer])]
        if sorted(got) != list(range(plan.n_groups)):
            return False
    return True


def test_most_important_groups_go_to_reliable_fast_workers() -> None:
    plan = _plan()
    imp = _importance()
    assert _covers_once(plan) and plan.local == ((),) * L
    for layer in range(L):
        mean = {n: sum(imp[layer][g] for g in w[layer]) / len(w[layer])
                for n, w in plan.workers.items()}
        # Reliable and fastest first, then reliable and slow, the lossy worker last.
        assert mean["fast"] > mean["slow"] > mean["lossy"]
        top = sorted(range(G), key=lambda g: -imp[layer][g])[:len(plan.workers["fast"][layer])]
        assert set(top) == set(plan.workers["fast"][layer])


def test_shares_are_proportional_to_speed_within_rounding() -> None:
    figs = [s.WorkerFigures("a", 1000.0), s.WorkerFigures("b", 1700.0), s.WorkerFigures("c", 333.0)]
    plan = s.plan_groups(figs, _importance(), epoch=0, model_key="m", group_size=64)
    total_speed = sum(f.speed for f in figs)
    for f in figs:
        per_layer = [len(gs) for gs in plan.workers[f.node]]
        ideal = G * f.speed / total_speed
        assert all(abs(k - ideal) < 2 for k in per_layer), (f.node, per_layer, ideal)
        assert abs(sum(per_layer) - L * ideal) <= 1, (f.node, sum(per_layer), L * ideal)


def test_coordinator_keeps_a_speed_sized_share_of_the_most_important_groups() -> None:
    plan = _plan(local_speed=1000.0)
    imp = _importance()
    assert abs(sum(len(gs) for gs in plan.local) - L * G / 7) <= 1  # 1000 of 7000 rows/s
    for layer, gs in enumerate(plan.local):
        top = sorted(range(G), key=lambda g: -imp[layer][g])[:len(gs)]
        assert set(gs) == set(top)


def test_offline_worker_gets_nothing_and_no_worker_means_all_local() -> None:
    figs = _figures()
    figs[1] = s.WorkerFigures("fast", speed=3000.0, online=False)
    plan = _plan(figs)
    assert "fast" not in plan.workers and plan.groups_for("fast") == ((),) * L
    assert _covers_once(plan) and set(plan.workers) == {"lossy", "slow"}
    alone = _plan([s.WorkerFigures("x", 100.0, online=False)])
    assert alone.workers == {} and alone.local == (tuple(range(G)),) * L


def test_plan_is_deterministic_and_random_mode_is_seeded() -> None:
    assert _plan() == _plan(list(reversed(_figures())))
    r1, r2, r3 = (_plan(mode="random", seed=k) for k in (7, 7, 8))
    assert r1 == r2 and r1 != r3 and r1.mode == "random" and _covers_once(r1)
    assert [len(gs) for gs in r1.workers["fast"]] == [len(gs) for gs in _plan().workers["fast"]]
    assert r1.workers["fast"] != _plan().workers["fast"]


def test_replan_hysteresis() -> None:
    basis = _figures()
    quiet = dict(now_s=100.0, planned_s=0.0)
    # Small wobble: no re-plan.
    wobble = [s.WorkerFigures(w.node, w.speed * 1.1, w.rtt_s, w.loss_rate, w.late_rate + 0.02)
              for w in basis]
    assert s.replan_reason(basis, wobble, **quiet) is None
    # Big change of one worker's speed share or reliability: re-plan.
    slower = [*basis[:2], s.WorkerFigures("slow", 400.0, 0.003)]
    assert "speed share of slow" in s.replan_reason(basis, slower, **quiet)
    lossier = [s.WorkerFigures("lossy", 2000.0, 0.004, 0.20, 0.10), *basis[1:]]
    assert "reliability of lossy" in s.replan_reason(basis, lossier, **quiet)
    # Drift inside the minimum interval waits; membership never does.
    assert s.replan_reason(basis, slower, now_s=5.0, planned_s=0.0) is None
    gone = [*basis[:2], s.WorkerFigures("slow", 1000.0, online=False)]
    assert "membership" in s.replan_reason(basis, gone, now_s=5.0, planned_s=0.0)
    # Hysteresis: the comparison is with the plan's basis, so a slow drift eventually re-plans.
    step = [s.WorkerFigures(w.node, w.speed * (0.85 if w.node == "slow" else 1.0), w.rtt_s,
                            w.loss_rate, w.late_rate) for w in basis]
    assert s.replan_reason(basis, step, **quiet) is None
    step2 = [s.WorkerFigures(w.node, w.speed * (0.7 if w.node == "slow" else 1.0), w.rtt_s,
                             w.loss_rate, w.late_rate) for w in basis]
    assert s.replan_reason(basis, step2, **quiet) is not None


def test_replan_on_importance_ranking_drift() -> None:
    figs, imp = _figures(), _importance()
    kw = dict(now_s=100.0, planned_s=0.0, basis_importance=imp)
    noisy = [[v * 1.05 for v in row] for row in imp]
    assert s.replan_reason(figs, figs, importance=noisy, **kw) is None
    flipped = [[-v for v in row] for row in imp]
    assert "importance" in s.replan_reason(figs, figs, importance=flipped, **kw)


def test_plan_dict_round_trip_through_cbor() -> None:
    plan = _plan(local_speed=500.0)
    d = cbor2.loads(cbor2.dumps(plan.to_dict()))
    assert s.Plan.from_dict(d) == plan


def _ordered() -> s.Plan:
    """A plan with a neuron order: 24 groups of 64 over 1,500 neurons (the last group 28 wide)."""
    from dataclasses import replace
    orders = tuple(s.pack_order([(7 * i + layer) % 1500 for i in range(1500)]) for layer in range(L))
    return replace(_plan(), order=orders)


def test_plan_with_a_neuron_order_round_trips_and_unpacks() -> None:
    plan = _ordered()
    back = s.Plan.from_dict(cbor2.loads(cbor2.dumps(plan.to_dict())))
    assert back == plan
    assert back.neuron_order(2)[:3] == (2, 9, 16)
    assert _plan().neuron_order(0) is None


@pytest.mark.parametrize("mutate", [
    lambda d: d["order"].pop(),  # one layer without an order
    lambda d: d["order"].__setitem__(0, d["order"][0][:-4]),  # 1,499 neurons
    lambda d: d["order"].__setitem__(1, s.pack_order([0] * 1500)),  # not a permutation
    lambda d: d["order"].__setitem__(1, s.pack_order(range(1, 1501))),  # ids out of range
    lambda d: d.update(order=[s.pack_order(range(1600))] * L),  # 1,600 neurons are 25 groups
    lambda d: d["order"].__setitem__(0, "abc"),
])
def test_bad_neuron_order_is_rejected(mutate) -> None:
    d = _ordered().to_dict()
    mutate(d)
    with pytest.raises(ProtocolError) as err:
        s.Plan.from_dict(d)
    assert err.value.reason == "bad-plan"


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(v=1),  # a v1 plan has no order: groups would be cut in another order
    lambda d: d.update(v=3),
    lambda d: d.update(epoch=-1),
    lambda d: d.update(epoch=True),
    lambda d: d.update(mode="clever"),
    lambda d: d.update(model_key=None),
    lambda d: d["local"].pop(),
    lambda d: d["workers"]["fast"][0].append(d["workers"]["slow"][0][0]),  # group held twice
    lambda d: d["workers"]["slow"][0].pop(),  # group held by no one
    lambda d: d["workers"]["slow"][1].append(G),  # out of range
    lambda d: d["workers"]["slow"][1].append("3"),
    lambda d: d["workers"].update({"": d["workers"].pop("slow")}),
    lambda d: d.update(workers=[]),
])
def test_bad_plan_dict_is_rejected(mutate) -> None:
    d = _plan().to_dict()
    mutate(d)
    with pytest.raises(ProtocolError):
        s.Plan.from_dict(d)


def test_non_map_plan_is_rejected() -> None:
    with pytest.raises(ProtocolError) as err:
        s.Plan.from_dict([1, 2])
    assert err.value.reason == "bad-plan"


def test_a_drift_must_persist_before_it_replans() -> None:
    pol = s.ReplanPolicy(persist_s=3.0)
    assert s.drift_persisted(None, 5.0, 6.0, pol) == (False, None)
    assert s.drift_persisted("membership: -['a'] +[]", 5.0, 6.0, pol) == (True, None)
    fire, since = s.drift_persisted("reliability of a: 0.9 -> 0.5", None, 10.0, pol)
    assert (fire, since) == (False, 10.0)
    assert s.drift_persisted("speed share of a: 0.3 -> 0.2", since, 12.9, pol) == (False, 10.0)
    assert s.drift_persisted("reliability of a: 0.9 -> 0.5", since, 13.0, pol) == (True, None)
    # Noise: the drift vanished on one check, so the clock starts again.
    _, since = s.drift_persisted(None, since, 11.0, pol)
    assert s.drift_persisted("reliability of a: 0.9 -> 0.5", since, 14.0, pol) == (False, 14.0)
