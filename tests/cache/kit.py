"""What the prompt-cache tests share: two prompts on one prefix, a fast link and a slow CPU, and a
node's retained catalog read off a real broker."""

from __future__ import annotations

import queue
import time
from typing import Any

from mesh import topics, wire
from mesh.auth import senders
from mesh.cache.lookup import LinkEstimate
from mesh.mqtt.bus import MqttBus
from tests.conftest import Broker

PREFIX = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
          "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
          "Which planet is known as the red planet?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\nAnswer: B\n\n")
Q1 = PREFIX + "Which planet has the most moons?\nA. Saturn\nB. Mars\nC. Venus\nD. Mercury\nAnswer:"
Q2 = PREFIX + "What is the largest planet?\nA. Earth\nB. Jupiter\nC. Mars\nD. Venus\nAnswer:"

FAST = LinkEstimate(bytes_per_s=1e9, rtt_s=0.001)
SLOW_CPU = 1.0  # prefill tokens/s: anything a fast link brings beats recomputing it


def retained_catalog(broker: Broker, node: str, min_items: int, timeout: float = 30.0) -> dict[str, Any]:
    """The body of ``node``'s catalog as a subscriber of its topic reads it (the retained copy, then
    each new one), once it lists at least ``min_items`` keys. The seal is unwrapped unchecked: what
    the asker account, or any node, gets."""
    got: queue.Queue[bytes] = queue.Queue()
    bus = MqttBus(f"cat-reader-{time.monotonic_ns() % 10**9}", broker.address)
    bus.subscribe(topics.node_catalog(node), lambda t, p, r: got.put(p))
    bus.start(10)
    try:
        deadline = time.monotonic() + timeout
        while True:
            body = dict(wire.decode(senders.unwrap(got.get(timeout=max(0.1, deadline - time.monotonic())))).body)
            if body["n"] >= min_items:
                return body
    finally:
        bus.stop()
