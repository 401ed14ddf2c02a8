"""The packed decode as built (mesh.weights.packed), side by side with the mapped kernels, fp32 and
llama.cpp on the same GGUF, in one process, 2 threads, on an idle machine.

Per model and quantised format (int8, q4): decode tok/s with the mapped kernels (``mapped``: int8
through ``_weight_int8pack_mm`` on bfloat16 rows, q4 unpacked to float32) and with the packed copy
(``packed``), fp32's, and llama.cpp's on the model's own GGUF (``nodes.bench.llama_ref``, its own
process), in ABBA order over ROUNDS rounds after a warm-up round; 64 greedy tokens after a
~100-token prompt, each figure the median over rounds. Quality of each decode path against fp32
over teacher-forced wiki positions (every position through the decode kernel): perplexity ratio and
argmax agreement; and whether the 64 greedy tokens equal fp32's.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/decode_packed.py [--rounds 3]
writes decode-packed.json / .png beside this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed_decode import PROMPT, TOKENS, fp32_reference, greedy, quality, teacher_forced  # noqa: E402

from mesh.model import load_model  # noqa: E402
from mesh.weights import packed  # noqa: E402
from nodes.bench.llama_ref import LlamaReference, available  # noqa: E402
from nodes.bench.memory import reference_gguf  # noqa: E402

HERE = Path(__file__).resolve().parent
HOME = Path.home() / ".cache" / "mesh"


def _copies(model: torch.nn.Module) -> dict:
    """Every packed copy by (module, attribute): a layer's own ``packed``, a fused set's ``qkv`` / ``gate_up``."""
    return {(m, a): getattr(m, a) for m in model.modules() for a in ("packed", *packed.FUSED)
            if getattr(m, a, None) is not None}


def _use(copies: dict, on: bool) -> None:
    for (m, a), p in copies.items():
        setattr(m, a, p if on else None)


def run_model(model: str, formats: list[str], rounds: int, windows_n: int, window_len: int) -> dict:
    torch.set_num_threads(2)
    fp32 = load_model(HOME, model, 2, weights="fp32")
    loaded, copies, added = {}, {}, {}
    for fmt in formats:
        loaded[fmt] = load_model(HOME, model, 2, weights=fmt)
        t0 = time.perf_counter()
        added[fmt] = {"mib": round(packed.pack_model(loaded[fmt].model) / 2**20, 1),
                      "estimate_mib": None, "s": 0.0}
        added[fmt]["s"] = round(time.perf_counter() - t0, 2)
        copies[fmt] = _copies(loaded[fmt].model)
        _use(copies[fmt], False)
        added[fmt]["estimate_mib"] = round(packed.packed_bytes(loaded[fmt].model) / 2**20, 1)
    ids = fp32.tokenizer(PROMPT)["input_ids"]
    ref_tokens, _ = greedy(fp32, ids)
    configs = ["fp32", *[f"{f}/{k}" for f in formats for k in ("mapped", "packed")]]
    llama = LlamaReference(reference_gguf(model, HOME), threads=2, tokens=TOKENS) if available() else None
    if llama:
        configs.append("llama.cpp")
    speeds: dict[str, list[float]] = {c: [] for c in configs}
    same: dict[str, bool] = {}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for name in (configs if r % 2 else configs[::-1]):
                if name == "llama.cpp":
                    tps = llama.ask(PROMPT)["decode_tps"]  # type: ignore[union-attr]
                elif name == "fp32":
                    _, tps = greedy(fp32, ids)
                else:
                    fmt, kernel = name.split("/")
                    _use(copies[fmt], kernel == "packed")
                    toks, tps = greedy(loaded[fmt], ids)
                    same[name] = toks == ref_tokens
                if r:
                    speeds[name].append(round(tps, 2))
                print(model, r, name, round(tps, 1), flush=True)
    finally:
        if llama:
            llama.close()
    windows, targets, ref = fp32_reference(fp32, windows_n, window_len)
    q = {}
    for name in configs:
        if "/" in name:
            fmt, kernel = name.split("/")
            _use(copies[fmt], kernel == "packed")
            q[name] = quality(teacher_forced(loaded[fmt], windows), ref, targets)
    med = {k: round(statistics.median(v), 2) for k, v in speeds.items() if v}
    ratios = {k: round(v / med["llama.cpp"], 3) for k, v in med.items() if "llama.cpp" in med}
    return {"decode_tps": med, "decode_tps_all": speeds, "x_llama_cpp": ratios,
            "greedy_tokens_equal_fp32": same, "quality_vs_fp32": q, "positions": int(targets.numel()),
            "packed_copy": added}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--formats", default="int8,q4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=128)
    ap.add_argument("--out", default="decode-packed")
    args = ap.parse_args()
    out = {"what": __doc__.split("\n\n")[0], "threads": 2, "tokens": TOKENS, "rounds": args.rounds,
           "capability": str(torch.backends.cpu.get_cpu_capability()), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "models": {}}
    for model in args.models.split(","):
        out["models"][model] = run_model(model, args.formats.split(","), args.rounds, args.windows, args.window_len)
        print(model, json.dumps({k: out["models"][model][k] for k in ("decode_tps", "x_llama_cpp")}), flush=True)
    (HERE / f"{args.out}.json").write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    x = 0
    ticks = []
    for model, r in out["models"].items():
        names = list(r["decode_tps"])
        for j, n in enumerate(names):
            y = r["decode_tps"][n]
            ax.bar(x + j, y, color="#4c72b0" if n == "llama.cpp" else "#55a868" if n.endswith("packed") else "#999999")
            ax.text(x + j, y, f"{n}\n{y:.0f}", ha="center", va="bottom", fontsize=6)
        ticks.append((x + (len(names) - 1) / 2, model))
        x += len(names) + 1
    ax.set_xticks([t for t, _ in ticks], [m for _, m in ticks])
    ax.set_ylabel("decode tok/s (2 threads)")
    ax.set_title("decode: mapped kernels, packed (mesh.weights.packed), fp32, llama.cpp on the same GGUF")
    fig.tight_layout()
    fig.savefig(HERE / f"{args.out}.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
