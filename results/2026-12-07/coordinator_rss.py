"""The HALO coordinator's memory as a real process: `mesh coordinator` on an embedded amqtt broker,
SmolLM2, --threads 1, --no-cache, no workers (so an ask runs every MLP on the coordinator), one
ask of 8 tokens; then /proc/<pid>/status (VmRSS, RssAnon, RssFile, VmHWM).

    PYTHONPATH=<checkout> python results/2026-12-07/coordinator_rss.py <checkout> [--weights F] [--out JSON]

<checkout> is the repository whose code the coordinator runs (this one, or an older commit's
worktree: before this commit the coordinator took no --weights and ran transformers' classes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key + "_mib"] = round(int(value.split()[0]) / 1024, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkout")
    ap.add_argument("--weights", help="passed to `mesh coordinator` (new code only)")
    ap.add_argument("--out")
    args = ap.parse_args()
    from mesh.model import Decoder  # noqa: F401  (the checkout's code is importable)
    from nodes.client import MeshClient, asker_keyring
    from nodes.up import free_port, spawn, wait_port

    repo = Path(args.checkout).resolve()
    home = Path(os.environ.get("MESH_HOME", Path.home() / ".cache" / "mesh"))
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    port = free_port()
    logs = Path("/tmp") / f"coordinator-rss-{port}"
    logs.mkdir(exist_ok=True)
    broker = spawn([sys.executable, "-m", "nodes.cli", "broker", "--port", str(port)], open(logs / "broker.log", "wb"),
                   env=env)
    coord = None
    try:
        wait_port("127.0.0.1", port, 30, broker)
        argv = [sys.executable, "-m", "nodes.cli", "coordinator", "--broker", f"127.0.0.1:{port}", "--model",
                "smollm2-135m", "--threads", "1", "--no-cache", "--heartbeat", "0.5", "--home", str(home)]
        if args.weights:
            argv += ["--weights", args.weights]
        t0 = time.monotonic()
        coord = spawn(argv, open(logs / "coordinator.log", "wb"), env=env)
        from mesh.config import BrokerAddress

        with MeshClient(BrokerAddress("127.0.0.1", port), keyring=asker_keyring(home)) as client:
            client.wait_online(["coordinator"], 300, ready=lambda v: "halo" in v.heartbeat)
            online_s = time.monotonic() - t0
            started = status(coord.pid)
            r = client.ask("The capital of France is", node="coordinator", max_new_tokens=8, timeout=300,
                           no_cache=True)
            time.sleep(1.0)
            after = status(coord.pid)
            key = client.peers.get("coordinator").heartbeat.get("model_key")
        result = {"checkout": str(repo), "weights": args.weights or "default", "model_key": key,
                  "online_s": round(online_s, 1), "online": started, "after_ask": after,
                  "answer": r.answer, "token_ids": r.node_figures.get("token_ids")}
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for p in (coord, broker):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
