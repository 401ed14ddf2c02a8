"""A HALO worker-only node on a Pi Zero 2W's memory (root only, issue 16): in a real cgroup v1
memory group of 400 MiB with swap off, `mesh node --roles worker --no-answer` starts (it used to
refuse: its check budgeted the whole MLP in float32), announces how many neuron groups it can hold,
gets a plan from a real coordinator that gives it no more than that (the rest stays with the
coordinator), serves its partials of a strict ask, and is never OOM-killed. The same node in a
250 MiB group, too small for one group per layer beside its runtime, says so in one line and
exits 2 before the OOM killer has anything to do.

The worker reads its groups from its own copy of the weight file (``Testbed.private_home``), so
the pages it reads are charged to its cgroup; the coordinator runs uncapped beside it, on the
amqtt broker in the gateway namespace. ~40 s here.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from mesh.config import BrokerAddress
from nodes.client import MeshClient
from nodes.testbed.bed import Testbed, identity_parts
from nodes.testbed.spec import NodeSpec, TestbedSpec, check_node_name, memory_cgroup_path
from tests.conftest import CACHE_ROOT, ENV, asker_keys, mesh_argv, require_model

pytestmark = pytest.mark.testbed

MiB = 1 << 20
MODEL = "smollm2-135m"
CAP_MIB, TOO_SMALL_MIB = 400, 250  # the pi-zero-2w profile's cap; a cap below runtime + one group a layer
TOTAL_GROUPS = 30 * 24  # SmolLM2: 30 layers of 1,536 neurons in groups of 64


def _node(name: str, mem_cap_mib: int | None) -> NodeSpec:
    return NodeSpec(name=check_node_name(name), link_mbit=None, loss_pct=0.0, cpu=None, mem_cap_mib=mem_cap_mib)


def test_a_worker_only_node_works_within_a_pi_zeros_400_mib(make_testbed: Callable[..., Testbed]) -> None:
    require_model(MODEL)
    asker_keys()  # the CA first: the worker's identity is issued from it
    tb = make_testbed(lambda i: TestbedSpec(nodes=(_node("zero", CAP_MIB), _node("tiny", TOO_SMALL_MIB),
                                                   _node("co", None)), instance=i))
    tb.start_broker("amqtt")
    files = [f"models/{MODEL}/{f}" for f in ("config.json", "mesh-meta.json", "model.safetensors")]
    homes = {n: tb.private_home(n, CACHE_ROOT, [*files, *identity_parts(CACHE_ROOT, n)]) for n in ("zero", "tiny")}

    def worker(name: str) -> list[str]:
        return mesh_argv("node", "--name", name, "--roles", "worker", "--no-answer", "--model", MODEL,
                         "--threads", "1", "--heartbeat", "0.5", "--no-ha", "--broker", tb.broker_url,
                         "--home", str(homes[name]))

    t0 = time.monotonic()
    tiny = tb.spawn("tiny", worker("tiny"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tb.spawn("zero", worker("zero"), env=ENV, role="node", log=tb.log_path("node-zero"))
    tb.spawn("co", mesh_argv("coordinator", "--model", MODEL, "--home", str(CACHE_ROOT), "--no-cache",
                             "--threads", "1", "--heartbeat", "0.5", "--replan-interval", "3600",
                             "--broker", tb.broker_url), env=ENV, role="coordinator", log=tb.log_path("coordinator"))

    # Too small: one line naming the flag, exit 2, no traceback, no OOM kill.
    _, err = tiny.communicate(timeout=60)
    refusal = [line for line in err.splitlines() if line.startswith("mesh node:")]
    print(f"{TOO_SMALL_MIB} MiB: rc {tiny.returncode}: {refusal}")
    assert tiny.returncode == 2 and len(refusal) == 1, err[-2000:]
    assert "fewer than one per layer" in refusal[0] and "--model" in refusal[0] and "Traceback" not in err
    assert tb.oom_kills("tiny") == 0

    with MeshClient(BrokerAddress(*tb.broker_address), keyring=asker_keys()) as client:
        client.wait_online(["zero"], 60, ready=lambda v: "capacity_groups" in (v.heartbeat.get("halo") or {}))
        capacity = client.peers.get("zero").heartbeat["halo"]["capacity_groups"]
        assert TOTAL_GROUPS // 3 <= capacity < TOTAL_GROUPS  # a third ran under this cap; not all of it fits

        def planned(v: object) -> bool:
            halo = v.heartbeat.get("halo") or {}  # type: ignore[attr-defined]
            return halo.get("workers") == ["zero"] and halo.get("pending") is None
        client.wait_online(["coordinator"], 120, ready=planned)
        plan = client.peers.get("coordinator").heartbeat["halo"]
        held = plan["groups"]["zero"]
        assert capacity - 1 <= held <= capacity  # its capacity's worth, never more
        assert plan["local_groups"] == TOTAL_GROUPS - held  # what it cannot hold stays with the coordinator
        client.wait_online(["zero"], 30, ready=lambda v: v.heartbeat["halo"]["groups"] == held)

        before = tb.memory("zero")
        r = client.ask("The capital of France is", node="coordinator", max_new_tokens=8, timeout=120,
                       extra={"halo_sync": "strict", "no_cache": True})
        figures = r.node_figures["halo"]
        client.wait_online(["zero"], 10, ready=lambda v: v.heartbeat["halo"]["served"] > 0)
        served = client.peers.get("zero").heartbeat["halo"]["served"]
    mem = tb.memory("zero")
    print(f"capacity {capacity} of {TOTAL_GROUPS} groups, held {held}, served {served} partials; "
          f"major faults during the ask {mem.major_faults - before.major_faults}; "
          f"cgroup before the ask {before.as_mib()}, after {mem.as_mib()}; halo figures {figures}; "
          f"{time.monotonic() - t0:.0f} s")
    assert figures["partials_on_time"] > 0 and figures["local_fallback_groups"] == 0
    assert "strict-timeout" not in figures["stops"]
    assert tb.process_memory("zero")  # still running
    assert mem.oom_kills == 0 and mem.limit_bytes == CAP_MIB * MiB
    # Below the cap without the kernel reclaiming at it (failcnt 0): the weight file's pages read
    # for the plan, read-around included, left the page cache (mesh.weights.mapped); before, 109 MiB
    # of them stayed charged to the worker and pressed it against the cap.
    assert mem.peak_bytes is not None and mem.peak_bytes < CAP_MIB * MiB
    assert int((Path(memory_cgroup_path(tb.cgroup("zero"))) / "memory.failcnt").read_text()) == 0
