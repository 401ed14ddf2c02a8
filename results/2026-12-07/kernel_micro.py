"""One-row (decode) matmul times on one thread, the figures behind mesh.weights' kernel choices and
the README's speed lead: fp32 F.linear, the int8 `dequant` kernel, torch's int4 CPU kernel, mesh's q4
block kernel, and fbgemm's dynamic int8 linear; plus q4 nibble unpacking, interleaved vs halves.
Run: .venv/bin/python results/2026-12-07/kernel_micro.py  (writes kernel_micro.json beside it)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from mesh.weights.formats import quantize_groups, quantize_rows
from mesh.weights.modules import group_matmul, int8_matmul

torch.set_num_threads(1)


def us(f, n: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return round((time.perf_counter() - t) / n * 1e6, 1)


out = {}
for n, k in ((1536, 576), (49152, 576)):
    w = torch.randn(n, k) * 0.05
    x = torch.randn(1, k)
    q8, s8 = quantize_rows(w)
    p4, s4, m4 = quantize_groups(w)
    i4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    sz = torch.rand(k // 32, n, 2)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data.copy_(w)
    dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0]
    it = 20 if n > 10000 else 300
    with torch.inference_mode():
        out[f"{n}x{k}"] = {"fp32": us(lambda: F.linear(x, w), it),
                           "int8_dequant": us(lambda: int8_matmul(x, q8, s8, "dequant"), it),
                           "int4pack_mm_for_cpu": us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, i4, 32, sz), it),
                           "q4_block": us(lambda: group_matmul(x, p4, s4, m4), it),
                           "fbgemm_dynamic_int8": us(lambda: dyn(x), it)}
R, K = 1536, 576
packed = torch.randint(0, 255, (R, K // 2), dtype=torch.uint8)
buf = torch.empty(R, K)
pairs = buf.view(R, K // 2, 2)
out["unpack_1536x576"] = {
    "interleaved": us(lambda: (pairs[..., 0].copy_(packed & 15), pairs[..., 1].copy_(packed >> 4)), 300),
    "halves": us(lambda: (buf[:, :K // 2].copy_(packed & 15), buf[:, K // 2:].copy_(packed >> 4)), 300)}
print(json.dumps(out, indent=1))
(Path(__file__).with_name("kernel_micro.json")).write_text(json.dumps(out, indent=1))
