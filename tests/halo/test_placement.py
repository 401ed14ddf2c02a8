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


# -- capacity (issue 16): a worker never gets more groups than its memory holds -----------------------


def _totals(plan: s.Plan) -> dict[str, int]:
    return {n: sum(map(len, w)) for n, w in plan.workers.items()}


def test_a_capped_worker_gets_its_capacity_and_the_rest_goes_to_the_others_by_speed() -> None:
    # Uncapped, "fast" would take half of all L x G = 144 groups (72): capped at 30, the other 114
    # go to the other two in their speed ratio 2:1 (water-filling).
    figs = [s.WorkerFigures("fast", 3000.0, capacity=30), s.WorkerFigures("mid", 2000.0),
            s.WorkerFigures("slow", 1000.0)]
    plan = _plan(figs)
    got = _totals(plan)
    assert _covers_once(plan) and plan.local == ((),) * L
    assert got["fast"] == 30
    assert abs(got["mid"] - 76) <= 1 and abs(got["slow"] - 38) <= 1 and got["mid"] + got["slow"] == 114
    # a capacity above the speed share binds nothing: the same plan as with none
    roomy = [s.WorkerFigures(f.node, f.speed, capacity=1000) for f in figs]
    free = [s.WorkerFigures(f.node, f.speed) for f in figs]
    assert _plan(roomy).workers == _plan(free).workers


def test_what_no_worker_can_hold_stays_with_the_coordinator_its_most_important_groups() -> None:
    figs = [s.WorkerFigures("a", 3000.0, capacity=40), s.WorkerFigures("b", 1000.0, capacity=25)]
    plan = _plan(figs)  # local_speed 0: the coordinator computes only what nobody can hold
    assert _covers_once(plan)
    assert _totals(plan) == {"a": 40, "b": 25}
    assert sum(map(len, plan.local)) == L * G - 65
    imp = _importance()
    for layer in range(L):  # the coordinator ranks first: the rest it keeps is the most important
        k = len(plan.local[layer])
        assert set(plan.local[layer]) == set(sorted(range(G), key=lambda g: -imp[layer][g])[:k])
    # the same with a coordinator that computes: capped workers still get no more
    plan = _plan(figs, local_speed=100_000.0)
    assert _covers_once(plan) and all(v <= {"a": 40, "b": 25}[n] for n, v in _totals(plan).items())


@pytest.mark.parametrize("caps", [(1, 1, 1), (7, 0, 200), (143, 1, 0), (6, 6, 6), (5, 300, 11)])
def test_no_holder_ever_exceeds_its_capacity_and_every_group_is_placed_once(caps: tuple[int, int, int]) -> None:
    figs = [s.WorkerFigures(n, sp, rtt_s=0.001 * i, capacity=c)
            for i, (n, sp, c) in enumerate(zip(("a", "b", "c"), (3000.0, 1700.0, 333.0), caps))]
    for mode in ("importance", "random"):
        plan = _plan(figs, mode=mode)
        assert _covers_once(plan), caps
        for f in figs:
            assert sum(map(len, plan.groups_for(f.node))) <= f.capacity, (caps, mode, _totals(plan))
        assert 0 not in caps or [f.node for f in figs if f.capacity == 0][0] not in plan.workers


def test_water_fill_and_the_bounded_apportionment() -> None:
    shares, rest = s.water_fill([3.0, 1.0, 1.0], [10, None, None], 100)
    assert shares == [10, 45.0, 45.0] and rest == 0.0
    shares, rest = s.water_fill([3.0, 1.0], [10, 20], 100)
    assert shares == [10, 20] and rest == 70
    assert s._apportion([1.0, 1.0, 1.0], 10) == [4, 3, 3]
    assert s._apportion([1.0, 1.0, 1.0], 10, [1, 10, 10]) == [1, 5, 4]
    assert s._apportion([1.0, 0.0], 10, [4, 10]) == [4, 6]  # the unwanted one takes what is left
    assert s._apportion([1.0, 1.0], 10, [2, 3]) == [2, 3]  # bounds below the total: less placed


def test_a_capacity_change_replans_at_once() -> None:
    basis = [s.WorkerFigures("a", 1000.0, capacity=100), s.WorkerFigures("b", 1000.0)]
    now = [s.WorkerFigures("a", 1000.0, capacity=60), s.WorkerFigures("b", 1000.0)]
    reason = s.replan_reason(basis, now, now_s=1.0, planned_s=0.0)  # well inside min_interval_s
    assert reason == "capacity of a: 100 -> 60 groups"
    assert s.drift_persisted(reason, None, 1.0) == (True, None)
    assert s.replan_reason(basis, basis, now_s=1.0, planned_s=0.0) is None


def test_workers_that_cannot_hold_both_plans_are_reloading() -> None:
    def plan(epoch: int, a: int, b: int) -> s.Plan:  # a's and b's first groups of layer 0, the rest local
        rest = tuple(range(a + b, G))
        return s.Plan(epoch, "m", 64, G, {"a": ((*range(a),), *([()] * (L - 1))),
                                          "b": ((*range(a, a + b),), *([()] * (L - 1)))},
                      (rest, *([tuple(range(G))] * (L - 1))))

    figs = [s.WorkerFigures("a", 1.0, capacity=10), s.WorkerFigures("b", 1.0), s.WorkerFigures("c", 1.0, capacity=5)]
    assert s.reloading_workers(None, plan(2, 6, 6), figs) == frozenset()  # the first plan: nothing to drop
    assert s.reloading_workers(plan(1, 6, 6), plan(2, 6, 6), figs) == {"a"}  # 6 + 6 > 10; b has no bound
    assert s.reloading_workers(plan(1, 4, 6), plan(2, 6, 6), figs) == frozenset()  # 4 + 6 fit
