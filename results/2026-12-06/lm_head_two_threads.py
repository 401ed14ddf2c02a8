"""SmolLM2-sized LM head (49152 x 576 fp32, one position): one thread vs the rows in halves on two threads (one OpenMP thread each), and whether the logits are bitwise equal. Run: .venv/bin/python results/2026-12-06/lm_head_two_threads.py"""
import threading, time, torch
torch.set_num_threads(1)
W = torch.randn(49152, 576)
h = torch.randn(1, 576)
half = 49152 // 2
out2 = [None]
go, done = threading.Event(), threading.Event()
def helper():
    torch.set_num_threads(1)
    while True:
        go.wait(); go.clear()
        out2[0] = torch.nn.functional.linear(h, W[half:])
        done.set()
threading.Thread(target=helper, daemon=True).start()
def split():
    go.set()
    a = torch.nn.functional.linear(h, W[:half])
    done.wait(); done.clear()
    return torch.cat([a, out2[0]], -1)
full = torch.nn.functional.linear(h, W)
print("bitwise equal:", torch.equal(full, split()))
for name, f in (("full", lambda: torch.nn.functional.linear(h, W)), ("split2", split)) * 2:
    for _ in range(5): f()
    t = time.perf_counter()
    for _ in range(50): f()
    print(name, round((time.perf_counter() - t) / 50 * 1000, 2), "ms")
