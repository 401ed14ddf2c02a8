"""A HALO coordinator in a weight format below fp32, as real processes on a real broker: `mesh
coordinator --weights q4` runs the mesh's own forward (mesh.lm, no transformers) on the q4 file,
announces the q4 model key, and q4 workers join its plan (a worker-only node reading its groups
from the file, and a full q4 node that also answers asks); a strict HALO answer is token for token
the plain single-node answer of the same weights, the full node's over the mesh and this process's
own. (Before: the coordinator took no --weights and always loaded fp32 through transformers, so a
q4 worker's model key never matched its plans.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.halo.predictor import predictor_path
from mesh.model import Decoder, load_model
from nodes.client import MeshClient
from nodes.up import spawn
from tests.conftest import CACHE_ROOT, ENV, Broker, NodeProcess, asker_keys, mesh_argv, require_model, start_node

pytestmark = pytest.mark.e2e

MODEL, WEIGHTS = "smollm2-135m", "q4"
ONLY, FULL = "q4-only", "q4-full"
PROMPT = "The capital of France is"


def _halo(client: MeshClient) -> dict[str, Any]:
    v = client.peers.get("coordinator")
    return (v.heartbeat.get("halo") or {}) if v is not None else {}


@pytest.fixture(scope="module")
def q4_mesh(amqtt_broker: Broker, log_dir: Path) -> Iterator[dict[str, NodeProcess]]:
    require_model(MODEL)
    asker_keys()  # the CA first (see tests.conftest.start_node)
    addr = f"127.0.0.1:{amqtt_broker.port}"
    procs: dict[str, NodeProcess] = {}
    try:
        log = log_dir / f"{ONLY}-{amqtt_broker.port}.log"
        procs[ONLY] = NodeProcess(ONLY, spawn(mesh_argv(
            "node", "--name", ONLY, "--broker", addr, "--model", MODEL, "--weights", WEIGHTS, "--roles", "worker",
            "--no-answer", "--threads", "1", "--heartbeat", "0.5", "--home", str(CACHE_ROOT)), open(log, "wb"), env=ENV),
            log)
        procs[FULL] = start_node(amqtt_broker, FULL, MODEL, log_dir, "--weights", WEIGHTS, "--roles", "worker",
                                 "--threads", "1")
        log = log_dir / f"coordinator-{WEIGHTS}-{amqtt_broker.port}.log"
        env = {**ENV, "PYTHONPROFILEIMPORTTIME": "1"}  # every module it imports is listed in its log
        procs["coordinator"] = NodeProcess("coordinator", spawn(mesh_argv(
            "coordinator", "--broker", addr, "--model", MODEL, "--weights", WEIGHTS, "--threads", "1",
            "--heartbeat", "0.5", "--home", str(CACHE_ROOT), "--replan-interval", "3600", "--sync", "strict",
            "--no-cache"), open(log, "wb"), env=env), log)
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            deadline = time.monotonic() + 240
            while True:
                for p in procs.values():
                    if p.proc.poll() is not None:
                        raise AssertionError(f"{p.name} exited ({p.proc.returncode}): {p.log.read_text()[-3000:]}")
                halo = _halo(client)
                if set(halo.get("workers", [])) == {ONLY, FULL} and halo.get("pending") is None:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"no plan over the q4 workers: {halo}")
                time.sleep(0.2)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_a_q4_coordinator_plans_over_q4_workers_and_strict_is_the_plain_q4_answer(
        amqtt_broker: Broker, q4_mesh: dict[str, NodeProcess]) -> None:
    loaded = load_model(CACHE_ROOT, MODEL, weights=WEIGHTS)
    dec = Decoder(loaded)
    ref = dec.generate(dec.encode(PROMPT), 20)
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        views = {n: client.peers.get(n).heartbeat for n in ("coordinator", ONLY, FULL)}
        halo = _halo(client)
        plain = client.ask(PROMPT, node=FULL, max_new_tokens=20, timeout=120, no_cache=True)
        routed = client.ask(PROMPT, node="coordinator", max_new_tokens=20, timeout=300, no_cache=True)
    key = loaded.model_key
    assert key.endswith("/q4") and {n: hb["model_key"] for n, hb in views.items()} == dict.fromkeys(views, key)
    assert sum(halo["groups"].values()) == 30 * 24 and halo["local_groups"] == 0  # every group on a q4 worker
    # a predictor trained on fp32 (mesh setup) serves the q4 coordinator: its neuron order is in the plan
    assert halo["predictor"] == predictor_path(CACHE_ROOT, MODEL, 64).exists()
    figs = routed.node_figures
    assert figs["model"] == MODEL and figs["halo"]["sync"] == "strict"
    assert figs["halo"]["partials_on_time"] == 2 * figs["halo"]["steps"] > 0  # both workers, every step
    assert figs["halo"]["local_fallback_groups"] == 0 and figs["halo"]["zeroed_groups"] == 0
    assert plain.node_figures["token_ids"] == ref.token_ids and len(ref.token_ids) > 0
    assert figs["token_ids"] == ref.token_ids, (routed.answer, ref.text)
    # the mesh's own forward: the coordinator never imported transformers
    imported = [line.rsplit("|", 1)[-1].strip() for line in q4_mesh["coordinator"].log.read_text().splitlines()
                if line.startswith("import time:")]
    assert "mesh.lm.model" in imported and not [m for m in imported if m.startswith("transformers")]
