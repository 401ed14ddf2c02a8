"""Issue 14: is main's HALO time per token at 0 % loss slower than the tree before the move, or is
that the noise of this machine? A same-tree control, run in the same sitting.

Recipe (2026-12-07, 12:47-13:11 UTC, machine otherwise idle but for three helpers reading):
two worktrees of 6712cb8 (/work/old, /work/old2) and main, six rounds, each round a control pair
(6712cb8 vs 6712cb8, OUT=results/2026-12-07/control) then a test pair (6712cb8 vs main,
OUT=results/2026-12-07/quick), ABBA order in both:

    HALO_ARGS="--loss 0 --no-ablation --reps 5 --mmlu 4 --ppl-tokens 32" OUT=$PWD/results/2026-12-07/control \\
        FIRST=$i results/2026-12-06/layout_side_by_side.sh /work/old /work/old2 $i halo   # and likewise quick

Prints and writes control-summary.json / .png: each round's paired ratio B/A (A = /work/old, B =
/work/old2 in the control, main in the test; whichever ran first), and the pooled medians of every 6712cb8 run against every main run.
Run: .venv/bin/python results/2026-12-07/control_summary.py
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("strict_0_ms", "relaxed_0_ms")


def _layout():
    spec = importlib.util.spec_from_file_location("layout_summary", HERE.parent / "2026-12-06" / "layout_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(mod, folder: str, side: str) -> dict[str, dict]:
    mod.HERE = HERE / folder
    return {r["file"].rsplit("-", 1)[1]: r for r in map(mod.halo_row, mod.runs("halo", side))}


def main() -> None:
    mod = _layout()
    out: dict = {}
    pooled: dict[str, list[dict]] = {"6712cb8": [], "main": []}
    for folder, second in (("control", "6712cb8 again"), ("quick", "main")):
        old, new = rows(mod, folder, "old"), rows(mod, folder, "new")
        paired = {k: [new[r][k] / old[r][k] for r in sorted(old) if r in new] for k in KEYS}
        out[folder] = {"A": "6712cb8", "B": second,
                       "paired_ratio": {k: {"per_round": v, "median": statistics.median(v),
                                            "min": min(v), "max": max(v)} for k, v in paired.items()}}
        pooled["6712cb8"] += old.values()
        pooled["main" if folder == "quick" else "6712cb8"] += new.values()
        print(folder, "B/A per round", {k: [round(x, 3) for x in v] for k, v in paired.items()})
    out["pooled_median_ms"] = {tree: {k: statistics.median(r[k] for r in rs) for k in KEYS} | {"runs": len(rs)}
                               for tree, rs in pooled.items()}
    out["pooled_main_over_6712cb8"] = {k: out["pooled_median_ms"]["main"][k] / out["pooled_median_ms"]["6712cb8"][k]
                                       for k in KEYS}
    print("pooled medians", json.dumps(out["pooled_median_ms"]), "main/6712cb8",
          {k: round(v, 3) for k, v in out["pooled_main_over_6712cb8"].items()})
    (HERE / "control-summary.json").write_text(json.dumps(out, indent=2))
    plt = mod.plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, key in enumerate(KEYS):
        for j, folder in enumerate(("control", "quick")):
            vals = out[folder]["paired_ratio"][key]["per_round"]
            ax.scatter([i + (j - 0.5) * 0.3] * len(vals), vals, color=("tab:gray", "tab:blue")[j],
                       label=("6712cb8 / 6712cb8 (control)", "main / 6712cb8")[j] if i == 0 else None)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(range(len(KEYS)), ["strict 0 %", "relaxed 0 %"])
    ax.set_ylabel("paired ratio of ms per token, B / A")
    ax.set_title("mesh bench halo --loss 0, 6 ABBA rounds each, one sitting")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "control-summary.png", dpi=110)


if __name__ == "__main__":
    main()
