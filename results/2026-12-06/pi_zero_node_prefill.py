"""A pi-zero-2w testbed node's no-cache prefill, timed repeatedly beside an unthrottled node, with
the node process's CPU ticks every 5 s: the figures behind "the same throttled 65-token prefill
took 12-15 s, then 31-71 s during a host episode, unthrottled 0.22-0.26 s" (2026-12-06). Needs
root (namespaces, cgroups) and a calibration (`python -m nodes.testbed calibrate --profile
pi-zero-2w`).

    PYTHONPATH=. .venv/bin/python results/2026-12-06/pi_zero_node_prefill.py [--asks 2] [--instance 93]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import AutoTokenizer  # noqa: E402

from mesh.config import BrokerAddress  # noqa: E402
from mesh.testbed_plan import device_profile, make_spec  # noqa: E402
from nodes.client import MeshClient  # noqa: E402
from nodes.testbed import CALIBRATION_DEFAULT_DIR, Testbed, load_calibration  # noqa: E402
from tests.conftest import require_model  # noqa: E402


def ticks(pid: int) -> tuple[int, int]:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12])  # utime, stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--asks", type=int, default=2)
    ap.add_argument("--instance", type=int, default=93)
    args = ap.parse_args()
    cal = load_calibration(CALIBRATION_DEFAULT_DIR, "pi-zero-2w")
    if cal is None:
        raise SystemExit("no pi-zero-2w calibration: python -m nodes.testbed calibrate --profile pi-zero-2w")
    tb = Testbed(make_spec(2, device_profile("pi-zero-2w", cal), link_mbit=100, instance=args.instance))
    tb.up()
    stop = threading.Event()
    try:
        tb.start_broker("mosquitto")
        tb.start_nodes("gemma3-270m", extra=["--threads", "1", "--link-ping", "5", "--heartbeat", "5"])
        tb.set_cpu("pi1", None)  # pi1 unthrottled, pi2 keeps the calibrated quota
        pid = next(r.pid for r in tb._records if r.node == "pi2" and r.role == "node")

        def monitor() -> None:
            t0, hz = time.monotonic(), os.sysconf("SC_CLK_TCK")
            while not stop.wait(5):
                u, s = ticks(pid)
                print(f"  {time.monotonic() - t0:5.0f} s: pi2 CPU user {u / hz:.2f} s, system {s / hz:.2f} s", flush=True)

        threading.Thread(target=monitor, daemon=True).start()
        tok = AutoTokenizer.from_pretrained(require_model("gemma3-270m"))
        words = ("the mesh shares prompt state between small devices over a lossy link " * 12).split()
        prompt = " ".join(words[:60])
        while len(tok(prompt)["input_ids"]) > 65:
            prompt = prompt.rsplit(" ", 1)[0]
        host, port = tb.broker_address
        with MeshClient(BrokerAddress(host, port), name=f"t-{args.instance}") as client:
            for node in ("pi1", "pi2"):
                for _ in range(args.asks):
                    t = time.monotonic()
                    r = client.ask(prompt, node=node, max_new_tokens=1, no_cache=True, timeout=300)
                    print(f"{node}: prefill {float(r.node_figures['prefill_s']):.3f} s, "
                          f"ask {time.monotonic() - t:.1f} s", flush=True)
    finally:
        stop.set()
        tb.down()


if __name__ == "__main__":
    main()
