"""Every message handler of a node, fed 10,000 random and mutated payloads on the topics it serves.

The decoders are fuzzed on their own in test_fuzz_decoders.py; here the whole handler runs, as
paho's network thread would run it: a real :class:`nodes.agent.NodeAgent` (connected to a real
amqtt broker, so its error replies and forwarded asks really go out), its reply inbox and link
probe, a HALO worker, a HALO coordinator with its engine, and the Home Assistant extension. The
model is a tiny random-weight one with SmolLM2's architecture and real tokenizer
(``tests.fuzz.fuzzkit``). The node's own loops (worker, heartbeat, KV serving) are not started: the
test plays those parts itself, so it can see what each payload left in their queues.

For every payload, exactly one of these must hold, else the test fails:

- *rejected*: one reason counter rises by one, as the heartbeat publishes it
  (``NodeAgent.heartbeat_body()["rejects"]``; the link probe's ``stale`` and the HALO worker's
  ``dropped`` are heartbeat figures too), and nothing was enqueued or changed;
- *accepted*: what the handler feeds (the ask queue, the router's forwards, the peer table, the
  peer catalogs, the KV-serving queue, a waiting requester, the HALO request or plan queue...)
  changed, no counter rose, and the payload is valid by the spec written out in this file, so no
  garbage is ever enqueued; what was enqueued is then consumed the way the node's loop does it
  (served, routed, planned...) and that must not raise either;
- *ignored* on purpose (the few no-op inputs each handler documents, e.g. an empty retained
  heartbeat that clears a decommissioned node): nothing counted, nothing changed.

An exception escaping a handler fails the test at once.

Handlers where fuzzing found a defect carry ``xfail(strict=True)`` with the bug and the fix; each
of them first replays the payload that shows it, so the expectation is deterministic.
"""

from __future__ import annotations

import queue
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mesh import topics, wire
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.mqtt.bus import MqttBus
from mesh.cache.catalog import Catalog
from mesh.config import NodeConfig
from mesh.errors import ProtocolError
from mesh.cache.quota import fetch_reply_ok
from mesh.model import Decoder, LoadedModel
from mesh.routing import choose_node
from mesh.halo.placement import Plan
from nodes.agent import NodeAgent
from mesh.cache.node_cache import NodeCache
from mesh.cache.peers import CatalogSync
from mesh.cache.transfer import PeerTransfer
from nodes.coordinator import Coordinator, CoordinatorConfig
from mesh.ha.extension import HomeAssistantExtension
from mesh.halo.engine import HaloEngine
from mesh.halo.worker import HaloWorker
from tests.fuzz import fuzzkit
from tests.conftest import Broker, require_model
from tests.fuzz.fuzzkit import cbor_payload, node_topic

EXAMPLES = 10_000  # payloads per handler
BATCH = 10  # payloads per hypothesis example: hypothesis costs ~1 ms an example here, a payload ~0.1 ms
NAME = "fuzznode"
Message = tuple[str, bytes, bool]  # topic, payload, retained
REASON = re.compile(r"^[a-z0-9][a-z0-9.-]{0,39}$")  # ProtocolError.reason: "a short stable token"


def fuzz_settings(shrink: bool) -> settings:
    phases = (Phase.explicit, Phase.generate, Phase.shrink) if shrink else (Phase.explicit, Phase.generate)
    return settings(max_examples=EXAMPLES // BATCH, deadline=None, suppress_health_check=list(HealthCheck),
                    database=None, phases=phases, report_multiple_bugs=False)


def _never(*_: Any) -> bool:
    return False


def _noop(*_: Any) -> None:
    return None


@dataclass
class Case:
    """One handler, the garbage it gets, and how to see what it did."""

    handler: Callable[[str, bytes, bool], None]
    messages: Callable[[fuzzkit.Rnd], Message]
    counted: Callable[[], dict[str, int]]  # reject counters as the heartbeat publishes them
    state: Callable[[], Any]  # what acceptance changes
    valid: Callable[[str, bytes, bool], bool]  # the spec: may this payload be accepted?
    prepare: Callable[[str, bytes], None] = _noop
    ignored: Callable[[str, bytes, bool], bool] = _never
    consume: Callable[[str, bytes], None] = _noop  # what the node's loop does with an accepted one
    known_bad: list[Message] = field(default_factory=list)  # replayed first: reproducers of bugs found
    reasons: int = 2  # distinct reject reasons the garbage must reach (a handler with one check: 1)


def run_case(case: Case, shrink: bool = True) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    def check(topic: str, payload: bytes, retained: bool) -> None:
        case.prepare(topic, payload)
        r0, s0 = case.counted(), case.state()
        case.handler(topic, payload, retained)  # anything it raises fails the test
        r1, s1 = case.counted(), case.state()
        rose = {k: v - r0.get(k, 0) for k, v in r1.items() if v != r0.get(k, 0)}
        changed = s1 != s0
        what = f"topic={topic!r} payload={payload[:200]!r} retained={retained}"
        if case.ignored(topic, payload, retained):
            assert not rose and not changed, f"a documented no-op input did something ({rose}): {what}"
            outcomes["ignored"] += 1
        elif changed:
            assert not rose, f"accepted and counted as rejected too ({rose}): {what}"
            assert case.valid(topic, payload, retained), f"garbage accepted: {what}"
            case.consume(topic, payload)
            outcomes["accepted"] += 1
        else:
            assert list(rose.values()) == [1], f"dropped without a counted reason ({rose}): {what}"
            reason = next(iter(rose))
            assert REASON.match(reason), f"reject reason {reason!r} is not a short stable token: {what}"
            outcomes[f"rejected:{reason}"] += 1

    for message in case.known_bad:
        check(*message)

    @fuzz_settings(shrink)
    @given(st.integers(0, 2 ** 64))
    def fuzz(seed: int) -> None:  # hypothesis reports the failing seed; the payload is in the message
        rnd = fuzzkit.Rnd(seed)
        for _ in range(BATCH):
            check(*case.messages(rnd))

    fuzz()
    return outcomes


# -- the spec of what a handler may accept --------------------------------------------------------

def decoded(payload: bytes, kind: wire.Kind, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> wire.Envelope | None:
    try:
        env = wire.decode(payload, max_bytes)
    except ProtocolError:
        return None
    return env if env.kind is kind else None


def valid_ask(payload: bytes, limits: Any) -> bool:
    env = decoded(payload, wire.Kind.ASK, limits.max_message_bytes)
    if env is None:
        return False
    b, stop = env.body, env.body.get("stop", [])
    return (env.reply_to is not None and topics.reply_allowed(env.reply_to)
            and 0 < len(b["text"]) <= limits.max_prompt_chars
            and 1 <= b["max_new_tokens"] <= limits.max_new_tokens
            and len(stop) <= 8 and all(isinstance(s, str) and len(s) <= 64 for s in stop))


def node_of(topic: str) -> str | None:
    parsed = topics.parse_node_topic(topic)
    return None if parsed is None else parsed[0]


# -- meaningful field values per kind (fuzzkit adds generic mutations around them) ---------------

R = fuzzkit.Rnd
cbor_value, choice, one_of, opt = fuzzkit.cbor_value, fuzzkit.choice, fuzzkit.one_of, fuzzkit.optional_fields


def texts(r: R) -> str:
    return fuzzkit.pick(r, fuzzkit.rtext, "", " ", "x" * 32_000, "x" * 32_001, "\x00", "é" * 40)


def numbers(r: R) -> Any:
    return fuzzkit.pick(r, choice([0, 1, -1, 1e308, 2 ** 1100, -(10 ** 400), 1e-300, 5e5, float("inf"),
                                   float("nan")]), lambda r: r.uniform(0, 1e6), cbor_value)


def stops(r: R) -> Any:
    if r.random() < 0.2:
        return cbor_value(r)
    return [fuzzkit.pick(r, fuzzkit.rtext, "x" * 65, cbor_value) for _ in range(r.randint(0, 10))]


ASK_FIELDS = {
    "text": texts, "max_new_tokens": one_of(lambda r: r.randint(-2, 1030), cbor_value), "stop": stops,
    "reply_format": choice(["json", "cbor", "", 1]), "ask_id": one_of(lambda r: r.randbytes(8).hex(), cbor_value),
    "model": choice(["tiny-smollm2", "other", 3]), "no_cache": one_of(choice([True, False]), cbor_value),
    "halo_sync": choice(["strict", "relaxed", "x", 1]),
    "halo_eval": one_of(lambda r: {"ids": [r.randint(-1, 50_000) for _ in range(r.randint(0, 6))],
                                   "start": r.randint(-1, 7)}, cbor_value),
}
CORRS = one_of(lambda r: r.randbytes(8).hex(), choice(["c0", "", None]), cbor_value)
SENDERS = choice(["fuzz", "w1", "peer1", "coordinator", NAME, ""])


def heartbeat_fields(model_key: str) -> fuzzkit.Gen:
    """Heartbeats that reach the planner and the cost model: a worker of our model, odd figures."""
    fields = {
        "seq": one_of(lambda r: r.randint(-3, 2 ** 70), cbor_value),
        "roles": one_of(choice([["answer", "worker"]]), cbor_value), "model_key": choice([model_key, "other"]),
        "queue": one_of(lambda r: r.randint(-5, 2 ** 80), cbor_value), "load": numbers,
        "halo": one_of(lambda r: {"group_size": r.choice([64, 32, "x"]), "compute_rows_per_s": numbers(r)},
                       cbor_value),
        "link": one_of(lambda r: {"rtt_ewma_ms": numbers(r), "late_fraction": numbers(r),
                                  "loss_fraction": numbers(r)}, cbor_value),
        "link_bw_Bps": numbers, "rtt_ms": numbers,
    }
    return lambda r: opt(r, fields)


def messages(topic: fuzzkit.Gen, payload: fuzzkit.Gen, retained: fuzzkit.Gen | None = None) -> fuzzkit.Gen:
    return lambda r: (topic(r), payload(r), r.random() < 0.3 if retained is None else retained(r))


def const(value: Any) -> fuzzkit.Gen:
    return lambda r: value


# -- the rig: real node parts on a real broker ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return fuzzkit.tiny_loaded(require_model("smollm2-135m"))


def tiny_plan(loaded: LoadedModel, epoch: int, worker: str = NAME) -> Plan:
    return Plan(epoch, loaded.model_key, 64, 2, {worker: ((0,), (1,))}, ((1,), (0,)))


class Rig:
    def __init__(self, broker: Broker, tiny: LoadedModel, home: Path) -> None:
        self.tiny = tiny
        cfg = NodeConfig(name=NAME, broker=broker.address, home=home)
        self.agent = agent = NodeAgent(cfg, loaded=tiny)
        # What NodeAgent.start sets up, without its loops: the test drains their queues itself.
        agent.decoder = Decoder(tiny)
        agent.cache = NodeCache(tiny, cfg.cache, agent.decoder)
        agent.catalogs = CatalogSync(agent.bus, agent.cache, NAME, stop=agent._stop, rejects=agent.rejects,
                                     max_message_bytes=agent.limits.max_message_bytes)
        agent.transfer = PeerTransfer(agent.bus, agent.inbox, NAME, agent.cache.serve, agent.cache.digest,
                                      kv_wire=cfg.cache.kv_wire, online=agent.member.peer_online, stop=agent._stop,
                                      rejects=agent.rejects, max_message_bytes=agent.limits.max_message_bytes)
        agent.bus.start(10.0)
        agent.member.present = True  # what Member.go_online sets: it counts itself online, and routes
        agent.member.on_status(topics.node_status(NAME), topics.ONLINE, True)
        # A running node hears its own retained heartbeat: the router knows which model it serves.
        agent.member.on_heartbeat(topics.node_heartbeat(NAME), wire.encode(wire.Envelope(
            wire.Kind.HEARTBEAT, NAME, agent.heartbeat_body())), True)
        assert agent.member.peers.get(NAME).model == tiny.key
        # A cached prompt, so KV fetches for real keys serve real chunks.
        self.prompt_ids = agent.decoder.encode("The mesh keeps the KV state of every prompt it computed. " * 4)
        agent.cache.prepare_local(self.prompt_ids)
        self.chunk_keys, self.prompt_key = agent.cache.keys(self.prompt_ids)
        assert agent.cache.store.get_chain(self.chunk_keys), "the cache holds the primed prompt"
        self.reply_corr, self.reply_queue = agent.inbox.open("c0")

        # The HALO worker role, with the weights of plan epoch 1 loaded (as its loader would).
        self.worker = w = HaloWorker()
        w.agent, w.name, w.model, w.model_key = agent, NAME, tiny.model, tiny.model_key
        w.layout = split.model_layout(tiny.model.config, w.group_size)
        w.n_layers = len(split.decoder_layers(tiny.model))
        plan = tiny_plan(tiny, 1)
        w._weights[1] = [split.extract_groups(tiny.model, layer, gs, w.layout)
                         for layer, gs in enumerate(plan.groups_for(NAME))]

        # The HALO coordinator and its engine, with a pending plan waiting for acks.
        ccfg = CoordinatorConfig(broker=broker.address, home=home, group_size=64)
        self.coord = c = Coordinator(ccfg)
        c.loaded, c.decoder, c.cache = tiny, Decoder(tiny), None
        c.engine = HaloEngine(tiny, c.decoder, ccfg, c.bus, c.reply_topic, c.rejects)
        c.engine.switch.propose(tiny_plan(tiny, 7, "w1"), time.monotonic())
        c.bus.start(10.0)
        c.member.present = True  # what Member.go_online sets
        c.member.on_status(topics.node_status("n1"), topics.ONLINE, True)  # an answering node to route to
        c.member.peers.set_heartbeat("n1", {"seq": 0, "model": "tiny-smollm2", "queue": 0, "load": 0.0,
                                     "roles": ["answer"]}, time.monotonic())
        self.ha = HomeAssistantExtension()
        self.ha.rejects = agent.rejects  # what HomeAssistantExtension.start does besides attaching

    def stop(self) -> None:
        self.agent.bus.stop()
        self.coord.bus.stop()

    # -- what the heartbeats publish ---------------------------------------------------------------
    def node_counted(self) -> dict[str, int]:
        """The counters the node's heartbeat publishes, read cheaply per payload; the test checks at
        the end that the heartbeat itself carries them (:meth:`node_heartbeat_counted`)."""
        counted = self.agent.rejects.snapshot()
        counted["link.stale"] = self.agent.link.stats.stale
        counted["halo.dropped"] = self.worker.dropped
        return counted

    def node_heartbeat_counted(self) -> dict[str, int]:
        """The same counters as the heartbeat body publishes them (NodeAgent.heartbeat_body, plus the
        link probe's snapshot and the HALO worker's fields its heartbeat loop adds)."""
        counted = dict(self.agent.heartbeat_body()["rejects"])
        counted["link.stale"] = self.agent.link.snapshot()["stale"]
        counted["halo.dropped"] = self.worker.heartbeat_fields()["halo"]["dropped"]
        return counted

    def coord_counted(self) -> dict[str, int]:
        return self.coord.rejects.snapshot()  # Coordinator._heartbeat publishes exactly this

    # -- the cases ---------------------------------------------------------------------------------
    def cases(self) -> dict[str, Case]:
        a, c, w, tiny = self.agent, self.coord, self.worker, self.tiny
        limits = a.limits
        ask_payloads = cbor_payload(wire.Kind.ASK, body_fields=lambda r: opt(r, ASK_FIELDS), corr=CORRS)
        ask_msgs = messages(const(topics.node_ask(NAME)), ask_payloads)
        route_msgs = messages(const(topics.ROUTE), ask_payloads)
        json_msgs = messages(const(topics.ASK), fuzzkit.json_ask)
        text_msgs = messages(const(topics.ASK_TEXT), fuzzkit.text_ask)
        status_msgs = messages(node_topic("status"), fuzzkit.status_payload)
        hb_payloads = one_of(*[cbor_payload(wire.Kind.HEARTBEAT, body_fields=heartbeat_fields(tiny.model_key),
                                            sender=SENDERS)] * 9, const(b""))
        hb_msgs = messages(node_topic("heartbeat"), hb_payloads)

        def pending_routes() -> int:
            return sum(a.member.pending.values())

        def clear_routes(*_: Any) -> None:
            a.member.pending.clear()

        def drain_jobs(*_: Any) -> None:
            job = a.member.jobs.get_nowait()
            assert job.env.reply_to is not None and topics.reply_allowed(job.env.reply_to)

        def json_valid(topic: str, payload: bytes, retained: bool) -> bool:
            try:
                ask = wire.decode_json_ask(payload, limits.max_json_ask_bytes, 64, limits.max_new_tokens)
            except ProtocolError:
                return False
            return len(ask.text) <= limits.max_prompt_chars and topics.reply_allowed(ask.reply_to or topics.ANSWER)

        def text_valid(topic: str, payload: bytes, retained: bool) -> bool:
            try:
                text = payload.decode("utf-8").strip()
            except UnicodeDecodeError:
                return False
            return bool(text) and len(payload) <= limits.max_json_ask_bytes and len(text) <= limits.max_prompt_chars

        # status: put the peer in the state a valid status would change
        focus: list[str | None] = [None]  # the peer the current payload is about

        def view_of(table: Any) -> Any:
            v = None if focus[0] is None else table.get(focus[0])
            return None if v is None else (v.online, v.seq, v.heartbeat)

        def status_prepare(topic: str, payload: bytes) -> None:
            focus[0] = name = node_of(topic)
            if name is not None:
                a.member.peers.set_status(name, payload != topics.ONLINE)

        def status_state() -> Any:
            return view_of(a.member.peers)

        def status_valid(topic: str, payload: bytes, retained: bool) -> bool:
            return node_of(topic) is not None and payload in (topics.ONLINE, topics.OFFLINE, b"")

        # heartbeat: an online peer we have not heard from, so a valid heartbeat is recorded
        def hb_prepare(topic: str, payload: bytes) -> None:
            focus[0] = name = node_of(topic)
            if name is not None:
                a.member.peers.forget(name)
                a.member.peers.set_status(name, True)

        def hb_state() -> Any:
            return view_of(a.member.peers)

        def hb_valid(topic: str, payload: bytes, retained: bool) -> bool:
            env = decoded(payload, wire.Kind.HEARTBEAT)
            return node_of(topic) is not None and env is not None

        def hb_consume(topic: str, payload: bytes) -> None:
            # What reads peer heartbeats: the cost model's links (every ask) and the router.
            a._peer_links()
            choose_node(a.member.peers.online(), a.member.pending, {})

        # catalogs
        sentinel = Catalog.from_keys(a.cache.digest, a.cache.chunk_size, [b"s" * 16], capacity=64)

        def cat_prepare(topic: str, payload: bytes) -> None:
            focus[0] = name = node_of(topic)
            if name is not None and name != NAME:
                a.cache.peers[name] = sentinel

        def cat_state() -> Any:
            return id(a.cache.peers.get(focus[0] or ""))

        def cat_valid(topic: str, payload: bytes, retained: bool) -> bool:
            if node_of(topic) is None:
                return False
            if payload == b"":
                return True
            env = decoded(payload, wire.Kind.CATALOG)
            try:
                return env is not None and Catalog.from_dict(dict(env.body)) is not None
            except ProtocolError:
                return False

        good_catalog = Catalog.from_keys(a.cache.digest, a.cache.chunk_size, self.chunk_keys, capacity=256).to_dict()
        cat_fields = {k: one_of(const(v), cbor_value) for k, v in good_catalog.items()}

        # KV fetches: real chunk keys, our prompt key and model digest, all codecs
        key = one_of(choice(self.chunk_keys), lambda r: r.randbytes(r.choice([15, 16, 17])), cbor_value)
        kv_fields = {
            "keys": one_of(*[lambda r: [key(r) for _ in range(r.randint(0, 8))]] * 6, const(list(self.chunk_keys)),
                           const(list(self.chunk_keys)), lambda r: [self.chunk_keys[0]] * 4097, cbor_value),
            "prompt_key": one_of(const(self.prompt_key), lambda r: fuzzkit.rbytes(r, 17), cbor_value),
            "codec": one_of(choice(["fp16", "int8", "fp32", "bogus", ""]), cbor_value),
            "model": one_of(const(a.cache.digest), lambda r: fuzzkit.rbytes(r, 17)),
        }

        def kv_valid(topic: str, payload: bytes, retained: bool) -> bool:
            env = decoded(payload, wire.Kind.KV_FETCH)
            return (env is not None and env.reply_to is not None and topics.reply_allowed(env.reply_to)
                    and env.body["model"] == a.cache.digest and fetch_reply_ok(env.sender, env.reply_to)
                    and len(env.body["keys"]) <= 4096
                    and all(isinstance(k, bytes) and len(k) == 16 for k in env.body["keys"]))

        def kv_consume(topic: str, payload: bytes) -> None:
            env = a.transfer.jobs.get_nowait()
            # PeerTransfer's serve loop, whose catch-all would only log: it must not need it.
            a.transfer.serve_one(env)

        # replies to the node's inbox: one requester waits on corr "c0"; the link probe takes pings
        reply_corrs = one_of(choice(["c0", "c1", "lp1", "lp99", "bw3", "lpx", "lp", "bw", "lp-1", None]), cbor_value)
        reply_msgs = messages(const(a.inbox.topic), one_of(*[cbor_payload(k, corr=reply_corrs) for k in (
            wire.Kind.TOKEN, wire.Kind.ANSWER, wire.Kind.ERROR, wire.Kind.PING, wire.Kind.KV_CHUNKS)]))

        def inbox_state() -> Any:
            return self.reply_queue.qsize(), a.link.stats.replies, a.link.stats.transfers

        def inbox_valid(topic: str, payload: bytes, retained: bool) -> bool:
            try:
                env = wire.decode(payload, limits.max_message_bytes)
            except ProtocolError:
                return False
            return env.corr == "c0" or (env.kind is wire.Kind.PING and str(env.corr)[:2] in ("lp", "bw"))

        def inbox_consume(topic: str, payload: bytes) -> None:
            while not self.reply_queue.empty():
                self.reply_queue.get_nowait()

        # HALO worker: the coordinator's MLP-input frames over the bus (the link down), and plans
        shapes = [(1, 1, 64)] * 4 + [(1, 3, 64), (1, 0, 64), (64,), (1, 1, 63), (1, 1, 65), (2, 2, 2, 64)]
        replies = [topics.halo_reply("coordinator")] * 4 + [topics.halo_link("x"), "mesh/v1/node/x/ask", "x"]

        def frame_payload(r: fuzzkit.Rnd) -> bytes:
            kind = r.choice([halo_wire.MLP] * 5 + [halo_wire.PARTIAL])
            x = torch.randn(*r.choice(shapes)).to(r.choice([torch.float16, torch.float32]))
            try:
                data = halo_wire.encode(kind, r.choice(["coordinator", "w1", "x" * 65]), r.choice([1, 1, 2]),
                                        r.randint(0, 2 ** 62), r.randint(0, 3), x,
                                        reply_to=r.choice(replies) if kind == halo_wire.MLP else "")
            except ProtocolError:
                return b"HALO" + r.randbytes(r.randint(0, 64))
            if r.random() < 0.3:  # one damaged byte
                at = r.randrange(len(data))
                data = data[:at] + bytes([r.randrange(256)]) + data[at + 1:]
            return data

        frame_msgs = messages(const(topics.node_mlp("coordinator")), frame_payload)

        def frame_prepare(topic: str, payload: bytes) -> None:
            w._requests.clear()  # each payload on its own (the compute loop serves the newest only)

        def frame_state() -> Any:
            return len(w._requests), w.served, w.skipped

        def frame_valid(topic: str, payload: bytes, retained: bool) -> bool:
            try:
                f = halo_wire.decode(payload, limits.max_message_bytes)
            except ProtocolError:
                return False
            return f.kind == halo_wire.MLP and 0 <= f.layer < w.n_layers and not retained

        def frame_consume(topic: str, payload: bytes) -> None:
            if w._requests:  # HaloWorker._compute_loop's body; its catch-all would only log
                w._serve_now(w._requests.pop())

        plan_dict = tiny_plan(tiny, 3).to_dict()
        plan_parts = {k: one_of(const(v), cbor_value) for k, v in plan_dict.items()}
        plan_fields = {"epoch": choice([3, 4, -1]),
                       "plan": one_of(const(plan_dict), lambda r: opt(r, plan_parts), cbor_value)}
        plan_msgs = messages(const(topics.HALO_PLAN), one_of(*[cbor_payload(
            wire.Kind.HALO_PLAN, body={"epoch": 3, "plan": plan_dict}, body_fields=lambda r: opt(r, plan_fields))] * 9,
            const(b"")))

        def plan_valid(topic: str, payload: bytes, retained: bool) -> bool:
            env = decoded(payload, wire.Kind.HALO_PLAN)
            if env is None:
                return False
            try:
                p = Plan.from_dict(env.body["plan"])
            except ProtocolError:
                return False
            return (p.epoch == env.body["epoch"] and p.model_key == tiny.model_key and p.group_size == 64
                    and p.n_groups == 2 and p.n_layers == w.n_layers)

        def plan_consume(topic: str, payload: bytes) -> None:
            w._plans.clear()

        # the coordinator's reply topic: plan acks from the workers of its plan (partials are frames)
        engine_msgs = messages(const(c.reply_topic), one_of(
            cbor_payload(wire.Kind.HALO_PLAN, body_fields=lambda r: opt(r, plan_fields), sender=SENDERS),
            *[cbor_payload(wire.Kind.HALO_ACK, body_fields=lambda r: {"epoch": r.choice([7, 6, 1])},
                           sender=SENDERS)] * 3))

        def engine_prepare(topic: str, payload: bytes) -> None:
            c.engine.switch.acks[7] = set()
            while not c.engine.step._partials.empty():
                c.engine.step._partials.get_nowait()

        def engine_state() -> Any:
            return c.engine.step._partials.qsize(), sorted(c.engine.switch.acks.get(7, ()))

        def engine_valid(topic: str, payload: bytes, retained: bool) -> bool:
            # Only what a worker of a known plan sends for a step the coordinator asked for (none
            # is outstanding here) or an ack of the pending epoch by a worker of that plan.
            env = decoded(payload, wire.Kind.HALO_ACK)
            return env is not None and env.sender == "w1" and env.body["epoch"] == 7

        # the coordinator's own handlers
        def coord_jobs_state() -> Any:
            return c.member.jobs.qsize()

        def coord_drain(*_: Any) -> None:
            c.member.jobs.get_nowait()

        def coord_routes() -> Any:
            return sum(c.member.pending.values())

        def coord_clear_routes(*_: Any) -> None:
            c.member.pending.clear()

        def coord_status_state() -> Any:
            return view_of(c.member.peers)

        def coord_status_prepare(topic: str, payload: bytes) -> None:
            focus[0] = name = node_of(topic)
            if name is not None:
                c.member.peers.set_status(name, payload != topics.ONLINE)

        def coord_hb_prepare(topic: str, payload: bytes) -> None:
            focus[0] = name = node_of(topic)
            if name is not None:
                c.member.peers.forget(name)
                c.member.peers.set_status(name, True)

        def coord_hb_state() -> Any:
            return view_of(c.member.peers)

        def coord_hb_consume(topic: str, payload: bytes) -> None:
            # Coordinator._plan_loop's body: re-plan from every peer's heartbeat figures.
            views = [(v.name, dict(v.heartbeat), v.online) for v in c.member.peers.all() if v.name != c.name]
            c.engine.replan(views, time.monotonic(), idle=True)

        def routed_ask_valid(topic: str, payload: bytes, retained: bool) -> bool:
            return valid_ask(payload, limits)

        return {
            "agent.node_ask": Case(a.member.on_node_ask, ask_msgs, self.node_counted, lambda: a.member.jobs.qsize(),
                                   lambda t, p, r: valid_ask(p, limits), consume=drain_jobs),
            "agent.route": Case(a.member.on_route, route_msgs, self.node_counted, pending_routes,
                                lambda t, p, r: valid_ask(p, limits), consume=clear_routes,
                                known_bad=[(topics.ROUTE, wire.encode(wire.Envelope(
                                    wire.Kind.ASK, "fuzz", {"text": "hi", "max_new_tokens": 4, "model": "other"},
                                    corr="m1", reply_to="mesh/v1/reply/fuzz")), False)]),
            "agent.json_ask": Case(a.member.on_json_ask, json_msgs, self.node_counted, pending_routes, json_valid,
                                   ignored=lambda t, p, r: r, consume=clear_routes),
            "agent.text_ask": Case(a.member.on_text_ask, text_msgs, self.node_counted, pending_routes, text_valid,
                                   ignored=lambda t, p, r: r, consume=clear_routes, reasons=1),
            "agent.status": Case(a.member.on_status, status_msgs, self.node_counted, status_state, status_valid,
                                 prepare=status_prepare, reasons=1),
            "agent.heartbeat": Case(a.member.on_heartbeat, hb_msgs, self.node_counted, hb_state, hb_valid,
                                    prepare=hb_prepare, consume=hb_consume,
                                    ignored=lambda t, p, r: p == b"" and node_of(t) is not None,
                                    known_bad=[(topics.node_heartbeat("peer1"), fuzzkit.dumps(fuzzkit.envelope_dict(
                                        wire.Kind.HEARTBEAT, {**fuzzkit.valid_bodies()[wire.Kind.HEARTBEAT],
                                                              "link_bw_Bps": 2 ** 1100})), True)]),
            "agent.catalog": Case(a.catalogs.handle, messages(node_topic("catalog"), one_of(*[cbor_payload(
                                      wire.Kind.CATALOG, body=good_catalog, body_fields=lambda r: opt(r, cat_fields),
                                      sender=SENDERS)] * 9, const(b""))),
                                  self.node_counted, cat_state, cat_valid, prepare=cat_prepare,
                                  ignored=lambda t, p, r: node_of(t) == NAME),
            "agent.kv_fetch": Case(a.transfer.handle, messages(const(topics.node_kv(NAME)), cbor_payload(
                                       wire.Kind.KV_FETCH, body_fields=lambda r: opt(r, kv_fields), corr=CORRS)),
                                   self.node_counted, lambda: a.transfer.jobs.qsize(), kv_valid, consume=kv_consume),
            "inbox+link": Case(a.inbox._handle, reply_msgs, self.node_counted, inbox_state, inbox_valid,
                               consume=inbox_consume),
            "halo_worker.frame": Case(w._on_frame, frame_msgs, self.node_counted, frame_state, frame_valid,
                                      prepare=frame_prepare, consume=frame_consume),
            "halo_worker.plan": Case(w._on_plan, plan_msgs, self.node_counted, lambda: len(w._plans), plan_valid,
                                     ignored=lambda t, p, r: p == b"", consume=plan_consume),
            "halo_engine.reply": Case(c.engine.on_reply, engine_msgs, self.coord_counted, engine_state,
                                      engine_valid, prepare=engine_prepare, known_bad=[
                                          (c.reply_topic, wire.encode(wire.Envelope(
                                              wire.Kind.HALO_PLAN, "stranger",
                                              {"epoch": 7, "plan": {}})), False),
                                          (c.reply_topic, wire.encode(wire.Envelope(
                                              wire.Kind.HALO_ACK, "w1", {"epoch": 6})), False)]),
            "coordinator.status": Case(c.member.on_status, status_msgs, self.coord_counted, coord_status_state,
                                       status_valid, prepare=coord_status_prepare,
                                       known_bad=[(topics.node_status("peer1"), b"garbage", False)]),
            "coordinator.heartbeat": Case(c.member.on_heartbeat, hb_msgs, self.coord_counted, coord_hb_state, hb_valid,
                                          prepare=coord_hb_prepare, consume=coord_hb_consume,
                                          ignored=lambda t, p, r: p == b"" and node_of(t) is not None,
                                          known_bad=[(f"{topics.ROOT}/node/bad.name/heartbeat", b"\xa0", True)]),
            "coordinator.ask": Case(c.member.on_node_ask, messages(const(topics.node_ask(c.name)), ask_payloads),
                                    self.coord_counted, coord_jobs_state, lambda t, p, r: valid_ask(p, limits),
                                    consume=coord_drain, known_bad=[(topics.node_ask(c.name), wire.encode(
                                        wire.Envelope(wire.Kind.ASK, "fuzz", {"text": "hi", "max_new_tokens": 4,
                                                                             "stop": [1]},
                                                      corr="k1", reply_to="mesh/v1/reply/fuzz")), False)]),
            "coordinator.route": Case(c.member.on_route, route_msgs, self.coord_counted, coord_routes, routed_ask_valid,
                                      consume=coord_clear_routes, known_bad=[(topics.ROUTE, wire.encode(
                                          wire.Envelope(wire.Kind.ASK, "fuzz", {"text": "", "max_new_tokens": 0})),
                                          False)]),
            "coordinator.json_ask": Case(c.member.on_json_ask, json_msgs, self.coord_counted, coord_routes, json_valid,
                                         ignored=lambda t, p, r: r, consume=coord_clear_routes),
            "coordinator.text_ask": Case(c.member.on_text_ask, text_msgs, self.coord_counted, coord_routes, text_valid,
                                         ignored=lambda t, p, r: r, consume=coord_clear_routes, reasons=1),
            "ha.birth": Case(self.ha._on_birth, messages(const("homeassistant/status"), fuzzkit.status_payload),
                             self.node_counted, lambda: self.ha._wanted.is_set(),
                             lambda t, p, r: not r and p.strip() == b"online",
                             ignored=lambda t, p, r: p.strip() == b"offline" or (r and p.strip() == b"online"),
                             consume=lambda t, p: self.ha._wanted.clear(), reasons=1),
        }


@pytest.fixture
def rig(amqtt_broker: Broker, tiny: LoadedModel, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(amqtt_broker, tiny, tmp_path)
    yield r
    r.stop()


# Defects found by this fuzzing: the bug and the fix are in each reason (and in the report).
KNOWN_BUGS: dict[str, str] = {}  # none open; a defect found goes here with its bug and fix


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[n])) if n in KNOWN_BUGS else n
    for n in ["agent.node_ask", "agent.route", "agent.json_ask", "agent.text_ask", "agent.status", "agent.heartbeat",
              "agent.catalog", "agent.kv_fetch", "inbox+link", "halo_worker.frame", "halo_worker.plan",
              "halo_engine.reply", "coordinator.status", "coordinator.heartbeat", "coordinator.ask",
              "coordinator.route", "coordinator.json_ask", "coordinator.text_ask", "ha.birth"]])
def test_handler_rejects_garbage_with_a_counted_reason(rig: Rig, name: str, amqtt_broker: Broker) -> None:
    t0 = time.monotonic()
    case = rig.cases()[name]
    outcomes = run_case(case, shrink=name not in KNOWN_BUGS)
    print(f"{name}: {sum(outcomes.values())} payloads in {time.monotonic() - t0:.1f} s: {dict(outcomes)}")
    assert sum(outcomes.values()) >= EXAMPLES
    rejected = {k for k in outcomes if k.startswith("rejected:")}
    # The garbage reached the handler's own checks, not only the CBOR decoder.
    assert len(rejected) >= case.reasons and outcomes["accepted"] >= 20, outcomes
    if case.counted == rig.coord_counted:  # the coordinator's handlers and its HALO engine
        check_published_heartbeat(rig, amqtt_broker)
    else:
        published = rig.node_heartbeat_counted()
        assert published == rig.node_counted()
        for reason in rejected:  # every reason seen is in the heartbeat, with at least that count
            assert published.get(reason.removeprefix("rejected:"), 0) >= outcomes[reason], (reason, published)


@pytest.mark.parametrize(("name", "kind", "topic"), [
    ("agent.heartbeat", wire.Kind.HEARTBEAT, topics.node_heartbeat("peer1")),
    ("agent.node_ask", wire.Kind.ASK, topics.node_ask(NAME)),
    ("agent.kv_fetch", wire.Kind.KV_FETCH, topics.node_kv(NAME)),
    ("coordinator.heartbeat", wire.Kind.HEARTBEAT, topics.node_heartbeat("peer1")),
    ("coordinator.ask", wire.Kind.ASK, topics.node_ask("coordinator")),
], ids=lambda v: v if isinstance(v, str) and "/" not in v else None)
def test_handler_caps_are_exact(rig: Rig, name: str, kind: wire.Kind, topic: str) -> None:
    """Through the real handler: an envelope exactly at its kind's byte cap, and exactly at its
    item budget, is accepted; one byte or one item more is refused and counted once."""
    case = rig.cases()[name]
    cap = wire.KIND_CAPS[kind]
    body = dict(fuzzkit.valid_bodies()[kind])
    if kind is wire.Kind.KV_FETCH:  # a fetch for another model is refused by meaning, not by size
        body["model"] = rig.agent.cache.digest
    n = 0

    def env() -> dict[str, Any]:
        nonlocal n
        n += 1  # a fresh correlation id each time: asks are deduplicated by it
        return {"sender": "peer1", "corr": f"exact-{time.monotonic_ns()}-{n}", "reply_to": topics.reply("node-peer1")}  # a KV fetch is answered only to the requester's inbox

    for payload, want in ((fuzzkit.of_size(kind, cap.bytes, body, **env()), None),
                          (fuzzkit.of_size(kind, cap.bytes + 1, body, **env()), "oversized"),
                          (fuzzkit.of_items(kind, cap.items, body, **env()), None),
                          (fuzzkit.of_items(kind, cap.items + 1, body, **env()), "too-many-items")):
        case.prepare(topic, payload)
        r0, s0 = case.counted(), case.state()
        case.handler(topic, payload, False)
        r1, s1 = case.counted(), case.state()
        rose = {k: v - r0.get(k, 0) for k, v in r1.items() if v != r0.get(k, 0)}
        if want is None:
            assert not rose and s1 != s0 and case.valid(topic, payload, False), (len(payload), rose)
            case.consume(topic, payload)
        else:
            assert rose == {want: 1} and s1 == s0, (len(payload), rose)


def check_published_heartbeat(rig: Rig, broker: Broker) -> None:
    """The coordinator builds its heartbeat inline (no heartbeat_body()), so read the counters it
    published through the real broker: they are the ones the fuzz case saw."""
    c = rig.coord
    counted = c.rejects.snapshot()
    seen: queue.Queue[dict[str, Any]] = queue.Queue()
    bus = MqttBus(f"fuzz-hb-{time.monotonic_ns()}", broker.address)
    # Every heartbeat on the topic (an earlier test's retained one comes first), decoded as a peer would.
    bus.subscribe(topics.node_heartbeat(c.name), lambda t, p, r: seen.put(dict(wire.decode(p).body)), qos=0)
    bus.start(10.0)
    try:
        c._heartbeat()
        deadline = time.monotonic() + 10.0
        while True:
            body = seen.get(timeout=max(deadline - time.monotonic(), 0.01))
            if body.get("rejects") == counted:
                break
    finally:
        bus.stop()


def test_a_forged_halo_frame_does_not_silence_the_worker(rig: Rig) -> None:
    w = rig.worker
    x = torch.randn(1, 3, 64).half()  # a prefill step's input: queued for the compute thread

    def frame(step: int) -> bytes:
        return halo_wire.encode(halo_wire.MLP, "coordinator", 1, step, 0, x, reply_to=topics.halo_reply("coordinator"))

    w._on_frame(topics.node_mlp("coordinator"), frame(2 ** 62), False)
    w._requests.clear()  # whatever became of the forged one
    real_step = time.time_ns() // 1000  # how the coordinator numbers its steps
    w._on_frame(topics.node_mlp("coordinator"), frame(real_step), False)
    assert [f.step for f in w._requests] == [real_step]
    assert w._newest["coordinator"] == real_step  # not overtaken: the compute thread serves it
