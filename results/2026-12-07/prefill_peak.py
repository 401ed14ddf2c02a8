"""How much a prefill adds to a node's peak beyond its KV (the figure behind
mesh.budget.activation_bytes_per_token): one fresh process per (model, prompt length), model
loaded and warmed on 16 tokens, then one prefill of T positions into a new cache: peak RSS
growth (VmHWM) beside the cache's bytes and what the node's plan budgets for T positions
(``T * context_bytes_per_token + prefill_bytes``, mesh.budget).

    HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/prefill_peak.py  # writes prefill-peak.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = r"""
import gc, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) * 1024
from mesh import budget
from mesh.model import load_model
m = load_model(Path.home() / '.cache/mesh', sys.argv[1], threads=2, weights=sys.argv[2], verify=False)
c = m.model.new_cache(); m.model.forward(list(range(100, 116)), c)
del c; gc.collect()
a = hwm(); t = int(sys.argv[3])
c = m.model.new_cache(); m.model.forward(list(range(200, 200 + t)), c)
grow, kv = hwm() - a, c.nbytes()
print(json.dumps({"model": sys.argv[1], "weights": sys.argv[2], "tokens": t, "kv_dtype": m.model.config.kv_dtype,
                  "peak_growth_mib": round(grow / 2**20, 1), "kv_mib": round(kv / 2**20, 1),
                  "budget_mib": round((t * budget.context_bytes_per_token(m.model.config)
                                       + budget.prefill_bytes(m.model.config)) / 2**20, 1)}))
"""


def main() -> int:
    rows = []
    for model in ("smollm2-135m", "gemma3-270m"):
        for t in (256, 1024):
            out = subprocess.run([sys.executable, "-c", CHILD, model, "q4", str(t), str(REPO)], capture_output=True,
                                 text=True, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    Path(__file__).with_name("prefill-peak.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
