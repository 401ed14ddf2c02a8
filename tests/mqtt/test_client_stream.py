"""MeshClient's token stream against a scripted node on a real amqtt broker.

The node here is a bare MqttBus that replies with a script of token pieces, so the order and the
gaps are exactly the ones a broker restart leaves behind (pieces lost in the outage, an earlier
send's stream resuming past them, a later send's stream starting again at 0).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh import topics, wire
from mesh.mqtt.bus import MqttBus
from nodes.client import MeshClient
from tests.conftest import Broker, start_amqtt

PIECES = ["The", " keeper", " had", " dedicated", " his", " life", "."]


@pytest.fixture(scope="module")
def broker(log_dir) -> Iterator[Broker]:  # type: ignore[no-untyped-def]
    b = start_amqtt(log_dir)
    yield b
    b.stop()


def scripted_node(broker: Broker, name: str, order: list[int]) -> MqttBus:
    """A node that answers every ask with the pieces of PIECES at ``order`` (None-free), then the answer."""
    bus = MqttBus(name, broker.address)
    bus.start(10)

    def on_ask(topic: str, payload: bytes, retained: bool) -> None:
        env = wire.decode(payload)
        for i in order:
            tok = wire.Envelope(wire.Kind.TOKEN, name, {"i": i, "text": PIECES[i]}, corr=env.corr)
            bus.publish(env.reply_to, wire.encode(tok), qos=1)
        answer = {"text": "".join(PIECES), "node": name, "prompt_tokens": 3, "new_tokens": len(PIECES),
                  "ttft_s": 0.0, "ttlt_s": 0.0}
        bus.publish(env.reply_to, wire.encode(wire.Envelope(wire.Kind.ANSWER, name, answer, corr=env.corr)), qos=1)

    bus.subscribe(topics.node_ask(name), on_ask)
    bus.publish_wait(topics.node_status(name), topics.ONLINE, qos=1, retain=True)
    return bus


@pytest.mark.parametrize("order", [
    [0, 1, 2, 3, 4, 5, 6],     # in order
    [0, 1, 5, 6, 2, 3, 4],     # a resumed stream past a gap, then a resend's stream fills it
    [0, 1, 5, 6, 0, 1, 2, 3, 4, 5, 6],  # the same with the resend's whole stream
    [0, 1, 2, 6],              # pieces lost for good: the answer fills them in
    [3, 4, 5, 6],              # the first pieces lost
])
def test_the_stream_reads_once_in_order(broker: Broker, order: list[int]) -> None:
    name = "scripted" + "".join(map(str, order))
    node = scripted_node(broker, name, order)
    try:
        with MeshClient(broker.address) as client:
            client.wait_online([name], 10)
            streamed: list[str] = []
            res = client.ask("hello", node=name, max_new_tokens=8, on_text=streamed.append, timeout=20)
        assert res.answer == "".join(PIECES)
        assert "".join(streamed) == res.answer, streamed
    finally:
        node.publish_wait(topics.node_status(name), b"", qos=1, retain=True)
        node.stop()
