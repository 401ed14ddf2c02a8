"""`mesh coordinator`: the HALO coordinator process.

It runs the mesh's own forward (:mod:`mesh.lm`, as a node does) in the weight format of
``--weights`` (fp32, int8 or q4; its model key names it, so workers of that format join its
plans). It keeps embeddings, attention, norms, the LM head and the KV cache (so the node's prompt
cache, ``mesh.cache.node_cache.NodeCache``, works unchanged), and routes every MLP layer through
``mesh.halo.groups.routed_mlps`` to the workers of the active plan plus its own local groups
(:class:`mesh.halo.engine.HaloEngine`). It answers asks like a node: status/heartbeat under its name, asks on
``node_ask(name)``, streamed TOKENs and an ANSWER with figures (per-token timing, partials late or
zeroed). Being the smallest live name it may be the mesh's router: it then forwards routed
asks to the least-loaded answering node.

Threads (stopped by :meth:`Coordinator.stop`): paho's network thread (decode and enqueue only),
the generation thread (all torch work, one ask at a time), the planner thread (heartbeat, figures,
re-plans with hysteresis, epoch switch while idle).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mesh import budget, topics, wire
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.direct import DirectLink
from mesh.config import BrokerAddress, CacheConfig, Limits
from mesh.errors import MeshError, TransportError
from mesh.loops import guarded
from mesh.halo.ledger import Liveness
from mesh.model import Decoder, Interrupted, bind_threads, load_model
from mesh.member import Job, Member, Stream, shows_cache
from mesh.halo.placement import ReplanPolicy
from mesh.halo.sync import SyncPolicy
from mesh.cache.node_cache import NodeCache
from mesh.weights.formats import DEFAULT_WEIGHTS
from mesh.halo.engine import HaloEngine
from nodes.agent import physical_memory

log = logging.getLogger(__name__)

NAME = "coordinator"
# Ask fields that once switched the coordinator onto a slower path for comparison: an ask carrying
# one is still answered, the field ignored and counted ("ignored-field.<name>" in the rejects).
IGNORED_ASK_FIELDS = ("halo_wire", "halo_link", "halo_head_threads", "halo_lean")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator needs; built once from CLI flags (``nodes.halo_cli``)."""

    broker: BrokerAddress = field(default_factory=BrokerAddress)
    name: str = NAME
    model: str = "smollm2-135m"
    weights: str = DEFAULT_WEIGHTS  # fp32 | int8 | q4: workers of the same format join its plans
    home: Path = Path.home() / ".cache" / "mesh"
    threads: int = 0
    group_size: int = 64
    sync: str = "relaxed"  # default sync of asks that do not name one: strict | relaxed
    policy: SyncPolicy = field(default_factory=lambda: SyncPolicy(min_deadline_s=0.005, max_deadline_s=0.05))  # 5-50 ms
    replan: ReplanPolicy = field(default_factory=ReplanPolicy)
    placement: str = "importance"  # importance | random (the ablation)
    reliability_weight: float = 2.0  # shares ~ speed * reliability^weight (0: by speed only)
    fallback: str = "important"  # relaxed: late important groups computed here ("none": zero)
    local_speed: float = 0.0  # neuron-rows/s the coordinator computes itself (0: none)
    wire_dtype: str = "float16"
    strict_timeout_s: float = 10.0  # then strict computes the missing groups itself (stays exact)
    strict_resend_s: float = 1.0  # strict: the step's input sent again to whom has not answered, this often
    liveness: Liveness = field(default_factory=Liveness)  # when a silent worker counts as gone
    heartbeat_s: float = 2.0
    predictor: Path | None = None  # default: the trained one next to the model, if any
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: Limits = field(default_factory=Limits)


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.name = config.name
        self.rejects = wire.RejectCounter()
        self.reply_topic = topics.reply(self.name)
        self.bus = MqttBus(f"mesh-{self.name}", config.broker,
                           will=(topics.node_status(self.name), topics.OFFLINE, topics.STATUS.qos, True))
        self.member = Member(self.name, self.bus, config.limits, self.rejects,
                             on_presence=self._on_presence, on_peer_heartbeat=self._on_peer_heartbeat,
                             answers_itself=self._answers_itself, answer_role=True)
        self._stop = self.member.stop_event
        self._working, self._worked = threading.Event(), threading.Event()  # work() began, ended
        self._threads: list[threading.Thread] = []
        self.served = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, work_here: bool = False) -> None:
        """Load, connect, go online and start the threads; ``work_here``: not the generation
        thread, which the caller then runs on its main thread (:meth:`work`; why:
        ``nodes.agent.NodeAgent.work``)."""
        from mesh.halo.head import two_thread_head

        cfg = self.config
        # The mesh's own forward (mesh.lm) in the mesh's weight format: its model key is the one
        # workers of that format announce, so they join its plans.
        self.loaded = load_model(cfg.home, cfg.model, cfg.threads, weights=cfg.weights)
        self.decoder = Decoder(self.loaded)
        # Only for a one-thread coordinator: then each half is bitwise the plain head's product
        # (a multi-threaded head already uses the cores, may sum in another order).
        one = torch.get_num_threads() == 1
        self.head = two_thread_head(self.loaded.model) if one else None
        self.cache = NodeCache(self.loaded, cfg.cache, self.decoder) if cfg.cache.enabled else None
        from mesh.auth.store import identity_dir, load_keyring

        keys = load_keyring(identity_dir(cfg.home), cfg.name, "coordinator")
        self.member.keys = keys  # asks opened, answers and forwards sealed (mesh.auth.senders)
        self.engine = HaloEngine(self.loaded, self.decoder, cfg, self.bus, self.reply_topic, self.rejects, keys)
        self.member.subscribe_presence(self.bus)
        self.bus.subscribe(self.reply_topic, self.engine.on_reply, qos=topics.REPLY.qos)
        self.bus.subscribe(topics.halo_reply(self.name), self.engine.on_frame, qos=topics.HALO_REPLY.qos)
        self.bus.on_connected(self._announce)
        self.bus.start()
        link = DirectLink(f"mesh-{self.name}-link", cfg.broker, topics.halo_link(self.name), self.engine.on_frame)
        try:
            link.open()
        except TransportError as exc:  # the planner retries; asks use the bus meanwhile
            log.warning("%s: HALO frames go over the bus until it connects", exc)
        self.engine.link = link
        self.member.go_online(self._heartbeat_body)
        loops = ((self._plan_loop, "planner"),) if work_here else ((self._work_loop, "generate"), (self._plan_loop, "planner"))
        for target, name in loops:
            t = threading.Thread(target=guarded(f"{self.name}-{name}", target, self._stop, self.rejects),
                                 name=f"{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("coordinator %s online with %s, sync %s", self.name, self.loaded.model_key, cfg.sync)

    @functools.cached_property
    def max_context(self) -> int:
        """Prompt and new tokens one ask may take (``mesh.budget``'s default for its model)."""
        return self.config.limits.max_context or budget.default_max_context(self.loaded.model.config,
                                                                            physical_memory())

    def stop(self, timeout: float = 10.0) -> None:
        self.member.go_offline()
        try:
            self.bus.publish_wait(topics.HALO_PLAN, b"", qos=1, retain=True, timeout=3.0)
        except MeshError as exc:
            log.warning("could not clear the plan: %s", exc)
        for t in self._threads:
            t.join(timeout)
        if self._working.is_set():  # the loop on the caller's thread: its ask ends before the bus does
            self._worked.wait(timeout)
        if self.engine.link is not None:
            self.engine.link.close()
        self.bus.stop()

    def _announce(self) -> None:
        if self.member.announce():
            self.engine.republish()

    # -- membership hooks (network thread) -------------------------------------------------------
    def _on_presence(self, name: str, online: bool | None) -> None:
        self.engine.set_online(name, bool(online))

    def _on_peer_heartbeat(self, name: str, body: dict[str, Any], retained: bool) -> None:
        if not retained:
            self.engine.note_heartbeat(name, body)

    def _answers_itself(self, env: wire.Envelope) -> bool:
        """With no answering node online, a routed ask in this model comes here (not JSON asks:
        those are the nodes' job)."""
        model = env.body.get("model")
        return env.body.get("reply_format") != "json" and (not isinstance(model, str) or model == self.loaded.key)

    # -- answering (generation thread) ------------------------------------------------------------
    def work(self) -> None:
        """Generate on the calling thread until offline (after ``start(work_here=True)``)."""
        self._working.set()
        try:
            guarded(f"{self.name}-generate", self._work_loop, self._stop, self.rejects)()
        finally:
            self._worked.set()

    def _work_loop(self) -> None:
        self.member.work(self._answer)

    def _answer(self, job: Job) -> None:
        b = job.env.body
        sync = b.get("halo_sync", self.config.sync)
        if sync not in ("strict", "relaxed"):
            sync = self.config.sync
        for k in IGNORED_ASK_FIELDS:
            if k in b:
                self.rejects.add("ignored-field." + k.replace("_", "-"))
        if isinstance(b.get("halo_eval"), dict):
            from mesh.halo.evaluate import evaluate

            figures = evaluate(self.engine, b["halo_eval"], strict=sync == "strict")
            self.served += 1
            self.member.reply(job, wire.Kind.ANSWER, {
                "text": "", "node": self.name, "prompt_tokens": figures.pop("prompt_tokens"),
                "new_tokens": 0, "ttft_s": 0.0, "ttlt_s": round(time.monotonic() - job.received, 6),
                "model": self.loaded.key, **figures})
            return
        ids = self.decoder.encode(b["text"])
        if budget.context_problem(len(ids), b["max_new_tokens"], self.max_context):
            raise budget.Abandoned(budget.TOO_LONG, f"{len(ids)} prompt tokens and {b['max_new_tokens']} new "
                                   f"exceed the coordinator's maximum context of {self.max_context} tokens")
        stop = lambda: self.member.must_stop(job)  # noqa: E731  (the forward's hook, between layers)
        on_text = Stream(self.member, job)

        cache_info: dict[str, Any] = {"decision": "disabled"}
        if self.cache is not None and not b.get("no_cache"):
            def prepare() -> tuple[torch.Tensor, Any]:
                got = self.cache.prepare_local(ids, stop=stop)
                cache_info.clear()
                cache_info.update(got.info)
                return got.logits, got.cache
        else:
            def prepare() -> tuple[torch.Tensor, Any]:
                return self.decoder.prefill(ids, stop=stop)
        try:
            with self.engine.run(strict=sync == "strict") as run:
                gen = self.decoder.generate(ids, b["max_new_tokens"], tuple(b.get("stop", ())), on_text,
                                            prepare=prepare)
        except Interrupted:
            self.member.checkpoint(job)  # raises why the forward stopped
            raise
        on_text.flush()
        done = time.monotonic()
        self.served += 1
        halo = run.figures()
        steps = halo.pop("token_times_s")
        decode_steps = steps[1:] if len(steps) > 1 else []
        self._send_answer(job, {
            "text": gen.text, "node": self.name, "model": self.loaded.key, "prompt_tokens": len(ids),
            "new_tokens": len(gen.token_ids), "token_ids": gen.token_ids,
            "ttft_s": round((on_text.first_at or done) - job.received, 6),
            "ttlt_s": round(done - job.received, 6), "prefill_s": round(gen.prefill_s, 6),
            "decode_s": round(gen.decode_s, 6), "stop_reason": gen.stop_reason,
            **({"cache": cache_info} if shows_cache(job) else {}),  # M1: see mesh.member.shows_cache
            "tpot_s": round(sum(decode_steps) / len(decode_steps), 6) if decode_steps else None,
            "token_times_s": [round(t, 6) for t in steps], "halo": halo,
        })

    def _send_answer(self, job: Job, answer: dict[str, Any]) -> None:
        """A JSON ask (Home Assistant, ``mosquitto_pub``) reads JSON, like a node's answer."""
        if job.json_reply:
            self.member.reply_json(job, dict(answer, id=job.env.corr))
        else:
            self.member.reply(job, wire.Kind.ANSWER, answer)

    # -- planner / heartbeat ----------------------------------------------------------------------
    def _plan_loop(self) -> None:
        bind_threads()
        last_hb = 0.0
        while not self._stop.wait(0.1):
            with self.member.changed:
                views = [(v.name, dict(v.heartbeat), v.online) for v in self.member.peers.all() if v.name != self.name]
            try:
                self.engine.replan(views, time.monotonic(), idle=not self.member.running)
            except Exception:
                log.exception("re-plan failed")
            if self.engine.link is not None:
                self.engine.link.service()  # keep-alive while idle; reconnect when it broke
            if time.monotonic() - last_hb >= self.config.heartbeat_s:
                last_hb = time.monotonic()
                self._heartbeat()

    def _heartbeat_body(self) -> dict[str, Any]:
        busy = self.member.running
        return {"time": time.time(), "model": self.loaded.key,
                "model_key": self.loaded.model_key, "queue": self.member.queue_length(),
                "load": 1.0 if busy else 0.0, "prefill_tps": 0.0, "served": self.served,
                "roles": ["coordinator"], "rejects": self.rejects.snapshot(), "halo": self.engine.snapshot(),
                "heartbeat_s": self.config.heartbeat_s, "max_context": self.max_context}

    def _heartbeat(self) -> None:
        try:
            self.member.publish_heartbeat(self._heartbeat_body())
        except MeshError as exc:
            log.warning("heartbeat not sent: %s", exc)

