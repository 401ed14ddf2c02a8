"""What a node must keep resident to decode without reading anything back from storage, part by part.

A node's resident set is not all of one kind. Anonymous memory (the interpreter's and torch's
heaps, tensors) cannot leave without swap; file pages (shared libraries, the memory-mapped
weights and tokenizer) are clean, and under a memory cap the kernel drops the cold ones instead
of killing the process, reading them back (a major fault) if they are touched again. So the
floor under which a node thrashes is its anonymous memory plus the file pages it touches per
token, not its RSS: torch's libraries are ~100 MiB of RSS at start, most of it touched once by
their initialisers.

:func:`probe` runs in a fresh process (``python -m nodes.bench.floor``): a node's imports, then
the model in one weight format, a prompt and a warm-up decode, then it clears its pages'
referenced bits (``mesh.sysmem.clear_referenced``), decodes ``tokens`` more (each one's text too,
as a node streams it, and the prompt encoded again) and reads per mapped object what those
tokens touched (``mesh.sysmem.mappings``). Measured, in bytes:

- ``runtime_anon`` / ``runtime_file``: the process after its imports, before the model;
- ``anon``: all anonymous memory once decoding (the runtime's, the model's Python objects and
  buffers, the prompt's KV);
- ``libraries_hot``: file pages of every mapping other than the weights and the tokenizer that
  the decoded tokens touched, of ``libraries_rss`` resident;
- ``weights_hot`` of ``weights_file``, ``tokenizer_hot`` of ``tokenizer_file``;
- ``kv_per_token`` and ``context_per_token`` (``mesh.budget``: what one more position costs).

The referenced bits overstate the libraries: this kernel keeps file pages in large folios, and
Gemma-3 q4 decoded with no major fault under a 340 MiB cap with 2.3 MiB of libtorch_cpu's file
pages resident although up to ~53 MiB of it showed as referenced uncapped in one run (8 in
another; 2026-12-07,
``results/2026-12-07/gemma_floor.py cap``, which finds the floor under real cgroup v1 caps). So
:func:`upper_bound` is what its name says; the floor lies between it and ``anon`` + the weights.
``mesh bench memory --roles floor`` reports the parts per model and format.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
PROMPT = ("Question: Which planet is known as the Red Planet, and why does it look red from Earth? "
          "Answer:")


def node_imports() -> None:
    """What `mesh node` has imported when it measures its runtime (nodes.cli.main, cmd_node)."""
    from nodes.cli import build_parser

    build_parser()
    import nodes.agent  # noqa: F401
    import nodes.ha_cli  # noqa: F401
    import nodes.halo_cli  # noqa: F401
    import nodes.memory  # noqa: F401


def probe(home: Path, model: str, weights: str, tokens: int = 16, warmup: int = 8, threads: int = 1) -> dict[str, Any]:
    """Measure in this process (fresh: nothing imported beyond the standard library); see the module docstring."""
    from nodes.memory import steady_malloc

    steady_malloc()
    import torch

    node_imports()
    from mesh import budget, sysmem
    from mesh.model import Decoder, converted_dir, load_model
    from mesh.text import FILE_NAME
    from mesh.weights.formats import weights_file

    start = sysmem.mappings()
    model_dir = converted_dir(home, model)
    wpath, tpath = str(weights_file(model_dir, weights).resolve()), str((model_dir / FILE_NAME).resolve())
    loaded = load_model(home, model, threads, weights=weights)
    dec, tok = Decoder(loaded), loaded.tokenizer
    ids = dec.encode(PROMPT)
    with torch.inference_mode():
        logits, cache = dec.prefill(ids)
        out = [int(torch.argmax(logits))]
        for _ in range(warmup):  # what the measured tokens do, so that no page is read for the first time then
            out.append(int(torch.argmax(dec.next_logits(out[-1], cache))))
            tok.decode(out, skip_special_tokens=True)
        sysmem.clear_referenced()
        f0, t0 = sysmem.process_memory().major_faults, time.perf_counter()
        dec.encode(PROMPT)
        for _ in range(tokens):
            out.append(int(torch.argmax(dec.next_logits(out[-1], cache))))
            tok.decode(out, skip_special_tokens=True)
        dt, f1 = time.perf_counter() - t0, sysmem.process_memory().major_faults
        use = sysmem.mappings()
    cfg = loaded.model.config
    files = {wpath: "weights", tpath: "tokenizer"}
    hot = {"weights": 0, "tokenizer": 0, "libraries": 0}
    rss = dict(hot)
    for name, u in use.items():
        part = files.get(os.path.realpath(name) if name.startswith("/") else name, "libraries")
        if u.file:
            hot[part] += min(u.referenced, u.file)
            rss[part] += u.file
    return {
        "model": model, "weights": weights, "tokens": tokens,
        "runtime_anon": sum(u.anon for u in start.values()), "runtime_file": sum(u.file for u in start.values()),
        "anon": sum(u.anon for u in use.values()),
        "libraries_hot": hot["libraries"], "libraries_rss": rss["libraries"],
        "weights_hot": hot["weights"], "weights_file": os.path.getsize(wpath),
        "tokenizer_hot": hot["tokenizer"], "tokenizer_file": os.path.getsize(tpath),
        "kv_per_token": budget.kv_bytes_per_token(cfg), "context_per_token": budget.context_bytes_per_token(cfg),
        "major_faults_per_token": (f1 - f0) / tokens, "decode_tps": round(tokens / dt, 2),
    }


def upper_bound(parts: dict[str, Any], context: int) -> int:
    """The sum the referenced bits give: anonymous memory, every file page the decoded tokens
    touched and ``context`` positions' KV and attention (an upper bound: see the module docstring)."""
    return (parts["anon"] + parts["libraries_hot"] + parts["weights_hot"] + parts["tokenizer_hot"]
            + context * parts["context_per_token"])


def measure(home: Path, model: str, weights: str, tokens: int, threads: int = 1, timeout_s: float = 900) -> dict[str, Any]:
    """:func:`probe` in a fresh process (this one has imported more than a node would)."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-m", "nodes.bench.floor", "--home", str(home), "--model", model,
                           "--weights", weights, "--tokens", str(tokens), "--threads", str(threads)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        return {"model": model, "weights": weights, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout)


def floor_row(parts: dict[str, Any], cap_mib: int, context: int) -> dict[str, Any]:
    """One `mesh bench memory` row: every part in MiB, the upper bound at ``context`` positions,
    and the part no kernel can drop (anonymous memory, every weight, the context's KV) against the cap."""
    if "error" in parts:
        return {**parts, "role": "floor", "started": False, "cap_mib": cap_mib}
    mib = {k: round(v / MiB, 1) for k, v in parts.items() if isinstance(v, int) and k != "tokens"
           and not k.endswith("per_token")}
    must = parts["anon"] + parts["weights_hot"] + context * parts["context_per_token"]
    return {"model": parts["model"], "weights": parts["weights"], "role": "floor", "started": True,
            "cap_mib": cap_mib, "context": context, **{f"{k}_mib": v for k, v in mib.items()},
            "kv_per_token": parts["kv_per_token"], "context_per_token": parts["context_per_token"],
            "upper_bound_mib": round(upper_bound(parts, context) / MiB, 1),
            "anon_weights_context_mib": round(must / MiB, 1), "left_mib": round(cap_mib - must / MiB, 1),
            "major_faults_per_token": parts["major_faults_per_token"], "decode_tps": parts["decode_tps"]}


def main() -> None:
    p = argparse.ArgumentParser(description="measure a node's resident floor (see nodes.bench.floor)")
    p.add_argument("--home", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(json.dumps(probe(Path(args.home), args.model, args.weights, args.tokens, threads=args.threads)))


if __name__ == "__main__":
    main()
