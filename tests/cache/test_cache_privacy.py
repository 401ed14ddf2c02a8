"""Review finding M1, experiment E10: an answer must not tell one user whether someone else asked
the same prompt before. A real node (SmolLM2, keyed like `mesh up`), a real broker, Home
Assistant's JSON ask path and the operator's sealed CLI asks."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh import topics
from mesh.mqtt.bus import MqttBus
from nodes.client import MeshClient
from tests.conftest import Broker, NodeProcess, asker_keys, start_node

pytestmark = pytest.mark.e2e

TEMPLATE = ("You are the voice assistant of a smart home. Answer in a few words. Question: {}\n"
            "Short answer:")
# What the review's E10 lists: one question the victim asked, and candidates it did not.
VICTIM = "is the front door locked?"
OTHERS = ("is the garage open?", "did anyone feed the dog?")
CACHE_WORDS = ("cache", "full_hit", "local_tokens", "remote_tokens", "peer", "decision")


@pytest.fixture(scope="module")
def node(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    n = start_node(amqtt_broker, "p1", "smollm2-135m", log_dir)
    yield n
    n.stop()


class HomeAssistant:
    """The `homeassistant` account's rights: publish a JSON ask, read the answer topic it names."""

    def __init__(self, broker: Broker) -> None:
        self.topic = f"homeassistant-mesh/e10/answer-{uuid.uuid4().hex[:8]}"  # an automation's topic
        self.answers: queue.Queue[bytes] = queue.Queue()
        self.bus = MqttBus(f"ha-{uuid.uuid4().hex[:8]}", broker.address)
        self.bus.start(10)
        self.bus.subscribe(self.topic, lambda t, p, r: self.answers.put(p), qos=1)  # after the SUBACK

    def ask(self, question: str) -> dict[str, Any]:
        ask = {"text": TEMPLATE.format(question), "reply_to": self.topic, "max_new_tokens": 1,
               "id": uuid.uuid4().hex}
        self.bus.publish_wait(topics.ASK, json.dumps(ask).encode(), qos=1)
        deadline = time.monotonic() + 120
        while True:
            answer = json.loads(self.answers.get(timeout=max(0.1, deadline - time.monotonic())))
            if answer.get("id") == ask["id"]:
                return answer

    def close(self) -> None:
        self.bus.stop()


def test_a_json_answer_does_not_say_whether_someone_asked_before(amqtt_broker: Broker, node: NodeProcess) -> None:
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as operator:
        victim = operator.ask(TEMPLATE.format(VICTIM), node="p1", max_new_tokens=2, timeout=120)
        # the operator's own answers carry no cache figures unless it asks for them
        assert not set(CACHE_WORDS) & set(victim.node_figures), victim.node_figures
        ha = HomeAssistant(amqtt_broker)
        try:
            probed = {q: ha.ask(q) for q in (VICTIM, *OTHERS)}
        finally:
            ha.close()
        for q, answer in probed.items():
            assert "error" not in answer, answer
            assert not set(CACHE_WORDS) & set(answer), (q, answer)
        # the victim's question and the others' answers have the same fields: nothing to compare
        assert len({frozenset(a) for a in probed.values()}) == 1, probed
        # the operator (the asker principal, sealed) still gets them when it asks: a full hit now
        again = operator.ask(TEMPLATE.format(VICTIM), node="p1", max_new_tokens=2, timeout=120, cache_figures=True)
        c = again.node_figures["cache"]
        assert c["decision"] == "local" and c["full_hit"] and c["local_tokens"] == again.prompt_tokens, c
        assert "cache" in again.as_json() and "cache" not in victim.as_json()
