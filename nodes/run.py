"""`mesh run` (what `make run` runs): a 3-node mesh on the embedded broker answering MMLU.

It brings up the broker and the nodes, asks 1-shot MMLU questions from several subjects through
the mesh with a progress bar, prints a table and a summary, writes the results as JSON, and
shuts everything down (also on Ctrl-C or failure).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nodes import mmlu
from nodes.bench.stats import mean, percentile
from mesh.errors import MeshError
from nodes.client import MeshClient, asker_keyring
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir
from nodes.up import MeshProcesses, free_port


@dataclass(frozen=True)
class Ask:
    """One planned ask of the main job."""

    prompt: str
    question: mmlu.Question
    phase: str  # "routed": the mesh picks the node; "cross-node": another node than the one that has it
    node: str | None = None
    no_cache: bool = False


def cache_label(cache: dict[str, Any] | None) -> str:
    if not cache:
        return "-"
    d = cache.get("decision", "-")
    if d == "remote":
        return f"remote {cache.get('remote_tokens', 0)}t from {cache.get('peer')}" + (" (full)" if cache.get("full_hit") else "")
    if d == "local":
        return f"local {cache.get('local_tokens', 0)}t" + (" (full)" if cache.get("full_hit") else "")
    if d == "recompute":
        return f"recompute (peer {cache.get('peer')})"
    return str(d)


def ask_all(client: MeshClient, plan: list[Ask], console: Console, timeout: float = 300.0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("MMLU 1-shot", total=len(plan))
        for a in plan:
            q = a.question
            progress.update(task, description=f"{a.phase} {q.subject[:24]}")
            row: dict[str, Any] = {"phase": a.phase, "subject": q.subject, "expected": q.letter, "no_cache": a.no_cache}
            try:
                r = client.ask(a.prompt, node=a.node, max_new_tokens=4, stop=("\n",), timeout=timeout,
                               no_cache=a.no_cache, cache_figures=True)
                got = mmlu.parse_letter(r.answer)
                row.update(answer=got, raw=r.answer, correct=got == q.letter, node=r.node,
                           prompt_tokens=r.prompt_tokens, new_tokens=r.new_tokens, token_ids=r.node_figures.get("token_ids"),
                           ttft_s=r.ttft_s, ttlt_s=r.ttlt_s, cache=r.node_figures.get("cache"))
            except MeshError as exc:
                row.update(answer=None, raw="", correct=False, node=None, error=str(exc))
            rows.append(row)
            progress.advance(task)
    return rows


def cross_node_plan(rows: list[dict[str, Any]], items: list[tuple[str, mmlu.Question]], names: list[str],
                    extra: dict[str, tuple[str, mmlu.Question]]) -> list[Ask]:
    """Per subject: one more question on a node that did not answer that subject, first without
    the cache (the baseline), then with it (its shared prefix comes from the peer that has it)."""
    plan: list[Ask] = []
    for subject, (prompt, q) in extra.items():
        used = {r["node"] for r in rows if r["subject"] == subject and r.get("node")}
        others = [n for n in names if n not in used]
        if not others:
            continue
        node = others[len(plan) // 2 % len(others)]
        plan += [Ask(prompt, q, "cross-node", node, no_cache=True), Ask(prompt, q, "cross-node", node)]
    return plan


def print_report(rows: list[dict[str, Any]], console: Console) -> dict[str, Any]:
    table = Table(title="MMLU 1-shot through the mesh")
    for col in ("phase", "subject", "exp", "ans", "ok", "node", "prompt tok", "cache", "TTFT s", "TTLT s"):
        table.add_column(col, justify="right" if col in ("prompt tok", "TTFT s", "TTLT s") else "left")
    for r in rows:
        table.add_row(r["phase"], r["subject"], r["expected"], str(r["answer"] or "-"), "yes" if r["correct"] else "no",
                      str(r["node"] or r.get("error", "-")), str(r.get("prompt_tokens", "-")),
                      "off (baseline)" if r["no_cache"] else cache_label(r.get("cache")),
                      f"{r['ttft_s']:.3f}" if "ttft_s" in r else "-", f"{r['ttlt_s']:.3f}" if "ttlt_s" in r else "-")
    console.print(table)
    ok = [r for r in rows if "ttft_s" in r]
    scored = [r for r in rows if not r["no_cache"]]  # the baselines repeat a question
    ttft = [r["ttft_s"] for r in ok]
    ttlt = [r["ttlt_s"] for r in ok]
    per_node: dict[str, int] = {}
    for r in ok:
        per_node[r["node"]] = per_node.get(r["node"], 0) + 1
    by_decision: dict[str, list[float]] = {}
    for r in ok:
        key = "no-cache" if r["no_cache"] else (r.get("cache") or {}).get("decision", "-")
        if (r.get("cache") or {}).get("full_hit"):
            key += " (full hit)"
        by_decision.setdefault(key, []).append(r["ttft_s"])
    pairs = [(a, b) for a, b in zip(rows, rows[1:])
             if a["phase"] == b["phase"] == "cross-node" and a["no_cache"] and not b["no_cache"]
             and "ttft_s" in a and "ttft_s" in b]
    same_answers = sum(a.get("token_ids") == b.get("token_ids") for a, b in pairs)
    cross = {
        "pairs": len(pairs),
        "ttft_no_cache_mean_s": mean([a["ttft_s"] for a, _ in pairs]),
        "ttft_cache_mean_s": mean([b["ttft_s"] for _, b in pairs]),
        "fetched": sum((b.get("cache") or {}).get("decision") == "remote" for _, b in pairs),
        "identical_answers": same_answers,
    }
    summary = {
        "questions": len(scored), "asks": len(rows), "answered": len(ok), "errors": len(rows) - len(ok),
        "correct": sum(r["correct"] for r in scored),
        "accuracy": sum(r["correct"] for r in scored) / len(scored) if scored else 0.0,
        "ttft_mean_s": mean(ttft), "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
        "ttlt_mean_s": mean(ttlt), "ttlt_p50_s": percentile(ttlt, 50),
        "prompt_tokens_mean": mean([r["prompt_tokens"] for r in ok]),
        "answers_per_node": per_node,
        "ttft_mean_by_cache_decision_s": {k: round(mean(v) or 0.0, 4) for k, v in sorted(by_decision.items())},
        "asks_by_cache_decision": {k: len(v) for k, v in sorted(by_decision.items())},
        "cross_node": cross,
    }
    console.print(
        f"[bold]Summary[/bold]: {summary['answered']}/{summary['asks']} asks answered; "
        f"{summary['correct']}/{summary['questions']} correct ({summary['accuracy']:.0%}; chance is 25%); "
        f"TTFT mean {summary['ttft_mean_s'] or 0:.3f} s (p50 {summary['ttft_p50_s'] or 0:.3f}, p90 {summary['ttft_p90_s'] or 0:.3f}), "
        f"TTLT mean {summary['ttlt_mean_s'] or 0:.3f} s, mean prompt {summary['prompt_tokens_mean'] or 0:.0f} tokens; "
        f"answers per node {per_node}")
    console.print("[bold]Prompt cache[/bold]: mean TTFT by decision " + ", ".join(
        f"{k} {v:.3f} s (n={summary['asks_by_cache_decision'][k]})"
        for k, v in summary["ttft_mean_by_cache_decision_s"].items()))
    if pairs:
        console.print(
            f"[bold]Cross-node[/bold]: {cross['fetched']}/{len(pairs)} asks fetched their subject's prefix from the "
            f"node that had answered it; TTFT {cross['ttft_no_cache_mean_s']:.3f} s without the cache -> "
            f"{cross['ttft_cache_mean_s']:.3f} s with it; identical answers {same_answers}/{len(pairs)}")
    return summary


HALO_PROMPTS = ("The three primary colours are", "Water boils at a temperature of")


def halo_demo(args: argparse.Namespace, root: Path, log_dir: Path | None, console: Console) -> dict[str, Any]:
    """A short HALO run: the coordinator plus 3 workers answer with strict and relaxed sync."""
    names = ["worker1", "worker2", "worker3"]
    procs = MeshProcesses(names, "smollm2-135m", free_port(), home=root, log_dir=log_dir,
                          node_args=["--roles", "worker", "--no-answer"], coordinator=True)
    with console.status("HALO: starting the coordinator and 3 workers (smollm2-135m)"):
        procs.start(timeout=600)
    rows: list[dict[str, Any]] = []
    try:
        with MeshClient(procs.address, keyring=asker_keyring(procs.home)) as client:
            for prompt in HALO_PROMPTS:
                for sync in ("strict", "relaxed"):
                    r = client.ask(prompt, node="coordinator", max_new_tokens=args.halo_tokens, timeout=300,
                                   no_cache=True, extra={"halo_sync": sync})
                    f = r.node_figures
                    halo = f.get("halo") or {}
                    rows.append({"prompt": prompt, "sync": sync, "answer": r.answer, "token_ids": f.get("token_ids"),
                                 "ttft_s": r.ttft_s, "ttlt_s": r.ttlt_s, "tpot_s": f.get("tpot_s"),
                                 "partials_on_time": halo.get("partials_on_time"),
                                 "partials_late": halo.get("partials_late"), "zeroed_groups": halo.get("zeroed_groups")})
    finally:
        procs.stop()
    table = Table(title="HALO: SmolLM2-135M with its MLP neuron groups on 3 workers (loopback, no loss)")
    for col in ("prompt", "sync", "answer", "TPOT ms", "TTLT s", "partials on time", "late", "zeroed groups"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["prompt"][:32], r["sync"], r["answer"].strip().replace("\n", " ")[:40],
                      f"{1000 * (r['tpot_s'] or 0):.0f}", f"{r['ttlt_s']:.2f}", str(r["partials_on_time"]),
                      str(r["partials_late"]), str(r["zeroed_groups"]))
    console.print(table)
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(rows[::2], rows[1::2]))
    console.print(f"[bold]HALO[/bold]: relaxed gave the strict answer on {same}/{len(rows) // 2} prompts; "
                  "`mesh bench halo` measures both under packet loss on the testbed")
    return {"rows": rows, "relaxed_equals_strict": same}


def main_job(args: argparse.Namespace) -> int:
    console = Console(width=None if Console().is_terminal else 132)
    root = mesh_home(args)
    data = mmlu_dir(root)
    subjects = tuple(args.subjects) if args.subjects else mmlu.DEFAULT_SUBJECTS
    items = mmlu.sample(data, subjects, per_subject=args.per_subject)
    extra = {q.subject: (p, q) for p, q in mmlu.sample(data, subjects, per_subject=1, offset=args.per_subject)}
    names = [f"node{i + 1}" for i in range(args.nodes)]
    port = free_port()
    log_dir = Path(args.json).parent / "logs" if args.json else None
    console.print(f"Starting the embedded broker on 127.0.0.1:{port} and {len(names)} nodes ({args.model}); "
                  f"node logs in {log_dir}")
    t0 = time.monotonic()
    procs = MeshProcesses(names, args.model, port, home=root, log_dir=log_dir)
    with console.status("waiting for nodes to load the model and come online"):
        procs.start(timeout=600)
    startup_s = time.monotonic() - t0
    console.print(f"{len(names)} nodes online after {startup_s:.1f} s")
    formats: dict[str, str] = {}
    try:
        with MeshClient(procs.address, keyring=asker_keyring(procs.home)) as client:
            client.wait_online(names, 60, ready=lambda v: "model_key" in v.heartbeat)
            formats = {n: str(client.peers.get(n).heartbeat["model_key"]).rpartition("/")[2] for n in names}  # type: ignore[union-attr]
            console.print("weight format per node: " + ", ".join(f"{n} {f}" for n, f in formats.items()))
            rows = ask_all(client, [Ask(p, q, "routed") for p, q in items], console)
            rows += ask_all(client, cross_node_plan(rows, items, names, extra), console)
    finally:
        procs.stop()
    summary = print_report(rows, console)
    halo = halo_demo(args, root, log_dir, console) if args.halo_tokens > 0 else None
    result = {"halo": halo, "job": "mmlu-1shot", "model": args.model, "nodes": names, "weights": formats,
              "broker": "amqtt (embedded)",
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "startup_s": startup_s, "summary": summary, "rows": rows,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        console.print(f"results written to {out}")
    return 0 if summary["answered"] == summary["asks"] else 1
