"""Which int8 decode kernel on x86, decided at model level: for each model's int8 weights and each
candidate kernel, decode tok/s (2 threads, 64 greedy tokens after a ~100-token prompt, the kernels
round robin over ROUNDS rounds, medians) and what the kernel does to the numbers, teacher-forced
one token at a time over wiki windows: perplexity over fp32's (fp32 by a plain prefill) and the
share of positions whose argmax equals fp32's.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/decode_kernel_choice.py
writes decode-kernel-choice.json beside this file.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh.model import Decoder, load_model  # noqa: E402
from mesh.weights import modules  # noqa: E402
from nodes.halo_data import load_split, token_windows  # noqa: E402

HOME = Path.home() / ".cache" / "mesh"
KERNELS = sys.argv[1].split(",") if len(sys.argv) > 1 else ["dequant", "fbgemm", "int8mm_bf16"]
MODELS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["smollm2-135m", "gemma3-270m"]
ROUNDS, WINDOWS, LENGTH = 3, 4, 128
THREADS = int(sys.argv[3]) if len(sys.argv) > 3 else 2
PROMPT = ("The history of the lighthouse begins in the ancient world, when fires were lit on hills to guide "
          "ships into harbour. The most famous of these was the Pharos of Alexandria, built in the third "
          "century before our era, which stood for more than a thousand years.")


@torch.inference_mode()
def decode_tps(loaded, ids) -> float:  # noqa: ANN001
    lm = loaded.model
    cache = lm.new_cache()
    logits = lm.forward(ids, cache)[-1]
    t = time.perf_counter()
    for _ in range(64):
        logits = lm.step(int(torch.argmax(logits)), cache)
    return 64 / (time.perf_counter() - t)


@torch.inference_mode()
def teacher_forced(loaded, windows):  # noqa: ANN001
    lm = loaded.model
    rows = []
    for w in windows:
        cache = lm.new_cache()
        rows.append(torch.stack([lm.step(t, cache) for t in w[:-1]]).float())
    return rows


def main() -> int:
    torch.set_num_threads(THREADS)
    held = load_split(HOME).held_out
    out: dict = {"threads": THREADS, "kernels": KERNELS, "rounds": ROUNDS, "windows": WINDOWS, "length": LENGTH, "models": {}}
    for model in MODELS:
        ref = load_model(HOME, model, threads=THREADS, weights="fp32", verify=False)
        windows = token_windows(ref.tokenizer, held, LENGTH, WINDOWS)
        with torch.inference_mode():
            ref_logits = [Decoder(ref).all_logits(w)[:-1].float() for w in windows]
        ids = ref.tokenizer(PROMPT)["input_ids"]
        del ref
        targets = [torch.tensor(w[1:]) for w in windows]
        nll = lambda rows: sum(float(torch.nn.functional.cross_entropy(r, t, reduction="sum"))  # noqa: E731
                               for r, t in zip(rows, targets)) / sum(len(t) for t in targets)
        ref_nll = nll(ref_logits)
        loaded = {}
        for k in KERNELS:
            modules.set_kernel(decode=k)
            loaded[k] = load_model(HOME, model, threads=THREADS, weights="int8", verify=False)
        tps: dict[str, list[float]] = {k: [] for k in KERNELS}
        for r in range(ROUNDS):
            for k in (KERNELS if r % 2 == 0 else KERNELS[::-1]):
                modules.set_kernel(decode=k)
                tps[k].append(decode_tps(loaded[k], ids))
        res = {}
        for k in KERNELS:
            modules.set_kernel(decode=k)
            rows = teacher_forced(loaded[k], windows)
            top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(rows, ref_logits))
            res[k] = {"decode_tps": round(statistics.median(tps[k]), 2), "decode_tps_all": [round(x, 2) for x in tps[k]],
                      "ppl_ratio": round(math.exp(nll(rows) - ref_nll), 4),
                      "top1_agreement_with_fp32": round(top1 / sum(len(t) for t in targets), 4)}
            print(model, k, res[k], flush=True)
        out["models"][model] = res
        del loaded
    Path(__file__).with_name(f"decode-kernel-choice-{'-'.join(MODELS)}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
