"""HALO on the testbed (root only): one lossy worker at 5 % drop; relaxed sync beats strict.

Same coordinator and plan for both (shares by speed only, ``--reliability-weight 0``), so the
difference is the sync rule alone: strict waits for every partial through TCP retransmissions,
relaxed stops at the deadline and never waits for a stalled worker.
"""

from __future__ import annotations

import sys
from typing import Callable

import pytest

from mesh.config import BrokerAddress
from nodes.bench.halo import _ask_raw
from nodes.client import MeshClient
from nodes.testbed.bed import Testbed
from nodes.testbed.shell import REPO_ROOT
from nodes.testbed.spec import NodeSpec, TestbedSpec, check_node_name
from tests.conftest import CACHE_ROOT, asker_keys, require_model

pytestmark = pytest.mark.testbed

MODEL = "smollm2-135m"


def _node(name: str) -> NodeSpec:
    return NodeSpec(name=check_node_name(name), link_mbit=None, loss_pct=0.0, cpu=None)


def test_relaxed_time_per_token_is_far_below_strict_at_5pct_loss(make_testbed: Callable[..., Testbed],
                                                                  mosquitto_ok: None) -> None:
    require_model(MODEL)
    tb = make_testbed(lambda i: TestbedSpec(nodes=(_node("co"), _node("wa"), _node("wb")), instance=i))
    tb.start_broker("mosquitto")
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    common = ["--broker", tb.broker_url, "--model", MODEL, "--home", str(CACHE_ROOT), "--threads", "1",
              "--heartbeat", "0.5"]
    for w in ("wa", "wb"):
        tb.spawn(w, [sys.executable, "-m", "nodes.cli", "node", "--name", w, "--roles", "worker",
                     "--no-cache", *common], env=env, log=tb.log_path(f"node-{w}"))
    tb.spawn("co", [sys.executable, "-m", "nodes.cli", "coordinator", "--no-cache", "--replan-interval",
                    "3600", "--reliability-weight", "0", *common], env=env, log=tb.log_path("coordinator"))
    host, port = tb.broker_address
    with MeshClient(BrokerAddress(host, port), keyring=asker_keys()) as client:
        client.wait_online(["wa", "wb", "coordinator"], 240, ready=lambda v: v.model == MODEL)
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            halo = client.peers.get("coordinator").heartbeat.get("halo") or {}
            if set(halo.get("workers", [])) == {"wa", "wb"} and halo.get("pending") is None:
                break
            time.sleep(0.2)
        tb.set_loss("wb", 5.0)
        tpot = {}
        for sync in ("relaxed", "strict", "relaxed"):  # relaxed twice: the first warms its figures
            body = _ask_raw(client, {"text": "Once upon a time,", "max_new_tokens": 16, "halo_sync": sync,
                                     "no_cache": True}, timeout=300)
            tpot[sync] = body["tpot_s"]
    print(tpot)
    # 3.9x and 2.8x measured in two runs on a loaded 2-core machine; the benchmark reports the figure
    assert tpot["relaxed"] * 2 < tpot["strict"], tpot
