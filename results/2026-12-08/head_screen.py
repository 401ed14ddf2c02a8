"""Gemma-3 q4 greedy decode: how many of the 262,144 head rows a rigorous screen on the 8-bit head's high
4 bits leaves to compute exactly (bound on the low half: 15 x scale x the input's positive / negative
sums per group; margin for bfloat16 rounding). Writes head_screen.json. Run from the repo root:
HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-08/head_screen.py gemma3-270m q4"""
import sys, torch
from pathlib import Path
from mesh.model import load_model, Decoder
from mesh.weights.modules import GroupLinear, Int8Linear
home = Path.home()/".cache"/"mesh"
key, fmt = sys.argv[1], sys.argv[2]
lm = load_model(home, key, weights=fmt, threads=2)
m = lm.model
head = m.lm_head
print(type(head).__name__, getattr(head,'bits',None), head.qweight.shape, head.scales.shape, head.qweight.dtype)
q = head.qweight
s = head.scales.float()
if s.dim() == 1: s = s[:, None]
N, K = q.shape; G = s.shape[1]; g = K // G
hs = []
orig = type(head).forward
class Cap(torch.nn.Module):
    def __init__(s2, h): super().__init__(); s2.h = h
    def forward(s2, x): hs.append(x.detach().reshape(-1, x.shape[-1])[-1].clone()); return s2.h.forward(x)
m.lm_head = Cap(head)
dec = Decoder(lm)
prompts = ["The capital of France is", "A short history of the printing press:", "def fibonacci(n):",
           "Question: What is the boiling point of water at sea level?\nAnswer:", "Turn on the kitchen lights and"]
for p in prompts:
    dec.generate(dec.encode(p), 24)
print("states", len(hs))
qi = q.to(torch.int32)
hi = (qi >> 4).float(); lo = (qi & 15).float()
qf = q.float()
import time
counts = []
for x in hs:
    xg = x.float().reshape(G, g)
    full = ((qf.reshape(N, G, g) * xg).sum(-1) * s).sum(-1)
    H = ((hi.reshape(N, G, g) * xg).sum(-1) * 16 * s).sum(-1)
    P = xg.clamp(min=0).sum(-1); M = xg.clamp(max=0).sum(-1); A = xg.abs().sum(-1)
    up = H + 15 * (s.clamp(min=0) @ P + s.clamp(max=0) @ M)
    low = H + 15 * (s.clamp(min=0) @ M + s.clamp(max=0) @ P)
    margin = 0.5 * (s.abs() @ A) + H.abs() * 2**-8 + 1e-4
    best_low = (low - margin).max()
    cand = int(((up + margin) >= best_low).sum())
    # centered hi approx quality
    width = float((up - low).median())
    top2 = full.topk(2).values
    counts.append(cand)
    print(f"cand {cand:6d}  width_med {width:.3f}  gap {float(top2[0]-top2[1]):.3f}  max {float(top2[0]):.2f} argmax_ok {int(full.argmax()) in torch.nonzero((up+margin)>=best_low).flatten().tolist()}")
import statistics
print("median", statistics.median(counts), "max", max(counts))
import json
json.dump({"model": key, "weights": fmt, "rows": N, "states": len(hs), "candidates": counts,
           "median": statistics.median(counts), "max": max(counts)},
          open(Path(__file__).with_name("head_screen.json"), "w"), indent=1)
