"""HALO time per token with the frames' MACs on and off, side by side: the summary of the alternating
`mesh bench halo --loss 0 --no-ablation` runs (auth-bench-halo-mac-{on,off}-N.json, same code; "on"
ran with a MESH_HOME holding identities, "off" with none, so the only difference is the keys).

    .venv/bin/python results/2026-12-06/auth_bench_halo_summary.py

Writes auth-bench-halo-summary.json and .png next to this file.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for side in runs:
        for path in sorted(HERE.glob(f"auth-bench-halo-mac-{side}-*.json")):
            d = json.loads(path.read_text())
            p = d["points"][0]
            runs[side].append({"file": path.name, "date": d.get("date"), "strict_tpot_s": p["strict_tpot_s"],
                               "relaxed_tpot_s": p["relaxed_tpot_s"], "strict_runs_s": p.get("strict_tpot_runs_s"),
                               "relaxed_runs_s": p.get("relaxed_tpot_runs_s"), "load_avg_1min": p.get("load_avg_1min"),
                               "agreement": p.get("agreement")})
    out: dict = {"what": "mesh bench halo --loss 0 --no-ablation --reps 3 --mmlu 10 --ppl-tokens 64, MACs on vs off, "
                         "alternating runs: on,off x3 then off,on x2 (median TPOT of each run's 3 generations)", "runs": runs}
    for sync in ("strict", "relaxed"):
        on = [r[f"{sync}_tpot_s"] for r in runs["on"]]
        off = [r[f"{sync}_tpot_s"] for r in runs["off"]]
        if on and off:
            out[sync] = {"on_median_s": statistics.median(on), "off_median_s": statistics.median(off),
                         "on_vs_off_pct": 100.0 * (statistics.median(on) / statistics.median(off) - 1.0),
                         "n_on": len(on), "n_off": len(off)}
    (HERE / "auth-bench-halo-summary.json").write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, sync in enumerate(("strict", "relaxed")):
        for j, (side, color) in enumerate((("off", "#999999"), ("on", "#55a868"))):
            ys = [r[f"{sync}_tpot_s"] * 1000 for r in runs[side]]
            xs = [i * 3 + j] * len(ys)
            ax.scatter(xs, ys, color=color, zorder=3)
            if ys:
                ax.hlines(statistics.median(ys), i * 3 + j - 0.3, i * 3 + j + 0.3, color=color, lw=3)
    ax.set_xticks([0, 1, 3, 4], ["strict\nMAC off", "strict\nMAC on", "relaxed\nMAC off", "relaxed\nMAC on"])
    ax.set_ylabel("ms per token (median of 3 generations per run)")
    title = "HALO, 3 workers, 0 % loss: frame MACs on vs off"
    if "strict" in out and "relaxed" in out:
        title += f"\nmedians: strict {out['strict']['on_vs_off_pct']:+.1f} %, relaxed {out['relaxed']['on_vs_off_pct']:+.1f} %"
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "auth-bench-halo-summary.png", dpi=110)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
