"""Resident memory of a loaded node's model per weight format: anonymous vs file-mapped.

Each (model, format) runs in a fresh process: import, tokenizer, weights, then one greedy ask
(a 1-shot MMLU prompt, 16 new tokens). Reported from /proc/self/status after each stage:
VmRSS, RssAnon, RssFile, and the peak VmHWM. Memory only: no timing.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-06/weights_memory.py \
        --out results/2026-12-06/weights_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STAGE = r'''
import json, sys
def status():
    keep = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in keep:
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out
stages = {"start": status()}
import torch, transformers
stages["imports"] = status()
from pathlib import Path
from mesh.model import Decoder, load_model
key, weights, home = sys.argv[1], sys.argv[2], Path(sys.argv[3])
loaded = load_model(home, key, 2, weights=weights)
stages["loaded"] = status()
dec = Decoder(loaded)
prompt = ("The following are multiple choice questions (with answers) about geography.\n\n"
          "What is the capital city of France?\nA. Lyon\nB. Paris\nC. Nice\nD. Lille\nAnswer: B\n\n"
          "Which river flows through Paris?\nA. Seine\nB. Rhine\nC. Thames\nD. Danube\nAnswer:")
g = dec.generate(dec.encode(prompt), 16)
stages["after_ask"] = status()
print(json.dumps({"model": key, "weights": weights, "model_key": loaded.model_key, "answer": g.text,
                  "stages_mib": stages}))
'''


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--weights", default="fp32,int8")
    p.add_argument("--home", default=str(Path.home() / ".cache" / "mesh"))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for key in args.models.split(","):
        for w in args.weights.split(","):
            r = subprocess.run([sys.executable, "-c", STAGE, key, w, args.home], capture_output=True, text=True,
                               check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
