"""Who may send what on the ask path (mesh.auth.senders), and the membership core that uses it.

In memory, no broker: the real-broker attack (a rogue answering a routed CLI ask first, review
experiment E3) is tests/system/test_attack_forged_answer.py.
"""

from __future__ import annotations

import time
from typing import Any


from mesh import dedupe, topics, wire
from mesh.auth import senders
from mesh.auth.certs import CertificateAuthority
from mesh.config import Limits
from tests.auth.kit import reason, ring
from mesh.errors import ProtocolError
from mesh.member import JSON_SENDER, Member, asker_of
from mesh.mqtt.inbox import ReplyInbox

INBOX = topics.reply("cli-run1")
MAX = wire.DEFAULT_MAX_BYTES




def ask_env(sender: str = "asker", text: str = "hi", corr: str = "c1", reply_to: str = INBOX,
            **body: Any) -> wire.Envelope:
    return wire.Envelope(wire.Kind.ASK, sender, {"text": text, "max_new_tokens": 2, **body}, corr=corr,
                         reply_to=reply_to)


def test_an_asker_seals_its_ask_and_a_keyed_node_refuses_plain_ones(ca: CertificateAuthority) -> None:
    asker, node = ring(ca, "asker", "asker"), ring(ca, "n1")
    topic = topics.node_ask("n1")
    env = senders.open_ask(node, senders.encode(asker, ask_env(), topic), topic, MAX, JSON_SENDER)
    assert (env.sender, env.corr, env.reply_to, env.body["text"]) == ("asker", "c1", INBOX, "hi")
    assert reason(senders.open_ask, node, wire.encode(ask_env()), topic, MAX, JSON_SENDER) == "unauthenticated"
    # a node's own ask that it did not route (a rogue holding a node key) is not an ask
    rogue = ring(ca, "zzz")
    forged = senders.encode(rogue, ask_env("zzz"), topic)
    assert reason(senders.open_ask, node, forged, topic, MAX, JSON_SENDER) == "wrong-role"
    # sealed for another topic: not re-postable
    other = senders.encode(asker, ask_env(), topics.node_ask("n2"))
    assert reason(senders.open_ask, node, other, topic, MAX, JSON_SENDER) == "bad-signature"


def test_a_forward_carries_the_askers_seal_and_nothing_else_passes(ca: CertificateAuthority) -> None:
    asker, router, target, rogue = ring(ca, "asker", "asker"), ring(ca, "n1"), ring(ca, "n2"), ring(ca, "zzz")
    original_env = ask_env(ask_id="a1")
    original = senders.encode(asker, original_env, topics.ROUTE)
    topic = topics.node_ask("n2")
    fwd = senders.forward(router, original_env, original, "n1", "load")
    env = senders.open_ask(target, senders.encode(router, fwd, topic), topic, MAX, JSON_SENDER)
    assert env.sender == "asker" and env.body["routed_by"] == "n1" and env.body["routed_reason"] == "load"
    assert senders.ASKED not in env.body and senders.ASKER not in env.body
    # the target's dedupe sees the asker's own ask, whoever forwarded it (two routers overlapping)
    assert dedupe.ask_identity(env) == dedupe.ask_identity(original_env)
    # a node that read mesh/v1/route may copy the seal, never change what was asked or where it goes
    copied = senders.forward(rogue, ask_env(text="FORGED", ask_id="a1"), original, "zzz", "load")
    env = senders.open_ask(target, senders.encode(rogue, copied, topic), topic, MAX, JSON_SENDER)
    assert env.body["text"] == "hi"  # what is asked comes from the asker's seal, not the forward
    for changed in (ask_env(reply_to=topics.reply("victim"), ask_id="a1"), ask_env(corr="c2", ask_id="a1")):
        bad = senders.forward(rogue, changed, original, "zzz", "load")
        assert reason(senders.open_ask, target, senders.encode(rogue, bad, topic), topic, MAX,
                      JSON_SENDER) == "forged-forward"
    no_seal = senders.forward(rogue, ask_env(text="FORGED"), None, "zzz", "load")
    assert reason(senders.open_ask, target, senders.encode(rogue, no_seal, topic), topic, MAX,
                  JSON_SENDER) == "unauthenticated"
    # a node's seal where the asker's belongs
    inner = senders.encode(rogue, ask_env("zzz"), topics.ROUTE)
    bad = senders.forward(rogue, ask_env("zzz"), inner, "zzz", "load")
    assert reason(senders.open_ask, target, senders.encode(rogue, bad, topic), topic, MAX, JSON_SENDER) == "wrong-role"
    # a Home Assistant ask has no seal: forwarded as JSON it stays
    ha = ask_env(JSON_SENDER, reply_to="homeassistant-mesh/x", reply_format="json")
    env = senders.open_ask(target, senders.encode(router, senders.forward(router, ha, None, "n1", "load"), topic),
                           topic, MAX, JSON_SENDER)
    assert env.sender == JSON_SENDER and env.body["reply_format"] == "json"


def test_a_keyless_process_reads_keyed_messages_at_their_word(ca: CertificateAuthority) -> None:
    asker, router = ring(ca, "asker", "asker"), ring(ca, "n1")
    original = senders.encode(asker, ask_env(), topics.ROUTE)
    fwd = senders.encode(router, senders.forward(router, ask_env(), original, "n1", "cache"), topics.node_ask("n2"))
    env = senders.open_ask(None, fwd, topics.node_ask("n2"), MAX, JSON_SENDER)
    assert env.sender == "asker" and env.body["routed_reason"] == "cache" and senders.ASKED not in env.body
    plain = senders.forward(None, ask_env("cli-x"), None, "n1", "load")
    assert plain.sender == "cli-x" and senders.ASKER not in plain.body


def test_the_asker_is_the_run_that_owns_the_inbox() -> None:
    assert asker_of(ask_env("asker", reply_to=topics.reply("cli-abc"))) == "cli-abc"
    assert asker_of(ask_env(JSON_SENDER, reply_to=topics.reply("cli-abc"))) == JSON_SENDER
    assert asker_of(ask_env("bob", reply_to="homeassistant-mesh/x")) == "bob"


def reply(kind: wire.Kind, sender: str, **body: Any) -> wire.Envelope:
    return wire.Envelope(kind, sender, body, corr="c1")


def test_a_gate_takes_replies_only_from_the_node_the_router_names() -> None:
    router = ["n1"]
    gate = senders.ReplyGate(None, True, lambda: router[0])
    forged = reply(wire.Kind.ANSWER, "zzz", text="FORGED")
    assert gate.take(forged) == []
    assert gate.take(reply(wire.Kind.ROUTED, "zzz", node="zzz")) == []  # not the router's word
    early = reply(wire.Kind.TOKEN, "n2", i=0, text="a")
    assert gate.take(early) == []  # held: the notice may come late
    assert gate.take(reply(wire.Kind.ROUTED, "n1", node="n2")) == [early]
    answer = reply(wire.Kind.ANSWER, "n2", text="a")
    assert gate.take(answer) == [answer]
    assert gate.take(forged) == []
    assert gate.unvouched() == 3  # two forged answers and the forged notice
    error = reply(wire.Kind.ERROR, "n1", reason="no-node", message="m")
    assert senders.ReplyGate(None, True, lambda: "n1").take(error) == [error]  # the router's own refusal


def test_a_notice_waits_until_the_askers_view_of_the_router_catches_up() -> None:
    """A dead node known only from a retained heartbeat is live to a new asker for one staleness
    window; the real router's notice is held, not refused, and taken once the asker agrees."""
    router = ["a1"]  # the ghost, smaller than the real router
    gate = senders.ReplyGate(None, True, lambda: router[0])
    notice = reply(wire.Kind.ROUTED, "gnode", node="gnode")
    answer = reply(wire.Kind.ANSWER, "gnode", text="a")
    assert gate.take(notice) == [] and gate.take(answer) == [] and gate.recheck() == []
    router[0] = "gnode"  # a1 went stale in the asker's view
    assert gate.recheck() == [answer] and gate.unvouched() == 0


def test_a_gate_for_an_ask_to_one_node_and_without_keys() -> None:
    gate = senders.ReplyGate("n2", True, lambda: "n1")
    ok = reply(wire.Kind.TOKEN, "n2", i=0, text="a")
    assert gate.take(ok) == [ok]
    assert gate.take(reply(wire.Kind.ROUTED, "n1", node="zzz")) == []
    assert gate.take(reply(wire.Kind.ERROR, "n1", reason="x", message="m")) == []
    assert gate.unvouched() == 2
    open_gate = senders.ReplyGate(None, False, lambda: "n1")
    forged = reply(wire.Kind.ANSWER, "zzz", text="FORGED")
    assert open_gate.take(forged) == [forged]  # as before identities
    assert open_gate.take(reply(wire.Kind.ROUTED, "n1", node="n2")) == []


class Bus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.handlers: dict[str, Any] = {}

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def publish_wait(self, topic: str, payload: bytes, **_: Any) -> None:
        self.sent.append((topic, payload))

    def subscribe(self, topic: str, handler: Any, qos: int = 0) -> None:
        self.handlers[topic] = handler


def test_members_route_answer_and_an_inbox_checks_it(ca: CertificateAuthority) -> None:
    """A keyed router forwards a sealed CLI ask to a keyed target, whose sealed answer the CLI's
    inbox opens; a rogue's plain answer and one in another node's name are refused and counted."""
    keys = {n: ring(ca, n) for n in ("n1", "n2")}
    asker = ring(ca, "asker", "asker")
    buses = {n: Bus() for n in keys}
    members = {n: Member(n, buses[n], Limits(), wire.RejectCounter(), keyring=keys[n])  # type: ignore[arg-type]
               for n in keys}
    router = members["n1"]
    router.present = True
    now = time.monotonic()
    with router.changed:
        for n in keys:
            router.peers.set_status(n, True)
            router.peers.set_heartbeat(n, {"seq": 1, "model": "m", "queue": 0 if n == "n2" else 5}, now)
    sealed = senders.encode(asker, ask_env(), topics.ROUTE)
    router.on_route(topics.ROUTE, sealed, False)
    assert router.rejects.snapshot() == {}
    (t1, notice), (t2, fwd) = buses["n1"].sent
    assert t1 == INBOX and t2 == topics.node_ask("n2")
    target = members["n2"]
    target.on_node_ask(t2, fwd, False)
    job = target.jobs.get_nowait()
    assert job.env.sender == "asker" and job.env.body["routed_by"] == "n1"
    target.reply(job, wire.Kind.ANSWER, {"text": "Paris", "node": "n2", "prompt_tokens": 1, "new_tokens": 1,
                                         "ttft_s": 0.1, "ttlt_s": 0.1})
    inbox_bus, rejects = Bus(), wire.RejectCounter()
    inbox = ReplyInbox(inbox_bus, "cli-run1", rejects, keyring=asker)  # type: ignore[arg-type]
    _, q = inbox.open("c1")
    inbox._handle(INBOX, notice, False)
    inbox._handle(INBOX, buses["n2"].sent[-1][1], False)
    plain = wire.encode(reply(wire.Kind.ANSWER, "n2", text="FORGED", node="n2", prompt_tokens=1, new_tokens=1,
                              ttft_s=0.0, ttlt_s=0.0))
    inbox._handle(INBOX, plain, False)
    inbox._handle(INBOX, keys["n1"].seal(wire.encode(reply(wire.Kind.TOKEN, "n2", i=0, text="x")), INBOX), False)
    got = [q.get_nowait() for _ in range(q.qsize())]
    assert [(e.kind, e.sender) for e in got] == [(wire.Kind.ROUTED, "n1"), (wire.Kind.ANSWER, "n2")]
    assert rejects.snapshot() == {"unauthenticated": 1, "name-mismatch": 1}
    gate = senders.ReplyGate(None, True, lambda: "n1")
    assert [e.body["text"] for g in got for e in gate.take(g)] == ["Paris"]
    # a plain ask on the routed topic is refused by a keyed router, and answered by no one
    router.on_route(topics.ROUTE, wire.encode(ask_env(corr="c9")), False)
    assert router.rejects.snapshot() == {"unauthenticated": 1} and len(buses["n1"].sent) == 2


# -- heartbeats and catalogs: only their node's ---------------------------------------------------

def beat(sender: str, seq: int, queue: int) -> wire.Envelope:
    return wire.Envelope(wire.Kind.HEARTBEAT, sender, {"seq": seq, "model": "m", "model_key": "k", "queue": queue,
                                                        "load": 0.0, "prefill_tps": 1.0})


def test_a_forged_heartbeat_does_not_change_a_nodes_view(ca: CertificateAuthority) -> None:
    keys = {n: ring(ca, n) for n in ("n1", "n2", "zzz")}
    receiver = Member("n1", Bus(), Limits(), wire.RejectCounter(), keyring=keys["n1"])  # type: ignore[arg-type]
    topic = topics.node_heartbeat("n2")
    receiver.on_heartbeat(topic, senders.encode(keys["n2"], beat("n2", 1, 0), topic), False)
    view = receiver.peers.get("n2")
    assert view is not None and (view.seq, view.queue) == (1, 0)
    forgeries = [wire.encode(beat("n2", 99, 7)),  # no key
                 keys["zzz"].seal(wire.encode(beat("n2", 99, 7)), topic),  # another key, n2's name
                 senders.encode(keys["zzz"], beat("zzz", 99, 7), topic),  # another key, its own name
                 senders.encode(keys["n2"], beat("n2", 99, 7), topics.node_heartbeat("n3"))]  # sealed for another topic
    for payload in forgeries:
        receiver.on_heartbeat(topic, payload, False)
        receiver.on_heartbeat(topic, payload, True)  # retained: no replay guard, the same checks
    view = receiver.peers.get("n2")
    assert view is not None and (view.seq, view.queue) == (1, 0)
    assert receiver.rejects.snapshot() == {"unauthenticated": 2, "name-mismatch": 4, "bad-signature": 2}
    # a replay of n2's own heartbeat is refused too (live; a retained copy is the broker's own)
    first = senders.encode(keys["n2"], beat("n2", 2, 1), topic)
    receiver.on_heartbeat(topic, first, False)
    receiver.on_heartbeat(topic, first, False)
    assert receiver.rejects.snapshot()["replayed"] == 1 and receiver.peers.get("n2").seq == 2  # type: ignore[union-attr]
    # a keyless process reads a sealed heartbeat at its word
    keyless = Member("n4", Bus(), Limits(), wire.RejectCounter())  # type: ignore[arg-type]
    keyless.on_heartbeat(topic, first, False)
    assert keyless.peers.get("n2").queue == 1  # type: ignore[union-attr]


class Peers:
    def __init__(self) -> None:
        self.catalogs: dict[str, Any] = {}

    def set_peer_catalog(self, name: str, catalog: Any) -> None:
        self.catalogs[name] = catalog


def test_a_catalog_counts_only_sealed_by_its_node(ca: CertificateAuthority) -> None:
    import threading

    from mesh.cache.peers import CatalogSync

    keys = {n: ring(ca, n) for n in ("n1", "n2", "zzz")}
    peers, bus = Peers(), Bus()
    sync = CatalogSync(bus, peers, "n1", stop=threading.Event(), rejects=wire.RejectCounter(),  # type: ignore[arg-type]
                       max_message_bytes=MAX, keyring=keys["n1"])
    topic = topics.node_catalog("n2")
    body = {"v": 1, "model": b"m" * 16, "chunk": 16, "epoch": 1, "n": 1, "m": 64, "k": 2, "bits": bytes(8)}
    forged = wire.Envelope(wire.Kind.CATALOG, "n2", body)
    sync.handle(topic, wire.encode(forged), True)
    sync.handle(topic, keys["zzz"].seal(wire.encode(forged), topic), True)
    assert peers.catalogs == {} and sync.rejects.snapshot() == {"unauthenticated": 1, "name-mismatch": 1}
    sync.handle(topic, senders.encode(keys["n2"], forged, topic), True)
    assert peers.catalogs["n2"]["epoch"] == 1


# -- KV fetches and parts: between nodes, from the peer asked --------------------------------------

def test_kv_fetches_and_parts_are_sealed_between_nodes(ca: CertificateAuthority) -> None:
    import queue
    import threading

    from mesh.cache.transfer import PeerTransfer

    keys = {n: ring(ca, n) for n in ("n1", "n2", "zzz")}
    asker = ring(ca, "asker", "asker")
    model = b"m" * 16
    served: list[list[bytes]] = []

    def serve(ks: list[bytes], pkey: bytes | None, codec_name: str, max_bytes: int) -> Any:
        served.append(ks)
        yield {"chunks": [], "part": 0, "last": True}

    def transfer(name: str, bus: Bus) -> PeerTransfer:
        inbox = ReplyInbox(bus, f"node-{name}", wire.RejectCounter(), keyring=keys[name])  # type: ignore[arg-type]
        return PeerTransfer(bus, inbox, name, serve, model, kv_wire="fp16", online=lambda _: True,
                            stop=threading.Event(), rejects=wire.RejectCounter(), max_message_bytes=MAX,
                            keyring=keys[name])

    b1, b2 = Bus(), Bus()
    t1, t2 = transfer("n1", b1), transfer("n2", b2)
    replies = t1.fetch("n2", [b"k" * 16], None, 5.0)
    topic, fetch = b1.sent[-1]
    assert topic == topics.node_kv("n2")
    t2.handle(topic, fetch, False)
    t2.serve_one(t2.jobs.get_nowait())
    assert served == [[b"k" * 16]] and t2.rejects.snapshot() == {}
    reply_topic, part = b2.sent[-1]
    assert reply_topic == topics.reply("node-n1")
    # the parts n1's inbox takes: n2's, sealed; not a plain one, nor one sealed by another node
    plain = wire.encode(wire.Envelope(wire.Kind.KV_CHUNKS, "n2", {"chunks": [], "part": 0, "last": True},
                                      corr=replies.corr))
    t1.inbox._handle(reply_topic, plain, False)
    t1.inbox._handle(reply_topic, keys["zzz"].seal(plain, reply_topic), False)
    t1.inbox._handle(reply_topic, part, False)
    assert t1.inbox.rejects.snapshot() == {"unauthenticated": 1, "name-mismatch": 1}
    assert [p[0]["last"] for p in replies] == [True]
    # a fetch that is plain, or sealed by an asker, is not served
    body = {"keys": [b"k" * 16], "codec": "fp16", "model": model}
    t2.handle(topic, wire.encode(wire.Envelope(wire.Kind.KV_FETCH, "n1", body, corr="c", reply_to=reply_topic)), False)
    t2.handle(topic, senders.encode(asker, wire.Envelope(wire.Kind.KV_FETCH, "asker", body, corr="c",
                                                         reply_to=topics.reply("node-asker")), topic), False)
    assert t2.rejects.snapshot() == {"unauthenticated": 1, "wrong-role": 1}
    assert isinstance(t2.jobs, queue.Queue) and t2.jobs.empty()


def test_mutated_sealed_asks_only_ever_raise_protocol_errors(ca: CertificateAuthority) -> None:
    """Bytes flipped anywhere in a sealed ask or forward (the certificate included: a bad X.509
    version once escaped as cryptography's InvalidVersion) end in a counted reason, keys or not."""
    import random

    asker, router, target = ring(ca, "asker", "asker"), ring(ca, "n1"), ring(ca, "n2")
    original = senders.encode(asker, ask_env(), topics.ROUTE)
    fwd = senders.encode(router, senders.forward(router, ask_env(), original, "n1", "load"), topics.node_ask("n2"))
    rng = random.Random(15)
    for _ in range(1500):
        p = bytearray(rng.choice([original, fwd]))
        for _ in range(rng.randint(1, 4)):
            p[rng.randrange(len(p))] = rng.randrange(256)
        for keys in (target, None):
            try:
                senders.open_ask(keys, bytes(p[: rng.randrange(1, len(p) + 1)]), topics.node_ask("n2"), MAX,
                                 JSON_SENDER)
            except ProtocolError:
                pass
