"""A HALO worker's capacity (issue 16): the groups its memory holds, announced in its heartbeat,
read (bounded) by the coordinator, never exceeded by a plan it accepts, nor by a re-plan while the
old plan's groups are still held; the coordinator does not wait for a worker that had to drop
the active plan's groups to load the next one."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mesh import topics, wire
from mesh.halo import groups as split
from mesh.halo.ledger import EpochSwitch, Presence, worker_figures
from mesh.halo.placement import Plan
from mesh.halo.plans import PlanHolder
from mesh.halo.worker import HaloWorker
from mesh.plausible import MAX_CAPACITY_GROUPS, heartbeat_problem
from tests.halo.rig import forward, heartbeat, make_rig, tiny_model

KEY = "tiny@0/fp32"
LAYERS, GROUP = 2, 24  # the tiny model (tests.halo.rig): intermediate 96 -> 4 groups a layer, 8 in all


class Bus:
    def __init__(self) -> None:
        self.published: list[tuple[str, wire.Envelope]] = []
        self.subscribed: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, wire.decode(payload, wire.DEFAULT_MAX_BYTES)))

    def subscribe(self, topic: str, callback: Any, qos: int = 0) -> None:
        self.subscribed.append(topic)

    def input_pending(self) -> bool:
        return False


class Source:
    """The tiny model's groups, recording what the worker held at each read (its kept epochs plus
    the groups of the plan being loaded read so far)."""

    def __init__(self, worker: HaloWorker) -> None:
        self.model = tiny_model(LAYERS)
        self.layout = split.model_layout(self.model.config, GROUP)
        self.worker, self.model_key, self.n_layers = worker, KEY, LAYERS
        self.hidden_size = int(self.model.config.hidden_size)
        self.loading = 0
        self.peaks: list[int] = []

    def read(self, layer: int, groups: Any, order: Any = None) -> split.GroupWeights:
        self.loading += len(groups)
        self.peaks.append(self.worker.held_groups() + self.loading)
        return split.extract_groups(self.model, layer, groups, self.layout, order)


def _worker(capacity: int | None) -> tuple[HaloWorker, Bus, Source]:
    w = HaloWorker(group_size=GROUP, capacity=capacity)
    bus = Bus()
    w.agent = SimpleNamespace(bus=bus, rejects=wire.RejectCounter(), name="w1",
                              limits=SimpleNamespace(max_message_bytes=1 << 20),
                              timing=SimpleNamespace(heartbeat_s=1.0))
    src = Source(w)
    w.source, w.name, w.model_key, w.layout, w.n_layers = src, "w1", KEY, src.layout, LAYERS
    return w, bus, src


def _plan(epoch: int, mine: tuple[tuple[int, ...], ...]) -> Plan:
    local = tuple(tuple(g for g in range(4) if g not in gs) for gs in mine)
    return Plan(epoch, KEY, GROUP, 4, {"w1": mine}, local)


def _send(w: HaloWorker, plan: Plan) -> None:
    env = wire.Envelope(wire.Kind.HALO_PLAN, "coordinator", {"epoch": plan.epoch, "plan": plan.to_dict()},
                        reply_to=topics.reply("coordinator"))
    w._on_plan(topics.HALO_PLAN, wire.encode(env), True)


def _load_queued(w: HaloWorker) -> None:
    w.source.loading = 0
    plan, reply, coordinator = w._plans.pop()
    w._plans.clear()
    w._load(plan, reply, coordinator)


def test_the_heartbeat_announces_the_capacity_and_the_coordinator_reads_it_bounded() -> None:
    w, _, _ = _worker(capacity=5)
    hb = {"roles": ["worker"], "model_key": KEY, **w.heartbeat_fields()}
    assert hb["halo"]["capacity_groups"] == 5
    assert heartbeat_problem(hb) is None
    assert worker_figures("w1", hb, True, KEY, GROUP).capacity == 5
    # a full node's worker (no bound) says nothing: the coordinator reads no cap
    free, _, _ = _worker(capacity=None)
    hb_free = {"roles": ["worker"], "model_key": KEY, **free.heartbeat_fields()}
    assert "capacity_groups" not in hb_free["halo"]
    assert worker_figures("w1", hb_free, True, KEY, GROUP).capacity is None
    # impossible figures are refused whole, like any heartbeat figure (mesh.plausible)
    for bad in (-1, MAX_CAPACITY_GROUPS + 1, float("nan"), float("inf"), "12", True):
        assert heartbeat_problem({**hb, "halo": {**hb["halo"], "capacity_groups": bad}}) == "halo.capacity_groups"
    assert worker_figures("w1", {**hb, "halo": {**hb["halo"], "capacity_groups": 7.9}}, True, KEY, GROUP).capacity == 7


def test_a_plan_beyond_the_capacity_is_refused_whole_and_never_acknowledged() -> None:
    w, bus, src = _worker(capacity=5)
    _send(w, _plan(1, ((0, 1, 2), (0, 1, 2))))  # 6 groups > 5: an old coordinator, or a forged plan
    assert not w._plans and w.agent.rejects.snapshot() == {"halo-plan-over-capacity": 1}
    assert src.peaks == [] and bus.published == []  # nothing read, nothing acknowledged
    _send(w, _plan(2, ((0, 1, 2), (0, 1))))  # 5: taken
    _load_queued(w)
    assert w.held_groups() == 5 and max(src.peaks) == 5
    assert [(t, e.kind, e.body["epoch"]) for t, e in bus.published] == [
        (topics.reply("coordinator"), wire.Kind.HALO_ACK, 2)]


def test_a_replan_drops_the_old_groups_before_loading_when_both_do_not_fit() -> None:
    w, bus, src = _worker(capacity=6)
    _send(w, _plan(1, ((0, 1), (0, 1))))
    _load_queued(w)
    w._serving = 1  # the coordinator's active plan, being served
    # 4 + 2 fit: the served plan stays while the next one loads (no gap in what it serves)
    _send(w, _plan(2, ((2,), (2,))))
    _load_queued(w)
    assert sorted(w._weights) == [1, 2] and max(src.peaks) <= 6
    # 4 + 2 + 4 do not: first the epoch not being served goes, then (4 + 4 > 6) the served one
    src.peaks.clear()
    _send(w, _plan(3, ((0, 3), (1, 3))))
    _load_queued(w)
    assert sorted(w._weights) == [3] and src.peaks == [2, 4]  # never above the capacity
    assert [e.body["epoch"] for _, e in bus.published] == [1, 2, 3]


def test_no_capacity_keeps_the_old_behaviour() -> None:
    w, _, src = _worker(capacity=None)
    for epoch, mine in ((1, ((0, 1, 2, 3), (0, 1, 2, 3))), (2, ((0, 1, 2, 3), (0, 1, 2, 3)))):
        _send(w, _plan(epoch, mine))
        _load_queued(w)
    assert sorted(w._weights) == [1, 2] and max(src.peaks) == 16


def test_the_step_does_not_wait_for_a_reloading_worker_until_the_switch() -> None:
    holder = PlanHolder(EpochSwitch(), Presence())
    holder.reloading = frozenset({"a"})
    assert holder.unreachable(["a", "b"]) == {"a"} and holder.gone(["a", "b"]) == frozenset()
    holder.switch.propose(_plan(1, ((0,), (0,))), 0.0)
    assert holder.maybe_switch() is None  # w1 has not acknowledged
    holder.switch.ack("w1", 1)
    assert holder.maybe_switch() is not None and holder.unreachable(["a", "b"]) == frozenset()


def test_the_start_check_takes_smollm2_q4_on_a_pi_zero_and_refuses_100_mib_in_one_line(
        monkeypatch: Any, capsys: Any) -> None:
    """The worker-only node's start check (nodes.memory.fit_worker, as `mesh node --no-answer` runs
    it) on SmolLM2's real config, with a 400 MiB cgroup and the runtime a worker-only node measured
    (results/2026-12-07/halo-worker-memory.json: 239 MiB): it starts; with 100 MiB `mesh node`
    exits 2 with one line naming the flag to change. The old check refused 400 MiB too (597 MiB)."""
    import threading

    import nodes.cli
    import nodes.memory
    from mesh import sysmem
    from tests.conftest import CACHE_ROOT, require_model

    require_model("smollm2-135m")
    mib = 1 << 20
    limit = {"bytes": 400 * mib}
    monkeypatch.setattr(sysmem, "memory_limit", lambda *a, **k: sysmem.MemoryLimit(limit["bytes"], "cgroup v1", 24 << 30))
    monkeypatch.setattr(sysmem, "process_memory",
                        lambda *a, **k: sysmem.ProcessMemory(239 * mib, 239 * mib, 160 * mib, 79 * mib, 0, 0))
    fit = nodes.memory.fit_worker(SimpleNamespace(home=CACHE_ROOT, model="smollm2-135m"), "q4", 64)
    assert fit.total_groups == 720 and 240 <= fit.capacity < 720 and fit.footprint.total <= 400 * mib

    limit["bytes"] = 100 * mib
    monkeypatch.setattr(nodes.cli, "_stop_on_signals", threading.Event)  # no handlers in the test process
    monkeypatch.setattr(nodes.memory, "start_trimmer", lambda stop: None)
    rc = nodes.cli.main(["node", "--name", "zero", "--roles", "worker", "--no-answer", "--model", "smollm2-135m",
                         "--weights", "q4", "--no-ha", "--home", str(CACHE_ROOT)])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("mesh node:")]
    assert rc == 2 and len(said) == 1 and "Traceback" not in err, err
    assert "fewer than one per layer (30)" in said[0] and "100 MiB (cgroup v1)" in said[0] and "--model" in said[0]


def test_a_strict_step_computes_a_reloading_workers_groups_instead_of_timing_out(tmp_path: Path) -> None:
    """The coordinator's side of a re-plan beyond a worker's capacity: the worker drops the active
    plan's groups before it loads the new ones, so until the switch it answers no frame of the
    active plan. The step knows (``reloading_workers``) and computes those groups itself, exactly,
    without waiting out the strict timeout (2 s a layer step in the rig) for partials that cannot come."""
    gen = make_rig(tmp_path)
    engine, bus = next(gen)
    try:
        ids = [3, 14, 15, 92, 65]
        with torch.inference_mode():
            ref = engine.model(input_ids=torch.tensor([ids])).logits
        active = engine.switch.active
        held = sum(map(len, active.groups_for("good")))
        capped = {**heartbeat(1000.0), "halo": {"compute_rows_per_s": 1000.0, "group_size": 16, "capacity_groups": held}}
        bus.auto_ack = False
        engine.replan([("good", capped, True), ("lossy", heartbeat(1000.0, late=0.3), True)], time.monotonic(), idle=True)
        pending = engine.switch.pending
        assert pending is not None and engine.replans[-1].endswith(f"capacity of good: None -> {held} groups")
        assert sum(map(len, pending.groups_for("good"))) <= held
        assert engine.plans.reloading == {"good"} and engine.snapshot()["reloading"] == ["good"]
        bus.workers["good"].delay = {0: None, 1: None}  # dropped the active plan's groups: no answer
        logits, run, took = forward(engine, True, ids)
        figures = run.figures()
        assert "strict-timeout" not in figures["stops"] and took < 1.5, (figures["stops"], took)
        assert figures["local_fallback_groups"] > 0 and run.epochs == {active.epoch}
        assert torch.allclose(logits, ref, atol=2e-3)  # still exact (fp16 on the wire)
        # A newer plan replacing the pending one before the switch, without the worker (its status
        # says offline): it has still dropped the active plan's groups, so the step still does not
        # wait for it (a fresh reloading_workers would not name it: it is in no pending plan).
        engine.replan([("good", capped, False), ("lossy", heartbeat(1000.0, late=0.3), True)], time.monotonic(),
                      idle=True)
        newer = engine.switch.pending
        assert newer.epoch > pending.epoch and set(newer.workers) == {"lossy"}
        assert engine.plans.reloading == {"good"}
        logits, run, took = forward(engine, True, ids)
        assert "strict-timeout" not in run.figures()["stops"] and took < 1.5 and run.epochs == {active.epoch}
        assert torch.allclose(logits, ref, atol=2e-3)
        # once every worker of it acknowledged, the next forward switches
        bus.ack("lossy", newer.epoch)
        logits, run, _ = forward(engine, True, ids)
        assert run.epochs == {newer.epoch} and engine.plans.reloading == frozenset()
        assert run.figures()["local_fallback_groups"] == 0 and torch.allclose(logits, ref, atol=2e-3)
    finally:
        gen.close()
