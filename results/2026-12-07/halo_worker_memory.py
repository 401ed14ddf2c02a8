"""Memory of a HALO worker holding a third of the neuron groups: today's worker (a full node with the
worker role, `mesh node --roles worker --no-cache`) beside a worker-only node (`mesh node --roles
worker --no-answer`, nodes.worker), each alone in a cgroup v1 memory group capped at the pi4-2gb
profile's 1536 MiB (no swap), one after the other, on the embedded broker.

Per run: the node starts (its speed probe reads layer 0's first quarter), one plan (sealed as the
coordinator, retained) gives it a third of every layer's groups in a non-trivial neuron order
(what a predictor-ordered plan looks like), and once its heartbeat shows the epoch loaded the
figures are read: the cgroup's peak (``memory.max_usage_in_bytes``: anonymous memory and the page
cache it charged), the largest anonymous share seen (sampled every 50 ms), the cache and mapped
file pages at the end, the process's own peak resident set (VmHWM) and OOM kills. Before each run
the node's own copy of the model's weight files is evicted from the page cache
(``posix_fadvise(DONTNEED)``), so each run's reads are charged to its cgroup (pages of a file that
other processes map, as the shared cache's are on this machine, would be charged to theirs).

    sudo HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/halo_worker_memory.py  # writes halo-worker-memory.json

Issue 16's capacity (a worker-only node announces ``halo.capacity_groups``, the groups its memory
holds): ``--cap 400 --fill --runs 1,2,3`` runs the worker-only SmolLM2 nodes under a Pi Zero's
400 MiB, each given a plan of exactly its announced capacity (spread evenly over the layers)
instead of a third, and writes ``halo-worker-memory-400-fill.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from mesh import topics, wire  # noqa: E402
from mesh.auth import store  # noqa: E402
from mesh.halo.placement import Plan, pack_order  # noqa: E402
from mesh.lm.config import load_config  # noqa: E402
from mesh.config import BrokerAddress  # noqa: E402
from mesh.model import converted_dir  # noqa: E402
from mesh.mqtt.bus import MqttBus  # noqa: E402
from mesh.sysmem import read_cgroup_v1  # noqa: E402
from mesh.weights.formats import weights_file  # noqa: E402
from nodes.client import MeshClient, asker_keyring  # noqa: E402
from nodes.up import free_port, spawn, wait_port  # noqa: E402

HOME = Path.home() / ".cache" / "mesh"
OUT = Path(__file__).with_name("halo-worker-memory.json")
CAP_MIB = 1536  # the pi4-2gb profile
CGROUPS = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20
EPOCH = 5
RUNS = [  # (model, weights, worker-only)
    ("smollm2-135m", "fp32", False), ("smollm2-135m", "fp32", True),
    ("smollm2-135m", "int8", True), ("smollm2-135m", "q4", True),
    ("gemma3-270m", "fp32", False), ("gemma3-270m", "fp32", True), ("gemma3-270m", "q4", True),
]


def private_home(root: Path) -> Path:
    """Its own copy of the converted models (other processes on this machine map the shared
    cache's files, whose pages are then charged to their cgroups, never to the node's) and
    throwaway identities; the real cache is only read."""
    for key in ("smollm2-135m", "gemma3-270m"):
        (root / "models").mkdir(parents=True, exist_ok=True)
        shutil.copytree(converted_dir(HOME, key), root / "models" / key)
    d = store.identity_dir(root)
    for name, role in (*((f"w{i}", "node") for i in range(len(RUNS))), ("coordinator", "coordinator"),
                       ("asker", "asker")):
        store.issue(d, name, role)
    return root


def evict(home: Path, key: str) -> None:
    for fmt in ("fp32", "int8", "q4"):
        path = weights_file(converted_dir(home, key), fmt)
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def plan(model_key: str, key: str, name: str, fill: int | None = None) -> Plan:
    """A third of every layer's groups, or with ``fill`` that many groups spread evenly over the layers."""
    cfg = load_config(converted_dir(HOME, key))
    n_layers, n_groups = cfg.num_hidden_layers, -(-cfg.intermediate_size // 64)
    g = torch.Generator().manual_seed(3)
    order = tuple(pack_order(torch.randperm(cfg.intermediate_size, generator=g).tolist()) for _ in range(n_layers))
    if fill is None:
        mine = [tuple(range(0, n_groups, 3))] * n_layers
    else:
        mine = [tuple(range(0, n_groups))[:fill // n_layers + (layer < fill % n_layers)] for layer in range(n_layers)]
    rest = tuple(tuple(x for x in range(n_groups) if x not in gs) for gs in mine)
    return Plan(epoch=EPOCH, model_key=model_key, group_size=64, n_groups=n_groups,
                workers={name: tuple(mine)}, local=rest, order=order)


def run(home: Path, port: int, name: str, key: str, weights: str, lean: bool, log: Path, cap_mib: int = CAP_MIB,
        fill: bool = False) -> dict[str, Any]:
    """One node named ``name`` (a fresh name per run: a dead node's retained heartbeat is no reading)."""
    group = CGROUPS / f"mesh-halo-worker-mem-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(cap_mib * MiB))
    (group / "memory.memsw.limit_in_bytes").write_text(str(cap_mib * MiB))
    role = ["--no-answer"] if lean else ["--no-cache"]
    argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), sys.executable, "-m", "nodes.cli",
            "node", "--name", name, "--model", key, "--weights", weights, "--roles", "worker", *role, "--threads", "1",
            "--heartbeat", "0.5", "--no-ha", "--broker", f"127.0.0.1:{port}", "--home", str(home)]
    evict(home, key)
    proc = spawn(argv, open(log, "wb"), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            try:
                anon[0] = max(anon[0], read_cgroup_v1(group).anon_bytes)
            except (OSError, ValueError):
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    row: dict[str, Any] = {"model": key, "weights": weights, "node": "worker-only (--no-answer)" if lean
                           else "full node, worker role (--no-cache)", "cap_mib": cap_mib}
    try:
        with MeshClient(_address(port), keyring=asker_keyring(home)) as client:
            # this very process's heartbeat (``sh`` execs the node: same pid), with its worker started
            client.wait_online([name], 600, ready=lambda v: v.heartbeat.get("pid") == proc.pid and "halo" in v.heartbeat)
            model_key = client.peers.get(name).heartbeat["model_key"]
            capacity = client.peers.get(name).heartbeat["halo"].get("capacity_groups")
            row["capacity_groups"] = capacity
            keys = store.load_keyring(store.identity_dir(home), "coordinator", "coordinator")
            bus = MqttBus(f"plan-{os.getpid()}", _address(port))
            bus.start(10.0)
            env = wire.Envelope(wire.Kind.HALO_PLAN, "coordinator", {"epoch": EPOCH, "plan": plan(model_key, key, name, capacity if fill else None).to_dict()},
                                reply_to=topics.reply("coordinator"))
            t0 = time.monotonic()
            bus.publish_wait(topics.HALO_PLAN, keys.seal_envelope(env, topics.HALO_PLAN), qos=1, retain=True)
            client.wait_online([name], 600, ready=lambda v: v.heartbeat.get("pid") == proc.pid
                               and (v.heartbeat.get("halo") or {}).get("epoch") == EPOCH)
            row["plan_loaded_s"] = round(time.monotonic() - t0, 2)
            hb = client.peers.get(name).heartbeat
            row.update(model_key=model_key, roles=hb["roles"], groups=hb["halo"]["groups"],
                       compute_rows_per_s=hb["halo"]["compute_rows_per_s"])
            time.sleep(1.0)  # a settled reading after the load (heartbeats every 0.5 s)
            m = read_cgroup_v1(group)
            status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
            row.update(peak_mib=round(m.peak_bytes / MiB, 1), anon_peak_mib=round(max(anon[0], m.anon_bytes) / MiB, 1),
                       anon_mib=round(m.anon_bytes / MiB, 1), cache_mib=round(m.file_bytes / MiB, 1),
                       mapped_mib=round(m.mapped_bytes / MiB, 1), oom_kills=m.oom_kills,
                       vm_hwm_mib=round(int(status["VmHWM"].split()[0]) / 1024, 1),
                       vm_rss_mib=round(int(status["VmRSS"].split()[0]) / 1024, 1))
            bus.publish_wait(topics.HALO_PLAN, b"", qos=1, retain=True)
            bus.stop()
    except Exception as exc:  # recorded: an OOM kill or a refusal is a result too
        row["error"] = f"{type(exc).__name__}: {exc}; log {log}"
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        sampler.join(2)
        fit = [line.split("INFO nodes.memory: ", 1)[1] for line in log.read_text().splitlines()
               if "INFO nodes.memory: memory:" in line]
        row["footprint_check"] = fit[0] if fit else None
        group.rmdir()
    return row


def _address(port: int) -> BrokerAddress:
    return BrokerAddress("127.0.0.1", port)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=CAP_MIB, help="the memory cgroup's cap, MiB")
    ap.add_argument("--fill", action="store_true", help="give each node its announced capacity, not a third")
    ap.add_argument("--runs", help="indices into RUNS, comma separated (default: all)")
    args = ap.parse_args()
    runs = [RUNS[int(i)] for i in args.runs.split(",")] if args.runs else RUNS
    out_path = OUT if (args.cap, args.fill) == (CAP_MIB, False) else \
        OUT.with_name(f"halo-worker-memory-{args.cap}{'-fill' if args.fill else ''}.json")
    if os.geteuid() != 0 or not (CGROUPS / "memory.memsw.limit_in_bytes").exists():
        print("needs root and the cgroup v1 memory controller with swap accounting", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="halo-worker-mem-"))
    port = free_port()
    broker = spawn([sys.executable, "-m", "nodes.cli", "broker", "--port", str(port)], open(root / "broker.log", "wb"))
    rows = []
    try:
        wait_port("127.0.0.1", port, 30, broker)
        home = private_home(root / "home")
        for i, (key, weights, lean) in enumerate(runs):
            row = run(home, port, f"w{i}", key, weights, lean, root / f"{key}-{weights}-{'lean' if lean else 'full'}.log",
                      args.cap, args.fill)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(20)
    share = "its announced capacity of groups" if args.fill else "a third of the groups"
    out = {"what": f"a HALO worker holding {share} (plan in a permuted neuron order), alone in a "
                   f"cgroup v1 memory group capped at {args.cap} MiB, --threads 1, its own copy of the "
                   "converted models, their page cache evicted before each run", "machine": os.uname().machine,
           "torch": torch.__version__, "rows": rows}
    for key in ("smollm2-135m", "gemma3-270m"):
        full = next((r for r in rows if r["model"] == key and r["weights"] == "fp32" and "full" in r["node"]), {})
        lean = next((r for r in rows if r["model"] == key and r["weights"] == "fp32" and "only" in r["node"]), {})
        if full.get("peak_mib") and lean.get("peak_mib"):
            out[f"{key}_fp32_peak_ratio_worker_only_over_full"] = round(lean["peak_mib"] / full["peak_mib"], 3)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written to {out_path}")
    if not any("error" in r for r in rows):  # else keep the logs the errors name
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
