"""Ask ids, on the node agent and on the HALO coordinator alike (``mesh.member``).

The same sender sending the same ask id twice gets one answer (a router that crashed mid-duty and
its successor may both forward an ask: ``mesh.routing``'s argument relies on every target dropping
the repeat). Two different senders that happen to use one id get an answer each.

Real processes on a real amqtt broker: one SmolLM2 node and one coordinator with no workers (it
computes every neuron group itself). Asks are sent as raw envelopes straight to each process's
ask topic, so no router or client resend is involved.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from mesh.auth import senders
from mesh.mqtt.bus import MqttBus
from nodes.client import MeshClient
from nodes.up import spawn
from tests.conftest import CACHE_ROOT, ENV, Broker, NodeProcess, asker_keys, mesh_argv, require_model, start_node

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
SETTLE_S = 3.0  # how long a repeat gets to produce a second answer once the first arrived


@pytest.fixture(scope="module")
def members(amqtt_broker: Broker, log_dir: Path) -> Iterator[list[str]]:
    require_model(MODEL)
    node = start_node(amqtt_broker, "idnode", MODEL, log_dir, "--threads", "1", "--no-cache")
    log = log_dir / f"coordinator-ids-{amqtt_broker.port}.log"
    proc = spawn(mesh_argv("coordinator", "--broker", f"127.0.0.1:{amqtt_broker.port}", "--model", MODEL,
                           "--threads", "1", "--heartbeat", "0.5", "--home", str(CACHE_ROOT), "--no-cache",
                           "--sync", "strict"), open(log, "wb"), env=ENV)
    coordinator = NodeProcess("coordinator", proc, log)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.wait_online(["coordinator"], 240, ready=lambda v: v.model == MODEL)
        yield ["idnode", "coordinator"]
    finally:
        coordinator.stop()
        node.stop()


class Asker:
    """A client that sends raw ASK envelopes under a sender name of its choice."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.name = name
        self.topic = topics.reply(f"ids-{name}-{time.monotonic_ns()}")
        self.answers: queue.Queue[wire.Envelope] = queue.Queue()
        self.bus = MqttBus(f"ids-{name}-{time.monotonic_ns()}", broker.address)
        self.bus.subscribe(self.topic, self._on_reply, qos=1)
        self.bus.start()

    def _on_reply(self, topic: str, payload: bytes, retained: bool) -> None:
        env = wire.decode(senders.unwrap(payload))
        if env.kind is wire.Kind.ANSWER:
            self.answers.put(env)

    def ask(self, node: str, corr: str) -> None:
        body = {"text": "The capital of France is", "max_new_tokens": 2, "no_cache": True}
        keys = asker_keys()  # with identities, every asker of the account seals as its principal
        sender = keys.name if keys is not None else self.name
        env = wire.Envelope(wire.Kind.ASK, sender, body, corr=corr, reply_to=self.topic)
        self.bus.publish_wait(topics.node_ask(node), senders.encode(keys, env, topics.node_ask(node)), qos=1)

    def count_answers(self, corr: str, timeout: float = 120.0) -> int:
        """Answers to ``corr``: waits for the first, then ``SETTLE_S`` for any repeat."""
        got, deadline = 0, time.monotonic() + timeout
        settle_until = deadline
        while True:
            left = (deadline if got == 0 else settle_until) - time.monotonic()
            if left <= 0:
                return got
            try:
                env = self.answers.get(timeout=left)
            except queue.Empty:
                return got
            if env.corr == corr:
                got += 1
                settle_until = time.monotonic() + SETTLE_S

    def close(self) -> None:
        self.bus.stop()


@pytest.mark.parametrize("target", ["idnode", "coordinator"])
def test_the_same_sender_repeating_an_ask_id_gets_one_answer(amqtt_broker: Broker, members: list[str],
                                                            target: str) -> None:
    asker = Asker(amqtt_broker, "alice")
    try:
        corr = f"repeat-{target}-{time.monotonic_ns()}"
        asker.ask(target, corr)
        asker.ask(target, corr)
        assert asker.count_answers(corr) == 1
    finally:
        asker.close()


@pytest.mark.parametrize("target", ["idnode", "coordinator"])
def test_two_senders_sharing_an_ask_id_get_an_answer_each(amqtt_broker: Broker, members: list[str],
                                                          target: str) -> None:
    alice, bob = Asker(amqtt_broker, "alice"), Asker(amqtt_broker, "bob")
    try:
        corr = f"shared-{target}-{time.monotonic_ns()}"
        alice.ask(target, corr)
        bob.ask(target, corr)
        assert (alice.count_answers(corr), bob.count_answers(corr)) == (1, 1)
    finally:
        alice.close()
        bob.close()
