"""Greedy tokens of one prompt with the margin each won by, as JSON on stdout.

Run on x86 and inside the arm64 root (deploy/aarch64/emulate.sh) with the same converted model:
kernels add in different orders on the two, so the tokens can only be expected to agree where
each step's winner leads the runner-up by more than that noise. ``min_margin`` says by how much
the closest step was won (logits, not probabilities).

    python deploy/aarch64/greedy.py --home ~/.cache/mesh --model smollm2-135m --tokens 16 "prompt"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompt", nargs="+")
    p.add_argument("--home", type=Path, required=True, help="MESH_HOME with the converted model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import torch

    from mesh.model import Decoder, load_model

    t0 = time.perf_counter()
    loaded = load_model(args.home, args.model, args.threads)
    load_s = time.perf_counter() - t0
    decoder = Decoder(loaded)
    ids = decoder.encode(" ".join(args.prompt))
    out: list[int] = []
    margins: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits, cache = decoder.prefill(ids)
        for _ in range(args.tokens):
            top = torch.topk(logits.float(), 2)
            margins.append(round(float(top.values[0] - top.values[1]), 4))
            out.append(int(top.indices[0]))
            if out[-1] in loaded.eos_ids:
                break
            logits = decoder.next_logits(out[-1], cache)
    run_s = time.perf_counter() - t0
    print(json.dumps({
        "model": args.model, "digest": loaded.digest, "prompt_ids": ids, "token_ids": out,
        "text": loaded.tokenizer.decode(out, skip_special_tokens=True), "margins": margins,
        "min_margin": min(margins), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_s": round(load_s, 2), "run_s": round(run_s, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
