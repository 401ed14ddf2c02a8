"""E1 of the security review (C1): one small retained heartbeat must not freeze a node.

The payload is the review's ``dag.py``: a heartbeat envelope whose body shares one list through
CBOR value-sharing tags (28 marks a value shareable, 29 refers back to it), ``LEVELS`` lists deep,
each holding ``FAN`` references to the one below. It is a few hundred bytes; a decoder that walks
the decoded value without a visited set visits ``FAN ** (LEVELS - 1)`` list nodes on paho's network
thread, which then reads nothing else (asks included) for seconds to days, and being retained it
comes back on every reconnect.

Real processes on a real amqtt broker: one SmolLM2 node. The test times a short ask's first token
before the attack (the control, side by side in the same test) and with the attack retained, and
requires the attacked asks to stay within ``RATIO`` of the control. Its own waiting is bounded
(``WAIT_S`` per ask), so a node that freezes fails the test in bounded time instead of hanging it;
the node's heartbeat must then show the refusal counted under ``shared-value``. Where the nodes hold
identities (``mesh.auth``), the attacker holds a node's credential and seals the payload: a stranger
is refused before the decoder sees a byte (``unauthenticated``), so only an insider tests it.
"""

from __future__ import annotations

import queue
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from mesh.auth import senders
from mesh.mqtt.bus import MqttBus
from tests.conftest import Broker, NodeProcess, asker_keys, peer_keys, start_node
from tests.fuzz.fuzzkit import shared_heartbeat

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
NODE = "freeze1"
LEVELS = 14  # 234 bytes: 4**13 = 67 million list visits for a walk without a visited set
RATIO = 5.0  # attacked first-token time over the control's (the review saw 0.2 s -> 12.4 s at 219 bytes)
WAIT_S = 30.0  # per ask: the old code stays frozen for minutes (longer than this) at these sizes
ASKS = 3  # per side; medians are compared


class Asker:
    """Sends short asks straight to the node and times the first token; also keeps the node's
    last heartbeat body. It subscribes to nothing else: the attack topic never reaches it."""

    def __init__(self, broker: Broker) -> None:
        tag = time.monotonic_ns()
        self.topic = topics.reply(f"freeze-{tag}")
        self.firsts: queue.Queue[tuple[str, float]] = queue.Queue()
        self.heartbeat: dict = {}
        self.heartbeat_bytes = 0
        self.bus = MqttBus(f"freeze-{tag}", broker.address)
        self.bus.subscribe(self.topic, self._on_reply, qos=1)
        self.bus.subscribe(topics.node_heartbeat(NODE), self._on_heartbeat, qos=0)
        self.bus.start()
        self.seen: set[str] = set()

    def _on_reply(self, topic: str, payload: bytes, retained: bool) -> None:
        env = wire.decode(senders.unwrap(payload))
        if env.kind in (wire.Kind.TOKEN, wire.Kind.ANSWER, wire.Kind.ERROR) and env.corr not in self.seen:
            self.seen.add(env.corr or "")
            self.firsts.put((env.corr or "", time.monotonic()))

    def _on_heartbeat(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            self.heartbeat = dict(wire.decode(senders.unwrap(payload)).body)
            self.heartbeat_bytes = len(payload)

    def first_token_s(self, corr: str) -> float:
        """Seconds from sending an ask to its first token; ``WAIT_S`` at most (then the ask failed)."""
        body = {"text": "The capital of France is", "max_new_tokens": 2, "no_cache": True}
        keys = asker_keys()
        env = wire.Envelope(wire.Kind.ASK, keys.name if keys else "freeze-asker", body, corr=corr, reply_to=self.topic)
        sent = time.monotonic()
        self.bus.publish_wait(topics.node_ask(NODE), senders.encode(keys, env, topics.node_ask(NODE)), qos=1)
        deadline = sent + WAIT_S
        while True:
            try:
                got, at = self.firsts.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return WAIT_S
            if got == corr:
                return at - sent

    def stop(self) -> None:
        self.bus.stop()


@pytest.fixture(scope="module")
def node(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    proc = start_node(amqtt_broker, NODE, MODEL, log_dir, "--threads", "1", "--no-cache")
    try:
        yield proc
    finally:
        proc.stop()


def test_the_review_payload_is_what_it_says() -> None:
    """234 bytes, as in the review (dag.py 14), and it really shares: cbor2 alone builds it."""
    import cbor2

    payload = shared_heartbeat(LEVELS)
    assert len(payload) == 234
    lists = cbor2.loads(payload)["b"]["pad"]
    assert lists[-1][0] is lists[-1][1] is lists[-2]


def test_a_retained_shared_heartbeat_does_not_freeze_the_node(amqtt_broker: Broker, node: NodeProcess) -> None:
    asker = Asker(amqtt_broker)
    attack = topics.node_heartbeat("zz")
    try:
        asker.first_token_s("warm-up")
        control = [asker.first_token_s(f"control-{i}") for i in range(ASKS)]
        assert max(control) < WAIT_S, f"the node does not answer at all: {control}"
        keys = peer_keys("zz")
        payload = shared_heartbeat(LEVELS)
        asker.bus.publish_wait(attack, keys.seal(payload, attack) if keys else payload, qos=1, retain=True)
        attacked: list[float] = []
        for i in range(ASKS):
            attacked.append(asker.first_token_s(f"attacked-{i}"))
            if attacked[-1] >= WAIT_S:  # frozen: waiting out the other asks proves nothing more
                attacked += [WAIT_S] * (ASKS - len(attacked))
                break
        ratio = statistics.median(attacked) / statistics.median(control)
        print(f"first token: control {control}, attacked {attacked}, median ratio {ratio:.2f}")
        assert ratio <= RATIO, (f"first token {statistics.median(attacked):.3f} s under attack vs "
                                f"{statistics.median(control):.3f} s before (x{ratio:.1f}): {attacked} {control}")
        deadline = time.monotonic() + 10.0
        while asker.heartbeat.get("rejects", {}).get("shared-value", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert asker.heartbeat.get("rejects", {}).get("shared-value", 0) >= 1, asker.heartbeat.get("rejects")
        # The heartbeat cap leaves room: a real node's heartbeat is a small part of it.
        assert 0 < 8 * asker.heartbeat_bytes <= wire.KIND_CAPS[wire.Kind.HEARTBEAT].bytes, asker.heartbeat_bytes
    finally:
        asker.bus.publish_wait(attack, b"", qos=1, retain=True)  # an empty retained payload clears it
        asker.stop()
