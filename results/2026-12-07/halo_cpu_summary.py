"""Issue 14: CPU seconds per process of `mesh bench halo --loss 0 --no-ablation`, old (6712cb8) vs
new (fa5dc84) layout, ABBA (halo_cpu_side_by_side.sh), with the bench's time per token beside.
Run: .venv/bin/python results/2026-12-07/halo_cpu_summary.py  (writes halo-cpu-summary.json)"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def role(cmd: str, cpu: float, top: float) -> str:
    if cmd.startswith("mosquitto") or (not cmd and cpu < 60):
        return "broker"
    if "nodes.cli coordinator" in cmd or (not cmd and cpu == top):
        return "coordinator"
    return "worker"  # the three `--roles worker` nodes (an empty command line: sampled as a zombie)


rows = []
for path in sorted(HERE.glob("halo-cpu-[on]*-[0-9].json")):
    side, n = path.stem.split("-")[2:4]
    d = json.loads(path.read_text())
    bench = json.loads((HERE / f"halo-cpu-bench-{side}-{n}.json").read_text())["points"][0]
    top = max(p["cpu_s"] for p in d["processes"])
    cpu: dict[str, float] = {}
    for p in d["processes"]:
        r = role(p["cmd"], p["cpu_s"], top)
        cpu[r] = round(cpu.get(r, 0.0) + p["cpu_s"], 1)
    rows.append({"run": f"{side}-{n}", "side": side, "cpu_s": cpu, "cpu_total_s": round(sum(cpu.values()), 1),
                 "strict_ms": round(bench["strict_tpot_s"] * 1000, 1), "relaxed_ms": round(bench["relaxed_tpot_s"] * 1000, 1),
                 "strict_runs_ms": [round(x * 1000, 1) for x in bench["strict_tpot_runs_s"]]})
    print(rows[-1])
summary = {s: {k: statistics.median(r[k] for r in rows if r["side"] == s) for k in ("cpu_total_s", "strict_ms", "relaxed_ms")}
           for s in ("old", "new")}
print(summary)
(HERE / "halo-cpu-summary.json").write_text(json.dumps({"runs": rows, "median": summary}, indent=1))
