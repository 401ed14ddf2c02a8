"""llama.cpp on the same GGUF: the reference a user would pick instead of a mesh node.

`mesh bench memory` asks it the same prompts, in the same ABBA rotation as its nodes, where
``llama-cpp-python`` is installed (the optional extra ``reference``; never needed by ``make run`` or
``make test``). It runs in a process of its own, so its resident set is its own: ``python -m
nodes.bench.llama_ref GGUF --threads N --tokens T`` loads the file, then reads one JSON line per ask
on standard input (``{"prompt": ...}``) and writes one JSON line of figures per ask: prompt tokens,
prefill and decode tok/s (greedy, the argmax of the last position's logits, ``T`` new tokens, the
first from the prefill, as a node counts them), and the process's resident set (peak, anonymous).
An empty line or end of input ends it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

KIB = 1024
MIB = 1 << 20


def available() -> bool:
    """Whether ``llama_cpp`` is importable here (without importing it: it loads a shared library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _rss() -> dict[str, float]:
    out = {"rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MIB}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[f"{key.lower()}_mib"] = int(value.split()[0]) * KIB / MIB
    return {k: round(v, 1) for k, v in out.items()}


def serve(gguf: Path, threads: int, tokens: int, ctx: int, stdin: TextIO, stdout: TextIO) -> None:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    print(json.dumps({"ready": True, "version": llama_cpp.__version__, **_rss()}), file=stdout, flush=True)
    for line in stdin:
        if not line.strip():
            break
        ids = llm.tokenize(json.loads(line)["prompt"].encode(), add_bos=True)[: ctx - tokens]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        first = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        nxt = first
        for _ in range(tokens - 1):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        figures: dict[str, Any] = {"prompt_tokens": len(ids), "new_tokens": tokens, "prefill_s": t1 - t0,
                                   "decode_s": t2 - t1, "prefill_tps": len(ids) / (t1 - t0),
                                   "decode_tps": (tokens - 1) / (t2 - t1) if tokens > 1 else None}
        print(json.dumps({**figures, **_rss()}), file=stdout, flush=True)


class LlamaReference:
    """The reference process: :meth:`ask` one prompt at a time, :meth:`close` when done."""

    def __init__(self, gguf: Path, threads: int, tokens: int, ctx: int = 2048, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodes.bench.llama_ref", str(gguf), "--threads", str(threads),
             "--tokens", str(tokens), "--ctx", str(ctx)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=str(Path(__file__).resolve().parents[2]))
        self.started = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(self.timeout_s)
            raise RuntimeError(f"llama.cpp reference exited with status {code}")
        return json.loads(line)

    def ask(self, prompt: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LlamaReference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodes.bench.llama_ref", description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--ctx", type=int, default=2048)
    args = p.parse_args(argv)
    serve(args.gguf, args.threads, args.tokens, args.ctx, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
