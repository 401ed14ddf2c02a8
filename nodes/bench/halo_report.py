"""`mesh bench halo`'s arithmetic and plot: medians, pooled quality figures, the PNG (no processes,
no asks; nodes/bench/halo.py runs the bench and hands its results here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nodes.bench.report import pyplot, save_figure


class ZeroedShares:
    """What the quality asks summed as zero: steps, and the predicted and true importance shares
    (mean per layer step; the coordinator measures the true share from its full weights)."""

    def __init__(self) -> None:
        self.steps = self.zeroed_steps = self.multi_steps = self.zeroed_multi_steps = 0
        self.pred = self.true = 0.0

    def add(self, halo: dict[str, Any]) -> None:
        n = int(halo.get("steps", 0))
        self.steps += n
        self.zeroed_steps += int(halo.get("zeroed_steps", 0))
        self.multi_steps += int(halo.get("multi_steps", 0))
        self.zeroed_multi_steps += int(halo.get("zeroed_multi_steps", 0))
        self.pred += float(halo.get("zeroed_share_predicted", 0.0)) * n
        self.true += float(halo.get("zeroed_share_true", 0.0)) * n

    def figures(self) -> dict[str, Any]:
        n = max(1, self.steps)
        return {"eval_steps": self.steps, "eval_zeroed_steps": self.zeroed_steps,
                "eval_multi_steps": self.multi_steps, "eval_zeroed_multi_steps": self.zeroed_multi_steps,
                "zeroed_share_predicted": self.pred / n, "zeroed_share_true": self.true / n}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median TPOT (the lower middle one for an even count)."""
    ranked = sorted(runs, key=lambda r: r["tpot_s"] if r["tpot_s"] is not None else math.inf)
    return ranked[(len(ranked) - 1) // 2]


def ablation_arm(rs: list[dict[str, Any]], lossless: dict[str, Any]) -> dict[str, Any]:
    """One placement arm of the ablation, pooled over its rounds (perplexity over all scored
    tokens, zeroed shares weighted by steps), against the lossless reference."""
    nll = [v for r in rs for v in r["quality"]["nll"]]
    top = [v for r in rs for v in r["quality"]["argmax"]]
    ref_top = lossless["argmax"] * len(rs)
    picks = [v for r in rs for v in r["quality"]["picks"]]
    correct = sum(r["quality"]["accuracy"] * r["quality"]["n_mmlu"] for r in rs)
    steps = sum(r["quality"]["eval_steps"] for r in rs)
    ppl = math.exp(sum(nll) / len(nll))
    return {
        "relaxed_tpot_s": sorted(r["relaxed_tpot_s"] for r in rs)[(len(rs) - 1) // 2],
        "relaxed_tpot_runs_s": [r["relaxed_tpot_s"] for r in rs],
        "ppl_lossless": lossless["ppl"], "ppl_relaxed": ppl,
        "ppl_change_pct": 100.0 * (ppl / lossless["ppl"] - 1.0),
        "ppl_runs": [r["quality"]["ppl"] for r in rs],
        "agreement": sum(a == b for a, b in zip(top, ref_top)) / max(1, len(top)),
        "accuracy_lossless": lossless["accuracy"],
        "accuracy_relaxed": correct / max(1, sum(r["quality"]["n_mmlu"] for r in rs)),
        "mmlu_answer_agreement": sum(a == b for a, b in zip(picks, lossless["picks"] * len(rs))) / max(1, len(picks)),
        "zeroed_share_true": sum(r["quality"]["zeroed_share_true"] * r["quality"]["eval_steps"] for r in rs) / max(1, steps),
        "zeroed_share_predicted": sum(r["quality"]["zeroed_share_predicted"] * r["quality"]["eval_steps"]
                                      for r in rs) / max(1, steps),
        "zeroed_steps_fraction": sum(r["quality"]["eval_zeroed_steps"] for r in rs) / max(1, steps),
        "zeroed_share_true_runs": [r["quality"]["zeroed_share_true"] for r in rs],
        "runs": [{"relaxed_tpot_s": r["relaxed_tpot_s"], "halo": r["halo"], "plan": r["plan"], "load": r["load"],
                  **{k: v for k, v in r["quality"].items() if k not in ("nll", "argmax", "picks")}} for r in rs]}


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    pts = result["points"]
    x = [p["loss_pct"] for p in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [p["strict_tpot_s"] * 1000 for p in pts], "o-", label="strict (wait for all)")
    a.plot(x, [p["relaxed_tpot_s"] * 1000 for p in pts], "s-", label="relaxed (HALO)")
    a.set_xlabel("loss on lossy worker(s), % each direction")
    a.set_ylabel("time per output token, ms")
    a.set_yscale("log")
    a.legend()
    a.set_title(f"{result['model']}, {result['workers']} workers, {result['profile']}")
    b.plot(x, [p["ppl_relaxed"] for p in pts], "s-", label="relaxed perplexity")
    b.axhline(pts[0]["ppl_lossless"], color="gray", ls="--", label="lossless perplexity")
    b.set_xlabel("loss, %")
    b.set_ylabel("perplexity (held-out wiki)")
    b2 = b.twinx()
    b2.plot(x, [p["agreement"] for p in pts], "^:", color="green", label="top-1 agreement")
    b2.set_ylim(0, 1.05)
    b.legend(loc="upper left")
    b2.legend(loc="lower left")
    save_figure(fig, path)
