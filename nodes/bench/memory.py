"""`mesh bench memory`: what a node takes, in memory and speed, per model and weight format.

For each model a testbed comes up with one node per weight format (``--weights``), each in a
memory cgroup of the device profile's size (``--profile``; swap off, so over the cap means an
OOM kill), each with its own copy of the model (``Testbed.private_home``, then evicted from the
page cache: the weights the node maps are read by it and charged to it, as on a board), and
beside them one fp32 node with no cap: the reference a row's speed is compared with, measured in
the same run. The nodes run this machine's cores
(no CPU quota: a Pi Zero's would take hours over the same asks); memory is what is emulated.
Where ``llama-cpp-python`` is installed (the optional extra ``reference``), llama.cpp on the
model's own GGUF is asked the same prompts in the same rotation, uncapped, on as many threads as
the nodes (``nodes.bench.llama_ref``): its decode and prefill tok/s and resident set are each
row's ``llama_cpp_*`` figures, the reference a user would pick instead (``--no-llama-cpp`` skips it).

Asks (1-shot MMLU questions, ``--asks`` of them, ``--tokens`` new tokens each, no cache so every
ask computes) go to one node at a time, the reference and the capped nodes alternating in ABBA
order over the rounds, after one warm-up ask each. Per node: the cgroup's peak
(``max_usage_in_bytes``), the largest anonymous share sampled while it ran, major page faults
per generated token after the warm-up (weights read back from storage: the goal is none), OOM
kills, prefill and decode tok/s from the node's own figures. A node that refuses to start
(``mesh.footprint``) or is killed is a row too, with what it said.

Quality is measured natively in this process (it needs no cap and would take hours under a
quota): MMLU answer agreement with fp32 (1-shot, the letter whose logit is highest among
" A".." D", over ``--mmlu`` questions) and wiki perplexity over fp32's.

``--roles floor`` adds per model and format what a node must keep resident to decode without
reading anything back from storage, each part measured in a fresh process (``nodes.bench.floor``:
anonymous memory, the library, weight and tokenizer pages a token touches, KV per position), and
what that leaves under the profile's cap at ``--floor-context`` positions.

JSON (one row per model x format x role) + PNG.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mesh.config import BrokerAddress
from mesh.errors import MeshError
from nodes import mmlu
from nodes.bench.llama_ref import LlamaReference, available as llama_available
from nodes.bench.report import pyplot, save_figure, write_results
from nodes.testbed.bed import identity_parts
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir

MIB = 1 << 20
REF = "ref"  # the uncapped fp32 node
LLAMA = "llama.cpp"  # llama.cpp on the same GGUF, uncapped, where llama-cpp-python is installed
ROLES = ("cache", "worker", "coordinator", "floor")


def node_name(weights: str) -> str:
    return f"w{weights}"  # testbed node names are [a-z][a-z0-9]{0,11}


# -- quality, native ----------------------------------------------------------------------------
def quality(home: Path, model: str, formats: Sequence[str], n_mmlu: int, ppl_windows: int, ppl_tokens: int,
            progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """Per format: MMLU answer agreement with fp32 and perplexity over fp32's (fp32: 1.0 both)."""
    import torch

    from mesh.model import Decoder, load_model
    from nodes.halo_data import load_split, token_windows

    every = tuple(mmlu.subjects(mmlu_dir(home)))  # all 57: 500 questions need more than six subjects hold
    pairs = mmlu.sample(mmlu_dir(home), every, per_subject=max(1, math.ceil(n_mmlu / len(every))))[:n_mmlu]
    picks: dict[str, list[int]] = {}
    ppl: dict[str, float] = {}
    held_out = load_split(home).held_out  # read once; every format's tokenizer windows it alike
    every_format = ["fp32", *(f for f in formats if f != "fp32")]
    task = progress.add_task(f"{model}: quality", total=len(every_format) * (len(pairs) + ppl_windows)) \
        if progress is not None else None
    for fmt in every_format:
        loaded = load_model(home, model, 0, weights=fmt)
        tok = loaded.tokenizer
        letters = [tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in mmlu.LETTERS]
        dec = Decoder(loaded)
        with torch.inference_mode():
            out = []
            for prompt, _ in pairs:
                logits, _ = dec.prefill(tok(prompt)["input_ids"])
                out.append(max(range(4), key=lambda i: float(logits[letters[i]])))
                if task is not None:
                    progress.advance(task)  # type: ignore[union-attr]
            picks[fmt] = out
            windows = token_windows(tok, held_out, ppl_tokens, ppl_windows)
            nll, n = 0.0, 0
            for w in windows:
                logits = dec.all_logits(w)[:-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
                n += len(w) - 1
                if task is not None:
                    progress.advance(task)  # type: ignore[union-attr]
            ppl[fmt] = math.exp(nll / n)
        del loaded, dec
    return {f: {"mmlu_agreement": sum(a == b for a, b in zip(picks[f], picks["fp32"])) / len(pairs),
                "ppl": ppl[f], "ppl_ratio": ppl[f] / ppl["fp32"], "mmlu_questions": len(pairs)}
            for f in formats}


# -- memory and speed, in the testbed ----------------------------------------------------------
class Sampler:
    """Samples each node's cgroup every ``period_s``: the largest anonymous share seen."""

    def __init__(self, tb: Any, names: Sequence[str], period_s: float = 0.2) -> None:
        self.tb, self.names, self.period_s = tb, list(names), period_s
        self.anon_peak = {n: 0 for n in self.names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for n in self.names:
                try:
                    self.anon_peak[n] = max(self.anon_peak[n], self.tb.memory(n).anon_bytes)
                except (OSError, MeshError):
                    continue

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _log_text(path: Path, start: int = 0) -> str:
    """The log from byte ``start`` on ("" if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def measure_nodes(tb: Any, model: str, formats: Sequence[str], prompts: Sequence[str], tokens: int,
                  home: Path, progress: Progress | None = None,
                  llama: LlamaReference | None = None) -> dict[str, dict[str, Any]]:
    """Start the reference and one node per format, ask in ABBA order, and read their cgroups.
    ``llama``: llama.cpp on the model's GGUF, asked in the same rotation (row ``LLAMA``)."""
    from nodes.client import MeshClient, asker_keyring

    names = [REF, *(node_name(f) for f in formats)]
    weights = {REF: "fp32", **{node_name(f): f for f in formats}}
    started: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    log_start = {}  # where this run's part of each node's log begins (a testbed appends to it)
    for n in names:
        path = tb.log_path(f"node-{n}")
        log_start[n] = path.stat().st_size if path.exists() else 0
        own = tb.private_home(n, home, [f"models/{model}", *identity_parts(home, n)])
        try:
            tb.start_nodes(model, names=[n], extra=["--weights", weights[n], "--heartbeat", "1", "--threads", "2",
                                                    "--link-ping", "5", "--home", str(own)])
            started[n] = True
        except MeshError as exc:
            out[n] = {"started": False, "error": _log_tail(tb.log_path(f"node-{n}")) or str(exc),
                      "oom_kills": tb.oom_kills(n)}
    live = [n for n in names if started.get(n)]
    rotation = [*live, *([LLAMA] if llama is not None else [])]
    figures: dict[str, list[dict[str, Any]]] = {n: [] for n in rotation}
    faults0: dict[str, int] = {}
    host, port = tb.broker_address
    task = progress.add_task(f"{model}: asks", total=len(rotation) * (len(prompts) + 1)) if progress else None
    with MeshClient(BrokerAddress(host, port), name=f"bench-memory-{tb.spec.instance}",
                    keyring=asker_keyring(home)) as client, \
            Sampler(tb, live) as sampler:
        def ask(n: str, prompt: str) -> dict[str, Any]:
            if n == LLAMA:
                return llama.ask(prompt)  # type: ignore[union-attr]
            return dict(client.ask(prompt, node=n, max_new_tokens=tokens, no_cache=True, timeout=900).node_figures)

        for n in rotation:  # warm-up: the first ask maps the weights and sizes the allocator's pools
            ask(n, prompts[0])
            if n != LLAMA:
                faults0[n] = tb.memory(n).major_faults
            if task is not None:
                progress.advance(task)  # type: ignore[union-attr]
        for i, prompt in enumerate(prompts):
            for n in (rotation if i % 2 == 0 else rotation[::-1]):
                try:
                    figures[n].append(ask(n, prompt))
                except (MeshError, RuntimeError, ValueError) as exc:
                    figures[n].append({"error": str(exc)})
                if task is not None:
                    progress.advance(task)  # type: ignore[union-attr]
        anon = dict(sampler.anon_peak)
    for n in live:
        mem = tb.memory(n)
        good = [f for f in figures[n] if "error" not in f]
        decoded = sum(max(0, int(f["new_tokens"]) - 1) for f in good)
        out[n] = {
            "started": True, "asks": len(good), "errors": len(figures[n]) - len(good),
            "peak_mib": round((mem.peak_bytes or 0) / MIB, 1), "anon_peak_mib": round(anon[n] / MIB, 1),
            "mapped_mib": round(mem.mapped_bytes / MIB, 1),
            "major_faults_per_token": round((mem.major_faults - faults0[n]) / max(1, decoded), 2),
            "oom_kills": mem.oom_kills,
            "decode_tps": _median([(int(f["new_tokens"]) - 1) / f["decode_s"] for f in good
                                   if f.get("decode_s") and int(f["new_tokens"]) > 1]),
            "prefill_tps": _median([f["prompt_tokens"] / f["prefill_s"] for f in good if f.get("prefill_s")]),
            "alive": tb.process_memory(n) != {},
            # the node says so at start when it holds the packed decode copy (mesh.weights.packed)
            "packed_decode": "packed 4-bit kernel" in _log_text(tb.log_path(f"node-{n}"), log_start[n]),
        }
    if llama is not None:
        good = [f for f in figures[LLAMA] if "error" not in f]
        out[LLAMA] = {"asks": len(good), "errors": len(figures[LLAMA]) - len(good),
                      "version": llama.started.get("version"),
                      "rss_peak_mib": max((f["rss_peak_mib"] for f in good), default=None),
                      "anon_mib": max((f.get("rssanon_mib", 0) for f in good), default=None),
                      "decode_tps": _median([f["decode_tps"] for f in good if f.get("decode_tps")]),
                      "prefill_tps": _median([f["prefill_tps"] for f in good if f.get("prefill_tps")])}
    return out


def measure_halo(tb: Any, model: str, tokens: int, home: Path, args: argparse.Namespace,
                 progress: Progress | None = None, weights: str = "fp32") -> dict[str, dict[str, Any]]:
    """A HALO coordinator and its workers in format ``weights``, each under its cap with its own
    copy of the model, one routed generation of ``tokens``; per process the cgroup's peak and
    anonymous peak, OOM kills."""
    from nodes.bench.halo import PROMPT, HaloMesh
    from nodes.client import MeshClient, asker_keyring

    workers = [n for n in tb.spec.names if n.startswith("hw")]
    mesh = HaloMesh(tb, argparse.Namespace(model=model, home=str(home)), workers)
    homes = {}
    for n in ["hc", *workers]:
        homes[n] = tb.private_home(n, home, [f"models/{model}",
                                             *(identity_parts(home, "coordinator", "coordinator") if n == "hc"
                                               else identity_parts(home, n))])
    env = mesh.env
    for w in workers:
        tb.spawn(w, [*mesh._cli("node", "--name", w, "--model", model, "--roles", "worker", "--no-answer",
                                "--weights", weights, "--threads", "1", "--heartbeat", "0.5")[:-2],
                     "--home", str(homes[w])],
                 env=env, role="node", log=tb.log_path(f"node-{w}"))
    tb.spawn("hc", [*mesh._cli("coordinator", "--model", model, "--weights", weights, "--threads", "1",
                               "--heartbeat", "0.5", "--no-cache")[:-2], "--home", str(homes["hc"])],
             env=env, role="coordinator", log=tb.log_path("coordinator"))
    names = ["hc", *workers]
    out: dict[str, dict[str, Any]] = {}
    host, port = tb.broker_address
    task = progress.add_task(f"{model} {weights}: HALO", total=1) if progress else None
    try:
        with MeshClient(BrokerAddress(host, port), name=f"bench-memory-halo-{tb.spec.instance}",
                        keyring=asker_keyring(home)) as client, \
                Sampler(tb, names) as sampler:
            mesh.wait_ready(client, timeout=600)
            r = client.ask(PROMPT, node="coordinator", max_new_tokens=tokens, timeout=900,
                           extra={"halo_sync": "strict", "no_cache": True})
            figures = dict(r.node_figures)
            anon = dict(sampler.anon_peak)
        ok, error = True, None
    except MeshError as exc:
        ok, error, figures, anon = False, str(exc), {}, {n: 0 for n in names}
    if task is not None:
        progress.advance(task)  # type: ignore[union-attr]
    for n in names:
        mem = tb.memory(n)
        out[n] = {"started": ok, "error": error or (None if ok else _log_tail(tb.log_path(f"node-{n}"))),
                  "peak_mib": round((mem.peak_bytes or 0) / MIB, 1), "anon_peak_mib": round(anon.get(n, 0) / MIB, 1),
                  "mapped_mib": round(mem.mapped_bytes / MIB, 1), "oom_kills": mem.oom_kills,
                  "tpot_s": figures.get("tpot_s") if n == "hc" else None}
    return out


def _median(xs: Sequence[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


# -- the command ---------------------------------------------------------------------------------
def bench_memory(args: argparse.Namespace) -> int:
    from mesh.weights.formats import parse_formats
    from nodes.testbed.profiles import device_profile

    console = Console(width=None if Console().is_terminal else 140)
    profile = device_profile(args.profile)
    if profile.mem_cap_mib is None:
        raise MeshError(f"profile {args.profile!r} has no memory cap; pick pi-zero-2w, pi4-2gb or pi5")
    home = mesh_home(args)
    models = [m for m in args.models.split(",") if m]
    formats = list(parse_formats(args.weights))
    roles = [r for r in args.roles.split(",") if r]
    if set(roles) - set(ROLES):
        raise MeshError(f"unknown role in --roles {args.roles!r}; known: {', '.join(ROLES)}")
    data = mmlu_dir(home)
    prompts = [p for p, _ in mmlu.sample(data, per_subject=max(1, args.asks))][: args.asks]
    rows: list[dict[str, Any]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for model in models:
            if "cache" in roles:
                rows += cache_rows(model, formats, prompts, home, profile, args, progress)
            if {"worker", "coordinator"} & set(roles):
                rows += halo_rows(model, formats, home, profile, roles, args, progress)
            if "floor" in roles:
                rows += floor_rows(model, formats, home, profile, args, progress)
    print_rows([r for r in rows if r["role"] != "floor"], console)
    print_floor([r for r in rows if r["role"] == "floor"], console)
    out = {"bench": "memory", "profile": args.profile, "cap_mib": profile.mem_cap_mib, "models": models,
           "weights": formats, "asks": len(prompts), "tokens": args.tokens, "mmlu": args.mmlu,
           "note": "speed on this machine's cores under the memory cap, fp32 reference uncapped, same run",
           "rows": rows}
    write_results(out, args.json, lambda path: plot(rows, path), args.plot, console)
    return 0 if all(r.get("started") and not r.get("oom_kills") for r in rows) else 1


def cache_rows(model: str, formats: Sequence[str], prompts: Sequence[str], home: Path, profile: Any,
               args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    """One row per format: a node under the cap beside the uncapped fp32 reference, and quality."""
    from nodes.testbed.bed import Testbed
    from nodes.testbed.spec import NodeSpec, TestbedSpec, check_node_name

    q = quality(home, model, formats, args.mmlu, args.ppl_windows, args.ppl_tokens, progress) if args.mmlu else {}
    spec = TestbedSpec(nodes=tuple(
        NodeSpec(name=check_node_name(n), link_mbit=None, loss_pct=0.0, cpu=None,
                 mem_cap_mib=None if n == REF else profile.mem_cap_mib)
        for n in [REF, *(node_name(f) for f in formats)]), instance=args.instance)
    llama = None
    if args.llama_cpp and llama_available():
        llama = LlamaReference(reference_gguf(model, home), threads=2, tokens=args.tokens)
    try:
        with Testbed(spec) as tb:
            tb.start_broker(args.broker)
            nodes = measure_nodes(tb, model, formats, prompts, args.tokens, home, progress, llama)
    finally:
        if llama is not None:
            llama.close()
    ref, lc = nodes.get(REF, {}), nodes.get(LLAMA, {})
    rows = []
    for f in formats:
        got = nodes.get(node_name(f), {})
        rows.append({"model": model, "weights": f, "role": "cache", "profile": args.profile,
                     "cap_mib": profile.mem_cap_mib, **{k: got.get(k) for k in (
                         "started", "peak_mib", "anon_peak_mib", "mapped_mib", "major_faults_per_token",
                         "oom_kills", "decode_tps", "prefill_tps", "packed_decode", "asks", "errors", "error")},
                     "decode_tps_fp32": ref.get("decode_tps"), "prefill_tps_fp32": ref.get("prefill_tps"),
                     "fp32_uncapped_peak_mib": ref.get("peak_mib"),
                     **({f"llama_cpp_{k}": lc.get(k) for k in ("decode_tps", "prefill_tps", "rss_peak_mib", "anon_mib",
                                                                "version")} if lc else {}),
                     **{k: q.get(f, {}).get(k) for k in ("mmlu_agreement", "ppl_ratio", "ppl", "mmlu_questions")}})
    return rows


def reference_gguf(model: str, home: Path) -> Path:
    """The GGUF a model's weights were built from: llama.cpp's input for the same model."""
    from mesh.model import model_spec
    from nodes.setup import locate_gguf

    spec = model_spec(model, home)
    return Path(spec.gguf_path) if spec.gguf_path else locate_gguf(spec, home)


def halo_rows(model: str, formats: Sequence[str], home: Path, profile: Any, roles: Sequence[str],
              args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    """Per format, the coordinator's row and the worker row (the larger of two workers): memory
    only. The coordinator and its workers run the same format (a plan takes only workers of the
    coordinator's; each worker is worker-only, `--no-answer`, and reads its share of the MLP from
    that format's file, held as float32: mesh.halo.shard.FileGroups)."""
    from nodes.testbed.bed import Testbed
    from nodes.testbed.spec import NodeSpec, TestbedSpec, check_node_name

    spec = TestbedSpec(nodes=tuple(NodeSpec(name=check_node_name(n), link_mbit=None, loss_pct=0.0, cpu=None,
                                            mem_cap_mib=profile.mem_cap_mib) for n in ("hc", "hw1", "hw2")),
                       instance=args.instance)
    rows = []
    for f in formats:
        with Testbed(spec) as tb:
            tb.start_broker(args.broker)
            rows += _halo_format_rows(measure_halo(tb, model, args.tokens, home, args, progress, f),
                                      model, f, profile, roles, args)
    return rows


def _halo_format_rows(halo: dict[str, dict[str, Any]], model: str, weights: str, profile: Any,
                      roles: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for role, names in (("coordinator", ["hc"]), ("worker", ["hw1", "hw2"])):
        if role not in roles:
            continue
        worst = max((halo[n] for n in names), key=lambda r: r.get("peak_mib") or 0)
        rows.append({"model": model, "weights": weights, "role": role, "profile": args.profile,
                     "cap_mib": profile.mem_cap_mib, "processes": len(names),
                     **{k: worst.get(k) for k in ("started", "peak_mib", "anon_peak_mib", "mapped_mib",
                                                   "oom_kills", "error", "tpot_s")},
                     "oom_kills_all": sum(halo[n].get("oom_kills") or 0 for n in names)})
    return rows


def floor_rows(model: str, formats: Sequence[str], home: Path, profile: Any, args: argparse.Namespace,
               progress: Progress) -> list[dict[str, Any]]:
    """Per format, what a node must keep resident to decode (nodes.bench.floor), each part measured
    in a fresh uncapped process, against the profile's cap at ``--floor-context`` positions."""
    from nodes.bench.floor import floor_row, measure

    task = progress.add_task(f"{model}: floor", total=len(formats))
    rows = []
    for f in formats:
        rows.append({**floor_row(measure(home, model, f, args.tokens), profile.mem_cap_mib, args.floor_context),
                     "profile": args.profile})
        progress.advance(task)
    return rows


def print_floor(rows: Sequence[dict[str, Any]], console: Console) -> None:
    if not rows:
        return
    table = Table(title="What a node keeps resident to decode (MiB; hot: touched per token after warm-up, "
                        "large folios make it an upper bound)")
    cols = ("runtime_anon", "runtime_file", "anon", "libraries_hot", "weights_hot", "tokenizer_hot",
            "anon_weights_context", "upper_bound", "left")
    for col in ("model", "weights", *cols, "KV B/token", "context", "cap"):
        table.add_column(col.replace("_", " "), justify="right")
    for r in rows:
        if not r.get("started"):
            table.add_row(r["model"], r["weights"], str(r.get("error", ""))[:60], *[""] * (len(cols) + 2))
            continue
        table.add_row(r["model"], r["weights"], *(f"{r[c + '_mib']:.1f}" for c in cols), str(r["kv_per_token"]),
                      str(r["context"]), str(r["cap_mib"]))
    console.print(table)


def print_rows(rows: Sequence[dict[str, Any]], console: Console) -> None:
    if not rows:
        return
    table = Table(title="Memory and speed per model, weight format and role "
                        "(peak under the cap; speed vs fp32 uncapped)")
    for col in ("model", "weights", "role", "cap MiB", "peak MiB", "anon MiB", "maj flt/tok", "OOM", "decode tok/s",
                "x fp32", "x llama.cpp", "prefill tok/s", "x fp32", "MMLU agree", "ppl ratio"):
        table.add_column(col, justify="right")
    num = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    ratio = lambda a, b: "-" if not a or not b else f"{a / b:.2f}"  # noqa: E731
    for r in rows:
        head = (r["model"], r["weights"] + (" packed" if r.get("packed_decode") else ""), r["role"], str(r["cap_mib"]))
        if not r.get("started"):
            table.add_row(*head, "did not start", "", "", str(r.get("oom_kills")), str(r.get("error", ""))[:60],
                          "", "", "", "", num(r.get("mmlu_agreement"), "{:.3f}"), num(r.get("ppl_ratio"), "{:.4f}"))
            continue
        table.add_row(*head, num(r.get("peak_mib")), num(r.get("anon_peak_mib")),
                      num(r.get("major_faults_per_token"), "{:.2f}"), str(r.get("oom_kills")), num(r.get("decode_tps")),
                      ratio(r.get("decode_tps"), r.get("decode_tps_fp32")),
                      ratio(r.get("decode_tps"), r.get("llama_cpp_decode_tps")), num(r.get("prefill_tps")),
                      ratio(r.get("prefill_tps"), r.get("prefill_tps_fp32")), num(r.get("mmlu_agreement"), "{:.3f}"),
                      num(r.get("ppl_ratio"), "{:.4f}"))
    console.print(table)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    labels = [f"{r['model']}\n{r['weights']} {r['role']}" for r in rows]
    x = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows)), 4.5))
    a.bar(x, [r.get("peak_mib") or r.get("floor_mib") or 0 for r in rows], color="tab:blue",
          label="cgroup peak (floor: what must stay resident)")
    a.bar(x, [r.get("anon_peak_mib") or r.get("anon_mib") or 0 for r in rows], color="tab:orange", width=0.5,
          label="anonymous")
    for i, r in enumerate(rows):
        a.hlines(r["cap_mib"], i - 0.45, i + 0.45, colors="red", linestyles="dashed",
                 label="cap" if i == 0 else None)
        if not r.get("started"):
            a.text(i, 10, "did not start", ha="center", rotation=90, fontsize=8)
    a.set_xticks(list(x), labels, fontsize=8)
    a.set_ylabel("MiB")
    a.set_title("memory under the profile's cap")
    a.legend(fontsize=8)
    width = 0.28
    b.bar([i - width for i in x], [r.get("decode_tps") or 0 for r in rows], width, label="decode, capped")
    b.bar(list(x), [r.get("decode_tps_fp32") or 0 for r in rows], width, label="decode, fp32 uncapped")
    if any(r.get("llama_cpp_decode_tps") for r in rows):
        b.bar([i + width for i in x], [r.get("llama_cpp_decode_tps") or 0 for r in rows], width,
              label="llama.cpp, same GGUF, uncapped")
    b.set_xticks(list(x), labels, fontsize=8)
    b.set_ylabel("tokens/s")
    b.set_title("decode speed, same run")
    b.legend(fontsize=8)
    save_figure(fig, path)


def add_bench_memory(sub: Any) -> None:
    p = sub.add_parser("memory", help="node memory and speed per model and weight format under a device's cap "
                                      "(testbed, root)")
    p.add_argument("--profile", default="pi-zero-2w", help="device profile whose memory cap applies")
    p.add_argument("--models", "--model", dest="models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--weights", default="int8", help="comma-separated weight formats (fp32 is the reference)")
    p.add_argument("--roles", default="cache,worker,coordinator",
                   help="rows to measure: cache (one node per format), worker and coordinator (a HALO mesh, fp32), "
                        "floor (what a node must keep resident, part by part; nodes.bench.floor)")
    p.add_argument("--asks", type=int, default=6, help="measured asks per node (after one warm-up)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per ask (floor: tokens measured)")
    p.add_argument("--floor-context", type=int, default=256, help="positions the floor row's KV is counted for")
    p.add_argument("--mmlu", type=int, default=500, help="MMLU questions for answer agreement (0: skip quality)")
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--ppl-tokens", type=int, default=256)
    p.add_argument("--broker", default="mosquitto", choices=["mosquitto", "amqtt"])
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                   help="skip llama.cpp on the same GGUF (asked beside the nodes where llama-cpp-python is installed)")
    p.add_argument("--instance", type=int, default=4)
    p.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--json", default="out/bench-memory.json")
    p.add_argument("--plot", default="out/bench-memory.png")
    p.set_defaults(func=bench_memory)
