"""Issue 15: what authentication costs, from one sitting of `auth_side_by_side.sh` (same tree, a MESH_HOME
with identities ("on") vs the same home without ("off"), rounds in ABBA order).

    .venv/bin/python results/2026-12-07/auth_summary.py [DIR]

DIR defaults to auth/ beside this file. Per loss rate and sync rule: each round's on/off ratio of time
per output token (each run's TPOT is the median of its --reps generations), their median, and the pooled
medians of all "on" and all "off" runs; the cache bench's full-hit first token on both sides. Writes
auth-summary.json and auth-summary.png into DIR.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _runs(out: Path, bench: str) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {"on": {}, "off": {}}
    for path in out.glob(f"auth-{bench}-*-*.json"):
        m = re.fullmatch(rf"auth-{bench}-(on|off)-(\d+)\.json", path.name)
        if m:
            runs[m.group(1)][int(m.group(2))] = json.loads(path.read_text())
    return runs


def halo(out: Path) -> dict:
    runs = _runs(out, "halo")
    rounds = sorted(set(runs["on"]) & set(runs["off"]))
    result: dict = {"rounds": rounds, "by_loss": {}}
    for side in ("on", "off"):
        result[f"{side}_load_avg_1min"] = {i: [round(x, 2) for p in runs[side][i]["points"]
                                               for x in (p.get("load_avg_1min") or [])[:1]] for i in rounds}
    losses = sorted({p["loss_pct"] for i in rounds for p in runs["on"][i]["points"]})
    for loss in losses:
        entry: dict = {}
        for sync in ("strict", "relaxed"):
            def tpot(side: str, i: int) -> float:
                return next(p for p in runs[side][i]["points"] if p["loss_pct"] == loss)[f"{sync}_tpot_s"]
            on = [tpot("on", i) for i in rounds]
            off = [tpot("off", i) for i in rounds]
            ratios = [a / b for a, b in zip(on, off)]
            entry[sync] = {"on_tpot_s": on, "off_tpot_s": off, "paired_on_over_off": [round(r, 4) for r in ratios],
                           "paired_median": round(statistics.median(ratios), 4),
                           "pooled_on_median_s": statistics.median(on), "pooled_off_median_s": statistics.median(off),
                           "pooled_on_over_off": round(statistics.median(on) / statistics.median(off), 4)}
        for sync in ("strict", "relaxed"):  # where the time goes on the coordinator, ms per token (median of runs)
            entry[sync]["phases_ms_per_token"] = {side: {
                k: round(statistics.median(next(p for p in runs[side][i]["points"] if p["loss_pct"] == loss)
                                           [f"{sync}_halo"]["phases_s"].get(k, 0.0) * 1000 / runs[side][i]["tokens"]
                                           for i in rounds), 3)
                for k in ("encode", "publish", "gather", "reduce", "worker_compute")} for side in ("on", "off")}
        entry["agreement_on"] = [next(p for p in runs["on"][i]["points"] if p["loss_pct"] == loss).get("agreement")
                                 for i in rounds]
        result["by_loss"][str(loss)] = entry
    result["speedup_at_5pct"] = {side: [runs[side][i].get("speedup_at_5pct") for i in rounds] for side in ("on", "off")}
    return result


def cache(out: Path) -> dict:
    runs = _runs(out, "cache")
    result: dict = {}
    for side in ("on", "off"):
        result[side] = [{"round": i, "ttft_reduction_full_hit_pct": d["ttft_reduction_full_hit"],
                         "ttlt_reduction_full_hit_pct": d["ttlt_reduction_full_hit"],
                         "full_hit_ttft_s_median": d["cases"]["full"]["ttft_s_median"],
                         "miss_ttft_s_median": d["cases"]["miss"]["ttft_s_median"],
                         "identical_outputs": d["identical_outputs"]} for i, d in sorted(runs[side].items())]
    return result


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_loss = summary["halo"]["by_loss"]
    fig, axes = plt.subplots(1, max(1, len(by_loss)), figsize=(5 * max(1, len(by_loss)), 4.2), squeeze=False)
    for ax, (loss, entry) in zip(axes[0], by_loss.items()):
        for k, sync in enumerate(("strict", "relaxed")):
            for j, (side, color) in enumerate((("off", "#999999"), ("on", "#55a868"))):
                ys = [t * 1000 for t in entry[sync][f"{side}_tpot_s"]]
                ax.scatter([k * 3 + j] * len(ys), ys, color=color, zorder=3, label=f"MACs {side}" if k == 0 else None)
            ax.text(k * 3 + 0.5, max(entry[sync]["on_tpot_s"] + entry[sync]["off_tpot_s"]) * 1000,
                    f"on/off x{entry[sync]['paired_median']:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0.5, 3.5], ["strict", "relaxed"])
        ax.set_ylabel("time per token (ms)")
        ax.set_title(f"HALO at {float(loss):g} % loss, {len(summary['halo']['rounds'])} ABBA rounds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "auth"
    summary = {"what": "same tree, identities on vs off (auth_side_by_side.sh); mesh bench halo --loss 0,5 --no-ablation "
                       "--reps 5 --mmlu 4 --ppl-tokens 32; mesh bench cache --profile pi-zero-2w --model smollm2-135m "
                       "--questions 4", "halo": halo(out), "cache": cache(out)}
    (out / "auth-summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "auth-summary.png")
    for loss, entry in summary["halo"]["by_loss"].items():
        for sync in ("strict", "relaxed"):
            e = entry[sync]
            print(f"loss {loss} {sync}: paired on/off {e['paired_on_over_off']} median x{e['paired_median']}; "
                  f"pooled {e['pooled_on_median_s'] * 1000:.1f} vs {e['pooled_off_median_s'] * 1000:.1f} ms "
                  f"(x{e['pooled_on_over_off']}); ms/token on {e['phases_ms_per_token']['on']} "
                  f"off {e['phases_ms_per_token']['off']}")
    for side, rows in summary["cache"].items():
        for r in rows:
            print(f"cache {side} round {r['round']}: full hit TTFT {r['full_hit_ttft_s_median']:.3f} s "
                  f"({r['ttft_reduction_full_hit_pct']} %), TTLT {r['ttlt_reduction_full_hit_pct']} %, "
                  f"identical {r['identical_outputs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
