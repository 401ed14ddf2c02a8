"""A prototype, measured before it is built: q4 decode through torch's int4 kernel, side by side with
today's q4 decode and with llama.cpp on the same GGUF, in one process, 2 threads.

Today a q4 weight decodes by unpacking its nibbles into float32 a block at a time and calling
``F.linear`` (mesh/weights/modules.py ``group_matmul``): exact (SmolLM2's q4 is its GGUF bit for
bit), but several float32 passes per weight per token. ``torch._weight_int4pack_mm_for_cpu`` takes
grouped 4-bit weights with a (scale, zero) per group; on this x86 machine it is vectorised for
bfloat16 activations only (float32 and float16 fall to scalar code, 20-25x slower: checked in
/tmp/int4bench2.py-style micro-benchmarks, see the log). Its dequantiser is ``(q - 8) * scale + zero``,
so a q4 group (``q * s + m``) packs as (s, m + 8 s). An 8-bit group (the Q8_0 embedding / tied LM head
q4 keeps) splits into two 4-bit halves, ``q = 16 hi + lo`` with ``hi = q >> 4`` in -8..7 and
``lo = q & 15``: the input given twice, groups (16 s, 0) for ``hi + 8`` and (s, 8 s) for ``lo``: the
same products, 4-bit kernel. The packed layout depends on the CPU capability (AVX2, AVX-512: checked),
so it is made at load, in anonymous memory beside the mapped codes (which the embedding lookup and the
prefill keep reading).

Measured per model: decode tok/s of q4 today (``exact``), of q4 with the packed decode (``packed``),
and of llama.cpp on the model's own GGUF (``nodes.bench.llama_ref``), in ABBA order over ROUNDS rounds,
64 greedy tokens after a ~100-token prompt; quality of each decode path over teacher-forced wiki
positions (every position through the decode kernel) against fp32: perplexity ratio and argmax
agreement; whether greedy tokens equal fp32's over the 64.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/packed_decode.py [--rounds 3]
writes packed-decode.json / .png beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from decode_speed import PROMPT  # the same ~100-token prompt as the decode sittings
from mesh.model import load_model
from mesh.weights import modules
from mesh.weights.modules import GroupLinear
from nodes.bench.llama_ref import LlamaReference, available
from nodes.bench.memory import reference_gguf
from nodes.halo_data import load_split, token_windows

HERE = Path(__file__).resolve().parent
HOME = Path.home() / ".cache" / "mesh"
GROUP = 32
PACK_ROWS = 4096
TOKENS = 64
USE_PACKED = {"on": False}


def pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    n = codes.shape[0]
    parts = []
    for r0 in range(0, n, PACK_ROWS):
        c = codes[r0:r0 + PACK_ROWS]
        if codes.dtype == torch.uint8:  # column j in the low nibble, j + K/2 in the high one
            full = torch.cat([c & 15, c >> 4], dim=1).to(torch.int32)
        else:
            q = c.to(torch.int32)
            full = torch.cat([(q >> 4) + 8, q & 15], dim=1)
        parts.append(torch._convert_weight_to_int4pack_for_cpu(full.contiguous(), 1))
    s = scales.float()
    if codes.dtype == torch.uint8:
        assert mins is not None
        scale, zero, doubled = s, mins.float() + 8 * s, False
    else:
        scale, zero, doubled = torch.cat([16 * s, s], 1), torch.cat([torch.zeros_like(s), 8 * s], 1), True
    sz = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    return torch.cat(parts), sz, doubled


_plain_forward = GroupLinear.forward


def _forward(self: GroupLinear, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(self, "_packed", None)
    if USE_PACKED["on"] and packed is not None and x.numel() == self.in_features and getattr(modules._phase, "decode", False):
        w, sz, doubled = packed
        a = x.reshape(1, -1).to(torch.bfloat16)
        if doubled:
            a = torch.cat([a, a], 1)
        y = torch._weight_int4pack_mm_for_cpu(a, w, GROUP, sz).float()
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)
    return _plain_forward(self, x)



def pack_model(lm: torch.nn.Module) -> int:
    total = 0
    for m in lm.modules():
        if isinstance(m, GroupLinear):
            m._packed = pack(m.qweight, m.scales, m.mins)
            total += sum(t.numel() * t.element_size() for t in m._packed[:2])
    return total


@torch.inference_mode()
def greedy(loaded, ids: list[int]) -> tuple[list[int], float]:  # noqa: ANN001
    lm = loaded.model
    cache = lm.new_cache()
    logits = lm.forward(ids, cache)[-1]
    out = [int(logits.argmax())]
    t0 = time.perf_counter()
    for _ in range(TOKENS - 1):
        out.append(int(lm.step(out[-1], cache).argmax()))
    return out, (TOKENS - 1) / (time.perf_counter() - t0)


@torch.inference_mode()
def teacher_forced(loaded, windows) -> torch.Tensor:  # noqa: ANN001
    lm = loaded.model
    rows = []
    for w in windows:
        cache = lm.new_cache()
        rows += [lm.step(t, cache).float() for t in w[:-1]]
    return torch.stack(rows)


def fp32_reference(fp32, windows_n: int, window_len: int) -> tuple[list, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Held-out wiki windows, their next-token targets and fp32's logits at every position."""
    windows = token_windows(fp32.tokenizer, load_split(HOME).held_out, window_len, windows_n)
    targets = torch.tensor([t for w in windows for t in w[1:]])
    with torch.inference_mode():
        ref = torch.cat([fp32.model.forward(w, fp32.model.new_cache(), logits_to_keep=len(w))[:-1].float()
                         for w in windows])
    return windows, targets, ref


def quality(logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict:
    nll = float(F.cross_entropy(logits, targets, reduction="mean"))
    nll_ref = float(F.cross_entropy(ref, targets, reduction="mean"))
    return {"ppl": math.exp(nll), "ppl_ratio": math.exp(nll - nll_ref),
            "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}


def run_model(model: str, rounds: int, windows_n: int, window_len: int) -> dict:
    torch.set_num_threads(2)
    fp32 = load_model(HOME, model, 2, weights="fp32")
    q4 = load_model(HOME, model, 2, weights="q4")
    t0 = time.perf_counter()
    packed_bytes = pack_model(q4.model)
    pack_s = time.perf_counter() - t0
    ids = q4.tokenizer(PROMPT)["input_ids"]
    ref_tokens, _ = greedy(fp32, ids)
    speeds: dict[str, list[float]] = {"exact": [], "packed": [], "llama.cpp": []}
    same: dict[str, bool] = {}
    llama = LlamaReference(reference_gguf(model, HOME), threads=2, tokens=TOKENS) if available() else None
    try:
        order = ["exact", "packed", *(["llama.cpp"] if llama else [])]
        for r in range(rounds + 1):  # round 0 warms up
            for name in (order if r % 2 else order[::-1]):
                if name == "llama.cpp":
                    tps = llama.ask(PROMPT)["decode_tps"]  # type: ignore[union-attr]
                else:
                    USE_PACKED["on"] = name == "packed"
                    toks, tps = greedy(q4, ids)
                    same[name] = toks == ref_tokens
                if r:
                    speeds[name].append(tps)
    finally:
        if llama:
            llama.close()
    windows, targets, ref = fp32_reference(fp32, windows_n, window_len)
    q = {}
    for name in ("exact", "packed"):
        USE_PACKED["on"] = name == "packed"
        q[name] = quality(teacher_forced(q4, windows), ref, targets)
    USE_PACKED["on"] = False
    med = {k: round(statistics.median(v), 2) for k, v in speeds.items() if v}
    return {"decode_tps": med, "decode_tps_all": speeds, "greedy_tokens_equal_fp32": same,
            "packed_over_exact": round(med["packed"] / med["exact"], 2),
            "packed_over_llama_cpp": round(med["packed"] / med["llama.cpp"], 3) if "llama.cpp" in med else None,
            "quality_vs_fp32": q, "positions": int(targets.numel()),
            "packed_copy_mib": round(packed_bytes / 2**20, 1), "pack_s": round(pack_s, 2)}


def main() -> int:
    GroupLinear.forward = _forward  # the prototype's kernel (decode_packed.py measures the one built)
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=128)
    args = ap.parse_args()
    out = {"what": __doc__.split("\n\n")[0], "threads": 2, "tokens": TOKENS, "rounds": args.rounds,
           "capability": str(torch.backends.cpu.get_cpu_capability()), "models": {}}
    for model in args.models.split(","):
        out["models"][model] = run_model(model, args.rounds, args.windows, args.window_len)
        print(model, json.dumps(out["models"][model]), flush=True)
    (HERE / "packed-decode.json").write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["exact", "packed", "llama.cpp"]
    for i, (model, r) in enumerate(out["models"].items()):
        ys = [r["decode_tps"].get(n, 0) for n in names]
        ax.bar([i * 4 + j for j in range(3)], ys, color=["#999999", "#55a868", "#4c72b0"],
               label=None if i else names)
        for j, y in enumerate(ys):
            ax.text(i * 4 + j, y, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([i * 4 + 1 for i in range(len(out["models"]))], list(out["models"]))
    ax.set_ylabel("decode tok/s (2 threads)")
    ax.set_title("q4 decode: today, int4-packed (prototype), llama.cpp")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#999999", "#55a868", "#4c72b0")]
    ax.legend(handles, ["q4 today (exact)", "q4 packed, bf16 inputs", "llama.cpp, same GGUF"], fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "packed-decode.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
