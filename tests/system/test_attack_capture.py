"""E4 (review H2): heartbeat figures are checked against physics before anyone acts on them.

A fake node ``zzz`` (a raw MQTT client, no credentials needed on the embedded broker) says it is
online and heartbeats ``queue: -10**9``: before the fix the router sent it every routed and JSON
ask, which it swallowed. A fake HALO worker heartbeats ``compute_rows_per_s: 1e308``: before the
fix the coordinator's scheduler overflowed to NaN and raised on every re-plan tick. Now both
heartbeats are refused whole and counted (``implausible-heartbeat``), and the mesh answers.

Real processes on a real amqtt broker: one SmolLM2 node (the router: the smallest name) and one
HALO coordinator with no workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from nodes.client import MeshClient
from nodes.up import spawn
from tests.conftest import (CACHE_ROOT, ENV, Broker, NodeProcess, asker_keys, mesh_argv, peer_keys, require_model,
                            start_node)
from tests.system.rogue import Rogue, rejects_of, wait_json

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def mesh_pair(amqtt_broker: Broker, log_dir: Path) -> Iterator[dict[str, NodeProcess]]:
    require_model(MODEL)
    node = start_node(amqtt_broker, "capnode", MODEL, log_dir, "--threads", "1", "--no-cache")
    log = log_dir / f"coordinator-capture-{amqtt_broker.port}.log"
    proc = spawn(mesh_argv("coordinator", "--broker", f"127.0.0.1:{amqtt_broker.port}", "--model", MODEL,
                           "--threads", "1", "--heartbeat", "0.5", "--home", str(CACHE_ROOT), "--no-cache"),
                 open(log, "wb"), env=ENV)
    coordinator = NodeProcess("coordinator", proc, log)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.wait_online(["coordinator"], 240, ready=lambda v: v.model == MODEL)
        yield {"capnode": node, "coordinator": coordinator}
    finally:
        coordinator.stop()
        node.stop()


def fake_heartbeat(**figures: object) -> dict[str, object]:
    return {"seq": 1, "model": MODEL, "model_key": "x", "queue": 0, "load": 0.0, "prefill_tps": 1.0,
            "roles": ["answer"], **figures}


def test_a_negative_queue_captures_no_ask(amqtt_broker: Broker, mesh_pair: dict[str, NodeProcess]) -> None:
    name = "zzz"
    liar = Rogue(amqtt_broker, f"liar-{name}", will=(topics.node_status(name), topics.OFFLINE, True),
                 keys=peer_keys(name))  # a node's credential: the figures, not the seal, must give it away
    home = Rogue(amqtt_broker, "capture-home")
    try:
        liar.subscribe(topics.node_ask(name))
        home.subscribe("homeassistant-mesh/capture")
        liar.publish(topics.node_status(name), topics.ONLINE, retain=True)
        for seq in range(3):  # retained once, then live: every router has it either way
            liar.envelope(topics.node_heartbeat(name), wire.Kind.HEARTBEAT, name,
                          fake_heartbeat(seq=seq, queue=-10**9), retain=seq == 0, qos=0)
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.wait_online([name], 10)
            answered = []
            for i in range(3):
                try:
                    answered.append(client.ask(f"The capital of France is {i}", max_new_tokens=2,
                                               timeout=30, max_sends=1).node)
                except Exception as exc:  # before the fix: swallowed by zzz, so no answer
                    answered.append(f"no answer: {exc}")
        home.json_ask("Is the front door locked?", "homeassistant-mesh/capture")
        json_answer = wait_json(home, "homeassistant-mesh/capture", 30)
        captured = liar.collect(0.5)
        assert answered and all(n in ("capnode", "coordinator") for n in answered), answered
        assert json_answer is not None and json_answer.get("node") in ("capnode", "coordinator"), json_answer
        assert captured == []
        assert rejects_of(amqtt_broker, "capnode", "implausible-heartbeat") >= 1
    finally:
        liar.clear_retained(topics.node_heartbeat(name), topics.node_status(name))
        liar.close()
        home.close()


def test_an_absurd_halo_speed_does_not_stop_re_planning(amqtt_broker: Broker,
                                                        mesh_pair: dict[str, NodeProcess]) -> None:
    name = "wliar"
    coordinator = mesh_pair["coordinator"]
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        client.wait_online(["coordinator"], 30)
        model_key = str(client.peers.get("coordinator").heartbeat["model_key"])  # type: ignore[union-attr]
    failed_before = coordinator.log.read_text(errors="replace").count("re-plan failed")
    liar = Rogue(amqtt_broker, f"liar-{name}", will=(topics.node_status(name), topics.OFFLINE, True),
                 keys=peer_keys(name))  # a node's credential: the figures, not the seal, must give it away
    try:
        liar.publish(topics.node_status(name), topics.ONLINE, retain=True)
        halo = {"groups": {}, "epoch": 0, "served": 0, "group_size": 64, "compute_rows_per_s": 1e308,
                "heartbeat_s": 0.5}
        for seq in range(6):  # 1.5 s of heartbeats: the planner ticks every 0.1 s
            liar.envelope(topics.node_heartbeat(name), wire.Kind.HEARTBEAT, name,
                          fake_heartbeat(seq=seq, model_key=model_key, roles=["answer", "worker"], halo=halo),
                          retain=seq == 0, qos=0)
            time.sleep(0.25)
        failed = coordinator.log.read_text(errors="replace").count("re-plan failed") - failed_before
        assert failed == 0, f"the coordinator's re-plan raised {failed} times on a 1e308 speed"
        assert rejects_of(amqtt_broker, "coordinator", "implausible-heartbeat") >= 1
    finally:
        liar.clear_retained(topics.node_heartbeat(name), topics.node_status(name))
        liar.close()
