"""A node re-measures its prefill speed while idle until a real ask measures it.

The fetch-or-recompute decision of a node's first asks rests on this figure; the start-up
warm-up measured it while models loaded (on the testbed: four nodes at once, before the device's
CPU quota applied), which once made a fresh pi5 node expect 8.3 s for a 0.54 s recompute and
fetch instead (`mesh bench cache`, 2026-12-05).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mesh.config import NodeConfig
from mesh.model import Decoder, Interrupted
from nodes.agent import NodeAgent
from tests.fuzz import fuzzkit
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


def test_a_probe_gives_way_to_an_ask_at_the_next_decoder_layer(tmp_path: Path) -> None:
    tiny = fuzzkit.tiny_loaded(require_model("smollm2-135m"))
    decoder = Decoder(tiny)
    layers = list(tiny.model.base_model.layers)
    assert len(layers) >= 2
    ids = decoder.encode("a probe that an ask interrupts " * 4)
    expected, _ = decoder.prefill(ids)

    done: list[int] = []  # layers whose forward completed
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda _m, _a, _o, i=i: done.append(i))
    with pytest.raises(Interrupted):  # an ask arrives while the first layer runs
        decoder.prefill(ids, stop=lambda: len(done) >= 1)
    assert done == [0]  # the second layer never ran
    for layer in layers:
        layer._forward_hooks.clear()
    again, _ = decoder.prefill(ids, stop=lambda: False)  # no check is left behind; same numbers
    assert torch.equal(again, expected)

    agent = NodeAgent(NodeConfig(name="probe", home=tmp_path), loaded=tiny)
    agent.decoder = decoder
    agent.figures.prefill_spt = 100.0
    agent.member.jobs.put(object())  # an ask is queued
    long_ago = time.monotonic() - agent.timing.speed_probe_idle_s - 1
    assert not agent._probe_speed(idle_since=long_ago)
    assert agent.figures.spt_probes == 0 and agent.figures.prefill_spt == 100.0  # not counted
    agent.member.jobs.get_nowait()
    assert agent._probe_speed(idle_since=long_ago)  # idle again: it probes
    assert agent.figures.spt_probes == 1 and agent.figures.prefill_spt < 0.5
