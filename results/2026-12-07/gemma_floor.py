"""Gemma-3 270M on a Pi Zero 2W's 400 MiB: what a node must keep resident, measured (root only).

Subcommands (JSON on stdout, or to ``--json``):

- ``stages``: one process walks a node's start (bare interpreter, ``import torch``, the node's own
  imports as ``mesh node`` makes them, the q4 model loaded, a prompt and a warm-up decode) and
  records at each step its resident set by kind (``/proc/self/smaps``: anonymous vs file-backed,
  per mapped file) and the modules loaded; then it clears the pages' referenced bits
  (``/proc/self/clear_refs``), decodes ``--tokens`` more tokens and reads which pages those
  tokens touched (smaps ``Referenced``): the working set of decoding, per mapping.
  ``--tracemalloc`` adds what Python itself allocated (objects, code) at each step.
- ``cap``: the same decode loop (``loop``) as the only process of a fresh cgroup v1 memory group
  of ``--cap`` MiB with swap off, on a private copy of the model directory and (``--private-torch``)
  of the torch package, both evicted from the page cache first, so the group is charged every
  page the process reads (shared library pages another process read first would otherwise be
  charged to that process's group, as the testbed notes). Recorded: the group's peak
  (``max_usage_in_bytes``), the largest anonymous share sampled every 0.1 s, failcnt, OOM kills,
  major faults per decoded token after warm-up and decode tok/s (the process's own figures).
- ``q4emb``: build the all-4-bit variant of Gemma's q4 file (the Q8_0 embedding, which is also
  the tied LM head, re-quantised to 4-bit groups like the layers) into ``--out``.
- ``quality``: perplexity over fp32's on wiki windows for a q4 file given with ``--file``.

    sudo HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/gemma_floor.py stages --tokens 32
    sudo HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/gemma_floor.py cap --cap 400 --private-torch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MiB = 1 << 20
HOME = Path.home() / ".cache" / "mesh"
CGROUPS = Path("/sys/fs/cgroup/memory")
PROMPT = ("Question: Which planet is known as the Red Planet, and why does it look red from Earth? "
          "Answer:")


# -- reading /proc ------------------------------------------------------------------------------
def smaps(pid: str = "self") -> dict[str, Any]:
    """Per mapped object (a file by its base name, ``[heap]``, ``[anon]``...): mesh.sysmem.mappings."""
    from mesh.sysmem import mappings

    out: dict[str, Any] = {}
    for name, use in mappings(pid).items():
        key = os.path.basename(name) if name.startswith("/") else name
        old = out.get(key)
        out[key] = use if old is None else type(use)(old.rss + use.rss, old.anon + use.anon,
                                                     old.referenced + use.referenced)
    return out


def summary(groups: dict[str, Any], top: int = 12, field: str = "rss") -> dict[str, Any]:
    mib = lambda b: round(b / MiB, 1)  # noqa: E731
    rss = sum(g.rss for g in groups.values())
    anon = sum(g.anon for g in groups.values())
    ref = sum(g.referenced for g in groups.values())
    ref_anon = sum(g.referenced for g in groups.values() if g.file == 0)
    ranked = sorted(groups.items(), key=lambda kv: -getattr(kv[1], field))[:top]
    return {"rss_mib": mib(rss), "anon_mib": mib(anon), "file_mib": mib(rss - anon), "referenced_mib": mib(ref),
            "referenced_anon_only_mib": mib(ref_anon),
            "top": {n: {"rss": mib(g.rss), "anon": mib(g.anon), "ref": mib(g.referenced)} for n, g in ranked}}


def majflt() -> int:
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[9])


# -- the node's start, step by step ---------------------------------------------------------------
def node_imports() -> None:
    """What `mesh node` imports before it measures its runtime (nodes.cli.main, cmd_node)."""
    from nodes.cli import build_parser

    build_parser()
    from nodes.agent import NodeAgent  # noqa: F401
    from nodes.ha_cli import ha_extension_from_args  # noqa: F401
    from nodes.halo_cli import halo_extensions_from_args  # noqa: F401
    from nodes.memory import fit_node, steady_malloc  # noqa: F401
    from nodes.settings import node_config  # noqa: F401


def cmd_stages(args: argparse.Namespace) -> dict[str, Any]:
    import tracemalloc

    if args.tracemalloc:
        tracemalloc.start()
    steps: dict[str, Any] = {}

    def record(name: str) -> None:
        s = summary(smaps())
        s["modules"] = len(sys.modules)
        if args.tracemalloc:
            s["python_traced_mib"] = round(tracemalloc.get_traced_memory()[0] / MiB, 1)
        steps[name] = s
        print(f"{name}: rss {s['rss_mib']} anon {s['anon_mib']} file {s['file_mib']} modules {s['modules']}",
              file=sys.stderr)

    record("bare")
    from nodes.memory import steady_malloc

    steady_malloc()
    import torch

    record("import torch")
    node_imports()
    record("node imports")
    if args.stop_after_imports:
        return {"steps": steps}
    from mesh.model import Decoder, load_model

    loaded = load_model(Path(args.home), args.model, args.threads, weights=args.weights)
    record("model loaded")
    dec = Decoder(loaded)
    ids = dec.encode(PROMPT)
    with torch.inference_mode():
        logits, cache = dec.prefill(ids)
        tok = int(torch.argmax(logits))
        for _ in range(args.warmup):
            tok = int(torch.argmax(dec.next_logits(tok, cache)))
        record("prompt + warm-up decode")
        from mesh.sysmem import clear_referenced

        clear_referenced()
        f0, t0 = majflt(), time.perf_counter()
        for _ in range(args.tokens):
            tok = int(torch.argmax(dec.next_logits(tok, cache)))
        dt, f1 = time.perf_counter() - t0, majflt()
    groups = smaps()
    ws = summary(groups, top=16, field="referenced")
    return {"steps": steps, "decode_working_set": ws, "prompt_tokens": len(ids), "tokens": args.tokens,
            "decode_tps": round(args.tokens / dt, 2), "major_faults_per_token": (f1 - f0) / args.tokens,
            "torch_modules": sum(1 for m in sys.modules if m == "torch" or m.startswith("torch.")),
            "vmhwm_mib": round(int([x for x in open("/proc/self/status") if x.startswith("VmHWM")][0].split()[1]) / 1024, 1)}


# -- the capped decode loop -----------------------------------------------------------------------
def cmd_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The child of ``cap``: a node's imports, the model, a prompt, warm-up, measured decode."""
    from nodes.memory import start_trimmer, steady_malloc

    steady_malloc()
    start_trimmer(threading.Event())
    import torch

    node_imports()
    from mesh import sysmem
    from mesh.model import Decoder, load_model

    t_load = time.perf_counter()
    start_rss = sysmem.process_memory()
    loaded = load_model(Path(args.home), args.model, args.threads, weights=args.weights)
    load_s = time.perf_counter() - t_load
    dec = Decoder(loaded)
    ids = dec.encode(PROMPT)
    out: dict[str, Any] = {"runtime_rss_mib": round(start_rss.rss_bytes / MiB, 1),
                           "runtime_anon_mib": round(start_rss.anon_bytes / MiB, 1), "load_s": round(load_s, 2),
                           "torch_file": torch.__file__}
    with torch.inference_mode():
        for r in range(args.rounds):
            t0 = time.perf_counter()
            logits, cache = dec.prefill(ids)
            prefill_s = time.perf_counter() - t0
            tok = int(torch.argmax(logits))
            for _ in range(args.warmup):
                tok = int(torch.argmax(dec.next_logits(tok, cache)))
            f0, t0 = majflt(), time.perf_counter()
            for _ in range(args.tokens):
                tok = int(torch.argmax(dec.next_logits(tok, cache)))
            dt, f1 = time.perf_counter() - t0, majflt()
            out.setdefault("rounds", []).append({
                "prefill_s": round(prefill_s, 3), "decode_tps": round(args.tokens / dt, 2),
                "major_faults": f1 - f0, "major_faults_per_token": round((f1 - f0) / args.tokens, 2)})
            del cache
    mem = sysmem.process_memory()
    out.update(rss_mib=round(mem.rss_bytes / MiB, 1), anon_mib=round(mem.anon_bytes / MiB, 1),
               file_mib=round(mem.file_bytes / MiB, 1), vmhwm_mib=round(mem.peak_bytes / MiB, 1),
               smaps=summary(smaps(), top=10))
    return out


def evict(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # a fresh copy's pages are dirty: written back first, or they stay cached
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def private_copy(work: Path, model: str, weights_file: Path | None, torch_copy: bool) -> tuple[Path, Path | None]:
    """A home with its own copy of the model's directory (no fp32/int8 files) and, with
    ``torch_copy``, a directory holding a copy of the torch package, both evicted."""
    src = HOME / "models" / model
    dst = work / "home" / "models" / model
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name in ("model.safetensors", "weights-int8.safetensors", "weights-q4.safetensors") or p.is_dir():
            continue
        shutil.copy2(p, dst / p.name)
    shutil.copy2(weights_file or src / "weights-q4.safetensors", dst / "weights-q4.safetensors")
    evict(work / "home")
    lib = None
    if torch_copy:
        import importlib.util

        spec = importlib.util.find_spec("torch")
        assert spec is not None and spec.origin is not None
        lib = work / "pylib"
        shutil.copytree(Path(spec.origin).parent, lib / "torch", symlinks=True)
        evict(lib)
    return work / "home", lib


def cmd_cap(args: argparse.Namespace) -> dict[str, Any]:
    from mesh.sysmem import parse_keyed, read_cgroup_v1

    work = Path(tempfile.mkdtemp(prefix="gemma-floor-", dir=args.work))
    try:
        home, lib = private_copy(work, args.model, Path(args.file) if args.file else None, args.private_torch)
        group = CGROUPS / f"mesh-gemma-floor-{os.getpid()}"
        group.mkdir()
        try:
            limit = args.cap * MiB
            (group / "memory.limit_in_bytes").write_text(str(limit))
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
            env = {**os.environ, "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join([*([str(lib)] if lib else []), str(REPO)])}
            argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), sys.executable,
                    str(Path(__file__).resolve()), "loop", "--home", str(home), "--model", args.model,
                    "--weights", "q4", "--threads", str(args.threads), "--tokens", str(args.tokens),
                    "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
            cached = {}  # what of the private copies is still in the page cache before the child runs
            for f in [home / "models" / args.model / "weights-q4.safetensors",
                      *([lib / "torch" / "lib" / "libtorch_cpu.so"] if lib else [])]:
                res = subprocess.run(["fincore", "--bytes", "--noheadings", "-o", "RES", str(f)],
                                     capture_output=True, text=True)
                cached[f.name] = round(int(res.stdout.strip() or 0) / MiB, 1) if res.returncode == 0 else None
            anon_peak, stop = [0], threading.Event()

            def sample() -> None:
                while not stop.wait(0.1):
                    try:
                        stat = parse_keyed((group / "memory.stat").read_text())
                    except OSError:
                        continue
                    anon_peak[0] = max(anon_peak[0], stat.get("rss", 0))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
            stop.set()
            sampler.join()
            mem = read_cgroup_v1(group)
            stat = parse_keyed((group / "memory.stat").read_text())
            child: Any = None
            try:
                child = json.loads(proc.stdout)
            except ValueError:
                child = None
            return {"cap_mib": args.cap, "private_torch": args.private_torch, "file": args.file,
                    "returncode": proc.returncode, "cached_before_mib": cached, "wall_s": round(time.perf_counter() - t0, 1),
                    "peak_mib": round((mem.peak_bytes or 0) / MiB, 1), "anon_peak_mib": round(anon_peak[0] / MiB, 1),
                    "failcnt": int((group / "memory.failcnt").read_text()), "oom_kills": mem.oom_kills,
                    "group_major_faults": mem.major_faults,
                    "end": {k: round(stat.get(k, 0) / MiB, 1) for k in ("rss", "cache", "mapped_file")},
                    "child": child, "stderr": proc.stderr[-1500:] if child is None else proc.stderr[-300:]}
        finally:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the all-4-bit embedding ----------------------------------------------------------------------
def cmd_q4emb(args: argparse.Namespace) -> dict[str, Any]:
    """Gemma's GGUF converted as q4 with nothing kept at 8 bits (the embedding re-quantised to 4)."""
    from transformers import AutoConfig

    import mesh.weights.convert as convert
    from mesh.model import converted_dir, model_spec, read_meta
    from nodes.setup import locate_gguf

    spec = model_spec(args.model, HOME)
    src = converted_dir(HOME, args.model)
    meta = read_meta(src, args.model)
    convert.KEEP_8BIT = frozenset()  # the one change: no tensor stays 8-bit
    header = {"gguf_sha256": str(meta["gguf_sha256"]), "model": spec.key, "package_version": meta["package_version"]}
    out = convert.convert_gguf(locate_gguf(spec, HOME), Path(args.out), "q4", AutoConfig.from_pretrained(src), header)
    return {"out": str(out), "bytes": out.stat().st_size, "q4_bytes": (src / "weights-q4.safetensors").stat().st_size}


def cmd_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity over fp32's on ``--windows`` held-out wiki windows of ``--window`` tokens, and
    argmax agreement with fp32 per position, for the stock q4 file and for ``--file``."""
    import math

    import torch

    from mesh.model import Decoder, load_model
    from nodes.halo_data import load_split, token_windows

    work = Path(tempfile.mkdtemp(prefix="gemma-floor-q-", dir=args.work))
    try:
        home = work / "home"
        dst = home / "models" / args.model
        dst.mkdir(parents=True)
        for p in (HOME / "models" / args.model).iterdir():
            if p.is_file():
                os.symlink(p, dst / p.name)
        (dst / "weights-q4.safetensors").unlink()
        os.symlink(Path(args.file).resolve(), dst / "weights-q4.safetensors")
        held_out = load_split(HOME).held_out
        res: dict[str, Any] = {}
        argmax: dict[str, list[torch.Tensor]] = {}
        for name, where, fmt in (("fp32", HOME, "fp32"), ("q4", HOME, "q4"), ("q4-all-4bit", home, "q4")):
            loaded = load_model(where, args.model, args.threads, weights=fmt, verify=False)
            dec = Decoder(loaded)
            nll, n, picks = 0.0, 0, []
            for w in token_windows(loaded.tokenizer, held_out, args.window, args.windows):
                logits = dec.all_logits(w)[:-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
                n += len(w) - 1
                picks.append(logits.argmax(-1))
            res[name] = {"ppl": math.exp(nll / n), "positions": n}
            argmax[name] = picks
            del loaded, dec
        for name in ("q4", "q4-all-4bit"):
            res[name]["ppl_ratio"] = res[name]["ppl"] / res["fp32"]["ppl"]
            same = sum(int((a == b).sum()) for a, b in zip(argmax[name], argmax["fp32"]))
            res[name]["argmax_agreement"] = same / res[name]["positions"]
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["stages", "loop", "cap", "q4emb", "quality"])
    p.add_argument("--home", default=str(HOME))
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--weights", default="q4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cap", type=int, default=400)
    p.add_argument("--private-torch", action="store_true")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--stop-after-imports", action="store_true")
    p.add_argument("--file", help="q4 weight file to use instead of the model's (cap, quality)")
    p.add_argument("--out", default="/tmp/gemma-weights-q4-all4.safetensors")
    p.add_argument("--work", default="/tmp")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json")
    args = p.parse_args()
    result = {"stages": cmd_stages, "loop": cmd_loop, "cap": cmd_cap, "q4emb": cmd_q4emb,
              "quality": cmd_quality}[args.command](args)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
