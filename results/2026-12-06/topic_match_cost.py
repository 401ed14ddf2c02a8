"""What matching one message's topic against a node's ~10 subscription filters costs with paho's
topic_matches_sub (what MqttBus did per message before it remembered each topic's handlers).

    .venv/bin/python results/2026-12-06/topic_match_cost.py
"""

import time

import paho.mqtt.client as mqtt

FILTERS = ["mesh/v1/node/pi2/halo", "mesh/v1/plan", "mesh/v1/node/coordinator/mlp", "mesh/v1/node/pi2/ask",
           "mesh/v1/catalog/+", "mesh/v1/node/+/status", "mesh/v1/route", "mesh/v1/node/+/heartbeat",
           "mesh/v1/ask", "mesh/v1/ask/text"]
N = 20000
for r in range(3):
    t = time.perf_counter()
    for _ in range(N):
        [f for f in FILTERS if mqtt.topic_matches_sub(f, "mesh/v1/node/coordinator/mlp")]
    print(f"round {r + 1}: {(time.perf_counter() - t) / N * 1e6:.1f} us per message, {len(FILTERS)} filters")
