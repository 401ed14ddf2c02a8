"""Decode tok/s of fp32 and of int8 with the x86 decode kernel before this branch (``dequant``) and
after (``int8mm_bf16``), interleaved in one process at a fine grain: each configuration keeps its
own cache and decodes BLOCK greedy tokens in turn, BLOCKS turns, so a busy spell of the shared
machine (other sessions' tests) hits all three alike; the median over turns. THREADS from argv.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/decode_interleaved.py 1
writes decode-interleaved-<threads>t.json beside this file."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh.model import load_model  # noqa: E402
from mesh.weights import modules  # noqa: E402

HOME = Path.home() / ".cache" / "mesh"
THREADS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1
BLOCK, BLOCKS = 8, 12
PROMPT = ("The history of the lighthouse begins in the ancient world, when fires were lit on hills to guide "
          "ships into harbour. The most famous of these was the Pharos of Alexandria, built in the third "
          "century before our era, which stood for more than a thousand years.")


def main() -> int:
    out: dict = {"threads": THREADS, "block": BLOCK, "blocks": BLOCKS, "models": {}}
    for model in ("smollm2-135m", "gemma3-270m"):
        configs = {"fp32": ("fp32", "dequant"), "int8/dequant (before)": ("int8", "dequant"),
                   "int8/int8mm_bf16 (after)": ("int8", "int8mm_bf16")}
        loaded = {name: load_model(HOME, model, threads=THREADS, weights=w, verify=False)
                  for name, (w, _) in configs.items()}
        ids = loaded["fp32"].tokenizer(PROMPT)["input_ids"]
        state = {}
        with torch.inference_mode():
            for name, (_, k) in configs.items():
                modules.set_kernel(decode=k)
                lm = loaded[name].model
                cache = lm.new_cache()
                state[name] = [cache, lm.forward(ids, cache)[-1]]
            times: dict[str, list[float]] = {n: [] for n in configs}
            for b in range(BLOCKS):
                for name in (list(configs) if b % 2 == 0 else list(configs)[::-1]):
                    modules.set_kernel(decode=configs[name][1])
                    lm, (cache, logits) = loaded[name].model, state[name]
                    t = time.perf_counter()
                    for _ in range(BLOCK):
                        logits = lm.step(int(torch.argmax(logits)), cache)
                    times[name].append(BLOCK / (time.perf_counter() - t))
                    state[name][1] = logits
        tps = {n: round(statistics.median(v), 2) for n, v in times.items()}
        res = {"decode_tps": tps, "decode_tps_all": {n: [round(x, 2) for x in v] for n, v in times.items()},
               "int8_after_over_before": round(tps["int8/int8mm_bf16 (after)"] / tps["int8/dequant (before)"], 3),
               "int8_after_over_fp32": round(tps["int8/int8mm_bf16 (after)"] / tps["fp32"], 3),
               "int8_before_over_fp32": round(tps["int8/dequant (before)"] / tps["fp32"], 3)}
        out["models"][model] = res
        print(model, json.dumps(res), flush=True)
        del loaded, state
    Path(__file__).with_name(f"decode-interleaved-{THREADS}t.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0




def plot() -> None:
    """decode-interleaved.png from the 1- and 2-thread JSONs (``python decode_interleaved.py plot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    here = Path(__file__).parent
    runs = {t: json.loads((here / f"decode-interleaved-{t}t.json").read_text()) for t in (1, 2)
            if (here / f"decode-interleaved-{t}t.json").exists()}
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (t, run) in zip(axes[0], runs.items()):
        labels, vals = [], []
        for model, res in run["models"].items():
            for name, v in res["decode_tps"].items():
                labels.append(f"{model.split('-')[0]} {name}")
                vals.append(v)
        ax.bar(range(len(vals)), vals, color=["tab:gray", "tab:red", "tab:blue"] * 2)
        ax.set_xticks(range(len(vals)), labels, fontsize=7, rotation=20, ha="right")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"decode tok/s, {t} thread(s), interleaved (busy machine)")
    fig.tight_layout()
    fig.savefig(here / "decode-interleaved.png", dpi=110)


if __name__ == "__main__":
    if sys.argv[1:] == ["plot"]:
        plot()
    else:
        raise SystemExit(main())
