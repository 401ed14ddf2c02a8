"""Why a node's forwards run on its main thread: torch's OpenMP parallel regions led by another thread.

libgomp counts the process's initial thread as a managed thread even while another thread leads a
parallel region, so a region of N threads led by a worker thread makes N + 1 managed threads; with
N = the cores, that is more than the cores, and libgomp then throttles its spin-wait: the team's
workers sleep between regions (a futex wake and sleep per region) instead of spinning. A decode
step is hundreds of small regions. Measured here, in one process, side by side, 2 threads:

- per call, a 576x576 int4 matmul (``_weight_int4pack_mm_for_cpu``, one row) and a (64, 4096)
  row sum, led by the main thread and by a worker thread, with the process's context switches;
- SmolLM2 q4 decode tok/s (packed decode copy, 64 greedy tokens), main thread vs worker thread
  (2 threads) vs worker thread (1 thread), alternating, ROUNDS rounds.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/omp_main_thread.py [--rounds 3]
writes omp-main-thread.json / .png beside this file.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CALLS = 3000


def micro() -> dict:
    q = torch.randint(0, 16, (576, 576), dtype=torch.int32)
    w = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.rand(576 // 32, 576, 2).bfloat16()
    x = torch.randn(1, 576).bfloat16()
    big = torch.randn(64, 4096)
    out: dict[str, dict] = {}

    def bench(tag: str) -> None:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(CALLS):
            torch._weight_int4pack_mm_for_cpu(x, w, 32, sz)
        t1 = time.perf_counter()
        for _ in range(CALLS):
            big.sum(1)
        t2 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out[tag] = {"int4mm_us": round((t1 - t0) / CALLS * 1e6, 1), "row_sum_us": round((t2 - t1) / CALLS * 1e6, 1),
                    "voluntary_switches_per_call": round((r1.ru_nvcsw - r0.ru_nvcsw) / (2 * CALLS), 2)}

    bench("main")
    bench("main")

    def worker() -> None:
        torch.set_num_threads(2)
        bench("worker thread")
        bench("worker thread")

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    return out


def decode(rounds: int) -> dict:
    from mesh.model import Decoder, bind_threads, load_model
    from mesh.weights import packed

    loaded = load_model(Path.home() / ".cache" / "mesh", "smollm2-135m", 2, weights="q4", verify=False)
    packed.pack_model(loaded.model)
    dec = Decoder(loaded)
    ids = dec.encode("The history of the lighthouse begins in the ancient world, when fires were lit on hills "
                     "to guide ships into harbour.")

    def tps() -> float:
        g = dec.generate(ids, 64)
        return (len(g.token_ids) - 1) / g.decode_s

    got: dict[str, list[float]] = {"main thread, 2 threads": [], "worker thread, 2 threads": [],
                                   "worker thread, 1 thread": []}

    def on_worker(key: str, n: int) -> None:
        def run() -> None:
            bind_threads()
            torch.set_num_threads(n)
            got[key].append(tps())
        t = threading.Thread(target=run)
        t.start()
        t.join()

    tps()  # warm-up
    for r in range(rounds):
        order = list(got) if r % 2 == 0 else list(got)[::-1]
        for key in order:
            if key.startswith("main"):
                got[key].append(tps())
            else:
                on_worker(key, 2 if "2" in key else 1)
    return {k: {"median": round(statistics.median(v), 1), "all": [round(x, 1) for x in v]} for k, v in got.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = {"what": __doc__.split("\n\n")[0], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "calls": micro(), "decode_tps": decode(args.rounds)}
    print(json.dumps(out, indent=1))
    (HERE / "omp-main-thread.json").write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = list(out["decode_tps"])
    ax.bar(range(len(keys)), [out["decode_tps"][k]["median"] for k in keys], color=["#55a868", "#c44e52", "#999999"])
    ax.set_xticks(range(len(keys)), keys, fontsize=7)
    ax.set_ylabel("SmolLM2 q4 decode tok/s")
    ax.set_title("the same decode led by the main thread or a worker thread")
    fig.tight_layout()
    fig.savefig(HERE / "omp-main-thread.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
