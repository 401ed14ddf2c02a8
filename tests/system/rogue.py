"""A raw MQTT client that plays whatever the attack tests need it to: a fake node, an asker, a sink.

Plain paho, no mesh class in between: it publishes exactly the bytes a test builds (as an
attacker with no credentials on the embedded broker would) and collects what arrives on the
topics it subscribed to. Where the nodes hold identities (``mesh.auth``), it seals with ``keys``
(default the test clients' ``asker_keys()``; ``tests.conftest.peer_keys(name)`` for a stand-in
node): its asks in the keys' name, anything else it sends in the keys' own name. It then plays an
insider holding a credential, so the checks behind the signature are still the ones under test;
``keys=None`` plays a stranger, whom keyed nodes refuse (``unauthenticated``). What it receives is
unwrapped unchecked (``mesh.auth.senders.unwrap``).
"""

from __future__ import annotations

import json
import queue
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics, wire
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.errors import ProtocolError
from tests.conftest import Broker, asker_keys

_DEFAULT: Any = object()


class Rogue:
    def __init__(self, broker: Broker, client_id: str, will: tuple[str, bytes, bool] | None = None,
                 keys: Keyring | None = _DEFAULT) -> None:
        self.keys: Keyring | None = asker_keys() if keys is _DEFAULT else keys
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._sync_topic = f"rogue-sync/{client_id}"
        self._synced: queue.Queue[bytes] = queue.Queue()
        self.bytes_in = 0
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._sync_topic:
            self._synced.put(bytes(msg.payload))
            return
        self.bytes_in += len(msg.payload)
        try:
            payload = senders.unwrap(bytes(msg.payload))
        except ProtocolError:  # a sink keeps what it cannot unwrap as it came
            payload = bytes(msg.payload)
        self.got.put((msg.topic, payload))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and return once the broker holds the subscription: a message of our own sent
        after it, on a topic subscribed after it, has come back."""
        self.client.subscribe(topic, qos)
        self.client.subscribe(self._sync_topic, 1)
        token = str(time.monotonic_ns()).encode()
        self.publish(self._sync_topic, token)
        while self._synced.get(timeout=10) != token:
            pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def envelope(self, topic: str, kind: wire.Kind, sender: str, body: dict[str, Any], *, corr: str | None = None,
                 reply_to: str | None = None, retain: bool = False, qos: int = 1) -> None:
        if self.keys is not None and (kind is wire.Kind.ASK or sender == self.keys.name):
            env = wire.Envelope(kind, self.keys.name, body, corr=corr, reply_to=reply_to)
            self.publish(topic, senders.encode(self.keys, env, topic), qos=qos, retain=retain)
            return
        self.publish(topic, wire.encode(wire.Envelope(kind, sender, body, corr=corr, reply_to=reply_to)),
                     qos=qos, retain=retain)

    def json_ask(self, text: str, reply_to: str, max_new_tokens: int = 2, ask_id: str | None = None,
                 **extra: Any) -> None:
        ask: dict[str, Any] = {"text": text, "reply_to": reply_to, "max_new_tokens": max_new_tokens, **extra}
        if ask_id is not None:
            ask["id"] = ask_id
        self.publish(topics.ASK, json.dumps(ask).encode())

    def next(self, timeout: float) -> tuple[str, bytes] | None:
        try:
            return self.got.get(timeout=timeout)
        except queue.Empty:
            return None

    def collect(self, seconds: float) -> list[tuple[str, bytes]]:
        """Everything that arrives within ``seconds``."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            got = self.next(left)
            if got is not None:
                out.append(got)
        return out

    def clear_retained(self, *topic_list: str) -> None:
        for t in topic_list:
            self.publish(t, b"", qos=1, retain=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_json(rogue: Rogue, topic: str, timeout: float) -> dict[str, Any] | None:
    """The first JSON object that arrives on ``topic`` within ``timeout`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = rogue.next(left)
        if got is not None and got[0] == topic:
            try:
                return json.loads(got[1])
            except ValueError:
                continue
    return None


def rejects_of(broker: Broker, node: str, reason: str, timeout: float = 10.0) -> int:
    """How many ``reason`` rejects ``node``'s latest heartbeat reports (waits for one to show any)."""
    from nodes.client import MeshClient

    deadline = time.monotonic() + timeout
    count = 0
    with MeshClient(broker.address, keyring=asker_keys()) as client:
        while time.monotonic() < deadline:
            view = client.peers.get(node)
            count = int(((view.heartbeat if view else {}).get("rejects") or {}).get(reason, 0))
            if count:
                return count
            time.sleep(0.2)
    return count
