"""One real HALO worker process (``mesh node --roles worker``) on a real Mosquitto on loopback,
driven like the coordinator drives it: per layer step one MLP-input frame on the shared topic,
wait for the partial on the direct link. Prints the round trip and the worker process's CPU
time per step (from /proc), the figure that decides how many workers fit on a core.

    .venv/bin/python results/2026-12-06/worker_step_cost.py [--steps 3000] [--groups 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mesh import halo_wire, topics, wire  # noqa: E402
from mesh.bus import BrokerAddress, DirectLink  # noqa: E402
from mesh.model import load_model  # noqa: E402
from mesh.scheduler import WorkerFigures, plan_groups  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--groups", type=int, default=8, help="groups per layer the worker holds (of 24)")
    ap.add_argument("--home", default=str(Path.home() / ".cache" / "mesh"))
    args = ap.parse_args()
    port = free_port()
    broker = subprocess.Popen(["mosquitto", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        time.sleep(0.3)
        worker = subprocess.Popen([sys.executable, "-m", "nodes.cli", "node", "--name", "w1", "--model", "smollm2-135m",
                                   "--roles", "worker", "--threads", "1", "--heartbeat", "0.5", "--no-cache",
                                   "--broker", f"127.0.0.1:{port}", "--home", args.home], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loaded = load_model(Path(args.home), "smollm2-135m", threads=1)
        cfg = loaded.model.config
        n_layers, n_groups = cfg.num_hidden_layers, -(-cfg.intermediate_size // 64)
        got: list[tuple[str, bytes]] = []
        link = DirectLink("drv-link", BrokerAddress("127.0.0.1", port), topics.reply("drv") + "/#",
                          lambda t, p, r: got.append((t, p)))
        link.open()
        # The worker holds `groups` of every layer's groups; the rest sit with the (absent) local holder.
        speed_local = (n_groups - args.groups) / args.groups
        plan = plan_groups([WorkerFigures("w1", 1.0)], [[1.0] * n_groups] * n_layers, epoch=1,
                           model_key=loaded.model_key, group_size=64, local_speed=speed_local)
        env = wire.Envelope(wire.Kind.HALO_PLAN, "drv", {"epoch": 1, "plan": plan.to_dict()},
                            reply_to=topics.reply("drv"))
        deadline = time.monotonic() + 120
        while not any(t == topics.reply("drv") for t, _ in got) and time.monotonic() < deadline:
            link.publish(topics.HALO_PLAN, wire.encode(env))  # until the worker acknowledges
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end and not got:
                link.pump(0.1)
        if not got:
            raise SystemExit("the worker never acknowledged the plan")
        reply = topics.reply("drv") + "/halo"
        x = torch.randn(1, 1, cfg.hidden_size).half()
        rtts, step = [], 1
        for phase in ("warm", "measure"):
            n = 300 if phase == "warm" else args.steps
            if phase == "measure":
                print(f"measuring worker pid {worker.pid}", flush=True)
            c0, t0 = cpu_s(worker.pid), time.perf_counter()
            for i in range(n):
                got.clear()
                layer = step % n_layers
                link.publish(topics.node_mlp("drv"), halo_wire.encode(halo_wire.MLP, "drv", 1, step, layer, x,
                                                                      reply_to=reply))
                ts = time.perf_counter()
                while not got and time.perf_counter() - ts < 1.0:
                    link.pump(1.0)
                if phase == "measure":
                    rtts.append(time.perf_counter() - ts)
                step += 1
            c1, t1 = cpu_s(worker.pid), time.perf_counter()
        rtts.sort()
        print(f"worker holding {args.groups}/{n_groups} groups, {args.steps} steps: round trip p50 "
              f"{rtts[len(rtts) // 2] * 1e6:.0f} us, p90 {rtts[int(len(rtts) * 0.9)] * 1e6:.0f} us; worker CPU "
              f"{(c1 - c0) / args.steps * 1e6:.0f} us per step ({(c1 - c0) / (t1 - t0) * 100:.0f} % of a core)")
        link.close()
    finally:
        for p in (worker, broker):
            if p is not None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    main()
