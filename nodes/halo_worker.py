"""The HALO worker role of a node: serve neuron-group partials of the coordinator's plan.

Threads (all owned here and stopped by :meth:`HaloWorker.stop`):

- paho's network thread runs the handlers: decode, check, enqueue; never torch;
- the *loader* slices the groups a new plan assigns to this node out of the node's already
  loaded model (``mesh.split.extract_groups``), while the compute thread keeps serving the
  current plan, then acknowledges the epoch to the coordinator;
- the *compute* thread answers MLP requests one at a time. Only the newest request counts: a
  request whose step is older than one already received is dropped unanswered (the coordinator
  has moved on; answering would only pile work up behind a stalled link).

Wire: ``HALO_MLP {epoch, step, layer, x}`` on ``node_halo(name)``; the answer is
``HALO_PARTIAL {epoch, step, layer, y, compute_s}`` on the request's reply topic, ``y`` in fp16
(the request's dtype if it asked for float32). ``HALO_ACK {epoch}`` goes to the plan's reply
topic (the coordinator's).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from mesh import split, topics, wire
from mesh.errors import MeshError, ProtocolError
from mesh.scheduler import Plan
from nodes.agent import AgentExtension

log = logging.getLogger(__name__)

MAX_LAYERS = 1024
MAX_QUEUED_REQUESTS = 64  # requests waiting for the compute thread; it only ever serves the newest


class HaloWorker(AgentExtension):
    roles = ("worker",)

    def __init__(self, group_size: int = split.DEFAULT_GROUP_SIZE) -> None:
        self.group_size = group_size
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._requests: list[wire.Envelope] = []
        self._plans: list[tuple[Plan, str | None]] = []  # to load: (plan, ack topic)
        self._weights: dict[int, list[split.GroupWeights | None]] = {}  # epoch -> per layer
        self._epoch = -1
        self._serving = -1  # epoch of the newest request served
        self._groups = 0
        self.served = 0
        self.dropped = 0
        self.speed = 0.0  # neuron-rows per second (EWMA)
        self._threads: list[threading.Thread] = []
        self.agent: Any = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, agent: Any) -> None:
        self.agent = agent
        self.name = agent.name
        self.model = agent.loaded.model
        self.model_key = agent.loaded.model_key
        self.layout = split.model_layout(self.model.config, self.group_size)
        self.n_layers = len(split.decoder_layers(self.model))
        self.speed = self._measure_speed()
        for target, name in ((self._compute_loop, "halo-compute"), (self._load_loop, "halo-load")):
            t = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        agent.bus.subscribe(topics.node_halo(self.name), self._on_request, qos=topics.NODE_HALO.qos)
        agent.bus.subscribe(topics.HALO_PLAN, self._on_plan, qos=topics.PLAN.qos)
        log.info("HALO worker %s ready: %d groups of %d per layer, %.0f rows/s", self.name,
                 self.layout.n_groups, self.group_size, self.speed)

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(5)

    def heartbeat_fields(self) -> dict[str, Any]:
        with self._lock:
            return {"halo": {"groups": self._groups, "epoch": self._epoch, "served": self.served,
                             "dropped": self.dropped, "compute_rows_per_s": round(self.speed, 1),
                             "group_size": self.group_size,
                             "heartbeat_s": self.agent.timing.heartbeat_s}}

    def _measure_speed(self) -> float:
        """Neuron-rows per second of a one-token partial over a quarter of a layer."""
        groups = list(range(max(1, self.layout.n_groups // 4)))
        w = split.extract_groups(self.model, 0, groups, self.layout)
        x = torch.randn(1, 1, self.model.config.hidden_size)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(20):
                t0 = time.perf_counter()
                w.partial(x)
                best = min(best, time.perf_counter() - t0)
        return w.n_neurons / max(best, 1e-7)

    # -- handlers (network thread) --------------------------------------------------------------
    def _decode(self, payload: bytes, kind: wire.Kind) -> wire.Envelope | None:
        try:
            env = wire.decode(payload, self.agent.limits.max_message_bytes)
        except ProtocolError as exc:
            self.agent.rejects.add(exc.reason)
            return None
        if env.kind is not kind:
            self.agent.rejects.add("unexpected-kind")
            return None
        return env

    def _on_plan(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return  # plan cleared
        env = self._decode(payload, wire.Kind.HALO_PLAN)
        if env is None:
            return
        try:
            plan = Plan.from_dict(env.body["plan"])
        except ProtocolError as exc:
            self.agent.rejects.add(exc.reason)
            return
        if (plan.epoch != env.body["epoch"] or plan.model_key != self.model_key
                or plan.group_size != self.group_size or plan.n_groups != self.layout.n_groups
                or plan.n_layers != self.n_layers):
            self.agent.rejects.add("halo-plan-mismatch")
            log.info("ignoring plan epoch %s for %s/%s", plan.epoch, plan.model_key, plan.group_size)
            return
        reply = env.reply_to if env.reply_to and topics.reply_allowed(env.reply_to) else None
        with self._wake:
            self._plans.append((plan, reply))
            self._wake.notify_all()

    def _on_request(self, topic: str, payload: bytes, retained: bool) -> None:
        env = self._decode(payload, wire.Kind.HALO_MLP)
        if env is None:
            return
        b = env.body
        if (env.reply_to is None or not topics.reply_allowed(env.reply_to)
                or not 0 <= b["layer"] < self.n_layers or b["step"] < 0):
            self.agent.rejects.add("bad-halo-request")
            return
        with self._wake:
            # No memory of steps across requests: a forged request with a huge step must not make
            # the worker drop the real ones that follow. Overtaken requests are skipped where it
            # is safe, in the compute loop (it serves the newest queued one and drops the rest).
            if len(self._requests) >= MAX_QUEUED_REQUESTS:
                self._requests.pop(0)
                self.dropped += 1
            self._requests.append(env)
            self._wake.notify_all()

    # -- loader ---------------------------------------------------------------------------------
    def _load_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._plans or self._stop.is_set(), 0.5)
                if not self._plans:
                    continue
                plan, reply = self._plans[-1]  # only the newest plan matters
                self._plans.clear()
                if plan.epoch in self._weights:
                    loaded = True
                else:
                    loaded = False
            if not loaded:
                t0 = time.perf_counter()
                mine = plan.groups_for(self.name)
                with torch.inference_mode():
                    weights = [split.extract_groups(self.model, layer, gs, self.layout) if gs else None
                               for layer, gs in enumerate(mine)]
                with self._wake:
                    self._weights[plan.epoch] = weights
                    # Keep the epoch being served and the newest one (switched to once every
                    # worker acknowledged it). The two newest are not enough: a plan that replaces
                    # a pending one before the switch would drop the epoch still being served.
                    keep = {self._serving, *sorted(self._weights)[-2:]}
                    for e in [e for e in self._weights if e not in keep]:
                        del self._weights[e]
                    self._epoch = max(self._epoch, plan.epoch)
                    self._groups = sum(len(gs) for gs in mine)
                log.info("HALO worker %s loaded epoch %d: %d groups in %.3f s", self.name, plan.epoch,
                         self._groups, time.perf_counter() - t0)
            self._ack(plan.epoch, reply)

    def _ack(self, epoch: int, reply: str | None) -> None:
        target = reply or topics.reply("coordinator")
        env = wire.Envelope(wire.Kind.HALO_ACK, self.name, {"epoch": epoch, "groups": self._groups})
        try:
            self.agent.bus.publish(target, wire.encode(env), qos=1)
        except MeshError as exc:
            log.warning("HALO ack not sent: %s", exc)

    # -- compute --------------------------------------------------------------------------------
    def _compute_loop(self) -> None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._requests or self._stop.is_set(), 0.5)
                if not self._requests:
                    continue
                env = self._requests.pop()  # the newest
                self.dropped += len(self._requests)
                self._requests.clear()
                weights = self._weights.get(env.body["epoch"])
                if weights is not None:
                    self._serving = env.body["epoch"]
            if weights is None:
                self.agent.rejects.add("halo-unknown-epoch")
                continue
            try:
                self._serve(env, weights)
            except ProtocolError as exc:
                self.agent.rejects.add(exc.reason)
            except Exception:
                log.exception("HALO partial failed")

    def _serve(self, env: wire.Envelope, weights: list[split.GroupWeights | None]) -> None:
        b = env.body
        w = weights[b["layer"]]
        x = wire.unpack_tensor(b["x"])
        if w is None or x.ndim < 1 or x.shape[-1] != w.gate.shape[1]:
            self.agent.rejects.add("bad-halo-request")
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = w.partial(x.to(w.gate.dtype))  # (..., H)
        compute_s = time.perf_counter() - t0
        out_dtype = torch.float32 if x.dtype == torch.float32 else torch.float16
        body = {"epoch": b["epoch"], "step": b["step"], "layer": b["layer"],
                "y": wire.pack_tensor(y.to(out_dtype)), "compute_s": round(compute_s, 6)}
        reply = wire.Envelope(wire.Kind.HALO_PARTIAL, self.name, body, corr=env.corr)
        self.agent.bus.publish(env.reply_to, wire.encode(reply, self.agent.limits.max_message_bytes),
                               qos=topics.NODE_HALO.qos)
        rows = w.n_neurons * max(1, x.numel() // x.shape[-1])
        with self._lock:
            self.served += 1
            if compute_s > 0 and rows == w.n_neurons:  # one-token requests measure decode speed
                self.speed = 0.9 * self.speed + 0.1 * rows / compute_s if self.speed else rows / compute_s

