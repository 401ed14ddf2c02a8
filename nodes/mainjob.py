"""`mesh run` (what `make run` runs): a 3-node mesh on the embedded broker answering MMLU.

It brings up the broker and the nodes, asks 1-shot MMLU questions from several subjects through
the mesh with a progress bar, prints a table and a summary, writes the results as JSON, and
shuts everything down (also on Ctrl-C or failure).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mesh import mmlu
from mesh.errors import MeshError
from nodes.client import MeshClient
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir
from nodes.up import MeshProcesses, free_port


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ask_questions(client: MeshClient, items: list[tuple[str, mmlu.Question]], console: Console,
                  timeout: float = 300.0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("MMLU 1-shot", total=len(items))
        for prompt, q in items:
            progress.update(task, description=f"MMLU {q.subject[:24]}")
            row: dict[str, Any] = {"subject": q.subject, "expected": q.letter}
            try:
                r = client.ask(prompt, max_new_tokens=4, stop=("\n",), timeout=timeout)
                got = mmlu.parse_letter(r.answer)
                row.update(answer=got, raw=r.answer, correct=got == q.letter, node=r.node,
                           prompt_tokens=r.prompt_tokens, new_tokens=r.new_tokens,
                           ttft_s=r.ttft_s, ttlt_s=r.ttlt_s, cache=r.node_figures.get("cache"))
            except MeshError as exc:
                row.update(answer=None, raw="", correct=False, node=None, error=str(exc))
            rows.append(row)
            progress.advance(task)
    return rows


def print_report(rows: list[dict[str, Any]], console: Console) -> dict[str, Any]:
    table = Table(title="MMLU 1-shot through the mesh")
    for col in ("subject", "expected", "answer", "correct", "node", "prompt tok", "TTFT s", "TTLT s"):
        table.add_column(col, justify="right" if col in ("prompt tok", "TTFT s", "TTLT s") else "left")
    for r in rows:
        table.add_row(r["subject"], r["expected"], str(r["answer"] or "-"), "yes" if r["correct"] else "no",
                      str(r["node"] or r.get("error", "-")), str(r.get("prompt_tokens", "-")),
                      f"{r['ttft_s']:.3f}" if "ttft_s" in r else "-", f"{r['ttlt_s']:.3f}" if "ttlt_s" in r else "-")
    console.print(table)
    ok = [r for r in rows if "ttft_s" in r]
    ttft = [r["ttft_s"] for r in ok]
    ttlt = [r["ttlt_s"] for r in ok]
    per_node: dict[str, int] = {}
    for r in ok:
        per_node[r["node"]] = per_node.get(r["node"], 0) + 1
    summary = {
        "questions": len(rows), "answered": len(ok), "errors": len(rows) - len(ok),
        "correct": sum(r["correct"] for r in rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else 0.0,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None, "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p90_s": _pct(ttft, 0.9), "ttlt_mean_s": statistics.fmean(ttlt) if ttlt else None,
        "ttlt_p50_s": _pct(ttlt, 0.5), "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in ok) if ok else None,
        "answers_per_node": per_node,
    }
    console.print(
        f"[bold]Summary[/bold]: {summary['answered']}/{summary['questions']} answered, "
        f"{summary['correct']} correct ({summary['accuracy']:.0%}; chance is 25%), "
        f"TTFT mean {summary['ttft_mean_s'] or 0:.3f} s (p50 {summary['ttft_p50_s']:.3f}, p90 {summary['ttft_p90_s']:.3f}), "
        f"TTLT mean {summary['ttlt_mean_s'] or 0:.3f} s, mean prompt {summary['prompt_tokens_mean'] or 0:.0f} tokens, "
        f"answers per node {per_node}")
    return summary


def main_job(args: argparse.Namespace) -> int:
    console = Console(width=None if Console().is_terminal else 132)
    root = mesh_home(args)
    data = mmlu_dir(root)
    subjects = tuple(args.subjects) if args.subjects else mmlu.DEFAULT_SUBJECTS
    items = mmlu.sample(data, subjects, per_subject=args.per_subject)
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
    try:
        with MeshClient(procs.address) as client:
            rows = ask_questions(client, items, console)
    finally:
        procs.stop()
    summary = print_report(rows, console)
    result = {"job": "mmlu-1shot", "model": args.model, "nodes": names, "broker": "amqtt (embedded)",
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "startup_s": startup_s, "summary": summary, "rows": rows,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        console.print(f"results written to {out}")
    return 0 if summary["answered"] == summary["questions"] else 1
