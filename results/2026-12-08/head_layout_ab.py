"""Gemma-3 q4 head (262,144 x 640 Q8_0 codes): the packed copy with one kernel group per weight group
for both 4-bit halves (mesh.weights.packed.pack_int8) against the earlier layout (halves side by
side, a (scale, zero) each), time and error against the exact product, alternating in one process.
Run from the repo root: HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-08/head_layout_ab.py"""
import torch, time, statistics, sys
from pathlib import Path
from mesh.model import load_model
from mesh.weights import packed as P
torch.set_num_threads(2)
lm = load_model(Path.home()/".cache/mesh", "gemma3-270m", weights="q4", threads=2)
head = lm.model.lm_head
q, s = head.qweight, head.scales.float()
N, K = q.shape; g = K // s.shape[1]
new = P.pack_int8(q, s)
# the old layout: halves side by side, two (scale, zero) pairs per group
qi = q.to(torch.int32)
old_codes = P._pack_codes(q, lambda c: torch.cat(((c.to(torch.int32) >> 4) + 8, c.to(torch.int32) & 15), dim=1))
old_sz = P._scales_zeros(torch.cat((16 * s, s), 1), torch.cat((torch.zeros_like(s), 8 * s), 1))
x = torch.randn(1, K)
def f_old():
    a = x.to(torch.bfloat16); a = torch.cat((a, a), 1)
    return torch._weight_int4pack_mm_for_cpu(a, old_codes, g, old_sz).float()
def f_new():
    return new.matmul(x)
ref = (q.float().view(N, -1, g) * x.view(1, -1, g)).sum(-1).mul(s).sum(-1)
eo, en = (f_old()[0] - ref).abs(), (f_new()[0] - ref).abs()
print("max err old", float(eo.max()), "new", float(en.max()), "mean old", float(eo.mean()), "new", float(en.mean()))
print("argmax ref/old/new", int(ref.argmax()), int(f_old().argmax()), int(f_new().argmax()))
def bench(f, n=20):
    f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e3
r = {"old": [], "new": []}
for _ in range(8):
    r["old"].append(bench(f_old)); r["new"].append(bench(f_new))
print({k: round(statistics.median(v), 2) for k, v in r.items()}, "ms; bytes old", old_codes.numel() + old_sz.numel() * 2, "new", new.nbytes)
