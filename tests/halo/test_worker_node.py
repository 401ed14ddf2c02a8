"""A worker-only node (`mesh node --roles worker --no-answer`) as a real process on a real broker,
beside today's worker (a full node with the worker role), both given a third of SmolLM2's groups
by one plan in a non-trivial neuron order: the worker-only node never imports transformers,
advertises only the worker role with the full node's model key, refuses asks (and as the router
sends them to the full node), keeps no mapping of the weight file, and holds far less memory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mesh import topics, wire
from mesh.auth.store import identity_dir, load_keyring
from mesh.errors import MeshError
from mesh.halo.placement import Plan, pack_order
from mesh.mqtt.bus import MqttBus
from nodes.client import MeshClient
from nodes.up import spawn
from tests.conftest import (CACHE_ROOT, ENV, Broker, NodeProcess, asker_keys, mesh_argv, require_model,
                            start_node)

MODEL = "smollm2-135m"
LEAN, FULL = "a-lean", "b-full"  # the worker-only node has the smaller name: it is the router
EPOCH = 7


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _start_lean(broker: Broker, log_dir: Path) -> NodeProcess:
    log = log_dir / f"{LEAN}-{broker.port}.log"
    # -X importtime's environment form: every module the process imports is listed in its log
    env = {**ENV, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = spawn(mesh_argv("node", "--name", LEAN, "--broker", f"127.0.0.1:{broker.port}", "--model", MODEL,
                           "--roles", "worker", "--no-answer", "--threads", "1", "--heartbeat", "0.5",
                           "--home", str(CACHE_ROOT)), open(log, "wb"), env=env)
    return NodeProcess(LEAN, proc, log)


def _plan(model_key: str, n_layers: int = 30, n_groups: int = 24) -> Plan:
    thirds = [tuple(range(k, n_groups, 3)) for k in range(3)]
    g = torch.Generator().manual_seed(3)
    order = tuple(pack_order(torch.randperm(n_groups * 64, generator=g).tolist()) for _ in range(n_layers))
    return Plan(epoch=EPOCH, model_key=model_key, group_size=64, n_groups=n_groups,
                workers={LEAN: tuple(thirds[0] for _ in range(n_layers)), FULL: tuple(thirds[1] for _ in range(n_layers))},
                local=tuple(thirds[2] for _ in range(n_layers)), order=order)


@pytest.fixture()
def nodes(amqtt_broker: Broker, log_dir: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    require_model(MODEL)
    asker_keys()  # the CA first (see tests.conftest.start_node)
    lean = _start_lean(amqtt_broker, log_dir)
    try:
        full = start_node(amqtt_broker, FULL, MODEL, log_dir, "--roles", "worker", "--no-cache", "--threads", "1")
    except BaseException:
        lean.stop()
        raise
    yield lean, full
    lean.stop()
    full.stop()


def test_worker_only_node_holds_its_groups_only_and_answers_no_asks(amqtt_broker: Broker,
                                                                   nodes: tuple[NodeProcess, NodeProcess]) -> None:
    lean, full = nodes
    keys = load_keyring(identity_dir(CACHE_ROOT), "coordinator", "coordinator") if asker_keys() is not None else None
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        client.wait_online([LEAN, FULL], 240, ready=lambda v: v.model == MODEL and "halo" in v.heartbeat)
        lean_hb, full_hb = client.peers.get(LEAN).heartbeat, client.peers.get(FULL).heartbeat
        assert lean_hb["roles"] == ["worker"] and "answer" in full_hb["roles"]
        assert lean_hb["model_key"] == full_hb["model_key"] == f"{MODEL}@b179c9523d0e6a0f/fp32"
        assert lean_hb["halo"]["compute_rows_per_s"] > 0  # its speed probe ran on its own groups

        # One plan, retained as the coordinator's: a third of every layer's groups to each worker.
        bus = MqttBus(f"test-plan-{os.getpid()}", amqtt_broker.address)
        bus.start(10.0)
        try:
            env = wire.Envelope(wire.Kind.HALO_PLAN, "coordinator",
                                {"epoch": EPOCH, "plan": _plan(lean_hb["model_key"]).to_dict()},
                                reply_to=topics.reply("coordinator"))
            payload = keys.seal_envelope(env, topics.HALO_PLAN) if keys is not None else wire.encode(env)
            bus.publish_wait(topics.HALO_PLAN, payload, qos=1, retain=True)
            client.wait_online([LEAN, FULL], 120,
                               ready=lambda v: (v.heartbeat.get("halo") or {}).get("epoch") == EPOCH)
        finally:
            bus.publish_wait(topics.HALO_PLAN, b"", qos=1, retain=True)  # no plan left for other tests
            bus.stop()
        for name in (LEAN, FULL):
            assert client.peers.get(name).heartbeat["halo"]["groups"] == 8 * 30, name

        lean_mib, full_mib = _rss_mib(lean.proc.pid), _rss_mib(full.proc.pid)
        assert lean_mib < 0.6 * full_mib, (lean_mib, full_mib)
        assert "model.safetensors" not in Path(f"/proc/{lean.proc.pid}/maps").read_text()

        with pytest.raises(MeshError, match="answers no asks"):  # by name
            client.ask("Hi", node=LEAN, max_new_tokens=2, no_cache=True, timeout=60)
        r = client.ask("Hi", max_new_tokens=2, no_cache=True, timeout=120)  # routed by the worker-only node
        assert r.node == FULL
        # the refusal is counted where the heartbeat shows it
        client.wait_online([LEAN], 10, ready=lambda v: (v.heartbeat.get("rejects") or {}).get("not-answering") == 1)

    imported = [line.rsplit("|", 1)[-1].strip() for line in lean.log.read_text().splitlines()
                if line.startswith("import time:")]
    assert "mesh.halo.shard" in imported and "torch" in imported
    assert not [m for m in imported if m.split(".")[0] in ("transformers", "tokenizers")], \
        "the worker-only node imported transformers"
    print(f"RSS after loading a third of the groups: worker-only {lean_mib:.0f} MiB, full node {full_mib:.0f} MiB "
          f"(x{lean_mib / full_mib:.2f})")
