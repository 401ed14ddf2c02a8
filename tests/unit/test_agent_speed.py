"""A node re-measures its prefill speed while idle until a real ask measures it.

The fetch-or-recompute decision of a node's first asks rests on this figure; the start-up
warm-up measured it while models loaded (on the testbed: four nodes at once, before the device's
CPU quota applied), which once made a fresh pi5 node expect 8.3 s for a 0.54 s recompute and
fetch instead (`mesh bench cache`, 2026-12-05).
"""

from __future__ import annotations

import time
from pathlib import Path

from mesh.config import NodeConfig
from mesh.model import Decoder
from nodes.agent import NodeAgent
from tests import fuzzkit
from tests.conftest import require_model


def test_idle_probes_replace_the_start_up_speed_until_an_ask_measures_it(tmp_path: Path) -> None:
    tiny = fuzzkit.tiny_loaded(require_model("smollm2-135m"))
    agent = NodeAgent(NodeConfig(name="probe", home=tmp_path), loaded=tiny)
    agent.decoder = Decoder(tiny)
    agent.figures.prefill_spt = 100.0  # a start-up figure far off: 100 s per token
    limit = agent.timing.speed_probes
    assert limit >= 1

    assert not agent._probe_speed(idle_since=time.monotonic())  # not idle long enough yet
    assert agent.figures.prefill_spt == 100.0
    long_ago = time.monotonic() - agent.timing.speed_probe_idle_s - 1
    assert agent._probe_speed(idle_since=long_ago)
    assert 0 < agent.figures.prefill_spt < 0.5  # measured: a tiny model takes milliseconds per token
    assert agent.heartbeat_body()["prefill_tps_from"] == "probes:1"
    for _ in range(limit - 1):
        assert agent._probe_speed(idle_since=long_ago)
    assert not agent._probe_speed(idle_since=long_ago)  # at most `speed_probes` of them
    assert agent.figures.spt_probes == limit

    fresh = NodeAgent(NodeConfig(name="asked", home=tmp_path), loaded=tiny)
    fresh.decoder = agent.decoder
    fresh.figures.prefill_spt, fresh.figures.spt_measured = 0.25, True  # an answered ask measured it
    assert not fresh._probe_speed(idle_since=long_ago)
    assert fresh.figures.prefill_spt == 0.25
    assert fresh.heartbeat_body()["prefill_tps_from"] == "asks"
