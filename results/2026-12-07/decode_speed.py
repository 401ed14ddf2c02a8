"""Decode speed side by side in one run: the node's forward before this branch (main at 58486ff,
extracted to OLD_SRC), the forward of this branch, and llama.cpp (llama-cpp-python) on the same
GGUF files, for SmolLM2-135M and Gemma-3 270M in fp32, int8 and q4.

Each configuration runs in its own subprocess (a fresh process, the same 2 threads): a ~100-token
prompt is prefilled, then 64 greedy tokens are decoded (argmax of the last logits, one forward
per token); decode tok/s = 64 / the time of those 64 steps; 3 repetitions, the median. The
configurations of one model run back to back in the order old, new, llama.cpp per format, and the
whole list is run ROUNDS times (alternating order), so a slow spell of the shared machine hits all
of them alike; the reported figure is the median over every repetition of every round.

A per-op profile of one decode step (``--profile``) splits a step into the projections (each
module timed alone on the step's input shape), the LM head and the rest (norms, rotary, KV
writes, attention, Python).

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/decode_speed.py [--rounds 1]
      [--models smollm2-135m,gemma3-270m] [--formats fp32,int8,q4] [--out decode-speed]
writes <out>.json and <out>.png beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parents[1]
OLD_SRC = Path(os.environ.get("OLD_SRC", "/tmp/decode-old"))  # `git archive 58486ff mesh | tar -x -C $OLD_SRC`
HOME = Path.home() / ".cache" / "mesh"
GGUF = {"smollm2-135m": None, "gemma3-270m": HOME / "gguf" / "gemma-3-270m-q4_k_m.gguf"}
THREADS = int(os.environ.get("DECODE_THREADS", "2"))  # the brief: 2; a saturated machine: 1 (no OpenMP barrier stalls)
NEW_TOKENS = 64
REPS = 3
PROMPT = ("The history of the lighthouse begins in the ancient world, when fires were lit on hills "
          "to guide ships into harbour. The most famous of these was the Pharos of Alexandria, built "
          "in the third century before our era, which stood for more than a thousand years. In the "
          "centuries that followed, towers of stone and brick rose along the coasts of Europe, and "
          "keepers tended their lamps through long winter nights. Today most lights are automatic, "
          "yet the old towers still")


def gguf_path(model: str) -> Path:
    from nodes.bench.memory import reference_gguf  # the file the mesh's weights were built from

    return reference_gguf(model, HOME)


# -- one configuration, in a subprocess ---------------------------------------------------------
def worker_mesh(model: str, fmt: str) -> dict:
    import torch

    from mesh.model import load_model

    loaded = load_model(HOME, model, threads=THREADS, weights=fmt, verify=False)
    lm = loaded.model
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    runs, tokens, prefill = [], None, []
    with torch.inference_mode():
        warm = lm.new_cache()  # lazy initialisation, off the clock
        lm.forward(ids, warm)
        for t in range(8):
            lm.step(t + 5, warm)
        for _ in range(REPS):
            cache = lm.new_cache()
            t0 = time.perf_counter()
            logits = lm.forward(ids, cache)[-1]
            t1 = time.perf_counter()
            out = []
            for _ in range(NEW_TOKENS):
                nxt = int(torch.argmax(logits))
                out.append(nxt)
                logits = lm.step(nxt, cache)
            t2 = time.perf_counter()
            runs.append(NEW_TOKENS / (t2 - t1))
            prefill.append(len(ids) / (t1 - t0))
            tokens = out
    from mesh.weights import modules

    return {"decode_tps": runs, "prefill_tps": prefill, "prompt_tokens": len(ids), "tokens": tokens,
            "kernels": modules.kernels() if hasattr(modules, "kernels") else None}


def worker_llama(model: str) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path(model)), n_ctx=512, n_threads=THREADS, n_threads_batch=THREADS,
                n_batch=512, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)
    runs, prefill, tokens = [], [], None
    for _ in range(REPS + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(NEW_TOKENS):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        t2 = time.perf_counter()
        runs.append(NEW_TOKENS / (t2 - t1))
        prefill.append(len(ids) / (t1 - t0))
        tokens = out
    import llama_cpp

    return {"decode_tps": runs[1:], "prefill_tps": prefill[1:], "prompt_tokens": len(ids), "tokens": tokens,
            "version": llama_cpp.__version__}


def worker_profile(model: str, fmt: str) -> dict:
    """Where one decode step's time goes: every projection timed alone on a (1, 1, K) input,
    the LM head, and the rest of the step (norms, rotary, KV, attention, Python)."""
    import torch
    from torch import nn

    from mesh.model import load_model

    loaded = load_model(HOME, model, threads=THREADS, weights=fmt, verify=False)
    lm = loaded.model
    ids = loaded.tokenizer(PROMPT)["input_ids"]

    def median_ms(f, n: int) -> float:
        f()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    import contextlib

    try:
        from mesh.weights.modules import decoding  # this branch: one-row products of a generated token
    except ImportError:  # before it: every one-row product used the decode kernel
        decoding = contextlib.nullcontext
    with torch.inference_mode(), decoding():
        cache = lm.new_cache()
        lm.forward(ids, cache)
        nxt = [5]

        def step() -> None:
            lm.step(nxt[0], cache)

        step_ms = median_ms(step, 32)
        head = lm.lm_head
        layers_ms, head_ms = 0.0, 0.0
        seen = set()
        for name, mod in lm.named_modules():
            if name.startswith("model.layers.") and hasattr(mod, "in_features") and id(mod) not in seen:
                seen.add(id(mod))
                x = torch.randn(1, 1, mod.in_features)
                layers_ms += median_ms(lambda m=mod, x=x: m(x), 7)
        fused = getattr(lm, "fused_ms", None)
        x = torch.randn(1, 1, lm.config.hidden_size)
        head_ms = median_ms(lambda: head(x) if not isinstance(head, nn.Linear) else nn.functional.linear(x, head.weight), 9)
        prof_rows = []
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(4):
                    step()
            for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
                prof_rows.append({"op": ev.key, "calls_per_step": ev.count / 4,
                                  "self_ms_per_step": round(ev.self_cpu_time_total / 4 / 1e3, 3)})
        except Exception as exc:  # noqa: BLE001 - the profile is a bonus
            prof_rows.append({"error": repr(exc)})
    return {"step_ms": step_ms, "projections_ms": layers_ms, "lm_head_ms": head_ms,
            "rest_ms": step_ms - layers_ms - head_ms, "fused": fused, "top_ops": prof_rows}


def run_worker(args: argparse.Namespace) -> int:
    if args.engine == "llama":
        out = worker_llama(args.model)
    elif args.engine == "profile":
        out = worker_profile(args.model, args.fmt)
    else:
        out = worker_mesh(args.model, args.fmt)
    print("RESULT " + json.dumps(out))
    return 0


# -- the side-by-side run -----------------------------------------------------------------------
def spawn(engine: str, code: str, model: str, fmt: str) -> dict:
    src = {"old": OLD_SRC, "new": NEW_SRC}.get(code, NEW_SRC)
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS),
               DECODE_THREADS=str(THREADS))
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--engine", engine, "--model", model,
            "--fmt", fmt]
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=str(src), capture_output=True, text=True, timeout=1800)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        return {"error": (p.stderr or p.stdout)[-1500:]}
    out = json.loads(line[-1][len("RESULT "):])
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--engine", default="mesh")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fmt", default="fp32")
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--formats", default="fp32,int8,q4")
    ap.add_argument("--codes", default="old,new")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--profile", default="", help="codes to profile, e.g. old,new")
    ap.add_argument("--out", default="decode-speed")
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)
    models, formats, codes = args.models.split(","), args.formats.split(","), args.codes.split(",")
    try:
        import importlib.util

        have_llama = importlib.util.find_spec("llama_cpp") is not None and not args.no_llama
    except Exception:  # noqa: BLE001
        have_llama = False
    raw: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        order = codes if r % 2 == 0 else codes[::-1]
        for model in models:
            if have_llama:
                key = f"{model}/llama.cpp"
                res = spawn("llama", "new", model, "gguf")
                raw.setdefault(key, []).append(res)
                print(key, res.get("decode_tps", res.get("error")), flush=True)
            for fmt in formats:
                for code in order:
                    key = f"{model}/{fmt}/{code}"
                    res = spawn("mesh", code, model, fmt)
                    raw.setdefault(key, []).append(res)
                    print(key, res.get("decode_tps", res.get("error")), res.get("kernels"), flush=True)
    summary: dict[str, dict] = {}
    for key, runs in raw.items():
        tps = [x for r in runs for x in r.get("decode_tps", [])]
        pre = [x for r in runs for x in r.get("prefill_tps", [])]
        summary[key] = {"decode_tps": round(statistics.median(tps), 2) if tps else None,
                        "decode_tps_all": [round(x, 2) for x in tps],
                        "prefill_tps": round(statistics.median(pre), 1) if pre else None,
                        "errors": [r["error"] for r in runs if "error" in r]}
    ratios: dict[str, dict] = {}
    for model in models:
        ref = summary.get(f"{model}/llama.cpp", {}).get("decode_tps")
        for fmt in formats:
            new = summary.get(f"{model}/{fmt}/new", {}).get("decode_tps")
            old = summary.get(f"{model}/{fmt}/old", {}).get("decode_tps")
            fp32_new = summary.get(f"{model}/fp32/new", {}).get("decode_tps")
            ratios[f"{model}/{fmt}"] = {
                "new_over_old": round(new / old, 3) if new and old else None,
                "new_over_llama_cpp": round(new / ref, 3) if new and ref else None,
                "old_over_llama_cpp": round(old / ref, 3) if old and ref else None,
                "new_over_new_fp32": round(new / fp32_new, 3) if new and fp32_new else None,
                "same_tokens_old_new": (raw.get(f"{model}/{fmt}/new", [{}])[-1].get("tokens")
                                        == raw.get(f"{model}/{fmt}/old", [{}])[-1].get("tokens")),
            }
    profiles = {}
    for code in [c for c in args.profile.split(",") if c]:
        for model in models:
            for fmt in formats:
                profiles[f"{model}/{fmt}/{code}"] = spawn("profile", code, model, fmt)
                print("profile", model, fmt, code, {k: v for k, v in profiles[f"{model}/{fmt}/{code}"].items()
                                                     if k != "top_ops"}, flush=True)
    out = {"what": f"greedy decode tok/s, {THREADS} threads, ~100-token prompt, 64 new tokens, median of 3 per process",
           "threads": THREADS, "new_tokens": NEW_TOKENS, "reps_per_process": REPS, "rounds": args.rounds,
           "old_src": str(OLD_SRC), "summary": summary, "ratios": ratios, "profiles": profiles,
           "raw": {k: [{kk: vv for kk, vv in r.items() if kk != "tokens"} for r in v] for k, v in raw.items()}}
    path = HERE / f"{args.out}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"summary": {k: v["decode_tps"] for k, v in summary.items()}, "ratios": ratios}, indent=1))
    plot(summary, models, formats, codes, HERE / f"{args.out}.png")
    return 0


def plot(summary: dict, models: list[str], formats: list[str], codes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        labels, vals, colors = [], [], []
        for fmt in formats:
            for code in codes:
                labels.append(f"{fmt}\n{code}")
                vals.append(summary.get(f"{model}/{fmt}/{code}", {}).get("decode_tps") or 0)
                colors.append("tab:gray" if code == "old" else "tab:blue")
        ref = summary.get(f"{model}/llama.cpp", {}).get("decode_tps")
        if ref:
            labels.append("llama.cpp\nGGUF")
            vals.append(ref)
            colors.append("tab:orange")
            ax.axhline(0.6 * ref, color="tab:orange", ls="--", lw=1, label="0.6x llama.cpp")
            ax.legend(loc="upper left")
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), labels, fontsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{model}: decode tok/s ({THREADS} threads, 64 tokens)")
        ax.set_ylabel("tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
