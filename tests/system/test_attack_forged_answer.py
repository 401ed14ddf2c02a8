"""E3 (review H1): a rogue that answers a routed CLI ask first does not get its answer taken, and
one that heartbeats in a node's name does not change what others see of that node.

The routed topic shows every ask's corr and reply topic to anyone who reads it, and every node may
write every reply topic: before identities, the CLI returned the first ANSWER for its corr, whoever
sent it, so a forger answered ``FORGED`` in the name of ``node1`` and won (the review's
``forge.py``). Now nodes seal what they send, and the CLI takes a reply only from the node the
router's sealed notice names (``mesh.auth.senders``). The rogue here answers every routed ask at
once, three ways: plain bytes in the node's name (no key), sealed with a valid key of another name
in its own name (with a notice naming itself, and a token), and sealed with that key in the node's
name. Each is refused and counted, and the real answer comes through. Heartbeats forged the same
ways (no key; another node's key) leave the node's view as its own heartbeats make it.

Real processes on a real amqtt broker: one SmolLM2 node (with its identity, enrolled under the
test home like ``mesh up`` does); the rogue is a raw MQTT client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from mesh.auth.keyring import Keyring
from mesh.auth.store import identity_dir, load_keyring
from nodes.client import MeshClient
from tests.conftest import CACHE_ROOT, Broker, NodeProcess, asker_keys, start_node
from tests.system.rogue import Rogue, rejects_of

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
NODE = "e3node"
ROGUE = "zz-e3rogue"  # a valid node identity of another name (not the router: a larger name)


@pytest.fixture(scope="module")
def node(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    if asker_keys() is None:
        pytest.fail(f"no asker identity under {identity_dir(CACHE_ROOT)}: the test needs identities on")
    proc = start_node(amqtt_broker, NODE, MODEL, log_dir, "--threads", "1", "--no-cache")
    yield proc
    proc.stop()


def forged_answer(sender: str, corr: str | None) -> wire.Envelope:
    body = {"text": " FORGED", "node": NODE, "prompt_tokens": 1, "new_tokens": 1, "ttft_s": 0.0, "ttlt_s": 0.0}
    return wire.Envelope(wire.Kind.ANSWER, sender, body, corr=corr)


class Forger:
    """Reads mesh/v1/route and answers every ask on its reply topic at once, three ways."""

    def __init__(self, broker: Broker, keys: Keyring) -> None:
        self.rogue, self.keys = Rogue(broker, f"forger-{time.monotonic_ns()}", keys=None), keys
        self.rogue.subscribe(topics.ROUTE)
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            got = self.rogue.next(0.1)
            if got is None:
                continue
            ask = wire.decode(got[1])  # the asker's seal unwrapped: corr and reply topic in clear
            to, corr = ask.reply_to, ask.corr
            assert to is not None
            # 1. no key: plain bytes in the node's name
            self.rogue.publish(to, wire.encode(forged_answer(NODE, corr)))
            # 2. a valid key of another name, in its own name: its own word that it took the ask, a token, an answer
            notice = wire.Envelope(wire.Kind.ROUTED, ROGUE, {"node": ROGUE}, corr=corr)
            self.rogue.publish(to, self.keys.seal_envelope(notice, to))
            token = wire.Envelope(wire.Kind.TOKEN, ROGUE, {"i": 0, "text": " FORGED"}, corr=corr)
            self.rogue.publish(to, self.keys.seal_envelope(token, to))
            self.rogue.publish(to, self.keys.seal_envelope(forged_answer(ROGUE, corr), to))
            # 3. that key, in the node's name
            self.rogue.publish(to, self.keys.seal(wire.encode(forged_answer(NODE, corr)), to))
            self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.rogue.close()


def test_a_forged_answer_to_a_routed_ask_is_refused(amqtt_broker: Broker, node: NodeProcess) -> None:
    rogue_keys = load_keyring(identity_dir(CACHE_ROOT), ROGUE, "node")
    assert rogue_keys is not None and rogue_keys.identity.role == "node"
    forger = Forger(amqtt_broker, rogue_keys)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.wait_online([NODE], 30)
            streamed: list[str] = []
            results = [client.ask("The capital of France is", max_new_tokens=4, timeout=120, max_sends=1,
                                  on_text=streamed.append) for _ in range(2)]
            rejects = client.rejects.snapshot()
    finally:
        forger.close()
    assert forger.sent == 2, "the rogue saw every routed ask"
    for result in results:
        assert result.node == NODE and "FORGED" not in result.answer, result
    assert "FORGED" not in "".join(streamed)
    assert results[0].answer == results[1].answer  # the node's own, greedy answer, twice
    # per ask: the plain answer (no key) and the one in the node's name under another key, refused
    # on arrival; the notice, token and answer in the rogue's own name, vouched for by no router
    # (counted when the ask ends; one that came after it, as any reply to a closed ask)
    assert rejects.get("unauthenticated", 0) >= 2 and rejects.get("name-mismatch", 0) >= 2, rejects
    assert rejects.get("wrong-sender", 0) + rejects.get("unexpected-reply", 0) >= 6, rejects
    assert rejects.get("wrong-sender", 0) >= 2, rejects


def test_a_forged_heartbeat_does_not_change_the_nodes_view(amqtt_broker: Broker, node: NodeProcess) -> None:
    """Heartbeats in the node's name, from no key and from a valid key of another name: a keyed
    client's view of the node keeps the node's own figures, and the node counts the forgeries."""
    rogue_keys = load_keyring(identity_dir(CACHE_ROOT), ROGUE, "node")
    assert rogue_keys is not None
    rogue = Rogue(amqtt_broker, f"hb-forger-{time.monotonic_ns()}", keys=None)
    topic = topics.node_heartbeat(NODE)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.wait_online([NODE], 30, ready=lambda v: v.model == MODEL)
            start = client.peers.get(NODE).seq  # type: ignore[union-attr]
            for i in range(5):
                forged = wire.Envelope(wire.Kind.HEARTBEAT, NODE, {
                    "seq": 10**6 + i, "model": "forged-model", "model_key": "x", "queue": 3, "load": 0.9,
                    "prefill_tps": 1.0, "heartbeat_s": 0.5})
                rogue.publish(topic, wire.encode(forged), qos=1)
                rogue.publish(topic, rogue_keys.seal(wire.encode(forged), topic), qos=1)
            # the node's own heartbeats go on (every 0.5 s): three more, all after the forgeries
            client.wait_online([NODE], 30, ready=lambda v: v.seq >= start + 3)
            view = client.peers.get(NODE)
            rejects = client.rejects.snapshot()
    finally:
        rogue.close()
    assert view is not None and view.model == MODEL and view.seq < 10**6, view
    assert rejects.get("unauthenticated", 0) >= 5 and rejects.get("name-mismatch", 0) >= 5, rejects
    assert rejects_of(amqtt_broker, NODE, "name-mismatch") >= 5  # the node itself heard and refused them
