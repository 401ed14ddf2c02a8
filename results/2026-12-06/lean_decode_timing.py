"""The coordinator's decode step without its MLPs: HF's forward vs mesh.lean's step, one torch
thread, SmolLM2-135M, 40-token prompt, median of 32 tokens, 3 alternating rounds; and whether the
logits are bitwise equal.

    .venv/bin/python results/2026-12-06/lean_decode_timing.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh import split  # noqa: E402
from mesh.lean import lean_step  # noqa: E402
from mesh.model import load_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model = load_model(Path.home() / ".cache" / "mesh", "smollm2-135m", threads=1).model
    step = lean_step(model)
    assert step is not None
    zero = lambda layer, x: torch.zeros_like(x)  # noqa: E731  (the MLPs are the workers' part)
    prompt = torch.tensor([list(range(100, 140))])

    def run(lean: bool, n: int = 32) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), split.routed_mlps(model, zero):
            cache = DynamicCache(config=model.config)
            model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times, logits = [], None
            for _ in range(n):
                t = time.perf_counter()
                if lean:
                    logits = step(5, cache)
                else:
                    logits = model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True).logits[0, -1]
                times.append(time.perf_counter() - t)
        return sorted(times)[n // 2] * 1e3, logits

    for r in range(3):
        hf, a = run(False)
        lean, b = run(True)
        print(f"round {r + 1}: HF forward {hf:.2f} ms/token, lean step {lean:.2f} ms/token, "
              f"logits bitwise equal: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
