"""The coordinator's HALO engine: plans, epochs and the routed MLP of every layer step.

Per layer step (:meth:`HaloEngine._mlp`, on the generation thread): encode the MLP input once
(fp16, the whole (B, T, H) input: all prompt positions in a prefill, the last one in decode) as a
``mesh.halo.frame`` frame and publish it once on the coordinator's MLP-input topic, which every
plan worker subscribes to, written on this thread over the direct link (``mesh.mqtt.direct.DirectLink``)
when there is one; partial frames come back on ``topics.halo_link`` and are read by this thread
while it waits (over the bus: ``topics.halo_reply``, read by paho's thread); compute the local
groups meanwhile; predict the groups' importance (relaxed); then gather partials until
``mesh.halo.ledger.StepGather`` says stop, and sum. Strict computes what never came itself after a
long timeout or when the worker went offline, so strict is always exact; relaxed counts it as
zero. A partial of an earlier step is discarded on arrival (counted ``late``).

Plans (planner thread): figures from heartbeats (``mesh.halo.ledger.worker_figures``), importance
window, ``mesh.halo.placement.replan_reason`` for hysteresis, ``plan_groups``, published retained
with an epoch; the pending plan becomes active once every worker in it acknowledged, at the start
of the next forward pass (or at once while idle).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from mesh import topics, wire
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.halo import predictor as pred_mod
from mesh.mqtt.direct import DirectLink
from mesh.errors import MeshError, ProtocolError
from mesh.model import WARMUP_TEXT
from mesh.halo.ledger import (
    EpochSwitch,
    Liveness,
    Presence,
    StepGather,
    SyncLedger,
    worker_figures,
)
from mesh.halo.placement import Plan, drift_persisted, pack_order, plan_groups, replan_reason
from mesh.halo.sync import fallback_groups

log = logging.getLogger(__name__)

STEP_WINDOW = 1 << 16  # how many steps back a partial may still arrive (and be counted late)
PARTIALS_MAX = 4096  # partials waiting for the generation thread; a flood beyond is dropped, counted
WINDOW_ALPHA = 0.2  # weight of one ask's mean predicted importance in the scheduler's window
WINDOW_EVERY = 8  # relaxed: the window samples the predicted importance of one forward pass in 8
SAMPLED_ASKS = 16  # finished asks whose sampled MLP inputs wait for the planner thread, at most


@dataclass
class HaloRun:
    """Figures of one ask (one or many forward passes)."""

    strict: bool
    link: bool = False  # this run holds the coordinator's direct link (frames written and read here)
    link_steps: int = 0  # steps whose frames went over the direct link
    starts: list[float] = field(default_factory=list)  # perf_counter at layer 0 of each forward
    ended: float = 0.0
    steps: int = 0
    on_time: int = 0
    late: int = 0  # partials discarded on arrival
    zeroed_groups: int = 0  # (layer step, group) pairs summed as zero (relaxed)
    zeroed_steps: int = 0
    multi_steps: int = 0  # steps of a multi-token forward (prefill: T > 1)
    zeroed_multi_steps: int = 0  # of them, closed with some group summed as zero
    incomplete_per_forward: list[int] = field(default_factory=list)  # steps closed without every partial
    local_fallback_groups: int = 0  # strict: computed here because the worker was gone/timed out
    # Share of the layer step's importance summed as zero, added up over steps (complete steps add
    # 0): predicted (from the predictor) always, true (each group's contribution norm, computed
    # here from the full weights) only when ``measure`` is set, since that costs a whole MLP.
    zeroed_share_predicted: float = 0.0
    zeroed_share_true: float = 0.0
    measure: bool = False
    epochs: set[int] = field(default_factory=set)
    stops: dict[str, int] = field(default_factory=dict)  # why each step stopped waiting
    imp_sum: Tensor | None = None
    imp_n: int = 0
    # MLP inputs (layer, x) of the forward passes sampled for the scheduler's window, predicted on
    # the planner thread afterwards (with the local fallback nothing else needs them predicted).
    samples: list[tuple[int, Tensor]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the MLP steps
    # (forward pass, positions) -> (deadline, straggler wait, first arrival): see HaloEngine._timing
    timing: tuple[tuple[int, int], tuple[float, float | None, float | None]] | None = None

    def spent(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now

    def figures(self) -> dict[str, Any]:
        times = [b - a for a, b in zip(self.starts, [*self.starts[1:], self.ended])]
        return {"sync": "strict" if self.strict else "relaxed",
                "steps": self.steps, "link_steps": self.link_steps,
                "partials_on_time": self.on_time, "partials_late": self.late,
                "zeroed_groups": self.zeroed_groups, "zeroed_steps": self.zeroed_steps,
                "multi_steps": self.multi_steps, "zeroed_multi_steps": self.zeroed_multi_steps,
                "incomplete_per_forward": list(self.incomplete_per_forward),
                "local_fallback_groups": self.local_fallback_groups, "epochs": sorted(self.epochs),
                "zeroed_share_predicted": round(self.zeroed_share_predicted / max(1, self.steps), 6),
                **({"zeroed_share_true": round(self.zeroed_share_true / max(1, self.steps), 6)}
                   if self.measure else {}),
                "stops": dict(self.stops),
                "phases_s": {k: round(v, 6) for k, v in sorted(self.phases.items())},
                "token_times_s": times}


class HaloEngine:
    def __init__(self, loaded: Any, decoder: Any, config: Any, bus: Any, reply_topic: str,
                 rejects: wire.RejectCounter) -> None:
        self.loaded, self.decoder, self.config, self.bus = loaded, decoder, config, bus
        self.reply_topic, self.rejects = reply_topic, rejects
        self.frame_reply = topics.halo_reply(config.name)  # partial frames come back here
        self.link: DirectLink | None = None  # frames written and read on the generation thread
        self._pump: DirectLink | None = None  # the link this step's partials come back on
        self.mlp_topic = topics.node_mlp(config.name)
        self.model = loaded.model
        self.layout = split.model_layout(self.model.config, config.group_size)
        self.act = split.mlp_act_name(self.model.config)
        self.predictor = self._load_predictor()
        # The predictor's groups are cut in its neuron order: this model is permuted to it (the
        # same function) and every plan carries it, so workers cut the same neurons.
        self.order: tuple[bytes, ...] = ()
        if self.predictor is not None and self.predictor.order is not None:
            split.permute_neurons(self.model, self.predictor.order)
            self.order = tuple(pack_order(o.tolist()) for o in self.predictor.order)
            log.info("neuron groups cut in the predictor's neuron order (%d layers)", len(self.order))
        mlps = [layer.mlp for layer in split.decoder_layers(self.model)]
        self.full = [split.full_weights(m, self.layout, self.act, i) for i, m in enumerate(mlps)]
        self.bias = [split.down_bias(self.model, i) for i in range(len(mlps))]
        self.n_layers = len(mlps)
        self.wire_dtype = getattr(torch, config.wire_dtype)
        self.window = self._initial_importance()  # (L, G)
        self._window_floor = self.window.clone()  # the window never ranks a group below this
        self._samples: list[list[tuple[int, Tensor]]] = []  # finished asks' sampled MLP inputs
        self.ledger = SyncLedger()
        self.switch = EpochSwitch()
        self._lock = threading.Lock()
        self._partials: queue.Queue[tuple[str, int, Tensor | None, float, float]] = queue.Queue(PARTIALS_MAX)
        # The generation thread sleeps until every partial it still waits for at this step arrived
        # (or its next decision time): one wake-up per step instead of one per partial, each of
        # which costs a thread switch (and the GIL) on a busy device.
        self._await_lock = threading.Lock()
        self._await: tuple[int, set[str], bool] | None = None
        self._arrival = threading.Event()
        self.presence = Presence(getattr(config, "liveness", Liveness()))
        self._presence_lock = threading.Lock()
        self._local: dict[int, list[split.GroupWeights | None]] = {}
        self._step = time.time_ns() // 1000  # above any step of an earlier coordinator run
        self._next_epoch = time.time_ns() // 1_000_000
        self._basis: list[Any] = []
        self._basis_imp: list[list[float]] | None = None
        self._planned_at = 0.0
        self._drift_since: float | None = None
        self._plan_payload: bytes | None = None
        self.run_state: HaloRun | None = None
        self._grams: dict[int, Tensor] = {}  # per layer, for the measured (true) zeroed share
        self.replans: list[str] = []

    # -- setup ------------------------------------------------------------------------------------
    def _load_predictor(self) -> pred_mod.ImportancePredictor | None:
        path = self.config.predictor or pred_mod.predictor_path(self.config.home, self.loaded.key, self.config.group_size)
        if not path.exists():
            log.warning("no importance predictor at %s (mesh halo train-predictor); relaxed sync "
                        "uses the static importance window instead", path)
            return None
        try:
            return pred_mod.load_predictor(path, self.loaded.model_key)
        except ProtocolError as exc:
            log.warning("predictor %s not usable: %s", path, exc)
            return None

    def _initial_importance(self) -> Tensor:
        ids = torch.tensor([self.decoder.encode(WARMUP_TEXT)])
        data = pred_mod.record_pairs(self.model, [ids], self.layout)
        # The max over positions, not the mean: a group can be crucial at a few positions only
        # (LLaMA's massive activations at the first token); placing it on a lossy worker because
        # its average is small wrecks every prefill that loses it.
        return torch.stack([y.amax(0) for y in data.targets])  # (L, G)

    # -- network thread ---------------------------------------------------------------------------
    def on_reply(self, topic: str, payload: bytes, retained: bool) -> None:
        t = time.perf_counter()
        try:
            env = wire.decode(payload, self.config.limits.max_message_bytes)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            return
        if env.kind is wire.Kind.HALO_ACK:
            with self._lock:
                pending, active = self.switch.pending, self.switch.active
                if pending is not None and env.body["epoch"] == pending.epoch and env.sender in pending.workers:
                    self.switch.ack(env.sender, env.body["epoch"])
                elif not (active is not None and env.body["epoch"] == active.epoch and env.sender in active.workers):
                    self.rejects.add("unexpected-ack")  # a repeated ack of the active plan is harmless
        else:
            self.rejects.add("unexpected-kind")

    def on_frame(self, topic: str, payload: bytes, retained: bool) -> None:
        """A worker's partial as a ``mesh.halo.frame`` frame (network thread)."""
        t = time.perf_counter()
        try:
            f = halo_wire.decode(payload, self.config.limits.max_message_bytes)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            return
        if f.kind != halo_wire.PARTIAL:
            self.rejects.add("unexpected-kind")
            return
        self._partial(f.sender, f.step, f.tensor, t, f.compute_s)

    def _partial(self, sender: str, step: int, y: Tensor, t: float, compute_s: float) -> None:
        # Only a worker of a plan we run, for a step we sent (late ones too: they are counted as
        # late and discarded by the gather); anything else would only fill the queue.
        if sender not in self._plan_workers() or not self._step - STEP_WINDOW <= step < self._step:
            self.rejects.add("unexpected-partial")
            return
        try:
            self._partials.put_nowait((sender, step, y, t, compute_s))
        except queue.Full:
            self.rejects.add("halo-busy")
            return
        with self._await_lock:
            waiting = self._await
            if waiting is not None and step == waiting[0] and sender in waiting[1]:
                waiting[1].discard(sender)
                if not waiting[1] or waiting[2]:
                    self._arrival.set()
        with self._presence_lock:
            self.presence.heard(sender, time.monotonic())

    def _plan_workers(self) -> frozenset[str]:
        with self._lock:
            return frozenset(w for p in (self.switch.active, self.switch.pending) if p is not None for w in p.workers)

    def set_online(self, node: str, online: bool) -> None:
        with self._presence_lock:
            self.presence.status(node, online, time.monotonic())

    def note_heartbeat(self, node: str, body: dict[str, Any]) -> None:
        halo = body.get("halo") if isinstance(body.get("halo"), dict) else {}
        period = halo.get("heartbeat_s")
        with self._presence_lock:
            self.presence.heard(node, time.monotonic(),
                                float(period) if isinstance(period, (int, float)) and not isinstance(period, bool)
                                else None)

    def gone(self, workers: Iterable[str]) -> frozenset[str]:
        """Workers not worth waiting for: offline (last will), silent, or suspect after a strict timeout."""
        with self._presence_lock:
            return self.presence.gone(workers, time.monotonic())

    # -- planning (planner thread) ----------------------------------------------------------------
    def replan(self, views: Sequence[tuple[str, dict[str, Any], bool]], now: float, idle: bool) -> None:
        self.fold_samples()
        gone = self.gone(name for name, _, _ in views)
        figs = [f for name, hb, online in views
                if (f := worker_figures(name, hb, online and name not in gone,
                                        self.loaded.model_key, self.config.group_size,
                                        self.ledger.late_rate(name))) is not None and f.speed > 0]
        with self._lock:
            window = self.window.tolist()
            reason = "initial" if self.switch.newest is None else replan_reason(
                self._basis, figs, now_s=now, planned_s=self._planned_at, policy=self.config.replan,
                basis_importance=self._basis_imp, importance=window)
            act, self._drift_since = drift_persisted(reason, self._drift_since, now, self.config.replan)
        if act and reason is not None:
            epoch = self._next_epoch
            self._next_epoch += 1
            # Shares follow useful throughput: speed x reliability^weight (weight 0: speed only,
            # the plain tensor-parallel baseline), so a lossy worker keeps few, unimportant groups.
            gamma = self.config.reliability_weight
            sized = [replace(f, speed=f.speed * max(f.reliability, 1e-3) ** gamma) for f in figs]
            plan = plan_groups(sized, window, epoch=epoch, model_key=self.loaded.model_key,
                               group_size=self.config.group_size, local_speed=self.config.local_speed,
                               mode=self.config.placement, seed=epoch)
            plan = replace(plan, order=self.order)
            local = [self._slice(layer, gs) if gs else None for layer, gs in enumerate(plan.local)]
            with self._lock:
                self._local[epoch] = local
                self.switch.propose(plan, now)
                self._basis, self._basis_imp, self._planned_at = figs, window, now
            self.replans.append(f"{epoch}: {reason}")
            log.info("plan epoch %d (%s): %s, local %d groups", epoch, reason,
                     {w: sum(map(len, gs)) for w, gs in plan.workers.items()}, sum(map(len, plan.local)))
            env = wire.Envelope(wire.Kind.HALO_PLAN, self.config.name,
                                {"epoch": epoch, "plan": plan.to_dict()}, reply_to=self.reply_topic)
            self._plan_payload = wire.encode(env)
            self.republish()
        if idle:
            self._maybe_switch()

    def republish(self) -> None:
        if self._plan_payload is not None:
            try:
                self.bus.publish(topics.HALO_PLAN, self._plan_payload, qos=topics.PLAN.qos, retain=True)
            except MeshError as exc:
                log.warning("plan not published: %s", exc)

    def _maybe_switch(self) -> Plan | None:
        with self._lock:
            plan = self.switch.maybe_switch()
            if plan is not None:
                for e in [e for e in self._local if e < plan.epoch]:
                    del self._local[e]
        if plan is not None:
            log.info("switched to plan epoch %d", plan.epoch)
        return plan

    def _slice(self, layer: int, groups: Sequence[int]) -> split.GroupWeights:
        f = self.full[layer]
        return split.extract_from_tensors(f.gate, f.up, f.down, groups, self.layout, self.act, layer,
                                          f.gate_bias, f.up_bias)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            active, pending = self.switch.active, self.switch.pending
        return {"epoch": active.epoch if active else None, "pending": pending.epoch if pending else None,
                "workers": sorted(active.workers) if active else [],
                "groups": {w: sum(map(len, gs)) for w, gs in (active.workers.items() if active else [])},
                "local_groups": sum(map(len, active.local)) if active else 0,
                "placement": self.config.placement, "sync": self.config.sync,
                "predictor": self.predictor is not None, "replans": len(self.replans),
                "deadline_ms": round(self.ledger.deadline(self.config.policy) * 1000, 3),
                "straggler_ms": round(self.ledger.straggler_wait(
                    self.config.policy, self.ledger.deadline(self.config.policy)) * 1000, 3),
                "partials": self.ledger.counts()}

    # -- the routed forward (generation thread) ---------------------------------------------------
    @contextmanager
    def run(self, strict: bool, measure: bool = False) -> Iterator[HaloRun]:
        """One ask's forward passes, routed; over the direct link when there is one (held for the
        whole run; the bus when another thread holds it a moment too long)."""
        state = HaloRun(strict, measure=measure)
        state.link = bool(self.link is not None and self.link.lock.acquire(timeout=0.5))
        self.run_state = state
        try:
            with torch.inference_mode(), split.routed_mlps(self.model, self._mlp):
                yield state
        finally:
            state.ended = time.perf_counter()
            self.run_state = None
            self._pump = None
            if state.link:
                self.link.lock.release()
            if state.imp_sum is not None and state.imp_n:
                self._fold_window((state.imp_sum / state.imp_n).float())
            if state.samples:
                with self._lock:  # bounded: without a planner thread nobody folds them
                    self._samples = [*self._samples[-(SAMPLED_ASKS - 1):], state.samples]

    def _fold_window(self, mean: Tensor) -> None:
        """One ask's mean predicted importance (L, G) into the scheduler's window."""
        with self._lock:
            self.window = torch.maximum((1 - WINDOW_ALPHA) * self.window + WINDOW_ALPHA * mean, self._window_floor)

    def fold_samples(self) -> int:
        """Predict the sampled MLP inputs of finished asks and fold them into the window (planner
        thread: 30 predictions per sampled forward cost ~2.5 ms per token on the generation
        thread, 3 % of a decode token, for a figure only the next re-plan reads). Returns how
        many asks it folded."""
        with self._lock:
            pending, self._samples = self._samples, []
        with torch.inference_mode():
            for samples in pending:
                total = torch.zeros_like(self.window)
                for layer, x in samples:
                    total[layer] += self._importance(layer, x).float()
                forwards = sum(1 for layer, _ in samples if layer == 0)
                if forwards:
                    self._fold_window(total / forwards)
        return len(pending)

    def _mlp(self, layer: int, x: Tensor) -> Tensor:  # x (B, T, H) -> (B, T, H)
        run = self.run_state
        assert run is not None
        if layer == 0:
            run.starts.append(time.perf_counter())
            run.incomplete_per_forward.append(0)
            self._maybe_switch()
        with self._lock:
            plan = self.switch.active
            local = self._local.get(plan.epoch) if plan is not None else None
        if plan is None or local is None:  # no plan yet: the whole MLP here
            return self.full[layer].partial(x) + (self.bias[layer] if self.bias[layer] is not None else 0)
        run.epochs.add(plan.epoch)
        step = self._step
        self._step += 1
        run.steps += 1
        tokens = x.shape[1]
        multi = tokens > 1
        run.multi_steps += int(multi)
        expected = {w: gs[layer] for w, gs in plan.workers.items() if gs[layer]}
        t = time.perf_counter()
        self._pump = None
        if expected:
            # One publish for every worker (the broker fans it out); each computes its own groups.
            # Over the direct link this thread writes it and reads the partials itself.
            link = self.link if run.link and self.link is not None and self.link.usable else None
            wx = x.to(self.wire_dtype)
            data = halo_wire.encode(halo_wire.MLP, self.config.name, plan.epoch, step, layer, wx,
                                    reply_to=link.topic if link is not None else self.frame_reply)
            t0 = t = run.spent("encode", t)
            if link is not None and not link.publish(self.mlp_topic, data):
                link = None  # it just broke: this step goes over the bus
                data = halo_wire.encode(halo_wire.MLP, self.config.name, plan.epoch, step, layer, wx,
                                        reply_to=self.frame_reply)
            if link is None:
                self.bus.publish(self.mlp_topic, data, qos=topics.NODE_MLP.qos)
            self._pump = link
            run.link_steps += int(link is not None)
            for w in expected:
                self.ledger.sent(w, step, t0, tokens)
            t = run.spent("publish", t)
        if expected and not multi:
            self.ledger.spread(step, len(expected))
        parts: list[Tensor | None] = [local[layer].partial(x) if local[layer] is not None else None]
        t = run.spent("local", t)
        if expected:
            gather, must_wait, imp = self._gather(run, layer, step, x, expected, t0)
            t = run.spent("gather", t)
            parts.extend(gather.partials.values())
            missing = gather.missing_groups()
            run.incomplete_per_forward[-1] += int(bool(missing))
            if missing and run.strict:
                parts.append(split.partial_of_groups(self.full[layer], self.layout, missing, x))
                run.local_fallback_groups += len(missing)
            elif missing:
                # Relaxed: missing groups count as zero, except the ones the coordinator computes
                # itself: every one of a prefill step, and (fallback "important") the ones
                # predicted important at a decode step, a few groups' rows.
                keep = list(fallback_groups(missing, must_wait, tokens, self.config.fallback, self.config.policy))
                if keep:
                    parts.append(split.partial_of_groups(self.full[layer], self.layout, keep, x))
                    run.local_fallback_groups += len(keep)
                if len(keep) < len(missing):
                    run.zeroed_groups += len(missing) - len(keep)
                    run.zeroed_steps += 1
                    run.zeroed_multi_steps += int(multi)
                    zeroed = [g for g in missing if g not in keep]
                    if imp is not None and float(imp.sum()) > 0:
                        run.zeroed_share_predicted += float(imp[zeroed].sum() / imp.sum())
                    if run.measure:
                        run.zeroed_share_true += self._true_share(layer, x, zeroed)
            t = run.spent("fallback", t)
        out = split.reduce_partials(parts, x, self.bias[layer])
        run.spent("reduce", t)
        return out

    def _gather(self, run: HaloRun, layer: int, step: int, x: Tensor,
                expected: dict[str, tuple[int, ...]], t0: float
                ) -> tuple[StepGather, frozenset[int], Tensor | None]:
        must_wait: frozenset[int] = frozenset()
        imp: Tensor | None = None
        # Predicted importance is needed up front only when it decides the wait (fallback "none");
        # with the local fallback only once something is missing at the end of the step. The
        # scheduler's importance window samples one forward pass in WINDOW_EVERY.
        policy = self.config.policy
        tokens = x.shape[1]
        sample = not run.strict and (len(run.starts) - 1) % WINDOW_EVERY == 0
        if not run.strict and self.config.fallback != "important":
            imp = self._predict(run, layer, x, record=sample)
            must_wait = frozenset(pred_mod.groups_to_wait(imp, self.config.policy.target_share))
        elif sample:
            run.samples.append((layer, x.detach().clone()))  # predicted later, on the planner thread
        important = frozenset() if self.config.fallback == "important" else must_wait
        # With the local fallback nothing needs the longer "important" wait: it is computed here.
        # A prefill step's deadline scales with its positions; the decode straggler wait follows
        # the measured spread of arrivals (a prefill's, whose missing groups are computed here
        # anyway, keeps the policy's share of its own deadline).
        deadline, straggler, first_at = self._timing(run, tokens)
        gather = StepGather(step, expected, important if not run.strict else frozenset(), run.strict,
                            straggler_s=straggler)
        numel = x.numel()
        wait: float | None = None  # first take what already arrived (late partials settle who is stalled)
        waiting: set[str] = set()
        while True:
            if wait is not None:
                # Relaxed: the first arrival starts the stragglers' shorter wait. Waking on it
                # costs a thread switch per step (relaxed was 6 % slower than strict at 0 % loss),
                # so with a measured first-arrival time sleep for all until the earliest a cut can
                # fall due, then decide from what arrived.
                first = not run.strict and gather.last_arrival_s is None
                if first and straggler is not None and first_at is not None:
                    wait, first = min(wait, max(first_at + straggler - elapsed, 0.0)), False
                self._sleep(step, waiting, wait, first=first)
            elif self._pump is not None and not self._pump.pump(0.0):
                self._pump = None  # the first look: read what arrived on the direct link (broke: the bus)
            while True:
                try:
                    item = self._partials.get_nowait()
                except queue.Empty:
                    break
                self._take(run, gather, item, numel, t0)
            now = time.perf_counter()
            stalled = frozenset() if run.strict else self.ledger.stalled(step, now, deadline,
                                                                          policy.cut_overdue_factor)
            gone = self.gone(expected)
            elapsed = now - t0
            d = gather.decide(elapsed_s=elapsed, deadline_s=deadline, stalled=stalled,
                              policy=policy, strict_timeout_s=self.config.strict_timeout_s,
                              gone=gone)
            if not d.wait:
                run.stops[d.reason] = run.stops.get(d.reason, 0) + 1
                if d.reason == "strict-timeout":
                    with self._presence_lock:
                        for w in gather.pending():
                            self.presence.timed_out(w)
                break
            wait = min(max(d.until_s - elapsed, 0.0), 0.25)
            waiting = set(gather.pending()) - stalled - gone
        for w in expected:
            self.ledger.closed(w, w in gather.partials, step)
        exact = tokens > 1 and policy.exact_multi  # nothing of it is zeroed: no prediction needed
        if not run.strict and imp is None and not gather.complete and not exact:
            imp = self._predict(run, layer, x, record=False)
            must_wait = frozenset(pred_mod.groups_to_wait(imp, self.config.policy.target_share))
        return gather, must_wait, imp

    def _timing(self, run: HaloRun, tokens: int) -> tuple[float, float | None, float | None]:
        """The step's deadline, straggler wait (decode) and first-arrival time, from the ledger's
        figures as they stood at the first step of this forward pass: the quantiles move over 64
        to 128 samples, so refreshing them at each of a token's 30 steps changed nothing but
        cost ~30 us per step on an idle machine (results/2026-12-06/ledger_step_cost.py) and,
        sampled under the bench's load, ~5 % of the coordinator's wall time."""
        key = (len(run.starts), tokens)
        if run.timing is None or run.timing[0] != key:
            policy = self.config.policy
            deadline = self.ledger.deadline(policy, tokens)
            straggler = self.ledger.straggler_wait(policy, deadline) if tokens == 1 else None
            first_at = self.ledger.first_arrival() if straggler is not None else None
            run.timing = (key, (deadline, straggler, first_at))
        return run.timing[1]

    def _true_share(self, layer: int, x: Tensor, zeroed: Sequence[int]) -> float:
        """The share of the step's true contribution norm (summed over positions) in ``zeroed``."""
        gram = self._grams.get(layer)
        if gram is None:
            gram = self._grams[layer] = split.importance_gram(self.full[layer])
        true = split.group_importance(self.full[layer], x, gram).reshape(-1, self.layout.n_groups).sum(0)  # (G,)
        total = float(true.sum())
        return float(true[list(zeroed)].sum()) / total if total > 0 else 0.0

    def _sleep(self, step: int, waiting: set[str], timeout: float, first: bool = False) -> None:
        """Until every worker in ``waiting`` (``first``: any of them) delivered its partial of
        ``step``, or ``timeout``."""
        with self._await_lock:
            self._await = (step, set(waiting), first)
            self._arrival.clear()
        try:
            end = time.perf_counter() + timeout
            if self._pump is not None and (not waiting or self._partials.empty()):
                # Read the partials here (the handler runs on this thread) until they are in.
                while not (waiting and self._arrival.is_set()):
                    left = end - time.perf_counter()
                    if left <= 0:
                        return
                    if not self._pump.pump(left):
                        self._pump = None  # broke: wait out the rest below (the bus is read elsewhere)
                        break
            left = end - time.perf_counter()
            if self._pump is not None or left <= 0:
                return
            if waiting and self._partials.empty():  # else something came meanwhile: look at it first
                self._arrival.wait(left)
            elif not waiting:
                time.sleep(left)
        finally:
            with self._await_lock:
                self._await = None

    def _importance(self, layer: int, x: Tensor) -> Tensor:
        # Per position, then the max: a prefill needs every group that matters at any position.
        return self.predictor.predict(layer, x[0]).amax(0) if self.predictor is not None else self.window[layer]

    def _predict(self, run: HaloRun, layer: int, x: Tensor, record: bool) -> Tensor:
        """Predicted importance of every group at this step: (G,); ``record`` adds it to the run's
        sample for the scheduler's window."""
        t = time.perf_counter()
        imp = self._importance(layer, x)
        if record:
            if run.imp_sum is None:
                run.imp_sum = torch.zeros(self.n_layers, imp.shape[-1])
            run.imp_sum[layer] += imp.float()
            run.imp_n += int(layer == 0)
        run.spent("predict", t)
        return imp

    def _take(self, run: HaloRun, gather: StepGather, item: tuple[str, int, Tensor | None, float, float],
              numel: int, t0: float) -> None:
        sender, s, y, t, compute_s = item
        if y is None or (s == gather.step and y.numel() != numel):
            self.rejects.add("bad-halo-partial")
        elif gather.add(sender, s, y, t - t0):
            latency = self.ledger.arrived(sender, s, t, on_time=True)
            run.on_time += 1
            if latency is not None:  # round trip of on-time partials, and the worker's share of it
                run.phases["rtt_on_time"] = run.phases.get("rtt_on_time", 0.0) + latency
                run.phases["worker_compute"] = run.phases.get("worker_compute", 0.0) + compute_s
        else:  # an earlier step's partial, discarded on arrival
            self.ledger.arrived(sender, s, t, on_time=False)
            run.late += 1

    # -- teacher-forced evaluation ----------------------------------------------------------------
    def evaluate(self, spec: dict[str, Any], strict: bool) -> dict[str, Any]:
        """``{"ids": [...], "start": k, "score_ids": [...]}``: prefill ``ids[:k]``, then feed the rest
        one token at a time; per fed position the NLL of the true next token and the argmax, and at
        the end the logits of ``score_ids``."""
        from transformers import DynamicCache

        ids, vocab = spec.get("ids"), self.model.config.vocab_size
        score_ids = spec.get("score_ids", [])
        start = spec.get("start", 1)
        if (not isinstance(ids, list) or not 1 <= len(ids) <= 4096 or not isinstance(score_ids, list)
                or not all(type(i) is int and 0 <= i < vocab for i in [*ids, *score_ids])
                or type(start) is not int or not 1 <= start <= len(ids)):
            raise ProtocolError("bad-halo-eval", "ids/start/score_ids")
        nll: list[float] = []
        top: list[int] = []
        with self.run(strict, measure=True) as run:
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=torch.tensor([ids[:start]]), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            logits = out.logits[0, -1]
            for pos in range(start, len(ids)):
                nll.append(-float(torch.log_softmax(logits.float(), -1)[ids[pos]]))
                top.append(int(torch.argmax(logits)))
                if pos + 1 < len(ids) or score_ids:
                    logits = self.decoder.next_logits(ids[pos], cache)
        figures = run.figures()
        times = figures.pop("token_times_s")
        return {"prompt_tokens": len(ids), "halo": figures,
                "tpot_s": round(sum(times[1:]) / len(times[1:]), 6) if len(times) > 1 else None,
                "eval": {"nll": nll, "argmax": top, "scores": [float(logits[i]) for i in score_ids]}}
