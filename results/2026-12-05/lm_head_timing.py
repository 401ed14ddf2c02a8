"""Time one SmolLM2-sized LM head (49152 x 576) matvec, fp32 and bf16. Run: .venv/bin/python results/2026-12-05/lm_head_timing.py THREADS"""
import torch, time, sys
torch.set_num_threads(int(sys.argv[1]))
W = torch.randn(49152, 576)
x = torch.randn(1, 576)
Wb = W.to(torch.bfloat16); xb = x.to(torch.bfloat16)
for name, w, v in (("fp32", W, x), ("bf16", Wb, xb)):
    for _ in range(3): torch.nn.functional.linear(v, w)
    t0 = time.perf_counter()
    for _ in range(50): torch.nn.functional.linear(v, w)
    print(name, sys.argv[1], "threads", round((time.perf_counter() - t0) / 50 * 1000, 2), "ms")
