"""`mesh node`: the node agent process.

Threads and who owns them (all stopped by :meth:`NodeAgent.stop`):

- paho's network thread: runs message handlers, which only decode, check and enqueue;
- the worker thread: all torch work (prefill, decode), one ask at a time, from a bounded queue;
- the heartbeat thread: a ping round trip to the broker and a heartbeat every period.

Startup order matters for routing (see ``mesh.routing``): load the model, connect with the last
will ``offline``, publish ``online`` and wait for the ack, and only then subscribe to the topics
the router serves.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mesh import topics, wire
from mesh.bus import MqttBus, ReplyInbox
from mesh.config import NodeConfig
from mesh.errors import MeshError, ProtocolError, TransportError
from mesh.model import Decoder, LoadedModel, load_model
from mesh.routing import PeerTable, choose_node, router_of

log = logging.getLogger(__name__)

WARMUP_TEXT = ("The mesh warms up its model once at start so that the first real prompt does not "
               "pay for lazy initialisation, and so that its heartbeat can report a measured "
               "prefill speed before any ask arrives. " * 2)


class _Cancelled(Exception):
    """Raised from the streaming callback to stop a generation when the node shuts down."""


@dataclass
class Job:
    env: wire.Envelope
    received: float  # monotonic
    json_reply: bool = False


@dataclass
class Figures:
    """What the heartbeat reports; written by the worker, read by the heartbeat thread."""

    served: int = 0
    failed: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    rtt_ms: float | None = None
    busy_s: float = 0.0
    last_ttft_s: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ewma(self, name: str, value: float, alpha: float = 0.3) -> None:
        old = getattr(self, name)
        setattr(self, name, value if not old else (1 - alpha) * old + alpha * value)


class NodeAgent:
    def __init__(self, config: NodeConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.name = config.name
        self.limits = config.limits
        self.timing = config.timing
        self.loaded = loaded
        self.rejects = wire.RejectCounter()
        self.figures = Figures()
        self.peers = PeerTable()
        self._peers_lock = threading.Lock()
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=self.limits.max_queue)
        self._running_job = False
        self._job_started: float | None = None
        self._load = 0.0  # busy fraction, EWMA over heartbeat periods
        self._seen_asks: OrderedDict[str, float] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._pending: dict[str, int] = {}  # router: asks sent per node since its last heartbeat
        self._last_assigned: dict[str, int] = {}
        self._assign_seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._started = time.time()
        self.bus = MqttBus(f"mesh-node-{self.name}", config.broker,
                           will=(topics.node_status(self.name), topics.OFFLINE, topics.STATUS.qos, True),
                           keepalive=self.timing.keepalive_s)
        self.inbox = ReplyInbox(self.bus, f"node-{self.name}", self.rejects, self.limits.max_message_bytes)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.loaded is None:
            self.loaded = load_model(self.config.cache_root, self.config.model, self.config.threads)
        self.decoder = Decoder(self.loaded)
        self._warm_up()
        self.bus.on_connected(self._announce)
        self.bus.subscribe(topics.ALL_STATUS, self._on_status, qos=1)
        self.bus.subscribe(topics.ALL_HEARTBEATS, self._on_heartbeat, qos=0)
        self.bus.start(self.timing.connect_timeout_s)
        self.inbox.start()
        self.bus.publish_wait(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)
        # Only now: the router argument in mesh.routing needs "online" accepted before these.
        self.bus.subscribe(topics.node_ask(self.name), self._on_node_ask, qos=1)
        self.bus.subscribe(topics.ROUTE, self._on_route, qos=1)
        self.bus.subscribe(topics.ASK, self._on_json_ask, qos=1)
        for target, name in ((self._work_loop, "worker"), (self._heartbeat_loop, "heartbeat")):
            t = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("node %s online with %s (%s)", self.name, self.loaded.key, self.loaded.model_key)

    def stop(self, timeout: float = 10.0) -> None:
        """Go offline cleanly: status ``offline``, refuse queued asks, stop every thread."""
        self._stop.set()
        try:
            self.bus.publish_wait(topics.node_status(self.name), topics.OFFLINE, qos=1, retain=True, timeout=3.0)
        except MeshError as exc:
            log.warning("could not publish offline status: %s", exc)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            self._reply_error(job, "shutdown", f"node {self.name} is shutting down")
        for t in self._threads:
            t.join(timeout)
        self.bus.stop()

    def wait(self) -> None:
        self._stop.wait()

    def _announce(self) -> None:
        # Runs after every reconnect: the retained status may have been replaced by our will.
        if not self._stop.is_set() and self.bus.connected.is_set():
            self.bus.publish(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)

    def _warm_up(self) -> None:
        ids = self.decoder.encode(WARMUP_TEXT)
        self.decoder.prefill(ids)  # first call pays lazy init
        t0 = time.perf_counter()
        self.decoder.prefill(ids)
        self.figures.prefill_tps = len(ids) / max(time.perf_counter() - t0, 1e-6)

    # -- handlers (network thread: decode, check, enqueue; never torch) --------------------------
    def _decode(self, payload: bytes, kind: wire.Kind) -> wire.Envelope | None:
        try:
            env = wire.decode(payload, self.limits.max_message_bytes)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            log.info("dropped payload: %s", exc)
            return None
        if env.kind != kind:
            self.rejects.add("unexpected-kind")
            return None
        return env

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None or payload not in (topics.ONLINE, topics.OFFLINE):
            self.rejects.add("bad-status")
            return
        with self._peers_lock:
            self.peers.set_status(parsed[0], payload == topics.ONLINE)

    def _on_heartbeat(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_node_topic(topic)
        if parsed is None:
            self.rejects.add("bad-topic")
            return
        if not payload:
            return  # an empty retained message clears a decommissioned node's heartbeat
        env = self._decode(payload, wire.Kind.HEARTBEAT)
        if env is None:
            return
        with self._peers_lock:
            if self.peers.set_heartbeat(parsed[0], env.body, time.monotonic()):
                self._pending.pop(parsed[0], None)

    def _on_node_ask(self, topic: str, payload: bytes, retained: bool) -> None:
        env = self._decode(payload, wire.Kind.ASK)
        if env is None or not self._valid_ask(env):
            return
        self._enqueue(Job(env, time.monotonic(), json_reply=env.body.get("reply_format") == "json"))

    def _valid_ask(self, env: wire.Envelope) -> bool:
        body = env.body
        reason = None
        if env.reply_to is None or not topics.reply_allowed(env.reply_to):
            reason = "bad-reply-topic"
        elif not body["text"] or len(body["text"]) > self.limits.max_prompt_chars:
            reason = "bad-prompt"
        elif not 1 <= body["max_new_tokens"] <= self.limits.max_new_tokens:
            reason = "bad-max-new-tokens"
        elif not all(isinstance(s, str) and len(s) <= 64 for s in body.get("stop", [])) or len(body.get("stop", [])) > 8:
            reason = "bad-stop"
        if reason is None:
            return True
        self.rejects.add(reason)
        if env.reply_to is not None and topics.reply_allowed(env.reply_to):
            self._reply_error(Job(env, time.monotonic()), reason, f"ask rejected: {reason}")
        return False

    def _enqueue(self, job: Job) -> None:
        ask_id = job.env.body.get("ask_id") or job.env.corr
        if ask_id:
            now = time.monotonic()
            with self._seen_lock:
                if ask_id in self._seen_asks:
                    self.rejects.add("duplicate-ask")
                    return
                self._seen_asks[ask_id] = now
                while self._seen_asks and now - next(iter(self._seen_asks.values())) > self.timing.dedupe_window_s:
                    self._seen_asks.popitem(last=False)
                while len(self._seen_asks) > 10_000:
                    self._seen_asks.popitem(last=False)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.rejects.add("busy")
            self._reply_error(job, "busy", f"node {self.name} is busy: {self._jobs.qsize()} asks queued")

    def _is_router(self) -> bool:
        with self._peers_lock:
            return router_of(v.name for v in self.peers.online()) == self.name

    def _route(self, env: wire.Envelope) -> None:
        with self._peers_lock:
            model = env.body.get("model")
            target = choose_node(self.peers.online(), self._pending, self._last_assigned,
                                 model if isinstance(model, str) else None)
            if target is not None:
                self._pending[target] = self._pending.get(target, 0) + 1
                self._assign_seq += 1
                self._last_assigned[target] = self._assign_seq
        if target is None:
            self._reply_error(Job(env, time.monotonic()), "no-node",
                              "no node is online to answer" + (f" with model {model}" if model else ""))
            return
        body = dict(env.body, routed_by=self.name)
        forwarded = wire.Envelope(wire.Kind.ASK, env.sender, body, corr=env.corr, reply_to=env.reply_to)
        self.bus.publish(topics.node_ask(target), wire.encode(forwarded, self.limits.max_message_bytes), qos=1)

    def _on_route(self, topic: str, payload: bytes, retained: bool) -> None:
        if not self._is_router():
            return
        env = self._decode(payload, wire.Kind.ASK)
        if env is not None and self._valid_ask(env):
            self._route(env)

    def _on_json_ask(self, topic: str, payload: bytes, retained: bool) -> None:
        if retained or not self._is_router():
            return  # a retained ask would be answered again by every new router
        try:
            ask = wire.decode_json_ask(payload, self.limits.max_json_ask_bytes, 64, self.limits.max_new_tokens)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            log.info("dropped JSON ask: %s", exc)
            return
        reply_to = ask.reply_to or topics.ANSWER
        if not topics.reply_allowed(reply_to):
            self.rejects.add("bad-reply-topic")
            return
        body = {"text": ask.text, "max_new_tokens": ask.max_new_tokens, "reply_format": "json"}
        if ask.ask_id:
            body["ask_id"] = ask.ask_id
        env = wire.Envelope(wire.Kind.ASK, "json-client", body, corr=ask.ask_id or uuid.uuid4().hex,
                            reply_to=reply_to)
        if self._valid_ask(env):
            self._route(env)

    # -- worker (torch) ---------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self._running_job = True
            t0 = time.monotonic()
            with self.figures.lock:
                self._job_started = t0
            try:
                self._answer(job)
            except _Cancelled:
                self._reply_error(job, "shutdown", f"node {self.name} stopped while answering")
            except Exception as exc:  # a failed ask must not kill the worker
                log.exception("ask failed")
                with self.figures.lock:
                    self.figures.failed += 1
                self._reply_error(job, "internal", f"{type(exc).__name__}: {exc}")
            finally:
                with self.figures.lock:
                    self.figures.busy_s += time.monotonic() - t0
                    self._job_started = None
                self._running_job = False

    def _answer(self, job: Job) -> None:
        body = job.env.body
        started = time.monotonic()
        ids = self.decoder.encode(body["text"])
        pieces = 0
        first_at: list[float] = []

        def on_text(piece: str) -> None:
            nonlocal pieces
            if self._stop.is_set():
                raise _Cancelled
            if not first_at:
                first_at.append(time.monotonic())
            if not job.json_reply:
                self._publish_reply(job, wire.Kind.TOKEN, {"i": pieces, "text": piece})
            pieces += 1

        gen = self.decoder.generate(ids, body["max_new_tokens"], tuple(body.get("stop", ())), on_text)
        done = time.monotonic()
        ttft = (first_at[0] if first_at else done) - job.received
        with self.figures.lock:
            self.figures.served += 1
            self.figures.last_ttft_s = ttft
            if gen.prefill_s > 0:
                self.figures.ewma("prefill_tps", len(ids) / gen.prefill_s)
            if len(gen.token_ids) > 1 and gen.decode_s > 0:
                self.figures.ewma("decode_tps", (len(gen.token_ids) - 1) / gen.decode_s)
        answer = {
            "text": gen.text, "node": self.name, "model": self.loaded.key,
            "prompt_tokens": len(ids), "new_tokens": len(gen.token_ids), "token_ids": gen.token_ids,
            "ttft_s": round(ttft, 6), "ttlt_s": round(done - job.received, 6),
            "queue_s": round(started - job.received, 6), "prefill_s": round(gen.prefill_s, 6),
            "decode_s": round(gen.decode_s, 6), "stop_reason": gen.stop_reason,
            "cache": {"local_tokens": 0, "remote_tokens": 0, "peer": None},
        }
        if job.json_reply:
            answer["id"] = job.env.corr
            self._publish_json(job, answer)
        else:
            self._publish_reply(job, wire.Kind.ANSWER, answer)

    def _publish_reply(self, job: Job, kind: wire.Kind, body: dict[str, Any]) -> None:
        if job.env.reply_to is None:
            return
        env = wire.Envelope(kind, self.name, body, corr=job.env.corr)
        self.bus.publish(job.env.reply_to, wire.encode(env, self.limits.max_message_bytes), qos=1)

    def _publish_json(self, job: Job, body: dict[str, Any]) -> None:
        if job.env.reply_to is not None:
            self.bus.publish(job.env.reply_to, json.dumps(body).encode(), qos=1)

    def _reply_error(self, job: Job, reason: str, message: str) -> None:
        try:
            if job.json_reply or job.env.body.get("reply_format") == "json":
                self._publish_json(job, {"error": reason, "message": message, "id": job.env.corr, "node": self.name})
            else:
                self._publish_reply(job, wire.Kind.ERROR, {"reason": reason, "message": message})
        except MeshError as exc:
            log.warning("could not send error reply: %s", exc)

    # -- heartbeat --------------------------------------------------------------------------------
    def heartbeat_body(self) -> dict[str, Any]:
        with self.figures.lock:
            f = self.figures
            body: dict[str, Any] = {
                "seq": self._seq, "time": time.time(), "uptime_s": round(time.time() - self._started, 1),
                "model": self.loaded.key, "model_key": self.loaded.model_key,
                "queue": self._jobs.qsize() + (1 if self._running_job else 0),
                "queue_max": self.limits.max_queue,
                "load": round(self._load, 3), "prefill_tps": round(f.prefill_tps, 1),
                "decode_tps": round(f.decode_tps, 1), "served": f.served, "failed": f.failed,
                "last_ttft_s": f.last_ttft_s, "pid": os.getpid(), "roles": ["answer"],
                "rejects": self.rejects.snapshot(), "cpu_load1": round(os.getloadavg()[0], 2),
            }
            if f.rtt_ms is not None:
                body["rtt_ms"] = round(f.rtt_ms, 3)
        return body

    def _busy_total(self, now: float) -> float:
        """Seconds spent answering since start, counting the running ask up to ``now``."""
        with self.figures.lock:
            started = self._job_started
            return self.figures.busy_s + (now - started if started is not None else 0.0)

    def _heartbeat_loop(self) -> None:
        last_busy, last_t = 0.0, time.monotonic()
        while not self._stop.is_set():
            try:
                rtt = self.inbox.ping(timeout=max(self.timing.heartbeat_s, 1.0))
                with self.figures.lock:
                    self.figures.ewma("rtt_ms", rtt * 1000.0)
            except TransportError as exc:
                log.info("ping failed: %s", exc)
            now = time.monotonic()
            busy_now = self._busy_total(now)
            self._load = 0.7 * self._load + 0.3 * min(1.0, (busy_now - last_busy) / max(now - last_t, 1e-6))
            last_busy, last_t = busy_now, now
            try:
                env = wire.Envelope(wire.Kind.HEARTBEAT, self.name, self.heartbeat_body())
                self.bus.publish(topics.node_heartbeat(self.name), wire.encode(env),
                                 qos=topics.HEARTBEAT.qos, retain=topics.HEARTBEAT.retain)
                self._seq += 1
            except MeshError as exc:
                log.warning("heartbeat not sent: %s", exc)
            self._stop.wait(self.timing.heartbeat_s)
