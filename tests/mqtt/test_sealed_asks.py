"""The sealed ask path through a real amqtt broker, with scripted members instead of models.

Two keyed members (``mesh.member.Member``: n1 routes, n2 answers with a script), a keyed
``MeshClient``, and a rogue that answers every routed ask first: plain bytes in n2's name, and
sealed with a valid key of its own in its own name with a notice naming itself. The client
returns n2's answer and counts the rest; a keyless client's plain ask is refused by the keyed
router. Seconds, not minutes: the model-backed version is tests/system/test_attack_forged_answer.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics, wire
from mesh.auth import senders
from mesh.auth.certs import CertificateAuthority
from mesh.auth.keyring import Keyring
from mesh.config import Limits
from mesh.errors import TransportError
from mesh.member import Job, Member
from mesh.mqtt.bus import MqttBus
from nodes.client import MeshClient
from tests.conftest import Broker, start_amqtt


@pytest.fixture(scope="module")
def broker(log_dir) -> Iterator[Broker]:  # type: ignore[no-untyped-def]
    b = start_amqtt(log_dir)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def ring(ca: CertificateAuthority, name: str, role: str = "node") -> Keyring:
    return Keyring(ca.issue(name, role), ca.cert)


def beat(queue: int) -> dict[str, Any]:
    return {"model": "m", "model_key": "k", "queue": queue, "load": 0.0, "prefill_tps": 10.0, "heartbeat_s": 2.0,
            "roles": ["answer"]}


class Scripted:
    """A keyed member whose every answer is two tokens and ``real`` (no model)."""

    def __init__(self, broker: Broker, name: str, keys: Keyring, queue: int) -> None:
        self.bus = MqttBus(f"scripted-{name}-{time.monotonic_ns()}", broker.address,
                           will=(topics.node_status(name), topics.OFFLINE, 1, True))
        self.member = Member(name, self.bus, Limits(), wire.RejectCounter(), keyring=keys)
        self.member.subscribe_presence(self.bus)
        self.bus.start(10)
        self.member.go_online(lambda: beat(queue))
        self.thread = threading.Thread(target=self.member.work, args=(self.answer,), daemon=True)
        self.thread.start()

    def answer(self, job: Job) -> None:
        for i, piece in enumerate((" re", "al")):
            self.member.reply(job, wire.Kind.TOKEN, {"i": i, "text": piece})
        self.member.reply(job, wire.Kind.ANSWER, {"text": " real", "node": self.member.name, "prompt_tokens": 1,
                                                  "new_tokens": 2, "ttft_s": 0.0, "ttlt_s": 0.0})

    def stop(self) -> None:
        self.member.go_offline()
        self.thread.join(5)
        self.bus.stop()


@pytest.fixture(scope="module")
def members(broker: Broker, ca: CertificateAuthority) -> Iterator[dict[str, Scripted]]:
    # n1 routes (the smallest name) and reports a long queue, so it forwards to n2
    out = {"n1": Scripted(broker, "n1", ring(ca, "n1"), 5), "n2": Scripted(broker, "n2", ring(ca, "n2"), 0)}
    yield out
    for m in out.values():
        m.stop()


def test_a_routed_ask_is_answered_by_the_node_the_router_names(broker: Broker, ca: CertificateAuthority,
                                                               members: dict[str, Scripted]) -> None:
    rogue_keys = ring(ca, "zz")
    rogue = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rogue-{time.monotonic_ns()}")
    sent: list[str] = []

    def forge(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ask = wire.decode(senders.unwrap(bytes(msg.payload)))  # corr and reply topic in clear
        to = ask.reply_to or ""
        forged = {"text": " FORGED", "node": "n2", "prompt_tokens": 1, "new_tokens": 1, "ttft_s": 0.0, "ttlt_s": 0.0}
        client.publish(to, wire.encode(wire.Envelope(wire.Kind.ANSWER, "n2", forged, corr=ask.corr)), qos=1)
        notice = wire.Envelope(wire.Kind.ROUTED, "zz", {"node": "zz"}, corr=ask.corr)
        client.publish(to, rogue_keys.seal_envelope(notice, to), qos=1)
        mine = wire.Envelope(wire.Kind.ANSWER, "zz", dict(forged, node="zz"), corr=ask.corr)
        client.publish(to, rogue_keys.seal_envelope(mine, to), qos=1)
        sent.append(ask.corr or "")

    rogue.on_message = forge
    rogue.connect("127.0.0.1", broker.port)
    rogue.subscribe(topics.ROUTE, 1)
    rogue.loop_start()
    try:
        with MeshClient(broker.address, keyring=ring(ca, "asker", "asker")) as client:
            client.wait_online(["n1", "n2"], 10, ready=lambda v: v.seq >= 0)
            result = client.ask("hi", max_new_tokens=2, timeout=20, max_sends=1)
            direct = client.ask("hi", node="n1", max_new_tokens=2, timeout=20, max_sends=1)
            rejects = client.rejects.snapshot()
    finally:
        rogue.loop_stop()
        rogue.disconnect()
    assert len(sent) == 1, "the rogue saw the routed ask (the direct one goes to n1's own topic)"
    assert (result.node, result.answer) == ("n2", " real")
    assert (direct.node, direct.answer) == ("n1", " real")
    assert rejects.get("unauthenticated", 0) >= 1, rejects
    assert rejects.get("wrong-sender", 0) + rejects.get("unexpected-reply", 0) >= 2, rejects
    assert members["n2"].member.rejects.snapshot() == {}  # n1's sealed forward, with the asker's seal inside


def test_a_keyless_ask_is_refused_by_a_keyed_mesh(broker: Broker, members: dict[str, Scripted]) -> None:
    with MeshClient(broker.address) as client:  # no keys: it reads the mesh, its asks are strangers'
        client.wait_online(["n1", "n2"], 10, ready=lambda v: v.seq >= 0)
        assert client.peers.get("n2").queue == 0  # type: ignore[union-attr]  (sealed heartbeats, read unchecked)
        before = members["n2"].member.rejects.snapshot().get("unauthenticated", 0)
        with pytest.raises(TransportError):  # refused unread: no reply, the ask times out
            client.ask("hi", node="n2", max_new_tokens=2, timeout=3, max_sends=1)
    deadline = time.monotonic() + 5
    while members["n2"].member.rejects.snapshot().get("unauthenticated", 0) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert members["n2"].member.rejects.snapshot().get("unauthenticated", 0) == before + 1
