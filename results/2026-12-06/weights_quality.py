"""int8 weights against fp32, side by side in one process: quality, then (with --speed) speed.

Quality (no timing): greedy continuations (tokens equal to fp32's?), MMLU 1-shot answer
agreement (the letter with the highest logit among " A".." D", as `mesh bench halo` scores it),
wiki perplexity over held-out windows (teacher-forced). Speed (--speed; only when the machine is
otherwise idle): prefill and decode tok/s, fp32 and int8 alternating in ABBA order, median over
rounds, for each int8 decode kernel.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-06/weights_quality.py \
        --models smollm2-135m,gemma3-270m --mmlu 100 --continuations 40 --out results/2026-12-06/weights_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from mesh.model import Decoder, load_model
from mesh.weights import modules
from nodes.halo_data import load_split, token_windows
from nodes.mmlu import LETTERS, sample
from nodes.setup import mmlu_dir


@torch.inference_mode()
def mmlu_picks(dec: Decoder, items: list[tuple[list[int], int]], letters: list[int]) -> list[int]:
    picks = []
    for ids, _ in items:
        logits, _ = dec.prefill(ids)
        picks.append(max(range(4), key=lambda i: float(logits[letters[i]])))
    return picks


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits = model(input_ids=torch.tensor([w])).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def quality(home: Path, key: str, args: argparse.Namespace) -> dict:
    runs = {w: load_model(home, key, args.threads, weights=w) for w in ("fp32", "int8")}
    tok = runs["fp32"].tokenizer
    per = max(1, math.ceil(args.mmlu / 6))
    items = [(tok(p)["input_ids"], q.answer) for p, q in sample(mmlu_dir(home), per_subject=per)][: args.mmlu]
    letters = [tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in LETTERS]
    held = load_split(home).held_out
    windows = token_windows(tok, held, args.ppl_tokens, args.ppl_windows)
    starts = [w[:32] for w in token_windows(tok, held[len(held) // 2:], 48, args.continuations)]
    out: dict = {"model": key, "n_mmlu": len(items), "ppl_windows": len(windows), "ppl_tokens": args.ppl_tokens,
                 "continuations": len(starts), "new_tokens": args.new_tokens}
    if args.speed_only:
        out = {"model": key, "speed": speed(runs, held, args)}
        return out
    per_w: dict = {}
    for w, loaded in runs.items():
        dec = Decoder(loaded)
        picks = mmlu_picks(dec, items, letters)
        gens = [dec.generate(s, args.new_tokens).token_ids for s in starts]
        per_w[w] = {"picks": picks, "gens": gens, "ppl": perplexity(loaded.model, windows),
                    "accuracy": sum(p == a for p, (_, a) in zip(picks, items)) / len(items)}
    a, b = per_w["fp32"], per_w["int8"]
    out.update({
        "mmlu_agreement": sum(x == y for x, y in zip(a["picks"], b["picks"])) / len(items),
        "mmlu_accuracy_fp32": a["accuracy"], "mmlu_accuracy_int8": b["accuracy"],
        "ppl_fp32": a["ppl"], "ppl_int8": b["ppl"], "ppl_ratio": b["ppl"] / a["ppl"],
        "continuations_identical": sum(x == y for x, y in zip(a["gens"], b["gens"])) / len(starts),
        "mean_common_prefix_tokens": statistics.mean(common_prefix(x, y) for x, y in zip(a["gens"], b["gens"])),
        "first_token_agreement": sum(x[:1] == y[:1] for x, y in zip(a["gens"], b["gens"])) / len(starts),
    })
    if args.speed:
        out["speed"] = speed(runs, held, args)
    return out


@torch.inference_mode()
def speed(runs: dict, held: tuple[str, ...], args: argparse.Namespace) -> dict:
    tok = runs["fp32"].tokenizer
    prompt = token_windows(tok, held, args.prefill_tokens, 1)[0]
    short = prompt[:16]
    variants = [("fp32", None), *(("int8", k) for k in modules.KERNELS)]
    default = modules.kernels()["decode"]
    times: dict[str, dict[str, list[float]]] = {f"{w}/{k or 'blas'}": {"prefill": [], "decode": []} for w, k in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # ABBA over rounds
        for w, k in order:
            if k:
                modules.set_kernel(decode=k)
            dec = Decoder(runs[w])
            t0 = time.perf_counter()
            dec.prefill(prompt)
            pre = time.perf_counter() - t0
            g = dec.generate(short, args.decode_tokens + 1)
            name = f"{w}/{k or 'blas'}"
            times[name]["prefill"].append(len(prompt) / pre)
            times[name]["decode"].append(max(1, len(g.token_ids) - 1) / g.decode_s)
    modules.set_kernel(decode=default)
    return {"prefill_tokens": len(prompt), "decode_tokens": args.decode_tokens, "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "tps": {n: {p: statistics.median(v) for p, v in t.items()} for n, t in times.items()},
            "samples": times}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--home", default=str(Path.home() / ".cache" / "mesh"))
    p.add_argument("--mmlu", type=int, default=100)
    p.add_argument("--continuations", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed", action="store_true")
    p.add_argument("--speed-only", action="store_true", help="skip the quality figures")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = [quality(Path(args.home), k, args) for k in args.models.split(",")]
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
                                          "torch": torch.__version__, "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
