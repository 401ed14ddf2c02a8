"""The HALO worker role of a node: serve neuron-group partials of the coordinator's plan.

Threads (all owned here and stopped by :meth:`HaloWorker.stop`):

- paho's network thread runs the handlers: decode, check, enqueue; never torch;
- the *loader* slices the groups a new plan assigns to this node out of the node's already
  loaded model (``mesh.split.extract_groups``), while the compute thread keeps serving the
  current plan, then acknowledges the epoch to the coordinator;
- the *compute* thread answers MLP requests one at a time. Only the newest request counts: a
  request whose step is older than one already received is dropped unanswered (the coordinator
  has moved on; answering would only pile work up behind a stalled link).

One exception to "no torch on the network thread", for the hot path: a one-position (decode)
MLP-input frame is served on the network thread itself (``inline``, the default): its partial is
one group slice of one token (~0.4 ms for a third of a SmolLM2 layer), no longer than decoding a
large message, and handing it to the compute thread and the answer back to paho's thread costs
two thread wake-ups per layer step, which on a busy 2-core device are the floor of the round trip
(see the bench's ``cbor_wire`` comparison). Prefill-sized requests still go to the compute thread,
and so does a frame with more input already waiting behind it (``MqttBus.input_pending``): after
a stalled link the frames of every step the coordinator ran meanwhile arrive at once, and the
compute thread serves only one no newer frame of the same coordinator has overtaken.

Wire: the coordinator publishes each layer step's MLP input once, as a ``mesh.halo_wire`` frame
on ``node_mlp(coordinator)``; every worker of its plan subscribes (the loader does, before it
acknowledges its first plan from that coordinator) and answers with a partial frame on the
request's reply topic, only for a layer where it holds groups. The CBOR ``HALO_MLP {epoch, step,
layer, x}`` on ``node_halo(name)`` is still served (answered with a CBOR ``HALO_PARTIAL``). ``y``
is fp16 (the request's dtype if it asked for float32). ``HALO_ACK {epoch}`` goes to the plan's
reply topic (the coordinator's).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from mesh import halo_wire, split, topics, wire
from mesh.errors import MeshError, ProtocolError
from mesh.model import bind_threads
from mesh.scheduler import Plan
from nodes.agent import AgentExtension

log = logging.getLogger(__name__)

MAX_LAYERS = 1024
STALE_WINDOW = 1 << 16  # a frame this many steps behind the coordinator's newest is skipped
MAX_QUEUED_REQUESTS = 64  # requests waiting for the compute thread; it only ever serves the newest
SPEED_PROBE_S = 2.0  # the compute thread re-measures the speed this often (while idle)
SPEED_ALPHA = 0.3  # weight of one probe in the reported speed


class HaloWorker(AgentExtension):
    roles = ("worker",)

    def __init__(self, group_size: int = split.DEFAULT_GROUP_SIZE, inline: bool = True) -> None:
        self.group_size = group_size
        self.inline = inline
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._requests: list[wire.Envelope | halo_wire.Frame] = []
        self._plans: list[tuple[Plan, str | None, str]] = []  # to load: (plan, ack topic, coordinator)
        self._coordinators: set[str] = set()  # whose MLP-input topic we subscribed to
        self._newest: dict[str, int] = {}  # per coordinator: the step of its last frame seen
        self.skipped = 0  # shared MLP inputs of an epoch or layer we hold no groups of
        self._weights: dict[int, list[split.GroupWeights | None]] = {}  # epoch -> per layer
        self._epoch = -1
        self._serving = -1  # epoch of the newest request served
        self._groups = 0
        self.served = 0
        self.dropped = 0
        self.speed = 0.0  # neuron-rows per second (EWMA of probes on a fixed workload)
        self._probe: tuple[split.GroupWeights, torch.Tensor] | None = None
        self._probed_at = 0.0
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
        if self.agent is None:  # the agent's first heartbeat can come before start()
            return {}
        with self._lock:
            return {"halo": {"groups": self._groups, "epoch": self._epoch, "served": self.served,
                             "dropped": self.dropped, "skipped": self.skipped,
                             "compute_rows_per_s": round(self.speed, 1),
                             "group_size": self.group_size,
                             "heartbeat_s": self.agent.timing.heartbeat_s}}

    def _measure_speed(self, reps: int = 20) -> float:
        """Neuron-rows per second of a one-token partial over a quarter of a layer.

        Always this fixed workload, never the live requests: a one-token partial's time is mostly
        per-operation overhead, so rows per second measured on the worker's own share grew with
        the share. The scheduler sizes shares by this speed, and the feedback (a small share
        measures slow, gets smaller) swung a worker between 21 and 668 of 720 groups every re-plan
        (8 s) under CPU contention. The probe still sees contention, which is what it is for.
        """
        if self._probe is None:
            groups = list(range(max(1, self.layout.n_groups // 4)))
            self._probe = (split.extract_groups(self.model, 0, groups, self.layout),
                           torch.randn(1, 1, self.model.config.hidden_size))
        w, x = self._probe
        best = float("inf")
        with torch.inference_mode():
            for _ in range(reps):
                t0 = time.perf_counter()
                w.partial(x)
                best = min(best, time.perf_counter() - t0)
        self._probed_at = time.monotonic()
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
                or plan.n_layers != self.n_layers
                or (plan.order and len(plan.order[0]) != 4 * self.layout.intermediate_size)):
            self.agent.rejects.add("halo-plan-mismatch")
            log.info("ignoring plan epoch %s for %s/%s", plan.epoch, plan.model_key, plan.group_size)
            return
        reply = env.reply_to if env.reply_to and topics.reply_allowed(env.reply_to) else None
        with self._wake:
            self._plans.append((plan, reply, env.sender))
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

    def _on_frame(self, topic: str, payload: bytes, retained: bool) -> None:
        """A coordinator's shared MLP input (network thread): check and enqueue."""
        try:
            frame = halo_wire.decode(payload, self.agent.limits.max_message_bytes)
        except ProtocolError as exc:
            self.agent.rejects.add(exc.reason)
            return
        if frame.kind != halo_wire.MLP or not 0 <= frame.layer < self.n_layers or retained:
            self.agent.rejects.add("bad-halo-request")
            return
        x = frame.tensor
        # A frame with more input right behind it may be stale: after a stalled link (a TCP
        # retransmission) the frames of every step the coordinator ran meanwhile arrive at once,
        # and serving each inline cost ~0.3 ms of compute per frame for partials the coordinator
        # only discards, while its current step waited behind them. Those go to the compute
        # thread, which serves only a frame no newer one has overtaken.
        inline = (self.inline and x.ndim >= 1 and x.numel() == x.shape[-1]  # one position: serve it here
                  and not self.agent.bus.input_pending())
        with self._lock:
            # The last one seen, not the largest: a forged frame with a huge step can at most
            # make the compute thread skip what is queued until the next real frame.
            self._newest[frame.sender] = frame.step
            if inline:
                weights = self._weights.get(frame.epoch)
                if weights is None:
                    self.skipped += 1
                    return
                self._serving = frame.epoch
        if inline:
            bind_threads()  # paho's network thread
            try:
                self._serve_frame(frame, weights)
            except ProtocolError as exc:
                self.agent.rejects.add(exc.reason)
            return
        with self._wake:
            if len(self._requests) >= MAX_QUEUED_REQUESTS:
                self._requests.pop(0)
                self.dropped += 1
            self._requests.append(frame)
            self._wake.notify_all()

    # -- loader ---------------------------------------------------------------------------------
    def _load_loop(self) -> None:
        bind_threads()
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._plans or self._stop.is_set(), 0.5)
                if not self._plans:
                    continue
                plan, reply, coordinator = self._plans[-1]  # only the newest plan matters
                self._plans.clear()
                if plan.epoch in self._weights:
                    loaded = True
                else:
                    loaded = False
            if not loaded:
                t0 = time.perf_counter()
                mine = plan.groups_for(self.name)
                with torch.inference_mode():
                    weights = [split.extract_groups(self.model, layer, gs, self.layout, plan.neuron_order(layer))
                               if gs else None for layer, gs in enumerate(mine)]
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
            self._listen(coordinator)
            self._ack(plan.epoch, reply)

    def _listen(self, coordinator: str) -> None:
        """Subscribe to ``coordinator``'s shared MLP input (loader thread: subscribing waits for
        the SUBACK, which the network thread delivers), before acknowledging its plan."""
        if coordinator in self._coordinators:
            return
        try:
            self.agent.bus.subscribe(topics.node_mlp(coordinator), self._on_frame, qos=topics.NODE_MLP.qos)
            self._coordinators.add(coordinator)
        except (MeshError, ValueError) as exc:
            log.warning("cannot subscribe to %s's MLP input: %s", coordinator, exc)

    def _ack(self, epoch: int, reply: str | None) -> None:
        target = reply or topics.reply("coordinator")
        env = wire.Envelope(wire.Kind.HALO_ACK, self.name, {"epoch": epoch, "groups": self._groups})
        try:
            self.agent.bus.publish(target, wire.encode(env), qos=1)
        except MeshError as exc:
            log.warning("HALO ack not sent: %s", exc)

    # -- compute --------------------------------------------------------------------------------
    def _compute_loop(self) -> None:
        bind_threads()
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._requests or self._stop.is_set(), 0.5)
                probe = not self._requests and time.monotonic() - self._probed_at >= SPEED_PROBE_S
            if probe and not self._stop.is_set():
                speed = self._measure_speed(reps=5)
                with self._lock:
                    self.speed = (1 - SPEED_ALPHA) * self.speed + SPEED_ALPHA * speed
                continue
            with self._wake:
                if not self._requests:
                    continue
                env = self._requests.pop()  # the newest
                self.dropped += len(self._requests)
                self._requests.clear()
                frame = isinstance(env, halo_wire.Frame)
                if frame and 0 < self._newest.get(env.sender, env.step) - env.step <= STALE_WINDOW:
                    self.dropped += 1  # overtaken by a newer step, served (or queued) already
                    continue
                epoch = env.epoch if frame else env.body["epoch"]
                weights = self._weights.get(epoch)
                if weights is not None:
                    self._serving = epoch
                elif frame:  # a shared input of a plan this worker is not (or no longer) in
                    self.skipped += 1
                    continue
            if weights is None:
                self.agent.rejects.add("halo-unknown-epoch")
                continue
            try:
                if frame:
                    self._serve_frame(env, weights)
                else:
                    self._serve(env, weights)
            except ProtocolError as exc:
                self.agent.rejects.add(exc.reason)
            except Exception:
                log.exception("HALO partial failed")

    def _serve_frame(self, req: halo_wire.Frame, weights: list[split.GroupWeights | None]) -> None:
        w = weights[req.layer]
        if w is None:  # no groups of this layer: nobody waits for an answer
            self.skipped += 1
            return
        x = req.tensor
        if x.shape[-1] != w.gate.shape[1] or not topics.reply_allowed(req.reply_to):
            self.agent.rejects.add("bad-halo-request")
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = w.partial(x.to(w.gate.dtype))  # (..., H)
        compute_s = time.perf_counter() - t0
        out = halo_wire.encode(halo_wire.PARTIAL, self.name, req.epoch, req.step, req.layer,
                               y.to(torch.float32 if x.dtype == torch.float32 else torch.float16),
                               compute_s=compute_s)
        self.agent.bus.publish(req.reply_to, out, qos=topics.HALO_REPLY.qos)
        self._count()

    def _count(self) -> None:
        with self._lock:
            self.served += 1

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
        self._count()

