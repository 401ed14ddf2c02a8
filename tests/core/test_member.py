"""The membership core on its own (mesh.member.Member), with a bus that records what it publishes.

The real-process versions (a node agent and a coordinator on a real broker) are in
tests/system/test_ask_ids.py; these pin the rules: what counts as a repeat, how long it is
remembered, what a full queue answers, and when a process counts itself as the router.
"""

from __future__ import annotations

import time
from typing import Any

from mesh import topics, wire
from mesh.config import Limits
from mesh.member import Job, Member


class RecordingBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def publish_wait(self, topic: str, payload: bytes, **_: Any) -> None:
        self.sent.append((topic, payload))

    def subscribe(self, *_: Any, **__: Any) -> None:
        pass


def member(max_queue: int = 8, window: float = 600.0) -> tuple[Member, RecordingBus]:
    bus = RecordingBus()
    return Member("n1", bus, Limits(max_queue=max_queue), wire.RejectCounter(), dedupe_window_s=window), bus  # type: ignore[arg-type]


def ask(sender: str, corr: str, reply_to: str = "mesh/v1/reply/a", **body: Any) -> Job:
    env = wire.Envelope(wire.Kind.ASK, sender, {"text": "hi", "max_new_tokens": 2, **body}, corr=corr,
                        reply_to=reply_to)
    return Job(env, time.monotonic())


def test_a_repeat_is_the_same_sender_reply_topic_and_id() -> None:
    m, _ = member()
    assert m.take(ask("alice", "q1"))
    assert not m.take(ask("alice", "q1"))  # the repeat
    assert m.take(ask("bob", "q1"))  # another asker, the same id
    assert m.take(ask("alice", "q1", reply_to="mesh/v1/reply/b"))  # another inbox of the same name
    assert m.take(ask("alice", "q2"))
    assert m.jobs.qsize() == 4 and m.rejects.snapshot() == {"duplicate-ask": 1}


def test_a_json_ask_id_counts_as_the_id() -> None:
    m, _ = member()
    assert m.take(ask("json-client", "c1", ask_id="mine"))
    assert not m.take(ask("json-client", "c2", ask_id="mine"))  # same asker, same ask_id
    assert m.take(ask("json-client", "c3", reply_to="homeassistant-mesh/answer", ask_id="mine"))  # another asker's inbox


def test_ids_are_forgotten_after_the_window() -> None:
    m, _ = member(window=0.05)
    job = ask("alice", "q1")
    assert m.take(job)
    m.jobs.get_nowait()
    time.sleep(0.1)
    assert m.take(ask("carol", "other"))  # any later ask expires what is older than the window
    assert m.take(ask("alice", "q1"))


def test_a_full_queue_answers_busy_and_counts_it() -> None:
    m, bus = member(max_queue=1)
    assert m.take(ask("alice", "q1"))
    assert not m.take(ask("alice", "q2"))
    topic, payload = bus.sent[-1]
    env = wire.decode(payload)
    assert topic == "mesh/v1/reply/a" and env.kind is wire.Kind.ERROR and env.body["reason"] == "busy"
    assert m.rejects.snapshot() == {"busy": 1}


def test_it_routes_only_while_present_and_smallest() -> None:
    m, _ = member()
    assert not m.is_router()  # not announced yet
    m.present = True
    assert m.is_router()  # alone
    m.on_status(topics.node_status("a0"), topics.ONLINE, True)
    assert m.is_router()  # a smaller name says online but never heartbeat: a ghost
    beat = {"seq": 0, "model": "m", "model_key": "k", "queue": 0, "load": 0.0, "prefill_tps": 1.0}
    m.on_heartbeat(topics.node_heartbeat("a0"), wire.encode(wire.Envelope(wire.Kind.HEARTBEAT, "a0", beat)), False)
    assert not m.is_router()  # a smaller name is live
    m.on_status(topics.node_status("a0"), topics.OFFLINE, False)
    assert m.is_router()
    m.on_status(topics.node_status("n1"), topics.ONLINE, True)  # its own retained status
    m.present = False  # going offline: it stops routing at once
    assert not m.is_router()


def test_an_id_is_burned_only_by_the_very_same_ask() -> None:
    m, _ = member()
    assert m.take(ask("json-client", "c1", reply_to="homeassistant-mesh/victim", ask_id="briefing-1", text="Say hello"))
    assert m.take(ask("json-client", "c2", reply_to="homeassistant-mesh/victim", ask_id="briefing-1", text="Good morning"))
    assert not m.take(ask("json-client", "c3", reply_to="homeassistant-mesh/victim", ask_id="briefing-1", text="Good morning"))
    # what a router adds is no part of the ask: two overlapping routers' copies are one ask
    assert not m.take(ask("json-client", "c4", reply_to="homeassistant-mesh/victim", ask_id="briefing-1", text="Good morning",
                          routed_by="r2", routed_reason="load"))
    assert m.take(ask("json-client", "c5", reply_to="homeassistant-mesh/victim", ask_id="briefing-1", text="Good morning",
                      max_new_tokens=3))  # another ask under the same id


def test_cache_figures_only_for_a_cbor_ask_that_asks_for_them() -> None:
    """M1/E10: the cache block says whether someone asked a prompt before; Home Assistant's JSON
    asks never get it, the asker's CBOR asks only when they set the flag."""
    from mesh.member import JSON_SENDER, shows_cache

    assert shows_cache(ask("asker", "a1", cache_figures=True))
    assert not shows_cache(ask("asker", "a2"))
    assert not shows_cache(ask("asker", "a3", cache_figures="yes"))
    # Home Assistant's ask (forwarded as the JSON sender, answered as JSON), even with the flag
    ha = ask(JSON_SENDER, "h1", reply_to="homeassistant-mesh/o", reply_format="json", cache_figures=True)
    ha.json_reply = True
    assert not shows_cache(ha)
    assert not shows_cache(ask(JSON_SENDER, "h2", cache_figures=True))
    # a sealed asker's ask answered as JSON: its topic may be one others read
    assert not shows_cache(ask("asker", "a4", reply_format="json", cache_figures=True))


def heartbeat(m: Member, name: str, seq: int, retained: bool = False, **body: Any) -> None:
    from mesh.auth import senders

    topic = topics.node_heartbeat(name)
    env = wire.Envelope(wire.Kind.HEARTBEAT, name, {"seq": seq, "model": "m", "model_key": "k", "queue": 0, "load": 0.0,
                                                   "prefill_tps": 0.0, "heartbeat_s": 0.5,
                                                   "roles": ["answer"], **body})
    m.on_heartbeat(topic, senders.encode(None, env, topic), retained)


def test_a_forged_offline_hides_a_live_node_for_one_heartbeat_only() -> None:
    """Anyone without an ACL (the embedded broker) can write a node's retained status; a node that
    heartbeats now is live again, while a retained (old) heartbeat does not revive a dead node."""
    m, _ = member()
    m.on_status(topics.node_status("n2"), topics.ONLINE, True)
    heartbeat(m, "n2", 1)
    assert [v.name for v in m.peers.live(time.monotonic())] == ["n2"]
    m.on_status(topics.node_status("n2"), topics.OFFLINE, True)  # forged, or a real last will
    assert m.peers.live(time.monotonic()) == []
    heartbeat(m, "n3", 5, retained=True)  # a dead node's retained heartbeat: no proof of life
    m.on_status(topics.node_status("n3"), topics.OFFLINE, True)
    heartbeat(m, "n2", 2)  # n2 is alive after all
    assert [v.name for v in m.peers.live(time.monotonic())] == ["n2"]


def test_the_router_routes_a_json_ask_again_when_its_node_dies_before_answering() -> None:
    m, bus = member()
    m.present = True
    for name, seq in (("n2", 1), ("n3", 1)):
        m.on_status(topics.node_status(name), topics.ONLINE, True)
        heartbeat(m, name, seq)
    import json

    m.on_json_ask(topics.ASK, json.dumps({"text": "hi", "id": "ha-1", "max_new_tokens": 4}).encode(), False)
    (first,) = [t for t, _ in bus.sent if t.endswith("/ask")]
    holder = first.split("/")[-2]
    other = ({"n2", "n3"} - {holder}).pop()
    heartbeat(m, other, 2, answered=[])  # the other node's heartbeat closes nothing
    bus.sent.clear()
    m.on_status(topics.node_status(holder), topics.OFFLINE, True)  # died before answering
    assert [t for t, _ in bus.sent if t.endswith("/ask")] == [topics.node_ask(other)]
    # the retry's node answers: its heartbeat lists the ask, and its later death re-sends nothing
    from mesh.handover import ask_digest

    heartbeat(m, other, 3, answered=[ask_digest(next(iter(m.forwards._open.values())).env.corr)])
    assert len(m.forwards) == 0
    bus.sent.clear()
    m.on_status(topics.node_status(other), topics.OFFLINE, True)
    assert [t for t, _ in bus.sent if t.endswith("/ask")] == []


def _beat(m: Member, name: str, roles: list[str] | None) -> None:
    body: dict[str, Any] = {"seq": 0, "model": "m", "model_key": "k", "queue": 0, "load": 0.0, "prefill_tps": 1.0}
    if roles is not None:
        body["roles"] = roles
    m.on_status(topics.node_status(name), topics.ONLINE, True)
    m.on_heartbeat(topics.node_heartbeat(name), wire.encode(wire.Envelope(wire.Kind.HEARTBEAT, name, body)), False)


def test_a_worker_only_member_refuses_every_ask_and_routes_none_to_itself() -> None:
    bus = RecordingBus()
    m = Member("a-w", bus, Limits(), wire.RejectCounter(), takes_asks=False)  # type: ignore[arg-type]
    m.present = True
    _beat(m, "a-w", ["worker"])
    m.on_node_ask(topics.node_ask("a-w"), wire.encode(ask("alice", "q1").env), False)  # by name, or routed to it
    topic, payload = bus.sent[-1]
    env = wire.decode(payload)
    assert topic == "mesh/v1/reply/a" and env.kind is wire.Kind.ERROR and env.body["reason"] == "not-answering"
    assert "answers no asks" in env.body["message"] and m.jobs.qsize() == 0
    assert m.rejects.snapshot() == {"not-answering": 1}
    # as the router (the smallest live name) it forwards to an answering node, never to itself
    assert m.is_router()
    m.route(ask("alice", "q2").env)
    assert bus.sent[-1][0] == "mesh/v1/reply/a"  # nobody answers yet: no-node
    assert wire.decode(bus.sent[-1][1]).body["reason"] == "no-node"
    _beat(m, "n2", ["answer"])
    m.route(ask("alice", "q3").env)
    assert bus.sent[-1][0] == topics.node_ask("n2")


def test_routers_never_pick_a_worker_only_node() -> None:
    m, bus = member()
    m.present = True
    _beat(m, "n3", ["worker"])  # worker-only
    m.route(ask("alice", "q1").env)
    assert wire.decode(bus.sent[-1][1]).body["reason"] == "no-node"
    _beat(m, "n4", ["answer", "worker"])  # a full node that is also a worker
    m.route(ask("alice", "q2").env)
    assert bus.sent[-1][0] == topics.node_ask("n4")
    _beat(m, "n0", None)  # a heartbeat without roles (before roles): still a candidate
    assert {v.name for v in m._candidates(None)} == {"n0", "n4"}


def test_no_heartbeat_leaves_after_the_offline_status() -> None:
    """A live heartbeat makes a node online again (above), so one sent by the heartbeat thread
    after go_offline's ``offline`` would revive a stopping node for a heartbeat period."""
    import pytest

    from mesh.errors import MeshError

    body = {"model": "m", "model_key": "k", "queue": 0, "load": 0.0, "prefill_tps": 0.0, "heartbeat_s": 0.5,
            "roles": ["answer"]}
    m, bus = member()
    m.publish_heartbeat(body)
    m.go_offline()
    with pytest.raises(MeshError, match="offline"):
        m.publish_heartbeat(body)
    sent = [t for t, _ in bus.sent]
    last_status = max(i for i, t in enumerate(sent) if t == topics.node_status("n1"))
    assert topics.node_heartbeat("n1") not in sent[last_status:]


def test_an_answer_streams_its_first_piece_at_once_then_at_most_every_tenth_of_a_second() -> None:
    """mesh.member.Stream: 64 tokens at 70 a second were 64 sealed messages, each a broker hop
    and a check at the asker on cores the decode needs; now the first token's piece goes at once
    (the asker's TTFT), then what came since every 0.1 s, and the rest at flush."""
    from mesh.member import Stream

    m, bus = member()
    now = [0.0]
    stream = Stream(m, ask("alice", "q1"), clock=lambda: now[0])
    words = [f" w{i}" for i in range(64)]
    sent_after: list[int] = []
    for w in words:
        now[0] += 1 / 70
        stream(w)
        sent_after.append(len(bus.sent))
    stream.flush()
    bodies = [wire.decode(p).body for _, p in bus.sent]
    assert sent_after[0] == 1 and stream.first_at == 1 / 70  # the first piece at once
    assert [b["i"] for b in bodies] == list(range(len(bodies)))  # numbered as before
    assert "".join(b["text"] for b in bodies) == "".join(words)
    assert len(bodies) <= 2 + (64 / 70) / 0.1  # ten a second, not seventy
    stream.flush()
    assert len(bus.sent) == len(bodies)  # nothing held: nothing sent

    json_job = ask("json-client", "q2")
    json_job.json_reply = True
    quiet = Stream(m, json_job, clock=lambda: now[0])
    quiet("a")
    quiet.flush()
    assert len(bus.sent) == len(bodies) and quiet.first_at is not None  # a JSON asker gets the answer alone


def test_an_ask_may_choose_a_piece_per_token_or_a_slower_pace() -> None:
    from mesh.member import MAX_STREAM_EVERY_S, Stream

    m, bus = member()
    now = [0.0]
    every = Stream(m, ask("alice", "q1", stream_every_s=0), clock=lambda: now[0])
    for w in ("a", "b", "c"):
        now[0] += 0.001
        every(w)
    assert [wire.decode(p).body["text"] for _, p in bus.sent] == ["a", "b", "c"]
    assert Stream(m, ask("alice", "q2", stream_every_s=1e9)).every_s == MAX_STREAM_EVERY_S
    assert Stream(m, ask("alice", "q3", stream_every_s=-5)).every_s == 0.0
    assert Stream(m, ask("alice", "q4", stream_every_s=float("nan"))).every_s == 0.1
