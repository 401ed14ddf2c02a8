"""One-row (decode) matmul kernels on the two models' real shapes, 2 threads, side by side in one
process, as ratios to fp32 ``F.linear``; and each kernel's error against the float64 product of
the same dequantised weights (random weights, activations with a few outlier channels, as a
normed hidden state has).

Kernels: fp32 BLAS; int8 per row: mesh's "dequant" (block to float32 + BLAS), ``_weight_int8pack_mm``
on float32 (scalar on x86) and on bfloat16 activations (AVX-512 on x86), fbgemm's dynamic int8
(``quantized::linear_dynamic``: activations quantised to uint8 per call, i.e. per token at one
row; int32 accumulation); q4 grouped: mesh's block kernel.

    PYTHONPATH=. .venv/bin/python results/2026-12-07/kernel_decode.py   # writes kernel-decode.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh.weights.formats import dequantize_groups, dequantize_rows, quantize_groups, quantize_rows  # noqa: E402
from mesh.weights.modules import group_matmul, int8_matmul  # noqa: E402

torch.set_num_threads(2)


def old_group_matmul(x, codes, scales, mins):  # noqa: ANN001, ANN201 - mesh.weights.modules at 58486ff
    n, k = codes.shape[0], x.shape[1]
    buf = torch.empty(max(1, 256 * 1024 // k), k)
    out = torch.empty((1, n))
    for r0 in range(0, n, buf.shape[0]):
        rows = min(buf.shape[0], n - r0)
        c, w = codes[r0:r0 + rows], buf[:rows]
        half = c.shape[1]
        w[:, :half].copy_(c & 15)
        w[:, half:].copy_(c >> 4)
        g = w.view(rows, scales.shape[1], -1).mul_(scales[r0:r0 + rows, :, None])
        g.add_(mins[r0:r0 + rows, :, None])
        torch.mm(x, w.t(), out=out[:, r0:r0 + rows])
    return out
SHAPES = {  # (N, K): out, in
    "smollm2 q/o 576x576": (576, 576), "smollm2 k/v 192x576": (192, 576), "smollm2 qkv fused 960x576": (960, 576),
    "smollm2 gate/up 1536x576": (1536, 576), "smollm2 gate+up fused 3072x576": (3072, 576),
    "smollm2 down 576x1536": (576, 1536), "smollm2 head 49152x576": (49152, 576),
    "gemma q 1024x640": (1024, 640), "gemma qkv fused 1536x640": (1536, 640), "gemma o 640x1024": (640, 1024),
    "gemma gate+up fused 4096x640": (4096, 640), "gemma down 640x2048": (640, 2048),
    "gemma head 262144x640": (262144, 640),
}
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))


def ms(f, reps: int) -> float:
    f()
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> int:
    out: dict = {"engine": torch.backends.quantized.engine,
                 "supported_engines": list(torch.backends.quantized.supported_engines), "shapes": {}}
    g = torch.Generator().manual_seed(0)
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.05
        x = torch.randn(1, k, generator=g)
        x[0, :4] *= 20  # a few outlier channels
        q8, s8 = quantize_rows(w)
        w8 = dequantize_rows(q8, s8)
        p4, s4, m4 = quantize_groups(w)
        w4 = dequantize_groups(p4, s4, m4)
        ref8 = (x.double() @ w8.double().T)
        wq = torch._make_per_channel_quantized_tensor(q8, s8.double(), torch.zeros(n, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(wq, None)
        xb, sb = x.to(torch.bfloat16), s8.to(torch.bfloat16)
        ones = torch.ones(n, dtype=torch.bfloat16)
        reps = 7 if n > 100_000 else (21 if n > 10_000 else 101)
        kern = {
            "fp32_linear": (lambda: F.linear(x, w8), None),
            "int8_dequant": (lambda: int8_matmul(x, q8, s8, "dequant"), ref8),
            "int8mm_f32": (lambda: torch._weight_int8pack_mm(x, q8, s8), ref8),
            "int8mm_bf16": (lambda: torch._weight_int8pack_mm(xb, q8, sb).float(), ref8),
            "int8mm_bf16_scale_after": (lambda: torch._weight_int8pack_mm(xb, q8, ones).float().mul_(s8), ref8),
            "fbgemm_dynamic": (lambda: torch.ops.quantized.linear_dynamic(x, packed, False), ref8),
            "q4_block_old": (lambda: old_group_matmul(x, p4, s4, m4), x.double() @ w4.double().T),
            "q4_block": (lambda: group_matmul(x, p4, s4, m4), x.double() @ w4.double().T),
        }
        assert torch.equal(old_group_matmul(x, p4, s4, m4), group_matmul(x, p4, s4, m4)), label
        row: dict = {}
        names = [k_ for k_ in kern if not (k_ == "int8mm_f32" and n > 100_000)]  # scalar: seconds
        times: dict[str, list[float]] = {k_: [] for k_ in names}
        for k_ in names:
            kern[k_][0]()  # warm-up
        for _ in range(reps):  # round robin: a busy spell of the shared machine hits every kernel
            for k_ in names:
                t = time.perf_counter()
                kern[k_][0]()
                times[k_].append(time.perf_counter() - t)
        base = statistics.median(times["fp32_linear"])
        for name in names:
            f, ref = kern[name]
            t = statistics.median(times[name])
            err = None
            if ref is not None:
                y = f().double()
                err = float((y - ref).abs().max() / ref.abs().max())
            row[name] = {"ms": round(t * 1e3, 4), "x_fp32": round(base / t, 2), "max_rel_err": err}
        out["shapes"][label] = row
        print(label, {k_: (v["ms"], v["x_fp32"]) for k_, v in row.items()}, flush=True)
    path = Path(__file__).with_name("kernel-decode.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
