"""What every member process of the mesh shares: the node agent and the HALO coordinator.

A :class:`Member` is one process's place in the mesh, on its bus:

- *presence*: the retained ``online`` status (the last will says ``offline``), republished after
  every reconnect, and who else is online (:class:`mesh.presence.Presence`);
- *ask intake*: decode, validate, drop a repeated ask id, queue (bounded; a full queue answers
  ``busy``), so one ask is answered once even when a router's crash overlaps its successor's duty
  (``mesh.routing``'s safety argument relies on every target doing this);
- *router duty*: while this process has the smallest live name (online and heartbeating:
  ``mesh.routing.live``), it forwards the asks that name
  no node (``mesh/v1/route``, the JSON and plain-text asks) to the node :func:`pick` chooses;
- *replies*: streamed pieces, answers and errors, as CBOR envelopes or JSON;
- *heartbeat*: published with a sequence number the peers order them by;
- *the work loop*: one ask at a time, off the network thread, a failed ask never kills it; an
  ask past its deadline, or whose asker is gone, stops between layers and tokens (``mesh.askers``).

What differs between processes is handed in: the cache depths per candidate (the agent's prompt
cache), hooks for presence and heartbeats (the coordinator's HALO engine), and who may answer.
Handlers run on paho's network thread: they decode, check and enqueue, never torch.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh import budget, handover, sysmem, topics, wire
from mesh.askers import AskGuard, Cancelled
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.config import Limits
from mesh.dedupe import SeenAsks
from mesh.errors import MeshError, ProtocolError
from mesh.model import bind_threads
from mesh.mqtt.bus import MqttBus
from mesh.presence import Presence
from mesh.routing import NodeView, answers_asks, pick, router_of

log = logging.getLogger(__name__)

NOT_ANSWERING = "not-answering"  # the error reason of an ask sent to a process that answers none
JSON_SENDER = "json-client"  # the sender of every JSON and text ask (they name none)

Depths = Callable[[wire.Envelope, list[str]], dict[str, int]]


def asker_of(env: wire.Envelope) -> str:
    """Whose going away stops an ask (``mesh.askers``): the client run that owns its reply inbox
    (``mesh/v1/reply/<run>``, named by that run's last will), else the sender. With identities,
    every run of one account seals as the same principal, so the sender names no single run."""
    if env.sender != JSON_SENDER and env.reply_to is not None:
        prefix = topics.reply("x")[:-1]
        run = env.reply_to[len(prefix):] if env.reply_to.startswith(prefix) else ""
        if run and "/" not in run:
            return run
    return env.sender


class AgentExtension:
    """Something riding on a node's lifecycle (Home Assistant discovery, ...).

    ``start`` runs once the node is online (network thread not involved), ``on_heartbeat`` after
    each heartbeat with its body, ``stop`` before the node goes offline. Errors are logged, never
    fatal to the node.
    """

    def start(self, agent: Any) -> None:
        pass

    def on_heartbeat(self, body: dict[str, Any]) -> None:
        pass

    def heartbeat_fields(self) -> dict[str, Any]:
        """Extra heartbeat fields (e.g. ``{"halo": {...}}``); called on the heartbeat thread."""
        return {}

    def stop(self) -> None:
        pass


def with_extension_fields(body: dict[str, Any], extensions: list[AgentExtension]) -> dict[str, Any]:
    """``body`` with every extension's heartbeat fields; one that fails is logged and left out."""
    for ext in extensions:
        try:
            body.update(ext.heartbeat_fields())
        except Exception:
            log.exception("extension %s heartbeat fields failed", type(ext).__name__)
    return body


@dataclass
class Job:
    env: wire.Envelope
    received: float  # monotonic
    json_reply: bool = False
    deadline: float = math.inf  # monotonic; set when taken (mesh.budget.deadline_at)


STREAM_EVERY_S = 0.1  # a streamed answer: the first piece at once, then at most ten messages a second
MAX_STREAM_EVERY_S = 1.0  # what an ask may choose (``stream_every_s``; 0: a piece per token)


class Stream:
    """An answer's text to its asker as it is generated (``Decoder.generate``'s ``on_text``): the
    first piece at once (the asker's time to first token), then what came since at most every
    ``every_s``, and what is left at :meth:`flush`. A node decoding 70 tokens a second sends ten
    messages, not seventy: each costs a seal on the node, a hop through the broker and a check at
    the asker, on cores the decode needs (a Pi, or the one machine of the testbed). Pieces are
    numbered as before; an asker joins them in order whatever their length. An ask's
    ``stream_every_s`` chooses another pace (0: a piece per token, for an asker that acts on each;
    at most :data:`MAX_STREAM_EVERY_S`). A JSON asker gets the answer alone. Each piece first checks
    that the job may go on (``Member.checkpoint``)."""

    def __init__(self, member: Member, job: Job, every_s: float = STREAM_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        asked = job.env.body.get("stream_every_s")
        if isinstance(asked, (int, float)) and not isinstance(asked, bool) and math.isfinite(asked):
            every_s = min(max(float(asked), 0.0), MAX_STREAM_EVERY_S)
        self.member, self.job, self.every_s, self.clock = member, job, every_s, clock
        self.first_at: float | None = None  # when the first piece was generated
        self.sent = 0  # pieces sent
        self._held = ""
        self._last = 0.0

    def __call__(self, piece: str) -> None:
        self.member.checkpoint(self.job)  # stopping, past its deadline, or its asker gone
        now = self.clock()
        if self.first_at is None:
            self.first_at = now
        self._held += piece
        if self.sent == 0 or now - self._last >= self.every_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Send what is held (before the answer)."""
        if not self._held or self.job.json_reply:
            return
        self.member.reply(self.job, wire.Kind.TOKEN, {"i": self.sent, "text": self._held})
        self.sent += 1
        self._held = ""
        self._last = self.clock() if now is None else now


def shows_cache(job: Job) -> bool:
    """Whether the answer to ``job`` may carry the prompt cache's figures (the ``cache`` block:
    ``full_hit``, ``local_tokens``, ``remote_tokens``, ``peer``, ``decision``...).

    They say whether someone asked the same prompt before (review M1, experiment E10: Home
    Assistant's account asks a candidate and reads ``full_hit``). So only an ask that sets
    :data:`mesh.wire.CACHE_FIGURES` and is answered as CBOR on its asker's inbox gets them, never a JSON
    answer (Home Assistant's: any automation, or any holder of that shared account, reads its
    topic). With keys, ``mesh.auth.senders.open_ask`` yields a sender other than
    :data:`JSON_SENDER` only for an ask sealed by an ``asker`` principal (the operator's CLI and
    benches), directly or inside a router's forward: an administrator's credential that reads
    every reply topic (KV parts in flight included). It cannot test candidates against the
    catalogs it reads (they are keyed with a key only nodes hold, ``mesh.cache.catalog``), but the
    figures of its own asks still say whether a prompt was cached (RELIABILITY.md, M1). Without
    keys nobody is authenticated; the shipped ACL lets only the asker and node accounts send CBOR
    asks.

    What stays: timing. ``ttft_s`` and ``prefill_s`` in every answer, and any asker's own clock,
    tell a full hit (no prefill) from a recompute, on a quiet node clearly; that threat remains.
    """
    return (job.env.body.get(wire.CACHE_FIGURES) is True and not job.json_reply
            and job.env.body.get("reply_format") != "json" and job.env.sender != JSON_SENDER)


class Member(Presence):
    """One process's membership: presence, intake, router duty, replies, heartbeat, work loop.

    ``label`` names the process in error messages (``node pi1``). ``answers_itself``: with no
    other answering node online, a routed ask it accepts comes to this process (the coordinator).
    ``answer_role``: routers only pick nodes whose heartbeat lists the role ``answer`` (the
    coordinator's rule; the agent routes to any node with a matching model whose roles answer asks:
    :func:`mesh.routing.answers_asks`). ``route_threshold``:
    see :func:`mesh.routing.route`. ``takes_asks`` False: a process that answers no asks (a
    worker-only node): every ask sent to it is refused at once with ``not-answering``, while it
    still routes others' asks when it is the router (:func:`mesh.routing.answers_asks` keeps
    routers from sending it any). ``keyring``: this process's identity (``mesh.auth``): asks are
    opened and replies and forwards sealed with it (``mesh.auth.senders``); None runs
    unauthenticated, as before identities.
    """

    def __init__(self, name: str, bus: MqttBus, limits: Limits, rejects: wire.RejectCounter, *,
                 dedupe_window_s: float = 600.0, depths: Depths | None = None,
                 on_presence: Callable[[str, bool | None], None] | None = None,
                 on_peer_heartbeat: Callable[[str, dict[str, Any], bool], None] | None = None,
                 answers_itself: Callable[[wire.Envelope], bool] | None = None,
                 answer_role: bool = False, route_threshold: int = 2, label: str = "",
                 ask_timeout_s: float = 300.0, keyring: Keyring | None = None, takes_asks: bool = True) -> None:
        super().__init__(rejects, limits.max_message_bytes, keyring)
        self.name, self.bus, self.limits = name, bus, limits
        self.label = label or name
        self.route_threshold = route_threshold
        self.dedupe_window_s = dedupe_window_s
        self.depths = depths
        self.on_presence = on_presence
        self.on_peer_heartbeat = on_peer_heartbeat
        self.answers_itself = answers_itself
        self.answer_role = answer_role
        self.takes_asks = takes_asks
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
        self.running = False  # an ask is being answered
        self.present = False  # between announcing "online" and going offline
        self.stop_event = threading.Event()
        self.seq = 0
        self.seen = SeenAsks(dedupe_window_s)
        self.ask_timeout_s = ask_timeout_s  # the deadline of an ask that gives none
        self.guard = AskGuard(self.stop_event, self.label, ignore=(JSON_SENDER,))
        self.pending: dict[str, int] = {}  # router: asks sent per node since its last heartbeat
        self._last_assigned: dict[str, int] = {}
        self._assign_seq = 0
        # Home Assistant's asks: the router keeps what it forwarded until the node says it answered,
        # and routes an ask once more when that node dies first; a node lists what it answered.
        self.forwards = handover.Forwards()
        self._forwards_lock = threading.Lock()
        self._heartbeat_lock = threading.Lock()  # no heartbeat leaves once go_offline has begun
        self.answered: deque[str] = deque(maxlen=handover.ANSWERED_KEPT)

    # -- presence ---------------------------------------------------------------------------------
    def go_online(self, first_heartbeat: Callable[[], dict[str, Any]] | None = None) -> None:
        """Publish ``online`` and wait for the ack, take asks addressed to us, publish the first
        heartbeat (``first_heartbeat()`` builds its body), then serve routed asks: the router
        argument in ``mesh.routing`` needs status and heartbeat accepted before the routed
        subscriptions (routers count only heartbeating nodes), and a client that sees the
        heartbeat may ask us at once."""
        self.bus.publish_wait(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)
        # Our own asks before the heartbeat: a client that waits for it may ask at once.
        self.bus.subscribe(topics.node_ask(self.name), self.on_node_ask, qos=1)
        self.bus.subscribe(topics.ALL_ASKER_STATUS, self.guard.on_asker_status, qos=1)
        if first_heartbeat is not None:
            self.publish_first_heartbeat(first_heartbeat())
        self.present = True
        self.bus.subscribe(topics.ROUTE, self.on_route, qos=1)
        self.bus.subscribe(topics.ASK, self.on_json_ask, qos=1)
        self.bus.subscribe(topics.ASK_TEXT, self.on_text_ask, qos=1)

    def announce(self) -> bool:
        """After a reconnect: the retained status may have been replaced by our will."""
        if self.stop_event.is_set() or not self.bus.connected.is_set():
            return False
        self.bus.publish(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)
        return True

    def go_offline(self) -> None:
        """Status ``offline``, and every queued ask refused. A heartbeat being sent finishes
        first and none is sent after (a live heartbeat would make the node online again)."""
        with self._heartbeat_lock:
            self.stop_event.set()
            self.present = False
        try:
            self.bus.publish_wait(topics.node_status(self.name), topics.OFFLINE, qos=1, retain=True, timeout=3.0)
        except MeshError as exc:
            log.warning("could not publish offline status: %s", exc)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            self.reply_error(job, "shutdown", f"{self.label} is shutting down")

    def status_changed(self, name: str, online: bool | None) -> None:
        if self.on_presence is not None and name != self.name:
            self.on_presence(name, online)
        if not online:
            self.rescue_orphans()

    def heard(self, name: str, body: dict[str, Any], retained: bool, fresh: bool) -> None:
        if fresh:
            with self.changed:
                self.pending.pop(name, None)
            with self._forwards_lock:
                self.forwards.answered(name, body.get("answered"))
        if self.on_peer_heartbeat is not None and name != self.name:
            self.on_peer_heartbeat(name, body, retained)

    # -- ask intake -------------------------------------------------------------------------------
    def open_ask(self, topic: str, payload: bytes) -> wire.Envelope | None:
        """The asker's envelope (``mesh.auth.senders.open_ask``), or None with the reason counted."""
        try:
            env = senders.open_ask(self.keys, payload, topic, self.max_message_bytes, JSON_SENDER)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            log.info("dropped ask on %s: %s", topic, exc)
            return None
        if env.kind is not wire.Kind.ASK:
            self.rejects.add("unexpected-kind")
            return None
        return env

    def on_node_ask(self, topic: str, payload: bytes, retained: bool) -> None:
        env = self.open_ask(topic, payload)
        if env is not None and not self.takes_asks:
            self.refuse(env)
            return
        if env is None or not self.valid_ask(env):
            return
        self.take(Job(env, time.monotonic(), json_reply=env.body.get("reply_format") == "json"))

    def refuse(self, env: wire.Envelope) -> None:
        """An ask that reached a process that answers none (routed by a router that did not know,
        or sent to it by name): counted, logged and answered with ``not-answering``."""
        self.rejects.add(NOT_ANSWERING)
        log.info("%s answers no asks: refused ask %s from %s", self.label, env.corr, env.sender)
        if env.reply_to is not None and topics.reply_allowed(env.reply_to):
            self.reply_error(Job(env, time.monotonic()), NOT_ANSWERING,
                             f"{self.label} answers no asks (it is a HALO worker only); ask the mesh, "
                             "or a node whose heartbeat lists the role 'answer'")

    def valid_ask(self, env: wire.Envelope) -> bool:
        """Count, and answer where a reply topic is usable, an ask that cannot be answered."""
        if env.reply_to is None or not topics.reply_allowed(env.reply_to):
            reason: str | None = "bad-reply-topic"
        else:
            reason = (wire.ask_problem(env, self.limits.max_prompt_chars, self.limits.max_new_tokens)
                      or budget.deadline_problem(env.body))
        if reason is None:
            return True
        self.rejects.add(reason)
        self.reply_error(Job(env, time.monotonic()), reason, f"ask rejected: {reason}")
        return False

    def seen_before(self, env: wire.Envelope, now: float) -> bool:
        """Whether this very ask came within the dedupe window (``mesh.dedupe``); remembers it."""
        return self.seen.seen_before(env, now)

    def take(self, job: Job) -> bool:
        """Queue an ask unless it repeats one already taken; a full queue answers ``busy``."""
        if self.seen_before(job.env, time.monotonic()):
            self.rejects.add("duplicate-ask")
            return False
        job.deadline = budget.deadline_at(job.received, job.env.body, self.ask_timeout_s)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.rejects.add("busy")
            self.reply_error(job, "busy", f"{self.label} is busy: {self.jobs.qsize()} asks queued")
            return False
        return True

    def queue_length(self) -> int:
        return self.jobs.qsize() + (1 if self.running else 0)

    # -- bounded work (mesh.askers) ---------------------------------------------------------------
    def checkpoint(self, job: Job) -> None:
        """Between two pieces of work: raise Cancelled (stopping) or budget.Abandoned."""
        self.guard.checkpoint(job.deadline, asker_of(job.env))

    def must_stop(self, job: Job) -> bool:
        """For a forward's ``stop`` hook (mesh.model.Decoder.prefill)."""
        return self.guard.must_stop(job.deadline, asker_of(job.env))

    # -- router duty ------------------------------------------------------------------------------
    def is_router(self) -> bool:
        """The smallest name among the live nodes (``mesh.routing.live``) and this one, if present."""
        with self.changed:
            names = {v.name for v in self.peers.live(time.monotonic())}
        if self.present:
            names.add(self.name)
        else:
            names.discard(self.name)
        return router_of(names) == self.name

    def on_route(self, topic: str, payload: bytes, retained: bool) -> None:
        if not self.is_router():
            return
        env = self.open_ask(topic, payload)
        if env is not None and self.valid_ask(env):
            self.route(env, payload if self.keys is not None else None)

    def on_text_ask(self, topic: str, payload: bytes, retained: bool) -> None:
        """A bare sentence (a Home Assistant ``text`` entity): answered as JSON on mesh/v1/answer."""
        if retained or not self.is_router():
            return
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        if not text or len(payload) > self.limits.max_json_ask_bytes:
            self.rejects.add("bad-text-ask")
            return
        self.on_json_ask(topics.ASK, json.dumps({"text": text}).encode(), False)

    def on_json_ask(self, topic: str, payload: bytes, retained: bool) -> None:
        if retained or not self.is_router():
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
        body: dict[str, Any] = {"text": ask.text, "max_new_tokens": ask.max_new_tokens, "reply_format": "json"}
        if ask.ask_id:
            body["ask_id"] = ask.ask_id
        if ask.deadline_s is not None:
            body["deadline_s"] = ask.deadline_s
        env = wire.Envelope(wire.Kind.ASK, JSON_SENDER, body, corr=ask.ask_id or uuid.uuid4().hex,
                            reply_to=reply_to)
        if self.valid_ask(env):
            self.route(env)

    def _candidates(self, model: str | None, exclude: str | None = None) -> list[NodeView]:
        with self.changed:  # live: a heartbeat accepted lately (none, refused or stale: no figures to trust)
            views = self.peers.live(time.monotonic())
        return [v for v in views
                if answers_asks(v.heartbeat, self.answer_role)
                and (model is None or not v.model or v.model == model) and v.name != exclude]

    def route(self, env: wire.Envelope, original: bytes | None = None, *, retry_of: str | None = None) -> None:
        """Forward an ask to the node :func:`pick` chooses, or answer ``no-node``. ``original``: the
        asker's sealed bytes, carried inside the sealed forward (``mesh.auth.senders.forward``);
        with keys, the asker also hears which node took its ask (a sealed ``ROUTED`` notice, sent
        before the forward, so it comes before the node's first reply). A JSON ask forwarded to
        another node is kept until that node says it answered (``mesh.handover``); ``retry_of``:
        the node that died holding it (this is its one retry, never sent there)."""
        model = env.body.get("model")
        model = model if isinstance(model, str) else None
        candidates = self._candidates(model, exclude=retry_of)
        depths = self.depths(env, [v.name for v in candidates]) if self.depths and candidates else {}
        with self.changed:
            target, reason = pick(candidates, depths, self.pending, self._last_assigned, model,
                                  self.route_threshold)
            if target is not None:
                self.pending[target] = self.pending.get(target, 0) + 1
                self._assign_seq += 1
                self._last_assigned[target] = self._assign_seq
        if target is None and self.answers_itself is not None and self.answers_itself(env):
            target, reason = self.name, "load"
        if target is None:
            self.rejects.add("no-node")
            self.reply_error(Job(env, time.monotonic()), "no-node",
                             "no node is online to answer" + (f" with model {model}" if model else ""))
            return
        if self.keys is not None and env.sender != JSON_SENDER and env.reply_to is not None:
            notice = senders.routed_notice(self.keys, env, target)
            self.bus.publish(env.reply_to, senders.encode(self.keys, notice, env.reply_to), qos=1)
        forwarded = senders.forward(self.keys, env, original, self.name, reason)
        topic = topics.node_ask(target)
        if env.sender == JSON_SENDER and target != self.name:  # kept before it can be answered
            now = time.monotonic()
            with self._forwards_lock:
                self.forwards.sent(env, target, budget.deadline_at(now, env.body, self.ask_timeout_s),
                                   retried=retry_of is not None)
        self.bus.publish(topic, senders.encode(self.keys, forwarded, topic, self.limits.max_message_bytes), qos=1)

    def rescue_orphans(self) -> None:
        """Route once more the JSON asks forwarded to a node that went offline or silent before
        its heartbeat said it answered them (review M9); on a status change and every heartbeat."""
        with self.changed:
            alive = {v.name for v in self.peers.live(time.monotonic())}
        if self.present:
            alive.add(self.name)
        with self._forwards_lock:
            orphans = self.forwards.orphans(alive, time.monotonic())
            self.forwards.retried += len(orphans)
        for f in orphans:
            log.warning("%s died holding Home Assistant ask %s: routing it once more", f.target, f.env.corr)
            try:
                self.route(f.env, retry_of=f.target)
            except MeshError as exc:
                log.warning("could not route ask %s again: %s", f.env.corr, exc)

    # -- replies ----------------------------------------------------------------------------------
    def reply(self, job: Job, kind: wire.Kind, body: dict[str, Any]) -> None:
        if job.env.reply_to is None:
            return
        env = wire.Envelope(kind, self.name, body, corr=job.env.corr)
        topic = job.env.reply_to
        self.bus.publish(topic, senders.encode(self.keys, env, topic, self.limits.max_message_bytes), qos=1)

    def reply_json(self, job: Job, body: dict[str, Any]) -> None:
        if job.env.reply_to is not None:
            self.bus.publish(job.env.reply_to, json.dumps(body).encode(), qos=1)

    def reply_error(self, job: Job, reason: str, message: str) -> None:
        """An error answer, where the ask carries a usable reply topic; never raises."""
        if job.env.reply_to is None or not topics.reply_allowed(job.env.reply_to):
            return
        try:
            if job.json_reply or job.env.body.get("reply_format") == "json":
                self.reply_json(job, {"error": reason, "message": message, "id": job.env.corr, "node": self.name})
            else:
                self.reply(job, wire.Kind.ERROR, {"reason": reason, "message": message})
        except MeshError as exc:
            log.warning("could not send error reply: %s", exc)

    # -- heartbeat --------------------------------------------------------------------------------
    def publish_heartbeat(self, body: dict[str, Any]) -> wire.Envelope:
        """One heartbeat (retained), numbered; raises MeshError when it could not be sent, or
        when this process is going offline."""
        # every node's heartbeat says its RSS, peak and memory limit (MiB), agent or coordinator
        self.rescue_orphans()  # the heartbeat's pace also finds nodes that went silent holding an ask
        extra = {"answered": list(self.answered)} if self.answered else {}
        env = wire.Envelope(wire.Kind.HEARTBEAT, self.name,
                            dict(body, seq=self.seq, **extra, **sysmem.heartbeat_fields()))
        topic = topics.node_heartbeat(self.name)
        with self._heartbeat_lock:
            if self.stop_event.is_set():
                raise MeshError(f"{self.label} is going offline: no heartbeat")
            self.bus.publish(topic, senders.encode(self.keys, env, topic),
                             qos=topics.HEARTBEAT.qos, retain=topics.HEARTBEAT.retain)
            self.seq += 1
        return env

    def publish_first_heartbeat(self, body: dict[str, Any]) -> None:
        """The heartbeat that makes this process live to routers (``mesh.routing.live``), sent
        before it serves asks; written to the broker before this returns (in order with what
        follows on this connection), or MeshError."""
        env = wire.Envelope(wire.Kind.HEARTBEAT, self.name, dict(body, seq=self.seq))
        topic = topics.node_heartbeat(self.name)
        self.bus.publish_wait(topic, senders.encode(self.keys, env, topic),
                              qos=topics.HEARTBEAT.qos, retain=topics.HEARTBEAT.retain)
        self.seq += 1

    # -- the work loop ----------------------------------------------------------------------------
    def work(self, answer: Callable[[Job], None], *, idle: Callable[[float], bool] | None = None,
             started: Callable[[float], None] | None = None,
             finished: Callable[[float, str], None] | None = None) -> None:
        """Answer queued asks one at a time until stopped (run it on its own thread).

        ``idle(since)`` runs when no ask came for a while and returns whether it did work;
        ``started(t0)`` and ``finished(t0, outcome)`` frame each ask (monotonic ``t0``; outcome
        ``answered``, ``abandoned`` (``mesh.budget``: deadline, asker gone, too long),
        ``cancelled`` or ``failed``).
        """
        bind_threads()
        idle_since = time.monotonic()
        while not self.stop_event.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                if idle is not None and idle(idle_since):
                    idle_since = time.monotonic()
                continue
            self.running = True
            t0 = time.monotonic()
            outcome = "failed"
            if started is not None:
                started(t0)
            try:
                self.checkpoint(job)  # a deadline may have passed while it queued
                answer(job)
                outcome = "answered"
            except budget.Abandoned as exc:
                outcome = "abandoned"
                self.rejects.add(exc.reason)
                log.info("ask %s abandoned: %s", job.env.corr, exc)
                self.reply_error(job, exc.reason, str(exc))
            except Cancelled:
                outcome = "cancelled"
                self.reply_error(job, "shutdown", f"{self.label} stopped while answering")
            except Exception as exc:  # a failed ask must not kill the loop
                log.exception("ask failed")
                self.reply_error(job, "internal", f"{type(exc).__name__}: {exc}")
            finally:
                if job.env.sender == JSON_SENDER:  # answered or refused: its router may forget it
                    self.answered.append(handover.ask_digest(job.env.corr))
                if finished is not None:
                    finished(t0, outcome)
                self.running = False
                idle_since = time.monotonic()
