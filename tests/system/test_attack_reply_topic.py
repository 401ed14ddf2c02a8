"""Review M5: an ask cannot make a node publish outside the mesh's reply topics.

Before the fix a node answered on any topic outside ``mesh/v1/`` and the literal
``homeassistant/``: on the embedded broker (no ACL), or a home broker whose clients share one
broadly privileged user, an ask could make a node publish JSON onto ``zigbee2mqtt/.../set``,
``cmnd/...`` or a custom discovery prefix. Now the reply topic must be on the allow-list the
gateway's ACL grants (``mesh/v1/reply/<name>``, ``mesh/v1/answer``, ``homeassistant-mesh/...``),
and anything else is refused and counted (``bad-reply-topic``).

Real processes on a real amqtt broker: one SmolLM2 node, raw MQTT clients.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from tests.conftest import Broker, NodeProcess, start_node
from tests.system.rogue import Rogue, rejects_of

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def node(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    proc = start_node(amqtt_broker, "rnode", MODEL, log_dir, "--threads", "1", "--no-cache")
    yield proc
    proc.stop()


def test_an_ask_cannot_answer_onto_a_device_topic(amqtt_broker: Broker, node: NodeProcess) -> None:
    home = Rogue(amqtt_broker, f"reply-home-{time.monotonic_ns()}")
    try:
        for t in ("zigbee2mqtt/lamp/set", "cmnd/plug/POWER", "homeassistant-mesh/ok"):
            home.subscribe(t)
        home.json_ask("Turn it on", "zigbee2mqtt/lamp/set", max_new_tokens=2)
        home.envelope(topics.node_ask("rnode"), wire.Kind.ASK, "someone", {"text": "ON", "max_new_tokens": 2},
                      corr="m5", reply_to="cmnd/plug/POWER")
        home.json_ask("The capital of France is", "homeassistant-mesh/ok", max_new_tokens=2)  # the control
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while "homeassistant-mesh/ok" not in seen and time.monotonic() < deadline:
            got = home.next(1.0)
            if got is not None:
                seen.append(got[0])
        seen += [t for t, _ in home.collect(3.0)]  # asks are answered in order: the control came last
        stray = [t for t in seen if t != "homeassistant-mesh/ok"]
    finally:
        home.close()
    assert "homeassistant-mesh/ok" in seen
    assert stray == [], f"the node published on {stray}"
    assert rejects_of(amqtt_broker, "rnode", "bad-reply-topic") >= 2
