"""Issue 14: the tree before the layout move (6712cb8) vs a later tree, from the runs layout_side_by_side.sh
wrote in one directory (default: beside this file: 6712cb8 vs the move commit fa5dc84; 2026-12-07's sitting,
6712cb8 vs main 69221f3, HALO only, is in results/2026-12-07).

Prints one line per run and the per-side medians, and writes layout-summary.json and
layout-summary.png. Answers: the cache bench's token ids per (question, case) must be the same on
both sides; HALO's quality figures (perplexity, MMLU) come from teacher-forced evaluation and must
be the same too.
Adds the paired new/old ratio of each HALO figure per round (rounds alternate the order, ABBA).
Run: .venv/bin/python results/2026-12-06/layout_summary.py [DIR]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent


def runs(bench: str, side: str) -> list[dict]:
    out = []
    for path in sorted(HERE.glob(f"layout-{bench}-{side}-*.json")):
        d = json.loads(path.read_text())
        d["_file"] = path.name
        out.append(d)
    return out


def halo_row(d: dict) -> dict:
    pts = {p["loss_pct"]: p for p in d["points"]}
    p0, p5 = pts[0.0], pts.get(5.0, {})  # a quick run (HALO_ARGS="--loss 0 ...") has no 5 % point

    def ms(p: dict, key: str) -> float | None:
        return 1e3 * p[key] if key in p else None

    return {"file": d["_file"], "strict_0_ms": ms(p0, "strict_tpot_s"), "relaxed_0_ms": ms(p0, "relaxed_tpot_s"),
            "strict_5_ms": ms(p5, "strict_tpot_s"), "relaxed_5_ms": ms(p5, "relaxed_tpot_s"),
            "speedup_5": p5.get("speedup"), "ppl_change_pct": p5.get("ppl_change_pct"),
            "agreement": p5.get("agreement"), "mmlu_lossless": p5.get("accuracy_lossless"),
            "mmlu_relaxed": p5.get("accuracy_relaxed"), "ppl_lossless": p5.get("ppl_lossless")}


def cache_row(d: dict) -> dict:
    by_case: dict[str, list[float]] = {}
    for r in d["rows"]:
        by_case.setdefault(r["case"], []).append(r["ttft_s"])
    return {"file": d["_file"], "ttft_reduction_full_hit": d["ttft_reduction_full_hit"],
            "ttlt_reduction_full_hit": d["ttlt_reduction_full_hit"], "identical_outputs": d["identical_outputs"],
            "fetches": d["fetches"], "wasted_fetches": d["wasted_fetches"],
            **{f"ttft_median_{c}_s": statistics.median(v) for c, v in sorted(by_case.items())}}


def answers(d: dict) -> dict[str, list[int]]:
    return {f"{r['group']}:{r['case']}": r["token_ids"] for r in d["rows"]}


def medians(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)]
    return {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in keys}


def main() -> None:
    summary: dict = {}
    for bench, row in (("halo", halo_row), ("cache", cache_row)):
        sides = {side: [row(d) for d in runs(bench, side)] for side in ("old", "new")}
        if not all(sides.values()):
            continue
        summary[bench] = {side: {"runs": rs, "median": medians(rs)} for side, rs in sides.items()}
        for side, rs in sides.items():
            for r in rs:
                print(bench, side, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
            print(bench, side, "median", {k: round(v, 4) for k, v in summary[bench][side]["median"].items()})
    if "halo" in summary:
        by_round = {side: {r["file"].rsplit("-", 1)[1]: r for r in summary["halo"][side]["runs"]} for side in ("old", "new")}
        paired: dict[str, list[float]] = {}
        for rnd in sorted(set(by_round["old"]) & set(by_round["new"])):
            for key in ("strict_0_ms", "relaxed_0_ms", "strict_5_ms", "relaxed_5_ms"):
                if by_round["old"][rnd][key] is None:
                    continue
                paired.setdefault(key, []).append(by_round["new"][rnd][key] / by_round["old"][rnd][key])
        summary["halo"]["paired_new_over_old"] = {k: {"per_round": v, "median": statistics.median(v)}
                                                  for k, v in paired.items()}
        print("halo paired new/old", {k: [round(x, 3) for x in v] for k, v in paired.items()})
    if "cache" in summary:
        old = [answers(d) for d in runs("cache", "old")]
        new = [answers(d) for d in runs("cache", "new")]
        same = all(a == old[0] for a in old + new)
        summary["cache"]["answers_identical_across_all_runs"] = same
        print("cache answers identical across every old and new run:", same)
    (HERE / "layout-summary.json").write_text(json.dumps(summary, indent=2))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "halo" in summary:
        ax = axes[0]
        for i, key in enumerate(("strict_0_ms", "relaxed_0_ms", "strict_5_ms", "relaxed_5_ms")):
            for j, side in enumerate(("old", "new")):
                vals = [r[key] for r in summary["halo"][side]["runs"] if r[key] is not None]
                ax.scatter([i + (j - 0.5) * 0.3] * len(vals), vals, color=("tab:gray", "tab:blue")[j],
                           label=side if i == 0 else None)
        ax.set_xticks(range(4), ["strict 0 %", "relaxed 0 %", "strict 5 %", "relaxed 5 %"])
        ax.set_yscale("log")
        ax.set_ylabel("ms per token")
        ax.set_title("mesh bench halo --loss 0,5 --no-ablation")
        ax.legend()
    if "cache" in summary:
        ax = axes[1]
        cases = [k for k in summary["cache"]["old"]["runs"][0] if k.startswith("ttft_median_")]
        for i, key in enumerate(cases):
            for j, side in enumerate(("old", "new")):
                vals = [r[key] for r in summary["cache"][side]["runs"]]
                ax.scatter([i + (j - 0.5) * 0.3] * len(vals), vals, color=("tab:gray", "tab:blue")[j],
                           label=side if i == 0 else None)
        ax.set_xticks(range(len(cases)), [c.removeprefix("ttft_median_").removesuffix("_s") for c in cases],
                      rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel("TTFT median, s")
        ax.set_title("mesh bench cache --profile pi-zero-2w --questions 4")
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "layout-summary.png", dpi=110)


if __name__ == "__main__":
    main()
