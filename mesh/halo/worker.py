"""The HALO worker role of a node: serve neuron-group partials of the coordinator's plan.

Pairs with the coordinator side: the frames served here come from the routed MLP step
(``mesh.halo.step``), the plans loaded here from ``mesh.halo.engine.HaloEngine.replan``.

Threads (all owned here and stopped by :meth:`HaloWorker.stop`):

- the *link* thread owns the worker's own broker connection for the hot path
  (``mesh.mqtt.direct.DirectLink`` over ``mesh.mqtt.lite``): it reads the MLP inputs, serves each
  coordinator's newest one-position frame of a read and writes the partial itself, with no paho
  and no thread hand-off in between. While the link is down the bus carries the frames (below);
  once it is back the bus unsubscribes them;
- paho's network thread runs the handlers: decode, check, enqueue. Over the bus a lone
  one-position (decode) frame is served right there (handing it to the compute thread and the
  answer back would cost two thread wake-ups per layer step); one with more input waiting behind
  it (``MqttBus.input_pending``: after a stalled link every step the coordinator ran meanwhile
  arrives at once) is queued;
- the *compute* thread serves prefill-sized and queued frames, only the newest: a frame older
  than one already received from its coordinator is dropped unanswered (it has moved on);
- the *loader* cuts the groups a new plan assigns to this node, layer by layer, from its
  :class:`mesh.halo.shard.GroupSource` (the node's loaded model, or on a worker-only node the
  weight file itself) while the current plan is still served, subscribes to the coordinator's MLP
  input, then acknowledges the epoch.

Capacity: a worker-only node may hold at most ``capacity`` groups at once (its memory limit's
worth, ``mesh.footprint.plan_worker``), announced in its heartbeat (``halo.capacity_groups``) for
the coordinator's placement. A plan giving it more is refused whole (counted
``halo-plan-over-capacity``, never acknowledged: a part of its groups would make the coordinator's
sums wrong); while a new plan loads, the plans it keeps count too, and those that do not fit beside
the new one are dropped before it loads (the one being served last), so a re-plan never holds more.

Wire: each layer step's MLP input comes once, as a ``mesh.halo.frame`` frame on
``node_mlp(coordinator)``, to every worker of the plan; the partial frame (fp16, float32 if the
input was) goes to the frame's reply topic, only for a layer where this worker holds groups.
``HALO_ACK {epoch}`` (CBOR) goes to the plan's reply topic (the coordinator's).
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
from mesh.auth.keyring import Keyring
from mesh.halo import groups as split
from mesh.halo.keys import HaloKeys
from mesh.mqtt.direct import DirectLink
from mesh.errors import MeshError, ProtocolError, TransportError
from mesh.loops import guarded
from mesh.model import bind_threads
from mesh.halo.placement import Plan
from mesh.halo.probe import SpeedProbe, probe_groups
from mesh.halo.shard import GroupSource, groups_of
from mesh.member import AgentExtension

log = logging.getLogger(__name__)

STALE_WINDOW = 1 << 16  # a frame this many steps behind the coordinator's newest is skipped
MAX_QUEUED_REQUESTS = 64  # frames waiting for the compute thread; it only ever serves the newest
SPEED_PROBE_S = 2.0  # the compute thread re-measures the speed this often (while idle)
SPEED_ALPHA = 0.3  # weight of one probe in the reported speed
LINK_PUMP_S = 0.2  # the link thread lets go of the link this often (subscribing waits for it)


class HaloWorker(AgentExtension):
    roles = ("worker",)

    def __init__(self, group_size: int = split.DEFAULT_GROUP_SIZE, keyring: Keyring | None = None,
                 source: GroupSource | None = None, capacity: int | None = None) -> None:
        """``keyring``: this node's identity (``mesh.halo.keys``); None runs unauthenticated.
        ``source``: where the groups come from (None: the agent's loaded model, at start).
        ``capacity``: the most groups (of every layer and every kept plan together) it may hold;
        None: no bound (a full node, which holds the whole model anyway)."""
        self.group_size = group_size
        self.source = source
        self.capacity = capacity
        self.keys = HaloKeys(keyring)
        self.link: DirectLink | None = None
        self._on_bus: set[str] = set()  # MLP-input topics the bus carries (while the link is down)
        self._batch: list[tuple[bytes, bool]] = []  # read by the link's pump, served after it
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._requests: list[halo_wire.Frame] = []
        self._plans: list[tuple[Plan, str | None, str]] = []  # to load: (plan, ack topic, coordinator)
        self._coordinators: set[str] = set()  # whose MLP-input topic we subscribed to
        self._newest: dict[str, int] = {}  # per coordinator: the step of its last frame seen
        self.skipped = 0  # shared MLP inputs of an epoch or layer we hold no groups of
        self._weights: dict[int, list[split.GroupWeights | None]] = {}  # epoch -> per layer
        self._epoch = -1
        self._serving = -1  # epoch of the newest request served
        self._groups = self.served = self.dropped = 0
        self.speed = 0.0  # neuron-rows per second (EWMA of probes on a fixed workload)
        self._probe: SpeedProbe | None = None
        self._threads: list[threading.Thread] = []
        self.agent: Any = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, agent: Any) -> None:
        self.agent = agent
        self.name = agent.name
        if self.source is None:
            from mesh.model import converted_dir

            self.source = groups_of(agent.loaded, converted_dir(agent.config.home, agent.loaded.key), self.group_size)
        self.model_key = self.source.model_key
        self.layout = self.source.layout
        self.n_layers = self.source.n_layers
        self.speed = self._measure_speed()
        self.link = DirectLink(f"mesh-{self.name}-halo", agent.bus.broker, None, self._on_link_message)
        try:
            self.link.open()
        except TransportError as exc:  # the link thread retries; frames use the bus meanwhile
            log.warning("%s: HALO frames go over the bus until it connects", exc)
        for target, name in ((self._compute_loop, "halo-compute"), (self._load_loop, "halo-load"),
                             (self._link_loop, "halo-link")):
            t = threading.Thread(target=guarded(f"{self.name}-{name}", target, self._stop, agent.rejects),
                                 name=f"{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
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
            halo = {"groups": self._groups, "epoch": self._epoch, "served": self.served,
                    "dropped": self.dropped, "skipped": self.skipped, "group_size": self.group_size,
                    "compute_rows_per_s": round(self.speed, 1), "heartbeat_s": self.agent.timing.heartbeat_s}
            if self.capacity is not None:
                halo["capacity_groups"] = self.capacity
            return {"halo": halo}

    def _measure_speed(self, reps: int = 20) -> float:
        if self._probe is None:
            with torch.inference_mode():
                self._probe = SpeedProbe(self.source.read(0, probe_groups(self.layout)))
        return self._probe.measure(reps)

    # -- handlers (network thread) --------------------------------------------------------------
    def _on_plan(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return  # plan cleared
        try:
            # Retained or not, a plan is idempotent by its epoch: no replay guard (mesh.auth.seal).
            env = self.keys.open(payload, topic, self.agent.limits.max_message_bytes, retained=True)
            if env.kind is not wire.Kind.HALO_PLAN:
                raise ProtocolError("unexpected-kind", env.kind)
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
        mine = sum(len(gs) for gs in plan.groups_for(self.name))
        if self.capacity is not None and mine > self.capacity:
            # Refused whole: holding only part of its groups would make every sum it serves wrong.
            self.agent.rejects.add("halo-plan-over-capacity")
            log.warning("refusing plan epoch %s: it gives this worker %d groups, it can hold %d",
                        plan.epoch, mine, self.capacity)
            return
        reply = env.reply_to if env.reply_to and topics.reply_allowed(env.reply_to) else None
        self.keys.joined(env.sender, plan.epoch, list(plan.workers), self.name)
        with self._wake:
            self._plans.append((plan, reply, env.sender))
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
        try:  # before the frame touches any state (a forged huge step would make real ones look stale)
            self.keys.check(frame)
        except ProtocolError as exc:
            if exc.reason == "not-in-plan":
                with self._lock:
                    self.skipped += 1
            else:
                self.agent.rejects.add(exc.reason)
            return None
        return frame

    def _on_frame(self, topic: str, payload: bytes, retained: bool) -> None:
        """A coordinator's shared MLP input from the bus (network thread)."""
        frame = self._check_frame(payload, retained)
        if frame is None:
            return
        with self._lock:
            # The last one seen, not the largest: a forged frame with a huge step can at most
            # make the compute thread skip what is queued until the next real frame.
            self._newest[frame.sender] = frame.step
        # A frame with more input right behind it may be stale: after a stalled link (a TCP
        # retransmission) the frames of every step the coordinator ran meanwhile arrive at once,
        # and serving each here cost a partial's compute per frame the coordinator only discards,
        # while its current step waited behind them. Those go to the compute thread, which serves
        # only a frame no newer one has overtaken.
        if _one_position(frame) and not self.agent.bus.input_pending():
            bind_threads()  # paho's network thread
            self._serve_now(frame)
        else:
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
            if _one_position(frame):
                newest[frame.sender] = frame
            else:
                newest.pop(frame.sender, None)  # a prefill step after it: stale (counted above)
                self._enqueue(frame)

        def send(topic: str, data: bytes) -> None:
            if not link.publish(topic, data):
                self.agent.bus.publish(topic, data, qos=topics.HALO_REPLY.qos)

        for frame in newest.values():
            self._serve_now(frame, send)

    def _serve_now(self, frame: halo_wire.Frame, send: Callable[[str, bytes], Any] | None = None) -> None:
        """Serve ``frame`` on this thread, if its epoch's weights are loaded."""
        with self._lock:
            weights = self._weights.get(frame.epoch)
            if weights is None:  # a shared input of a plan this worker is not (or no longer) in
                self.skipped += 1
                return
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
            self._load(plan, reply, coordinator)

    def _load(self, plan: Plan, reply: str | None, coordinator: str) -> None:
        """Load ``plan``'s groups (unless loaded), listen to its coordinator, acknowledge it."""
        with self._wake:
            loaded = plan.epoch in self._weights
        if not loaded:
            t0 = time.perf_counter()
            mine = plan.groups_for(self.name)
            self._make_room(sum(len(gs) for gs in mine), plan.epoch)
            with torch.inference_mode():  # one layer at a time (FileGroups maps one layer's worth)
                weights = [self.source.read(layer, gs, plan.neuron_order(layer))
                           if gs else None for layer, gs in enumerate(mine)]
            with self._wake:
                self._weights[plan.epoch] = weights
                # Keep the epoch being served and the two newest (the two newest alone would drop the
                # served one when a plan replaces a still pending one before the switch).
                keep = {self._serving, *sorted(self._weights)[-2:]}
                for e in [e for e in self._weights if e not in keep]:
                    del self._weights[e]
                self._epoch = max(self._epoch, plan.epoch)
                self._groups = sum(len(gs) for gs in mine)
            log.info("HALO worker %s loaded epoch %d: %d groups in %.3f s", self.name, plan.epoch,
                     self._groups, time.perf_counter() - t0)
        self._listen(coordinator)
        self._ack(plan.epoch, reply)

    def held_groups(self) -> int:
        """Groups held now, over every kept epoch."""
        with self._lock:
            return _held(self._weights)

    def _make_room(self, need: int, epoch: int) -> None:
        """Before loading ``need`` groups of ``epoch``: drop kept epochs until they fit beside them
        within the capacity, oldest first and the one being served last (its frames then go
        unanswered until the new plan is active; the coordinator computes those groups itself)."""
        if self.capacity is None:
            return
        with self._wake:
            for e in sorted(self._weights, key=lambda e: (e == self._serving, e)):
                if _held(self._weights) + need <= self.capacity:
                    break
                del self._weights[e]
                log.info("HALO worker %s dropped epoch %d before loading epoch %d (%d groups, capacity %d)",
                         self.name, e, epoch, need, self.capacity)

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
        env = wire.Envelope(wire.Kind.HALO_ACK, self.name, {"epoch": epoch, "groups": self._groups})
        topic = reply or topics.reply("coordinator")
        try:
            self.agent.bus.publish(topic, self.keys.seal(env, topic), qos=1)
        except MeshError as exc:
            log.warning("HALO ack not sent: %s", exc)

    # -- compute --------------------------------------------------------------------------------
    def _compute_loop(self) -> None:
        bind_threads()
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._requests or self._stop.is_set(), 0.5)
                probed_at = self._probe.at if self._probe is not None else 0.0
                probe = not self._requests and time.monotonic() - probed_at >= SPEED_PROBE_S
            if probe and not self._stop.is_set():
                speed = self._measure_speed(reps=5)
                with self._lock:
                    self.speed = (1 - SPEED_ALPHA) * self.speed + SPEED_ALPHA * speed
                continue
            with self._wake:
                if not self._requests:
                    continue
                frame = self._requests.pop()  # the newest
                self.dropped += len(self._requests)
                self._requests.clear()
                if 0 < self._newest.get(frame.sender, frame.step) - frame.step <= STALE_WINDOW:
                    self.dropped += 1  # overtaken by a newer step, served (or queued) already
                    continue
            try:
                self._serve_now(frame)
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
                               compute_s=compute_s, keys=self.keys.partial_keys(req.sender))
        if send is not None:
            send(req.reply_to, out)
        else:
            self.agent.bus.publish(req.reply_to, out, qos=topics.HALO_REPLY.qos)
        with self._lock:
            self.served += 1


def _held(weights: dict[int, list[split.GroupWeights | None]]) -> int:
    """Groups in ``weights`` (epoch -> per layer), over every epoch."""
    return sum(len(w.groups) for ws in weights.values() for w in ws if w is not None)


def _one_position(frame: halo_wire.Frame) -> bool:
    """A decode step's frame (one position), as opposed to a prefill's."""
    x = frame.tensor
    return x.ndim >= 1 and x.numel() == x.shape[-1]
