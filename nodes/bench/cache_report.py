"""What `mesh bench cache` reports: per-case medians paired with their misses, the paper's
figures beside them, the table on the console and the stacked-bar figure. Pure functions of the
rows ``nodes.bench.cache`` collects (plotting aside).
"""

from __future__ import annotations

import statistics
from math import comb
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nodes.bench.report import pyplot, save_figure
from nodes.bench.stats import mean, median

# the paper's figures (arXiv 2602.22812, Pi Zero 2W and Pi 5), printed and stored beside ours
PAPER = {"ttft_miss_s": 12.59, "ttft_hit_s": 0.87, "ttft_change_pct": -93.12,
         "ttlt_miss_s": 23.74, "ttlt_hit_s": 11.86, "ttlt_change_pct": -50.07, "pi5_change_pct": +7.0}

CASES = ("instruction", "examples", "full")
PHASES = ("mesh", "tokenize", "catalog", "fetch", "prefill", "decode")


def _paired(diffs: list[float]) -> dict[str, Any] | None:
    """Paired differences (cache minus no cache, same question, same node): median, quartiles,
    and how many pairs the cache lost; the sign test's two-sided p for "no difference"."""
    if not diffs:
        return None
    n = len(diffs)
    q = statistics.quantiles(diffs, n=4) if n >= 2 else [diffs[0]] * 3
    slower = sum(d > 0 for d in diffs)
    k = min(slower, n - slower)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"n": n, "median_s": statistics.median(diffs), "q1_s": q[0], "q3_s": q[2], "mean_s": statistics.fmean(diffs),
            "min_s": min(diffs), "max_s": max(diffs), "cache_slower": slower, "sign_test_p": round(p, 4)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case: medians of TTFT, TTLT and each phase, paired with the same prompt's miss on the
    same node (the pair's difference, its sign test); the paper's reductions for the full hit."""
    cases: dict[str, Any] = {}
    pairs_all: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for case in ("miss", *CASES):
        if case == "miss":
            got = [r for r in rows if r["case"].endswith("-miss")]
            pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        else:
            got = [r for r in rows if r["case"] == case]
            misses = {r["group"]: r for r in rows if r["case"] == f"{case}-miss"}
            pairs = [(misses[r["group"]], r) for r in got if r["group"] in misses]
            pairs_all += pairs
        entry: dict[str, Any] = {
            "n": len(got), "ttft_s_median": median([r["ttft_s"] for r in got]),
            "ttlt_s_median": median([r["ttlt_s"] for r in got]),
            "ttft_s_mean": mean([r["ttft_s"] for r in got]), "ttlt_s_mean": mean([r["ttlt_s"] for r in got]),
            "prompt_tokens_median": median([r["prompt_tokens"] for r in got]),
            "phases_s_median": {ph: median([_phase(r, ph) for r in got]) for ph in (*PHASES, "mesh_ttft", "fetch_ttft")},
        }
        if case != "miss":
            entry.update(
                decisions={d: sum((r["cache"] or {}).get("decision") == d for r in got)
                           for d in ("local", "remote", "recompute", "no-match")},
                reused_tokens_median=median([(r["cache"] or {}).get("local_tokens", 0)
                                              + (r["cache"] or {}).get("remote_tokens", 0) for r in got]),
                fetch_bytes_median=median([(r["cache"] or {}).get("fetch_bytes", 0) for r in got]),
                paired_ttft_minus_miss=_paired([b["ttft_s"] - a["ttft_s"] for a, b in pairs]),
                paired_ttlt_minus_miss=_paired([b["ttlt_s"] - a["ttlt_s"] for a, b in pairs]),
                ttft_reduction_median_pct=_reduction(pairs, "ttft_s"),
                ttlt_reduction_median_pct=_reduction(pairs, "ttlt_s"),
                worst_ttft_over_miss=max((b["ttft_s"] / a["ttft_s"] for a, b in pairs), default=None),
                identical=sum(a["token_ids"] == b["token_ids"] for a, b in pairs),
            )
        cases[case] = entry
    cached = [r for r in rows if r["case"] in CASES]
    wasted = [r for r in cached if (r["cache"] or {}).get("wasted")]
    full = cases["full"]
    return {
        "questions": full["n"], "cases": cases,
        # the paper's figures: the full hit's median TTFT/TTLT against the miss, in percent
        "ttft_reduction_full_hit": full["ttft_reduction_median_pct"],
        "ttlt_reduction_full_hit": full["ttlt_reduction_median_pct"],
        "identical_outputs": bool(pairs_all) and all(a["token_ids"] == b["token_ids"] for a, b in pairs_all),
        "lookups": len(cached), "fetches": sum((r["cache"] or {}).get("decision") == "remote" for r in cached),
        "wasted_fetches": len(wasted), "wasted": [(r["cache"] or {}).get("wasted") for r in wasted],
        "fetch_bytes_total": sum(int((r["cache"] or {}).get("fetch_bytes", 0)) for r in cached),
        # never slower than no cache: per case, the pairs where the cache lost and by how much
        "cache_slower_pairs": {c: (cases[c]["paired_ttft_minus_miss"] or {}).get("cache_slower") for c in CASES},
    }


def _phase(row: dict[str, Any], name: str) -> float:
    """A phase of a row; ``fetch_ttft`` (the fetch before the first token) for older rows too."""
    if name == "fetch_ttft" and name not in row["phases"]:
        early = (row["cache"] or {}).get("first_token") == "peer-logits"
        return 0.0 if early else row["phases"]["fetch"]
    return float(row["phases"][name])


def _reduction(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> float | None:
    """Median over pairs of the per-prompt reduction (miss - cache) / miss, in percent."""
    got = [100.0 * (a[key] - b[key]) / a[key] for a, b in pairs if a[key] > 0]
    return round(statistics.median(got), 2) if got else None


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """The paper's table as bars: per case the median TTFT and TTLT, stacked by phase."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 4.8), squeeze=False)
    colors = {"mesh": "#bbb", "tokenize": "#e9c46a", "catalog": "#f4a261", "fetch": "#2a9d8f",
              "prefill": "#e76f51", "decode": "#264653"}
    for ax, res in zip(axes[0], results):
        names = ["miss", *CASES]
        for j, metric in enumerate(("TTFT", "TTLT")):
            xs = [i * 2.6 + j for i in range(len(names))]
            bottom = [0.0] * len(names)
            for ph in PHASES:
                if metric == "TTFT" and ph == "decode":
                    continue
                key = f"{ph}_ttft" if (metric == "TTFT" and ph in ("mesh", "fetch")) else ph
                vals = [res["cases"][c]["phases_s_median"][key] or 0.0 for c in names]
                ax.bar(xs, vals, bottom=bottom, color=colors[ph], width=0.9, label=ph if metric == "TTLT" else None)
                bottom = [b + v for b, v in zip(bottom, vals)]
            for x, c in zip(xs, names):
                v = res["cases"][c][f"{metric.lower()}_s_median"] or 0.0
                ax.text(x, v, f"{metric}\n{v:.2f}s", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i * 2.6 + 0.5 for i in range(len(names))],
                      [f"{c}\n(n={res['cases'][c]['n']})" for c in names])
        ax.set_ylabel("seconds (medians; phases stacked)")
        full = res["ttft_reduction_full_hit"]
        ax.set_title(f"{res['profile']}: full hit TTFT -{full or 0:.1f} %, TTLT -{res['ttlt_reduction_full_hit'] or 0:.1f} %")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def print_results(results: list[dict[str, Any]], console: Console) -> None:
    """Per profile the table of cases, then the paper's figures to compare with."""
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for res in results:
        table = Table(title=f"{res['profile']}: prompt cache, {res['questions']} prompts per case (medians, s)")
        for col in ("case", "n", "TTFT", "TTLT", *PHASES, "decisions", "cache - miss TTFT (median, slower/n)",
                    "identical"):
            table.add_column(col)
        for case, e in res["cases"].items():
            paired = e.get("paired_ttft_minus_miss") or {}
            table.add_row(case, str(e["n"]), fmt(e["ttft_s_median"]), fmt(e["ttlt_s_median"]),
                          *(fmt(e["phases_s_median"][ph]) for ph in PHASES),
                          " ".join(f"{k}:{v}" for k, v in (e.get("decisions") or {}).items() if v),
                          f"{fmt(paired.get('median_s'))} ({paired.get('cache_slower')}/{paired.get('n')})" if paired else "",
                          str(e.get("identical", "")))
        console.print(table)
        console.print(f"full hit: TTFT -{res['ttft_reduction_full_hit']} %, TTLT -{res['ttlt_reduction_full_hit']} %; "
                      f"identical outputs {res['identical_outputs']}; wasted fetches {res['wasted_fetches']}"
                      f"/{res['lookups']} lookups")
        mem = res.get("memory") or {}
        if any(m.get("cap_mib") for m in mem.values()):
            console.print("memory (cgroup peak / cap MiB, OOM kills): " + ", ".join(
                f"{n} {m['peak_mib']:.0f}/{m['cap_mib']} ({m['oom_kills']})" for n, m in mem.items()))
    console.print(f"paper (Pi Zero 2W, Gemma-3 270M): TTFT {PAPER['ttft_miss_s']} -> {PAPER['ttft_hit_s']} s "
                  f"({PAPER['ttft_change_pct']}%), TTLT {PAPER['ttlt_miss_s']} -> {PAPER['ttlt_hit_s']} s "
                  f"({PAPER['ttlt_change_pct']}%); Pi 5 with its cache: {PAPER['pi5_change_pct']:+}%")
