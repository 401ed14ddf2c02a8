"""What the int8 decode kernel does to answers, measured through the decode path itself.

``mesh bench memory``'s quality (MMLU agreement, wiki perplexity) runs prefills, which use the
prefill kernel; this script makes the *decode* kernel produce the numbers:

- MMLU (1-shot, the bench's sample over all 57 subjects, N questions): the letter with the highest
  logit among " A".." D". The reference is fp32 (plain prefill). For int8, two ways: the plain
  prefill (what the bench measures) and "prefill all but the last TAIL prompt tokens, then feed
  those one at a time" (each of them through the decode kernel: their KV, their hidden states and
  the answer's logits). Agreement = the share of questions whose letter equals fp32's.
- Perplexity on the wiki text (the bench's held-out paragraphs, WINDOWS windows of LENGTH tokens),
  teacher-forced one token at a time (every position through the decode kernel), over fp32's
  (fp32: a plain prefill).

Decode kernels compared for int8: the machine's choice (mesh.weights.modules.kernels()) and
``dequant`` (the x86 decode kernel before this change), each in its own pass, one process.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/decode_quality.py [--n 200]
writes decode-quality.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh.model import Decoder, load_model  # noqa: E402
from mesh.weights import modules  # noqa: E402
from nodes import mmlu  # noqa: E402
from nodes.halo_data import load_split, token_windows  # noqa: E402
from nodes.setup import mmlu_dir  # noqa: E402

HOME = Path.home() / ".cache" / "mesh"
TAIL = 16


def letters_of(tok) -> list[int]:  # noqa: ANN001
    return [tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in mmlu.LETTERS]


@torch.inference_mode()
def mmlu_picks(loaded, pairs, tail: int) -> list[int]:  # noqa: ANN001
    lm, tok = loaded.model, loaded.tokenizer
    letters = letters_of(tok)
    out = []
    for prompt, _ in pairs:
        ids = tok(prompt)["input_ids"]
        if tail == 0:
            logits = lm.forward(ids, lm.new_cache())[-1]
        else:
            cache = lm.new_cache()
            lm.forward(ids[:-tail], cache)
            for t in ids[-tail:]:
                logits = lm.step(t, cache)
        out.append(max(range(4), key=lambda i: float(logits[letters[i]])))
    return out


@torch.inference_mode()
def perplexity(loaded, windows, stepwise: bool) -> float:  # noqa: ANN001
    lm = loaded.model
    nll, n = 0.0, 0
    for w in windows:
        if stepwise:
            cache = lm.new_cache()
            rows = [lm.step(t, cache) for t in w[:-1]]
            logits = torch.stack(rows).float()
        else:
            logits = Decoder(loaded).all_logits(w)[:-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", default="auto", help="int8 decode kernels to run, e.g. auto,dequant")
    args = ap.parse_args()
    every = tuple(mmlu.subjects(mmlu_dir(HOME)))
    pairs = mmlu.sample(mmlu_dir(HOME), every, per_subject=max(1, math.ceil(args.n / len(every))))[:args.n]
    held_out = load_split(HOME).held_out
    auto = modules.kernels()["decode"]
    out: dict = {"decode_kernel_auto": auto, "mmlu_questions": len(pairs), "tail_tokens_decoded": TAIL,
                 "ppl_windows": args.windows, "ppl_length": args.length, "models": {}}
    for model in args.models.split(","):
        t0 = time.perf_counter()
        ref = load_model(HOME, model, threads=args.threads, weights="fp32", verify=False)
        windows = token_windows(ref.tokenizer, held_out, args.length, args.windows)
        ref_picks = mmlu_picks(ref, pairs, 0)
        ref_ppl = perplexity(ref, windows, stepwise=False)
        del ref
        res: dict = {"fp32_ppl": ref_ppl}
        q = load_model(HOME, model, threads=args.threads, weights="int8", verify=False)
        picks = mmlu_picks(q, pairs, 0)
        res["int8_prefill"] = {"mmlu_agreement": sum(a == b for a, b in zip(picks, ref_picks)) / len(pairs),
                               "ppl_ratio": perplexity(q, windows, stepwise=False) / ref_ppl}
        for kernel in dict.fromkeys(auto if k == "auto" else k for k in args.kernels.split(",")):
            modules.set_kernel(decode=kernel)
            q = load_model(HOME, model, threads=args.threads, weights="int8", verify=False)  # packs for fbgemm
            picks_k = mmlu_picks(q, pairs, TAIL)
            res[f"int8_decode_{kernel}"] = {
                "mmlu_agreement": sum(a == b for a, b in zip(picks_k, ref_picks)) / len(pairs),
                "mmlu_agreement_with_int8_prefill": sum(a == b for a, b in zip(picks_k, picks)) / len(pairs),
                "ppl_ratio": perplexity(q, windows, stepwise=True) / ref_ppl}
            print(model, kernel, res[f"int8_decode_{kernel}"], flush=True)
        modules.set_kernel(decode=auto)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out["models"][model] = res
        print(model, json.dumps(res), flush=True)
    Path(__file__).with_name("decode-quality.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
