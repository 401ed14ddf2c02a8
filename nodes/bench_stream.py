"""`mesh bench cache --stream`: a stream of k-shot MMLU asks, with and without the prompt cache.

Per subject the k examples are the same for every question (as in the paper's 5-shot runs), so
after the first question of a subject every ask can reuse the long shared prefix. Each question
is asked twice on the same node, side by side: first with the cache (routed by the mesh, so it
goes to the node holding the subject's prefix), then with ``--no-cache`` (which stores nothing).
The figure is the mean TTFT reduction over the whole stream, first-of-subject misses included.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mesh import mmlu
from mesh.config import BrokerAddress
from mesh.testbed_plan import device_profile, make_spec
from nodes.client import MeshClient
from nodes.setup import mmlu_dir
from nodes.settings import mesh_home


def stream_items(args: argparse.Namespace) -> list[tuple[str, mmlu.Question]]:
    data = mmlu_dir(mesh_home(args))
    subjects = tuple(args.subjects) if args.subjects else mmlu.DEFAULT_SUBJECTS[: args.questions]
    items: list[tuple[str, mmlu.Question]] = []
    for subject in subjects:
        shots = mmlu.read_split(data, subject, "dev")[: args.shots]
        tests = [q for q in mmlu.read_split(data, subject, "test") if mmlu.word_count(q) <= 256]
        items += [(mmlu.few_shot_prompt(shots, q), q) for q in tests[: args.per_subject]]
    return items


def run_stream(profile: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from nodes.testbed import CALIBRATION_DEFAULT_DIR, Testbed, load_calibration

    cal = load_calibration(CALIBRATION_DEFAULT_DIR, profile) if profile == "pi-zero-2w" else None
    spec = make_spec(2, device_profile(profile, cal), instance=args.instance)
    items = stream_items(args)
    rows: list[dict[str, Any]] = []
    with Testbed(spec, calibration=cal) as tb:
        tb.start_broker(args.broker)
        tb.start_nodes(args.model, extra=["--kv-wire", args.kv_wire, "--heartbeat", "1"])
        host, port = tb.broker_address
        with MeshClient(BrokerAddress(host, port), name=f"stream-{spec.instance}") as client:
            time.sleep(3.0)  # first bandwidth probes
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{profile} {args.shots}-shot stream", total=len(items))
                for prompt, q in items:
                    cached = client.ask(prompt, max_new_tokens=args.tokens, stop=("\n",), timeout=900,
                                        model=args.model)
                    time.sleep(0.5)  # the catalog of what this ask stored reaches the router
                    plain = client.ask(prompt, node=cached.node, max_new_tokens=args.tokens, stop=("\n",),
                                       no_cache=True, timeout=900)
                    rows.append({"subject": q.subject, "node": cached.node, "prompt_tokens": cached.prompt_tokens,
                                 "ttft_cache_s": cached.ttft_s, "ttft_no_cache_s": plain.ttft_s,
                                 "ttlt_cache_s": cached.ttlt_s, "ttlt_no_cache_s": plain.ttlt_s,
                                 "cache": cached.node_figures.get("cache"),
                                 "identical": cached.node_figures.get("token_ids") == plain.node_figures.get("token_ids")})
                    progress.advance(task)
        testbed = tb.describe()
    mean = statistics.fmean
    summary = {
        "asks": len(rows), "shots": args.shots, "prompt_tokens_mean": mean(r["prompt_tokens"] for r in rows),
        "ttft_no_cache_mean_s": mean(r["ttft_no_cache_s"] for r in rows),
        "ttft_cache_mean_s": mean(r["ttft_cache_s"] for r in rows),
        "ttlt_no_cache_mean_s": mean(r["ttlt_no_cache_s"] for r in rows),
        "ttlt_cache_mean_s": mean(r["ttlt_cache_s"] for r in rows),
        "decisions": {d: sum((r["cache"] or {}).get("decision") == d for r in rows)
                      for d in ("local", "remote", "recompute", "no-match")},
        "identical_answers": sum(r["identical"] for r in rows),
        "worst_cache_over_no_cache": max(r["ttft_cache_s"] / r["ttft_no_cache_s"] for r in rows),
    }
    summary["ttft_reduction_pct"] = round(100 * (1 - summary["ttft_cache_mean_s"] / summary["ttft_no_cache_mean_s"]), 2)
    summary["ttlt_reduction_pct"] = round(100 * (1 - summary["ttlt_cache_mean_s"] / summary["ttlt_no_cache_mean_s"]), 2)
    return {"profile": profile, "mode": "stream", "testbed": testbed, "rows": rows, "summary": summary}


def print_stream(results: list[dict[str, Any]], console: Console) -> None:
    for res in results:
        s = res["summary"]
        console.print(
            f"[bold]{res['profile']}[/bold] {s['shots']}-shot stream, {s['asks']} asks, {s['prompt_tokens_mean']:.0f} "
            f"prompt tokens: TTFT {s['ttft_no_cache_mean_s']:.3f} -> {s['ttft_cache_mean_s']:.3f} s "
            f"({-s['ttft_reduction_pct']:+.1f} %), TTLT {s['ttlt_no_cache_mean_s']:.3f} -> {s['ttlt_cache_mean_s']:.3f} s "
            f"({-s['ttlt_reduction_pct']:+.1f} %), decisions {s['decisions']}, identical {s['identical_answers']}/{s['asks']}, "
            f"worst cache/no-cache {s['worst_cache_over_no_cache']:.2f}")
