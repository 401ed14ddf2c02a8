"""One figure and one summary JSON from weights_speed.json, weights_quality_<model>.json and
weights_memory.json (whichever exist): speed side by side, memory anonymous vs file-mapped, quality.

    .venv/bin/python results/2026-12-06/weights_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def _load(name: str) -> dict | None:
    p = HERE / name
    return json.loads(p.read_text()) if p.exists() else None


def main() -> None:
    speed, memory = _load("weights_speed.json"), _load("weights_memory.json")
    quality = {m: _load(f"weights_quality_{m}.json") for m in ("smollm2-135m", "gemma3-270m")}
    summary: dict = {"speed": {}, "memory": {}, "quality": {}}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    if speed:
        ax = axes[0]
        labels, dec, pre = [], [], []
        for row in speed["rows"]:
            tps = row["speed"]["tps"]
            base = tps["fp32/blas"]
            summary["speed"][row["model"]] = {
                **{k: {p: round(v, 2) for p, v in t.items()} for k, t in tps.items()},
                "int8_decode_over_fp32": {k: round(t["decode"] / base["decode"], 3) for k, t in tps.items()},
                "int8_prefill_over_fp32": {k: round(t["prefill"] / base["prefill"], 3) for k, t in tps.items()},
                "rounds": row["speed"]["rounds"], "threads": row["speed"]["threads"],
                "prefill_tokens": row["speed"]["prefill_tokens"], "decode_tokens": row["speed"]["decode_tokens"]}
            for k, t in tps.items():
                labels.append(f"{row['model'].split('-')[0]}\n{k}")
                dec.append(t["decode"])
                pre.append(t["prefill"] / 10)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], dec, 0.4, label="decode tok/s")
        ax.bar([i + 0.2 for i in x], pre, 0.4, label="prefill tok/s / 10")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title("speed, side by side (median of ABBA rounds)")
        ax.legend(fontsize=8)
    if memory:
        ax = axes[1]
        labels, anon, mapped = [], [], []
        for r in memory["rows"]:
            st = r["stages_mib"]["after_ask"]
            summary["memory"][f"{r['model']}/{r['weights']}"] = {"rss_mib": st["VmRSS"], "anon_mib": st["RssAnon"],
                                                                "file_mib": st["RssFile"], "peak_mib": st["VmHWM"]}
            labels.append(f"{r['model'].split('-')[0]}\n{r['weights']}")
            anon.append(st["RssAnon"])
            mapped.append(st["RssFile"])
        ax.bar(labels, anon, label="anonymous MiB")
        ax.bar(labels, mapped, bottom=anon, label="file-mapped MiB")
        ax.set_title("resident after one ask (uncapped)")
        ax.legend(fontsize=8)
    ax = axes[2]
    names, vals = [], []
    for m, q in quality.items():
        if not q:
            continue
        r = q["rows"][0]
        summary["quality"][m] = {k: r[k] for k in ("n_mmlu", "mmlu_agreement", "mmlu_accuracy_fp32", "mmlu_accuracy_int8",
                                                   "ppl_fp32", "ppl_int8", "ppl_ratio", "continuations",
                                                   "continuations_identical", "mean_common_prefix_tokens",
                                                   "first_token_agreement")}
        for k in ("mmlu_agreement", "ppl_ratio", "continuations_identical", "first_token_agreement"):
            names.append(f"{m.split('-')[0]}\n{k.replace('_', ' ')}")
            vals.append(r[k])
    ax.bar(names, vals)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_title("int8 vs fp32 quality")
    fig.tight_layout()
    fig.savefig(HERE / "weights_summary.png", dpi=110)
    (HERE / "weights_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
