"""The HALO worker role of a node: serve neuron-group partials of the coordinator's plan.

Threads (all owned here and stopped by :meth:`HaloWorker.stop`):

- paho's network thread runs the handlers: decode, check, enqueue; never torch;
- the *loader* slices the groups a new plan assigns to this node out of the node's already
  loaded model (``mesh.halo.groups.extract_groups``), while the compute thread keeps serving the
  current plan, then acknowledges the epoch to the coordinator;
- the *compute* thread answers MLP requests one at a time. Only the newest request counts: a
  request whose step is older than one already received is dropped unanswered (the coordinator
  has moved on; answering would only pile work up behind a stalled link).

- the *link* thread (``--halo-serve link``, the default) owns the worker's own broker connection
  for the hot path (``mesh.mqtt.direct.DirectLink`` over ``mesh.mqtt.lite``): it reads the MLP inputs,
  serves each coordinator's newest one-position frame of a read and writes the partial itself,
  with no paho and no thread hand-off in between (the worker's CPU per layer step 653-680 ->
  590-603 us, round trip p50 616-664 -> 536-551 us: ``results/2026-12-06/worker_step_cost.py``).
  While the link is down the bus carries the frames (served as below); once it is back the bus
  unsubscribes them.

Without the link, one exception to "no torch on the network thread", for the hot path: a
one-position (decode) MLP-input frame is served on the network thread itself (``inline``): its partial is
one group slice of one token (~0.4 ms for a third of a SmolLM2 layer), no longer than decoding a
large message, and handing it to the compute thread and the answer back to paho's thread costs
two thread wake-ups per layer step, which on a busy 2-core device are the floor of the round trip
(see the bench's ``cbor_wire`` comparison). Prefill-sized requests still go to the compute thread,
and so does a frame with more input already waiting behind it (``MqttBus.input_pending``): after
a stalled link the frames of every step the coordinator ran meanwhile arrive at once, and the
compute thread serves only one no newer frame of the same coordinator has overtaken.

Wire: the coordinator publishes each layer step's MLP input once, as a ``mesh.halo.frame`` frame
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
from collections.abc import Callable
from typing import Any

import torch

from mesh import topics, wire
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.mqtt.direct import DirectLink
from mesh.errors import MeshError, ProtocolError, TransportError
from mesh.model import bind_threads
from mesh.halo.placement import Plan
from mesh.member import AgentExtension

log = logging.getLogger(__name__)

MAX_LAYERS = 1024
STALE_WINDOW = 1 << 16  # a frame this many steps behind the coordinator's newest is skipped
MAX_QUEUED_REQUESTS = 64  # requests waiting for the compute thread; it only ever serves the newest
SPEED_PROBE_S = 2.0  # the compute thread re-measures the speed this often (while idle)
SPEED_ALPHA = 0.3  # weight of one probe in the reported speed
LINK_PUMP_S = 0.2  # the link thread lets go of the link this often (subscribing waits for it)


class HaloWorker(AgentExtension):
    roles = ("worker",)

    def __init__(self, group_size: int = split.DEFAULT_GROUP_SIZE, inline: bool = True, link: bool = True) -> None:
        self.group_size = group_size
        self.inline = inline
        self.use_link = link
        self.link: DirectLink | None = None
        self._on_bus: set[str] = set()  # MLP-input topics the bus carries (no link, or it broke)
        self._batch: list[tuple[bytes, bool]] = []  # read by the link's pump, served after it
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
        if self.use_link:
            self.link = DirectLink(f"mesh-{self.name}-halo", agent.bus.broker, None, self._on_link_message)
            try:
                self.link.open()
            except TransportError as exc:  # the link thread retries; frames use the bus meanwhile
                log.warning("%s: HALO frames go over the bus until it connects", exc)
            t = threading.Thread(target=self._link_loop, name=f"{self.name}-halo-link", daemon=True)
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
        if self.link is not None:
            self.link.close()

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

    def _check_frame(self, payload: bytes, retained: bool) -> halo_wire.Frame | None:
        try:
            frame = halo_wire.decode(payload, self.agent.limits.max_message_bytes)
        except ProtocolError as exc:
            self.agent.rejects.add(exc.reason)
            return None
        if frame.kind != halo_wire.MLP or not 0 <= frame.layer < self.n_layers or retained:
            self.agent.rejects.add("bad-halo-request")
            return None
        return frame

    def _on_frame(self, topic: str, payload: bytes, retained: bool) -> None:
        """A coordinator's shared MLP input from the bus (network thread)."""
        frame = self._check_frame(payload, retained)
        if frame is None:
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
        self._enqueue(frame)

    def _enqueue(self, frame: halo_wire.Frame) -> None:
        with self._wake:
            if len(self._requests) >= MAX_QUEUED_REQUESTS:
                self._requests.pop(0)
                self.dropped += 1
            self._requests.append(frame)
            self._wake.notify_all()

    # -- the worker's own link --------------------------------------------------------------------
    def _on_link_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self._batch.append((payload, retained))  # link thread, inside pump: served after the read

    def _serve_batch(self, link: DirectLink) -> None:
        """Serve what one read of the link brought (link thread, holding the link): of a
        coordinator's one-position frames only the newest (a burst after a stalled link holds
        steps it has already moved past); prefill-sized ones go to the compute thread."""
        batch, self._batch = self._batch, []
        newest: dict[str, halo_wire.Frame] = {}
        for payload, retained in batch:
            frame = self._check_frame(payload, retained)
            if frame is None:
                continue
            with self._lock:
                self._newest[frame.sender] = frame.step
                if frame.sender in newest:
                    self.dropped += 1  # overtaken within the same read
            x = frame.tensor
            if x.ndim >= 1 and x.numel() == x.shape[-1]:
                newest[frame.sender] = frame
            else:
                newest.pop(frame.sender, None)  # a prefill step after it: stale (counted above)
                self._enqueue(frame)

        def send(topic: str, data: bytes) -> None:
            if not link.publish(topic, data):
                self.agent.bus.publish(topic, data, qos=topics.HALO_REPLY.qos)

        for frame in newest.values():
            with self._lock:
                weights = self._weights.get(frame.epoch)
                if weights is None:
                    self.skipped += 1
                    continue
                self._serving = frame.epoch
            try:
                self._serve_frame(frame, weights, send)
            except ProtocolError as exc:
                self.agent.rejects.add(exc.reason)

    def _link_loop(self) -> None:
        """Read, serve and answer the MLP inputs on the worker's own connection: no paho thread
        and no hand-off between read and answer (``mesh.mqtt.direct.DirectLink``). While the link is
        broken the bus carries the frames; once it is back the bus lets them go again."""
        bind_threads()
        link = self.link
        assert link is not None
        while not self._stop.is_set():
            if link.usable:
                if self._on_bus:
                    for topic in list(self._on_bus):
                        self.agent.bus.unsubscribe(topic)
                    self._on_bus.clear()
                with link.lock:
                    ok = link.pump(LINK_PUMP_S)
                    try:
                        self._serve_batch(link)
                    except Exception:
                        log.exception("HALO partial failed")
                if ok:
                    continue
            for topic in list(link.topics):
                if topic not in self._on_bus:
                    self._bus_listen(topic)
            link.service()
            if not link.usable:
                self._stop.wait(LINK_PUMP_S)

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
        the SUBACK), before acknowledging its plan: on the worker's own link when it is up, else
        on the bus."""
        if coordinator in self._coordinators:
            return
        topic = topics.node_mlp(coordinator)
        self._coordinators.add(coordinator)
        if self.link is not None and self.link.lock.acquire(timeout=5.0):
            try:
                if self.link.add_topic(topic):
                    return
            finally:
                self.link.lock.release()
        if not self._bus_listen(topic):
            self._coordinators.discard(coordinator)

    def _bus_listen(self, topic: str) -> bool:
        try:
            self.agent.bus.subscribe(topic, self._on_frame, qos=topics.NODE_MLP.qos)
        except (MeshError, ValueError) as exc:
            log.warning("cannot subscribe to %s: %s", topic, exc)
            return False
        self._on_bus.add(topic)
        return True

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

    def _serve_frame(self, req: halo_wire.Frame, weights: list[split.GroupWeights | None],
                     send: Callable[[str, bytes], Any] | None = None) -> None:
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
        if send is not None:
            send(req.reply_to, out)
        else:
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

