"""The coordinator's HALO engine: plans, epochs, the importance window and the network handlers.

Plans (planner thread, :meth:`HaloEngine.replan`): figures from heartbeats
(``mesh.halo.ledger.worker_figures``), the importance window, ``mesh.halo.placement.replan_reason``
for hysteresis, ``plan_groups``, published retained with an epoch. Its other half is the worker's
plan load (``mesh.halo.worker``: the loader slices the groups and answers ``HALO_ACK``); the
pending plan becomes active once every worker in it acknowledged, at the start of the next forward
pass (or at once while idle), through the ``mesh.halo.plans.PlanHolder`` the step reads.

The model is the coordinator's :mod:`mesh.lm` model in its weight format (a transformers model
works too: the tests' small ones), left in its own neuron order; the groups it computes itself are
cut from it as a worker of that format cuts them (``mesh.halo.shard.ModelGroups``), in the plans'
neuron order. The routed MLP of every layer step is ``mesh.halo.step.RoutedStep`` (:attr:`HaloEngine.step`);
partial frames reach it through :meth:`HaloEngine.on_frame`. The benchmark's teacher-forced
evaluation is ``mesh.halo.evaluate``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mesh import topics, wire
from mesh.auth.keyring import Keyring
from mesh.errors import MeshError, ProtocolError
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.halo import predictor as pred_mod
from mesh.halo.keys import HaloKeys
from mesh.halo.ledger import EpochSwitch, Liveness, Presence, worker_figures
from mesh.halo.placement import drift_persisted, pack_order, plan_groups, reloading_workers, replan_reason
from mesh.halo.plans import WHOLE_LAYER, PlanHolder, WholeLayer
from mesh.halo.shard import ModelGroups
from mesh.halo.step import HaloRun, RoutedStep
from mesh.model import WARMUP_TEXT
from mesh.mqtt.direct import DirectLink

log = logging.getLogger(__name__)

WINDOW_ALPHA = 0.2  # weight of one ask's mean predicted importance in the scheduler's window
SAMPLED_ASKS = 16  # finished asks whose sampled MLP inputs wait for the planner thread, at most


class HaloEngine:
    """Plans, epochs and the importance window of one coordinator; its :attr:`step` routes the MLPs."""

    def __init__(self, loaded: Any, decoder: Any, config: Any, bus: Any, reply_topic: str,
                 rejects: wire.RejectCounter, keyring: Keyring | None = None) -> None:
        """``keyring``: this coordinator's identity (``mesh.halo.keys``); None runs unauthenticated."""
        self.loaded, self.decoder, self.config, self.bus = loaded, decoder, config, bus
        self.reply_topic, self.rejects = reply_topic, rejects
        self.keys = HaloKeys(keyring)
        self.model = loaded.model
        self.layout = split.model_layout(self.model.config, config.group_size)
        self.act = split.mlp_act_name(self.model.config)
        # This coordinator's own groups and its fallback's are cut from its loaded model, in its
        # weight format, as a worker of that format cuts them (mesh.halo.shard): never a float32
        # copy of a quantised MLP, only the groups a step or a plan asks for.
        self.groups = ModelGroups(loaded, config.group_size)
        self.n_layers = self.groups.n_layers
        self.predictor = self._load_predictor()
        # The predictor's groups are cut in its neuron order: every plan carries it, so the workers
        # and this coordinator cut the same neurons. The model itself keeps its own order (the same
        # function; a q4 down projection could not be reordered by its neurons: its blocks run along them).
        self.orders: list[Tensor | None] = [None] * self.n_layers
        self.order: tuple[bytes, ...] = ()
        if self.predictor is not None and self.predictor.order is not None:
            self.orders = list(self.predictor.order)
            self.order = tuple(pack_order(o.tolist()) for o in self.predictor.order)
            log.info("neuron groups cut in the predictor's neuron order (%d layers)", len(self.order))
        self.bias = [split.down_bias(self.model, i) for i in range(self.n_layers)]
        self.window = self._initial_importance()  # (L, G)
        self._window_floor = self.window.clone()  # the window never ranks a group below this
        self._samples: list[list[tuple[int, Tensor]]] = []  # finished asks' sampled MLP inputs
        self._lock = threading.Lock()  # the window and the planner's basis
        self.plans = PlanHolder(EpochSwitch(), Presence(getattr(config, "liveness", Liveness())))
        self.step = RoutedStep(self.model, self.groups, self.orders, self.bias, config, bus, self.plans, rejects,
                               self._importance, self.keys)
        self.ledger = self.step.ledger
        self.frame_reply = self.step.frame_reply
        self._next_epoch = time.time_ns() // 1_000_000
        self._basis: list[Any] = []
        self._basis_imp: list[list[float]] | None = None
        self._planned_at = 0.0
        self._drift_since: float | None = None
        self._plan_payload: bytes | None = None
        self.replans: list[str] = []

    @property
    def switch(self) -> EpochSwitch:
        return self.plans.switch

    @property
    def link(self) -> DirectLink | None:
        """The coordinator's direct link (set by the coordinator; the step writes and reads on it)."""
        return self.step.link

    @link.setter
    def link(self, link: DirectLink | None) -> None:
        self.step.link = link

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
        """Each group's peak measured importance (L, G) over the warm-up text, in the plan's neuron
        order: one forward of the model as loaded, each layer's groups read in float32 for its
        step only."""
        ids = torch.tensor([self.decoder.encode(WARMUP_TEXT)])
        every = range(self.layout.n_groups)
        peaks: list[Tensor] = []
        mlps = self.groups.mlps

        def record(layer: int, x: Tensor) -> Tensor:  # x (B, T, H)
            full = self.groups.read(layer, every, self.orders[layer])
            # The max over positions, not the mean: a group can be crucial at a few positions only
            # (LLaMA's massive activations at the first token); placing it on a lossy worker because
            # its average is small wrecks every prefill that loses it.
            peaks.append(pred_mod.group_importance(full, x.reshape(-1, x.shape[-1])).amax(0).float())  # (G,)
            return mlps[layer](x)

        with torch.inference_mode(), split.routed_mlps(self.model, record):
            split.feed(self.model, ids)
        return torch.stack(peaks)  # (L, G)

    # -- network thread ---------------------------------------------------------------------------
    def on_reply(self, topic: str, payload: bytes, retained: bool) -> None:
        """A worker's ``HALO_ACK`` of a plan epoch (CBOR, sealed by the worker: ``mesh.halo.keys``)."""
        try:
            env = self.keys.open(payload, topic, self.config.limits.max_message_bytes, retained)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            return
        if env.kind is wire.Kind.HALO_ACK:
            with self.plans.lock:
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
        try:
            self.keys.check(f)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            return
        self.step.arrived(f.sender, f.step, f.tensor, t, f.compute_s)

    def set_online(self, node: str, online: bool) -> None:
        with self.plans.presence_lock:
            self.plans.presence.status(node, online, time.monotonic())

    def note_heartbeat(self, node: str, body: dict[str, Any]) -> None:
        halo = body.get("halo") if isinstance(body.get("halo"), dict) else {}
        period = halo.get("heartbeat_s")
        self.plans.heard(node, float(period) if isinstance(period, (int, float)) and not isinstance(period, bool)
                         else None)

    # -- planning (planner thread) ----------------------------------------------------------------
    def replan(self, views: Sequence[tuple[str, dict[str, Any], bool]], now: float, idle: bool) -> None:
        """Re-plan if the figures or the importance window drifted (or at first): publish the new
        plan retained; it becomes active once every worker in it acknowledged (``HaloWorker``'s
        loader, ``mesh.halo.worker``, loads it and answers ``HALO_ACK``)."""
        self.fold_samples()
        with self.plans.lock:
            pending = self.switch.pending
            overdue = pending is not None and now - self.switch.pending_since > self.config.replan.pending_timeout_s
            stuck = self.switch.waiting_for() if overdue else frozenset()
        if stuck and pending is not None:
            log.warning("plan epoch %d still unacknowledged by %s after %.0f s: planning without them",
                        pending.epoch, sorted(stuck), self.config.replan.pending_timeout_s)
            self.plans.timed_out(stuck)
        gone = self.plans.gone(name for name, _, _ in views)
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
            local = [self._local(layer, gs) for layer, gs in enumerate(plan.local)]
            with self.plans.lock:
                self.plans.local[epoch] = local
                # Until the switch: a worker that dropped the active plan's groups for a pending plan
                # this one replaces has not got them back.
                self.plans.reloading = self.plans.reloading | reloading_workers(self.switch.active, plan, sized)
                self.switch.propose(plan, now)
            with self._lock:
                self._basis, self._basis_imp, self._planned_at = figs, window, now
            self.replans.append(f"{epoch}: {reason}")
            log.info("plan epoch %d (%s): %s, local %d groups", epoch, reason,
                     {w: sum(map(len, gs)) for w, gs in plan.workers.items()}, sum(map(len, plan.local)))
            env = wire.Envelope(wire.Kind.HALO_PLAN, self.config.name,
                                {"epoch": epoch, "plan": plan.to_dict()}, reply_to=self.reply_topic)
            self._plan_payload = self.keys.seal(env, topics.HALO_PLAN)
            self.republish()
        if idle:
            self.plans.maybe_switch()

    def republish(self) -> None:
        if self._plan_payload is not None:
            try:
                self.bus.publish(topics.HALO_PLAN, self._plan_payload, qos=topics.PLAN.qos, retain=True)
            except MeshError as exc:
                log.warning("plan not published: %s", exc)

    def _local(self, layer: int, groups: Sequence[int]) -> split.GroupWeights | WholeLayer | None:
        """What this coordinator computes of ``layer`` under a plan: nothing, the whole layer (its
        MLP module: no copy of the rows, and the plan of a coordinator with no workers holds every
        layer so), or float32 copies of a share, cut as a worker of its format cuts them."""
        if not groups:
            return None
        if len(set(groups)) == self.layout.n_groups:
            return WHOLE_LAYER
        return self.groups.read(layer, groups, self.orders[layer])

    def snapshot(self) -> dict[str, Any]:
        with self.plans.lock:
            active, pending = self.switch.active, self.switch.pending
        return {"epoch": active.epoch if active else None, "pending": pending.epoch if pending else None,
                "workers": sorted(active.workers) if active else [],
                "groups": {w: sum(map(len, gs)) for w, gs in (active.workers.items() if active else [])},
                "local_groups": sum(map(len, active.local)) if active else 0,
                "reloading": sorted(self.plans.reloading),
                "placement": self.config.placement, "sync": self.config.sync,
                "predictor": self.predictor is not None, "replans": len(self.replans),
                "deadline_ms": round(self.ledger.deadline(self.config.policy) * 1000, 3),
                "straggler_ms": round(self.ledger.straggler_wait(
                    self.config.policy, self.ledger.deadline(self.config.policy)) * 1000, 3),
                "partials": self.ledger.counts()}

    # -- the routed forward (generation thread) ---------------------------------------------------
    @contextmanager
    def run(self, strict: bool, measure: bool = False) -> Iterator[HaloRun]:
        """One ask's forward passes, routed (``mesh.halo.step``); its sampled importance is folded
        into the window afterwards."""
        state: HaloRun | None = None
        try:
            with self.step.run(strict, measure) as state:
                yield state
        finally:
            if state is not None and state.imp_sum is not None and state.imp_n:
                self._fold_window((state.imp_sum / state.imp_n).float())
            if state is not None and state.samples:
                with self._lock:  # bounded: without a planner thread nobody folds them
                    self._samples = [*self._samples[-(SAMPLED_ASKS - 1):], state.samples]

    def _fold_window(self, mean: Tensor) -> None:
        """One ask's mean predicted importance (L, G) into the scheduler's window."""
        with self._lock:
            self.window = torch.maximum((1 - WINDOW_ALPHA) * self.window + WINDOW_ALPHA * mean, self._window_floor)

    def fold_samples(self) -> int:
        """Predict the sampled MLP inputs of finished asks and fold them into the window (planner
        thread: a prediction per layer of every sampled forward would cost the generation thread
        time on the token path, for a figure only the next re-plan reads). Returns how many asks
        it folded."""
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

    def _importance(self, layer: int, x: Tensor) -> Tensor:
        # Per position, then the max: a prefill needs every group that matters at any position.
        return self.predictor.predict(layer, x[0]).amax(0) if self.predictor is not None else self.window[layer]
