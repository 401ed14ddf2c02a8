"""The int8 format's own error on the windows decode_kernel_choice.py uses (4 x 128 wiki tokens):
int8 through the prefill kernel (dequant: float32 arithmetic on the int8 weights, the x86 decode
numerics before this branch) against fp32, perplexity ratio and argmax agreement per position; the
baseline the decode kernel's figures are read against.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/int8_format_baseline.py
writes int8-format-baseline.json beside this file."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh.model import Decoder, load_model  # noqa: E402
from nodes.halo_data import load_split, token_windows  # noqa: E402

HOME = Path.home() / ".cache" / "mesh"


def main() -> int:
    held = load_split(HOME).held_out
    out = {}
    for model in ("smollm2-135m", "gemma3-270m"):
        rows = {}
        for fmt in ("fp32", "int8"):
            loaded = load_model(HOME, model, threads=1, weights=fmt, verify=False)
            windows = token_windows(loaded.tokenizer, held, 128, 4)
            with torch.inference_mode():
                rows[fmt] = [Decoder(loaded).all_logits(w)[:-1].float() for w in windows]
        targets = [torch.tensor(w[1:]) for w in windows]
        n = sum(len(t) for t in targets)
        nll = {f: sum(float(torch.nn.functional.cross_entropy(r, t, reduction="sum")) for r, t in zip(rows[f], targets)) / n
               for f in rows}
        top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(rows["int8"], rows["fp32"])) / n
        out[model] = {"int8_prefill_kernel_ppl_ratio": round(math.exp(nll["int8"] - nll["fp32"]), 4),
                      "int8_prefill_kernel_top1_agreement_with_fp32": round(top1, 4), "positions": n}
        print(model, out[model], flush=True)
    Path(__file__).with_name("int8-format-baseline.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
