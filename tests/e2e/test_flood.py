"""A real node keeps answering while another client floods its topics with garbage.

A `mesh node` process (SmolLM2-135M) on the embedded amqtt broker answers pairs of real asks, one
of each pair on a quiet bus and one under a flood of garbage on every topic it serves (asks, route,
JSON and text asks, heartbeats, statuses, catalogs, KV fetches, its reply inbox) from a second
client. Figures (``tests.flood.measure_flood``) are printed (``-s``) and written to
``out/flood.json`` (plot: ``out/flood.png``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, Broker, start_node
from tests.flood import measure_flood, write_json, write_plot

pytestmark = pytest.mark.e2e

PAIRS = 4
RATE = 2000.0  # garbage messages per second, QoS 0
MAX_MESSAGES = 40_000  # at most 10,000 per flooded ask (5 s at RATE)
SLOWDOWN_BOUND = 4.0  # flooded median TTLT at most this many times the quiet one (1.8x measured; the
# flooder and the broker share the 2 cores with the node, and other jobs share the machine)


def test_node_answers_under_a_garbage_flood_and_counts_every_reject(amqtt_broker: Broker, log_dir: Path) -> None:
    node = start_node(amqtt_broker, "f1", "smollm2-135m", log_dir)
    try:
        figures = measure_flood(amqtt_broker.address, "f1", pairs=PAIRS, rate=RATE, max_messages=MAX_MESSAGES)
    finally:
        node.stop()
    write_json(figures, REPO / "out" / "flood.json")
    write_plot(figures, REPO / "out" / "flood.png")
    print(json.dumps({k: v for k, v in figures.items() if k != "asks"}, indent=2))

    assert node.proc.returncode in (0, -15), "the node exited on its own under the flood"
    flood = figures["flood"]
    # Every ask answered, flooded or not, each with a single send (no timeout, no resend).
    assert figures["quiet"]["n"] == figures["flooded"]["n"] == PAIRS
    assert all(a["sends"] == 1 and a["new_tokens"] >= 1 for a in figures["asks"])
    assert figures["answers_identical"], "the flood changed an answer"
    # Each flooded ask was flooded from before it went out until its answer came.
    assert all(a["covered"] and a["flood_sent"] > 0 for a in figures["asks"] if a["flooded"]), figures["asks"]
    # It really was a flood: thousands of messages at over half the target rate.
    assert flood["sent"] >= 2_000 and flood["rate_msgs_per_s"] >= RATE / 2, flood
    # Every garbage message was counted under the reason it must get, seen in the node's heartbeat.
    counted = figures["rejects_counted"]
    assert counted == flood["sent_by_reason"], (counted, flood["sent_by_reason"])
    # The garbage asks that named a usable reply topic got an error reply each.
    assert flood["error_replies_received"] >= 0.99 * flood["sent_by_reason"]["bad-max-new-tokens"], flood
    assert figures["ttlt_ratio"] <= SLOWDOWN_BOUND, figures
