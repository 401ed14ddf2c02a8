"""Every decoder layer's int8 products of one token in sequence (weights streamed as in a decode step,
not one matrix in a loop): torch._weight_int8pack_mm on bfloat16 rows vs the doubled 4-bit packed
kernel (mesh.weights.packed.pack_int8). Run from the repo root:
HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-08/layer_kernels_stream.py smollm2-135m"""
import sys, torch, time, statistics
from pathlib import Path
from mesh.model import load_model
from mesh.weights.modules import Int8Linear
from mesh.weights.packed import pack_int8
torch.set_num_threads(2)
lm = load_model(Path.home()/".cache/mesh", sys.argv[1], weights="int8", threads=2)
layers = lm.model.model.layers
sets = []
for L in layers:
    a, m = L.self_attn, L.mlp
    for parts in ([a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]):
        q = torch.cat([p.qweight for p in parts]); s = torch.cat([p.scales for p in parts]).float()
        sets.append((q.contiguous(), s, torch.ones(q.shape[0], dtype=torch.bfloat16), pack_int8(q, s)))
xs = {K: torch.randn(1, K) for K in {int(q.shape[1]) for q, *_ in sets}}
def i8():
    for q, s, ones, p in sets:
        torch._weight_int8pack_mm(xs[int(q.shape[1])].to(torch.bfloat16), q, ones).float().mul_(s)
def d4():
    for q, s, ones, p in sets:
        p.matmul(xs[int(q.shape[1])])
def bench(f, n=30):
    for _ in range(3): f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e3
r = {"int8pack": [], "doubled": []}
for _ in range(5):
    r["int8pack"].append(bench(i8)); r["doubled"].append(bench(d4))
print(sys.argv[1], {k: round(statistics.median(v), 2) for k, v in r.items()}, "ms per token of layer matmuls")
