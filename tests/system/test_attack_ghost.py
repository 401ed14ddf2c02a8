"""E5 (review H3): routing trusts heartbeats, not a retained ``online``.

A retained ``online`` for ``a0`` (one publish, no credentials needed on the embedded broker, or a
node that died while a persistent broker was down) made ``a0`` the router, since it has the
smallest name: every JSON, text and routed ask went to nobody, for ever, with nothing counted.
Now a node counts for routing only while it heartbeats (``mesh.routing.live``): a ghost with no
heartbeat never routes, and one whose (retained) heartbeat stopped stops routing once stale.

Real processes on a real amqtt broker: one SmolLM2 node, raw MQTT clients for the ghost and the
home automation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from mesh.auth import senders
from mesh.routing import stale_after
from nodes.client import MeshClient
from tests.conftest import Broker, NodeProcess, asker_keys, peer_keys, start_node
from tests.system.rogue import Rogue, wait_json

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
PERIOD_S = 0.5  # the ghost's announced heartbeat period


@pytest.fixture(scope="module")
def node(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    proc = start_node(amqtt_broker, "gnode", MODEL, log_dir, "--threads", "1", "--no-cache")
    yield proc
    proc.stop()


@pytest.fixture()
def home(amqtt_broker: Broker) -> Iterator[Rogue]:
    rogue = Rogue(amqtt_broker, f"ghost-home-{time.monotonic_ns()}")
    rogue.subscribe("homeassistant-mesh/ghost")
    rogue.subscribe(topics.ANSWER)
    yield rogue
    rogue.clear_retained(*(topics.node_status(n) for n in ("a0", "a1")), topics.node_heartbeat("a1"))
    rogue.close()


def asks_answered(broker: Broker, home: Rogue) -> dict[str, object]:
    """A JSON ask, a text ask and a routed CLI ask, each with what answered it (None: nothing)."""
    out: dict[str, object] = {}
    home.json_ask("The capital of France is", "homeassistant-mesh/ghost", max_new_tokens=2)
    answer = wait_json(home, "homeassistant-mesh/ghost", 20)
    out["json"] = answer.get("node") if answer else None
    home.publish(topics.ASK_TEXT, b"Hello there")
    answer = wait_json(home, topics.ANSWER, 120)  # 64 new tokens: tens of seconds on a loaded machine
    out["text"] = answer.get("node") if answer else None
    with MeshClient(broker.address, keyring=asker_keys()) as client:
        try:
            out["routed"] = client.ask("The capital of France is", max_new_tokens=2, timeout=20, max_sends=1).node
        except Exception as exc:
            out["routed"] = f"no answer: {exc}"
    return out


def test_a_retained_online_without_heartbeat_routes_nothing(amqtt_broker: Broker, node: NodeProcess,
                                                            home: Rogue) -> None:
    home.publish(topics.node_status("a0"), topics.ONLINE, retain=True)
    assert asks_answered(amqtt_broker, home) == {"json": "gnode", "text": "gnode", "routed": "gnode"}


def test_a_dead_node_whose_heartbeat_stopped_stops_routing(amqtt_broker: Broker, node: NodeProcess,
                                                           home: Rogue) -> None:
    """A node that died while a persistent broker was down: its ``online`` and its last heartbeat
    stay retained. It may count as live for one staleness window after a router last heard that
    heartbeat, never longer."""
    beat = {"seq": 7, "model": MODEL, "model_key": "x", "queue": 0, "load": 0.0, "prefill_tps": 100.0,
            "roles": ["answer"], "heartbeat_s": PERIOD_S}
    home.publish(topics.node_status("a1"), topics.ONLINE, retain=True)
    topic = topics.node_heartbeat("a1")  # its own, sealed with its key where nodes hold keys
    home.publish(topic, senders.encode(peer_keys("a1"), wire.Envelope(wire.Kind.HEARTBEAT, "a1", beat), topic),
                 retain=True)
    time.sleep(stale_after(PERIOD_S) + 1.0)  # the window itself is the behaviour under test
    assert asks_answered(amqtt_broker, home) == {"json": "gnode", "text": "gnode", "routed": "gnode"}


def test_the_live_node_routes_without_a_ghost(amqtt_broker: Broker, node: NodeProcess, home: Rogue) -> None:
    assert asks_answered(amqtt_broker, home) == {"json": "gnode", "text": "gnode", "routed": "gnode"}
