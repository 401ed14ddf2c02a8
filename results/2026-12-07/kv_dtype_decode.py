"""Decode speed with a float16 KV cache (a node's default) beside float32, side by side in one
process: SmolLM2-135M q4, 2 threads, a ~240-token prompt (the Pi Zero bench's length), 32 greedy
tokens, the two alternating, 8 rounds; medians. Also whether both give the same tokens.

    HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/kv_dtype_decode.py  # writes kv-dtype-decode.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh.model import Decoder, load_model  # noqa: E402

HOME = Path.home() / ".cache" / "mesh"
ROUNDS = 8
TEXT = ("The following are multiple choice questions (with answers) about astronomy. " * 20)[:1100]


def main() -> int:
    models = {d: load_model(HOME, "smollm2-135m", threads=2, weights="q4", verify=False, kv_dtype=d)
              for d in ("float16", "float32")}
    ids = models["float16"].tokenizer(TEXT)["input_ids"]
    tps: dict[str, list[float]] = {d: [] for d in models}
    tokens = {}
    for r in range(ROUNDS):
        for d in (("float16", "float32") if r % 2 == 0 else ("float32", "float16")):
            g = Decoder(models[d]).generate(ids, 32)
            tps[d].append((len(g.token_ids) - 1) / g.decode_s)
            tokens[d] = g.token_ids
    out = {"model": "smollm2-135m", "weights": "q4", "threads": 2, "prompt_tokens": len(ids), "new_tokens": 32,
           "rounds": ROUNDS, "decode_tps_median": {d: round(statistics.median(v), 2) for d, v in tps.items()},
           "decode_tps": {d: [round(x, 2) for x in v] for d, v in tps.items()},
           "same_tokens": tokens["float16"] == tokens["float32"]}
    out["float16_over_float32"] = round(out["decode_tps_median"]["float16"] / out["decode_tps_median"]["float32"], 3)
    print(json.dumps(out, indent=1))
    Path(__file__).with_name("kv-dtype-decode.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
