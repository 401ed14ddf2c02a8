"""`mesh coordinator`: the HALO coordinator process.

It keeps embeddings, attention, norms, the LM head and the KV cache (so the node's prompt cache,
``mesh.cache.node_cache.NodeCache``, works unchanged), and routes every MLP layer through
``mesh.halo.groups.routed_mlps`` to the workers of the active plan plus its own local groups
(:class:`mesh.halo.engine.HaloEngine`). It answers asks like a node: status/heartbeat under its name, asks on
``node_ask(name)``, streamed TOKENs and an ANSWER with figures (per-token timing, partials late or
zeroed). Being the smallest online name it may be the mesh's router: it then forwards routed
asks to the least-loaded answering node.

Threads (stopped by :meth:`Coordinator.stop`): paho's network thread (decode and enqueue only),
the generation thread (all torch work, one ask at a time), the planner thread (heartbeat, figures,
re-plans with hysteresis, epoch switch while idle).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mesh import topics, wire
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.direct import DirectLink
from mesh.config import BrokerAddress, CacheConfig, Limits
from mesh.errors import MeshError, ProtocolError, TransportError
from mesh.halo.ledger import Liveness
from mesh.halo.lean import lean_step
from mesh.model import Decoder, bind_threads, load_model, two_thread_head
from mesh.routing import PeerTable, choose_node, router_of
from mesh.halo.placement import ReplanPolicy, SyncPolicy
from mesh.cache.node_cache import NodeCache
from mesh.halo.engine import HaloEngine

log = logging.getLogger(__name__)

NAME = "coordinator"


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator needs; built once from CLI flags (``nodes.halo_cli``)."""

    broker: BrokerAddress = field(default_factory=BrokerAddress)
    name: str = NAME
    model: str = "smollm2-135m"
    home: Path = Path.home() / ".cache" / "mesh"
    threads: int = 0
    group_size: int = 64
    sync: str = "relaxed"  # default sync of asks that do not name one: strict | relaxed
    policy: SyncPolicy = field(default_factory=SyncPolicy)
    replan: ReplanPolicy = field(default_factory=ReplanPolicy)
    placement: str = "importance"  # importance | random (the ablation)
    reliability_weight: float = 2.0  # shares ~ speed * reliability^weight (0: by speed only)
    fallback: str = "important"  # relaxed: late important groups computed here ("none": zero)
    local_speed: float = 0.0  # neuron-rows/s the coordinator computes itself (0: none)
    wire_dtype: str = "float16"
    direct_link: bool = True  # HALO frames over a second connection driven by the generation thread
    head_threads: int = 2  # the LM head of a decode step on two threads (mesh.model.TwoThreadHead); 1: plain
    lean_decode: bool = True  # decode steps through mesh.halo.lean (one-thread LLaMA coordinators); False: HF forward
    strict_timeout_s: float = 10.0  # then strict computes the missing groups itself (stays exact)
    liveness: Liveness = field(default_factory=Liveness)  # when a silent worker counts as gone
    heartbeat_s: float = 2.0
    predictor: Path | None = None  # default: the trained one next to the model, if any
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: Limits = field(default_factory=Limits)


@dataclass
class _Job:
    env: wire.Envelope
    received: float


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.name = config.name
        self.rejects = wire.RejectCounter()
        self.reply_topic = topics.reply(self.name)
        self.bus = MqttBus(f"mesh-{self.name}", config.broker,
                           will=(topics.node_status(self.name), topics.OFFLINE, topics.STATUS.qos, True))
        self.peers = PeerTable()
        self._peers_lock = threading.Lock()
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=config.limits.max_queue)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy = False
        self._seq = 0
        self.served = 0
        self._pending_routes: dict[str, int] = {}
        self._last_assigned: dict[str, int] = {}
        self._assign_seq = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        self.loaded = load_model(cfg.home, cfg.model, cfg.threads)
        self.decoder = Decoder(self.loaded)
        # Only for a one-thread coordinator: then each half is bitwise the plain head's product
        # (a multi-threaded head already uses the cores, and may sum in another order).
        one = torch.get_num_threads() == 1
        self.head = two_thread_head(self.loaded.model) if cfg.head_threads >= 2 and one else None
        self.cache = NodeCache(self.loaded, cfg.cache, self.decoder) if cfg.cache.enabled else None
        self.engine = HaloEngine(self.loaded, self.decoder, cfg, self.bus, self.reply_topic, self.rejects)
        # After the engine permuted the MLPs to the predictor's neuron order (the step calls each
        # layer's MLP module as it is, routed while an ask runs).
        self.decoder.step = lean_step(self.loaded.model) if cfg.lean_decode and one else None
        log.info("decode steps: %s", "mesh.halo.lean" if self.decoder.step is not None else "the HF forward")
        self.bus.subscribe(topics.ALL_STATUS, self._on_status, qos=1)
        self.bus.subscribe(topics.ALL_HEARTBEATS, self._on_heartbeat, qos=0)
        self.bus.subscribe(self.reply_topic, self.engine.on_reply, qos=topics.REPLY.qos)
        self.bus.subscribe(topics.halo_reply(self.name), self.engine.on_frame, qos=topics.HALO_REPLY.qos)
        self.bus.on_connected(self._announce)
        self.bus.start()
        if cfg.direct_link:
            link = DirectLink(f"mesh-{self.name}-link", cfg.broker, topics.halo_link(self.name),
                              self.engine.on_frame)
            try:
                link.open()
            except TransportError as exc:  # the planner retries; asks use the bus meanwhile
                log.warning("%s: HALO frames go over the bus until it connects", exc)
            self.engine.link = link
        self.bus.publish_wait(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)
        self.bus.subscribe(topics.node_ask(self.name), self._on_ask, qos=1)
        self.bus.subscribe(topics.ROUTE, self._on_route, qos=1)
        self.bus.subscribe(topics.ASK, self._on_json_ask, qos=1)
        self.bus.subscribe(topics.ASK_TEXT, self._on_json_ask, qos=1)
        for target, name in ((self._work_loop, "generate"), (self._plan_loop, "planner")):
            t = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("coordinator %s online with %s, sync %s", self.name, self.loaded.model_key, cfg.sync)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        try:
            self.bus.publish_wait(topics.node_status(self.name), topics.OFFLINE, qos=1, retain=True, timeout=3.0)
            self.bus.publish_wait(topics.HALO_PLAN, b"", qos=1, retain=True, timeout=3.0)
        except MeshError as exc:
            log.warning("could not publish offline status: %s", exc)
        for t in self._threads:
            t.join(timeout)
        if self.engine.link is not None:
            self.engine.link.close()
        self.bus.stop()

    def _announce(self) -> None:
        if not self._stop.is_set():
            self.bus.publish(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)
            self.engine.republish()

    # -- handlers (network thread) ----------------------------------------------------------------
    def _decode(self, payload: bytes, kind: wire.Kind) -> wire.Envelope | None:
        try:
            env = wire.decode(payload, self.config.limits.max_message_bytes)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            return None
        if env.kind is not kind:
            self.rejects.add("unexpected-kind")
            return None
        return env

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None:
            self.rejects.add("bad-topic")
            return
        if parsed[0] == self.name:
            return
        if payload not in (b"", topics.ONLINE, topics.OFFLINE):
            self.rejects.add("bad-status")  # garbage must not mark a worker gone
            return
        with self._peers_lock:
            if payload == b"":  # cleared by a decommission
                self.peers.forget(parsed[0])
            else:
                self.peers.set_status(parsed[0], payload == topics.ONLINE)
        self.engine.set_online(parsed[0], payload == topics.ONLINE)

    def _on_heartbeat(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None:
            self.rejects.add("bad-topic")
            return
        if parsed[0] == self.name or not payload:
            return
        env = self._decode(payload, wire.Kind.HEARTBEAT)
        if env is not None:
            with self._peers_lock:
                if self.peers.set_heartbeat(parsed[0], env.body, time.monotonic()):
                    self._pending_routes.pop(parsed[0], None)
            if not retained:
                self.engine.note_heartbeat(parsed[0], env.body)

    def _on_ask(self, topic: str, payload: bytes, retained: bool) -> None:
        env = self._decode(payload, wire.Kind.ASK)
        if env is None or not self._valid_ask(env):
            return
        try:
            self._jobs.put_nowait(_Job(env, time.monotonic()))
        except queue.Full:
            self.rejects.add("busy")
            self._reply(env, wire.Kind.ERROR, {"reason": "busy", "message": f"{self.name} is busy"})

    def _valid_ask(self, env: wire.Envelope) -> bool:
        """Count and answer (where a reply topic is usable) an ask that cannot be answered."""
        limits = self.config.limits
        reason = ("bad-reply-topic" if env.reply_to is None or not topics.reply_allowed(env.reply_to)
                  else wire.ask_problem(env, limits.max_prompt_chars, limits.max_new_tokens))
        if reason is None:
            return True
        self.rejects.add(reason)
        self._reply(env, wire.Kind.ERROR, {"reason": reason, "message": f"ask rejected: {reason}"})
        return False

    def _is_router(self) -> bool:
        with self._peers_lock:
            return router_of([self.name, *(v.name for v in self.peers.online())]) == self.name

    def _on_route(self, topic: str, payload: bytes, retained: bool) -> None:
        """Router duty (the smallest online name routes, and "coordinator" usually is the smallest):
        forward to the least-loaded answering node, as ``nodes.agent`` routers do."""
        if not self._is_router():
            return
        env = self._decode(payload, wire.Kind.ASK)
        if env is not None and self._valid_ask(env):
            self._route(env)

    def _on_json_ask(self, topic: str, payload: bytes, retained: bool) -> None:
        """``mesh/v1/ask`` (JSON) and ``mesh/v1/ask/text`` (plain text), routed like the agent does."""
        if retained or not self._is_router():
            return
        limits = self.config.limits
        try:
            if topic == topics.ASK_TEXT:
                text = payload.decode("utf-8").strip()
                payload = json.dumps({"text": text}).encode()
            ask = wire.decode_json_ask(payload, limits.max_json_ask_bytes, 64, limits.max_new_tokens)
        except UnicodeDecodeError:
            self.rejects.add("bad-text-ask")
            return
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            return
        reply_to = ask.reply_to or topics.ANSWER
        if not topics.reply_allowed(reply_to):
            self.rejects.add("bad-reply-topic")
            return
        body: dict[str, Any] = {"text": ask.text, "max_new_tokens": ask.max_new_tokens, "reply_format": "json"}
        if ask.ask_id:
            body["ask_id"] = ask.ask_id
        self._route(wire.Envelope(wire.Kind.ASK, "json-client", body, corr=ask.ask_id or uuid.uuid4().hex,
                                  reply_to=reply_to))

    def _route(self, env: wire.Envelope) -> None:
        with self._peers_lock:
            online = self.peers.online()
        model = env.body.get("model")
        with self._peers_lock:
            cands = [v for v in online if "answer" in (v.heartbeat.get("roles") or [])
                     and (not isinstance(model, str) or v.model == model)]
            target = choose_node(cands, self._pending_routes, self._last_assigned)
            if target is not None:
                self._pending_routes[target] = self._pending_routes.get(target, 0) + 1
                self._assign_seq += 1
                self._last_assigned[target] = self._assign_seq
        if target is None:  # no answering node: answer ourselves (JSON asks are nodes' job)
            if env.body.get("reply_format") == "json":
                self.rejects.add("no-node")
                return
            if isinstance(model, str) and model != self.loaded.key:
                self.rejects.add("no-node")
                self._reply(env, wire.Kind.ERROR, {"reason": "no-node",
                                                   "message": f"no node is online to answer with model {model}"})
                return
            target = self.name
        body = dict(env.body, routed_by=self.name, routed_reason="load")
        fwd = wire.Envelope(wire.Kind.ASK, env.sender, body, corr=env.corr, reply_to=env.reply_to)
        self.bus.publish(topics.node_ask(target), wire.encode(fwd, self.config.limits.max_message_bytes), qos=1)

    # -- answering (generation thread) ------------------------------------------------------------
    def _reply(self, env: wire.Envelope, kind: wire.Kind, body: dict[str, Any]) -> None:
        if env.reply_to is not None and topics.reply_allowed(env.reply_to):
            out = wire.Envelope(kind, self.name, body, corr=env.corr)
            self.bus.publish(env.reply_to, wire.encode(out, self.config.limits.max_message_bytes), qos=1)

    def _work_loop(self) -> None:
        bind_threads()
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self._busy = True
            try:
                self._answer(job)
            except Exception as exc:
                log.exception("HALO ask failed")
                self._reply(job.env, wire.Kind.ERROR, {"reason": "internal", "message": f"{type(exc).__name__}: {exc}"})
            finally:
                self._busy = False

    def _answer(self, job: _Job) -> None:
        b = job.env.body
        sync = b.get("halo_sync", self.config.sync)
        if sync not in ("strict", "relaxed"):
            sync = self.config.sync
        frames = b.get("halo_wire") != "cbor"  # the per-worker CBOR requests, for comparison
        link = b.get("halo_link") is not False  # False: frames through the bus, for comparison
        if self.head is not None:  # halo_head_threads 1: the plain LM head, for comparison
            self.head.parallel = b.get("halo_head_threads") != 1
        if self.decoder.step is not None:  # halo_lean false: the HF forward, for comparison
            self.decoder.step.enabled = b.get("halo_lean") is not False
        if isinstance(b.get("halo_eval"), dict):
            figures = self.engine.evaluate(b["halo_eval"], strict=sync == "strict", frames=frames, link=link)
            self.served += 1
            self._reply(job.env, wire.Kind.ANSWER, {
                "text": "", "node": self.name, "prompt_tokens": figures.pop("prompt_tokens"),
                "new_tokens": 0, "ttft_s": 0.0, "ttlt_s": round(time.monotonic() - job.received, 6),
                "model": self.loaded.key, **figures})
            return
        ids = self.decoder.encode(b["text"])
        pieces = 0
        first: list[float] = []

        def on_text(piece: str) -> None:
            nonlocal pieces
            if not first:
                first.append(time.monotonic())
            self._reply(job.env, wire.Kind.TOKEN, {"i": pieces, "text": piece})
            pieces += 1

        cache_info: dict[str, Any] = {"decision": "disabled"}
        prepare = None
        if self.cache is not None and not b.get("no_cache"):
            def prepare() -> tuple[torch.Tensor, Any]:
                got = self.cache.prepare_local(ids)
                cache_info.clear()
                cache_info.update(got.info)
                return got.logits, got.cache
        with self.engine.run(strict=sync == "strict", frames=frames, link=link) as run:
            gen = self.decoder.generate(ids, b["max_new_tokens"], tuple(b.get("stop", ())), on_text,
                                        prepare=prepare)
        done = time.monotonic()
        self.served += 1
        halo = run.figures()
        steps = halo.pop("token_times_s")
        decode_steps = steps[1:] if len(steps) > 1 else []
        self._reply(job.env, wire.Kind.ANSWER, {
            "text": gen.text, "node": self.name, "model": self.loaded.key, "prompt_tokens": len(ids),
            "new_tokens": len(gen.token_ids), "token_ids": gen.token_ids,
            "ttft_s": round((first[0] if first else done) - job.received, 6),
            "ttlt_s": round(done - job.received, 6), "prefill_s": round(gen.prefill_s, 6),
            "decode_s": round(gen.decode_s, 6), "stop_reason": gen.stop_reason, "cache": cache_info,
            "tpot_s": round(sum(decode_steps) / len(decode_steps), 6) if decode_steps else None,
            "token_times_s": [round(t, 6) for t in steps], "halo": halo,
        })

    # -- planner / heartbeat ----------------------------------------------------------------------
    def _plan_loop(self) -> None:
        bind_threads()
        last_hb = 0.0
        while not self._stop.wait(0.1):
            with self._peers_lock:
                views = [(v.name, dict(v.heartbeat), v.online) for v in self.peers.all()]
            try:
                self.engine.replan(views, time.monotonic(), idle=not self._busy)
            except Exception:
                log.exception("re-plan failed")
            if self.engine.link is not None:
                self.engine.link.service()  # keep-alive while idle; reconnect when it broke
            if time.monotonic() - last_hb >= self.config.heartbeat_s:
                last_hb = time.monotonic()
                self._heartbeat()

    def _heartbeat(self) -> None:
        body = {"seq": self._seq, "time": time.time(), "model": self.loaded.key,
                "model_key": self.loaded.model_key, "queue": self._jobs.qsize() + int(self._busy),
                "load": 1.0 if self._busy else 0.0, "prefill_tps": 0.0, "served": self.served,
                "roles": ["coordinator"], "rejects": self.rejects.snapshot(), "halo": self.engine.snapshot()}
        try:
            env = wire.Envelope(wire.Kind.HEARTBEAT, self.name, body)
            self.bus.publish(topics.node_heartbeat(self.name), wire.encode(env), qos=0, retain=True)
            self._seq += 1
        except MeshError as exc:
            log.warning("heartbeat not sent: %s", exc)

