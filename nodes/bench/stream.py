"""`mesh bench cache --stream`: a stream of k-shot MMLU asks, with and without the prompt cache.

Per subject the k examples are the same for every question (as in the paper's 5-shot runs), so
after the first question of a subject every ask can reuse the long shared prefix. Each question
is asked twice on the same node, side by side: first with the cache (routed by the mesh, so it
goes to the node holding the subject's prefix), then with ``--no-cache`` (which stores nothing).
The figure is the mean TTFT reduction over the whole stream, first-of-subject misses included.

The stream is shuffled (``--seed``): subjects arrive in random order across ``--nodes`` nodes
(default 4) that start with cold caches. At the end the nodes' heartbeat cache figures give the
wasted fetches as a share of lookups (every cached ask makes one lookup).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from mesh.config import BrokerAddress
from nodes import mmlu
from nodes.bench.report import pyplot, save_figure, write_results
from nodes.client import MeshClient, asker_keyring
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir
from nodes.testbed.profiles import device_profile
from nodes.testbed.spec import make_spec


def stream_items(args: argparse.Namespace) -> list[tuple[str, mmlu.Question]]:
    data = mmlu_dir(mesh_home(args))
    subjects = tuple(args.subjects) if args.subjects else mmlu.DEFAULT_SUBJECTS[: args.questions]
    items: list[tuple[str, mmlu.Question]] = []
    for subject in subjects:
        shots = mmlu.read_split(data, subject, "dev")[: args.shots]
        tests = [q for q in mmlu.read_split(data, subject, "test") if mmlu.word_count(q) <= 256]
        items += [(mmlu.few_shot_prompt(shots, q), q) for q in tests[: args.per_subject]]
    random.Random(args.seed).shuffle(items)
    return items


def run_stream(profile: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from nodes.testbed.bed import Testbed
    from nodes.testbed.calibrate import calibration_dir, load_calibration

    cal = load_calibration(calibration_dir(mesh_home(args)), profile) if profile == "pi-zero-2w" else None
    spec = make_spec(args.nodes, device_profile(profile, cal), instance=args.instance)
    items = stream_items(args)
    rows: list[dict[str, Any]] = []
    with Testbed(spec, calibration=cal) as tb:
        tb.start_broker(args.broker)
        tb.start_nodes(args.model, extra=["--kv-wire", args.kv_wire, "--heartbeat", "1"])
        host, port = tb.broker_address
        with MeshClient(BrokerAddress(host, port), name=f"stream-{spec.instance}",
                        keyring=asker_keyring(mesh_home(args))) as client:
            time.sleep(3.0)  # first bandwidth probes
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{profile} {args.shots}-shot stream", total=len(items))
                for prompt, q in items:
                    cached = client.ask(prompt, max_new_tokens=args.tokens, stop=("\n",), timeout=900,
                                        model=args.model, cache_figures=True)
                    time.sleep(0.5)  # the catalog of what this ask stored reaches the router
                    plain = client.ask(prompt, node=cached.node, max_new_tokens=args.tokens, stop=("\n",),
                                       no_cache=True, timeout=900)
                    rows.append({"subject": q.subject, "node": cached.node, "prompt_tokens": cached.prompt_tokens,
                                 "ttft_cache_s": cached.ttft_s, "ttft_no_cache_s": plain.ttft_s,
                                 "ttlt_cache_s": cached.ttlt_s, "ttlt_no_cache_s": plain.ttlt_s,
                                 "cache": cached.node_figures.get("cache"),
                                 "identical": cached.node_figures.get("token_ids") == plain.node_figures.get("token_ids")})
                    progress.advance(task)
            time.sleep(2.5)  # one more heartbeat from every node after the last ask
            nodes = {v.name: dict(v.heartbeat.get("cache", {})) for v in client.nodes() if v.name.startswith("pi")}
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
    lookups = sum(int(c.get("lookups", c.get("asks", 0))) for c in nodes.values())
    wasted = sum(int(c.get("wasted_fetches", 0)) for c in nodes.values())
    summary.update(
        nodes=len(nodes), subjects=len({r["subject"] for r in rows}), seed=args.seed,
        hit_rate=round(sum((r["cache"] or {}).get("local_tokens", 0) + (r["cache"] or {}).get("remote_tokens", 0) > 0
                           for r in rows) / len(rows), 4),
        lookups=lookups, wasted_fetches=wasted, fetches=sum(int(c.get("fetches", 0)) for c in nodes.values()),
        wasted_share_of_lookups=round(wasted / lookups, 4) if lookups else None,
        fetched_bytes=sum(int(c.get("fetched_bytes", 0)) for c in nodes.values()),
        ttft_hits_only_reduction_pct=_reduction([r for r in rows if (r["cache"] or {}).get("decision") != "no-match"]),
        node_cache=nodes,
    )
    summary["ttft_reduction_pct"] = round(100 * (1 - summary["ttft_cache_mean_s"] / summary["ttft_no_cache_mean_s"]), 2)
    summary["ttlt_reduction_pct"] = round(100 * (1 - summary["ttlt_cache_mean_s"] / summary["ttlt_no_cache_mean_s"]), 2)
    return {"profile": profile, "mode": "stream", "testbed": testbed, "rows": rows, "summary": summary}


def _reduction(rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    a = statistics.fmean(r["ttft_no_cache_s"] for r in rows)
    b = statistics.fmean(r["ttft_cache_s"] for r in rows)
    return round(100 * (1 - b / a), 2)


def print_stream(results: list[dict[str, Any]], console: Console) -> None:
    for res in results:
        s = res["summary"]
        console.print(
            f"[bold]{res['profile']}[/bold] {s['shots']}-shot stream, {s['asks']} asks, {s['prompt_tokens_mean']:.0f} "
            f"prompt tokens: TTFT {s['ttft_no_cache_mean_s']:.3f} -> {s['ttft_cache_mean_s']:.3f} s "
            f"({-s['ttft_reduction_pct']:+.1f} %), TTLT {s['ttlt_no_cache_mean_s']:.3f} -> {s['ttlt_cache_mean_s']:.3f} s "
            f"({-s['ttlt_reduction_pct']:+.1f} %), decisions {s['decisions']}, identical {s['identical_answers']}/{s['asks']}, "
            f"worst cache/no-cache {s['worst_cache_over_no_cache']:.2f}; hit rate {s['hit_rate']:.1%}, hits alone "
            f"{s['ttft_hits_only_reduction_pct']} %; wasted fetches {s['wasted_fetches']}/{s['lookups']} lookups")


def bench_stream(args: argparse.Namespace, console: Console) -> int:
    args.shots = args.shots or 5
    results = [run_stream(p, args, console) for p in args.profiles.split(",")]
    print_stream(results, console)
    out = {"bench": "cache-stream", "model": args.model, "kv_wire": args.kv_wire, "broker": args.broker,
           "tokens": args.tokens, "results": results}
    if len(results) == 1:  # one profile: its figures at the top level, the stream under "stream"
        s = results[0]["summary"]
        out.update(profile=results[0]["profile"], questions=s["asks"], lookups=s["lookups"],
                   wasted_fetches=s["wasted_fetches"], identical_outputs=s["identical_answers"] == s["asks"], stream=s)
    write_results(out, args.json, lambda path: plot_stream(results, path), args.plot, console)
    return 0


def plot_stream(results: list[dict[str, Any]], path: Path) -> None:
    """Per ask, in stream order: TTFT without and with the cache (log scale)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.6 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows, s = res["rows"], res["summary"]
        x = range(len(rows))
        ax.plot(x, [r["ttft_no_cache_s"] for r in rows], "o-", color="#999", ms=3, label="no cache")
        ax.plot(x, [r["ttft_cache_s"] for r in rows], "o-", color="#2a7", ms=3, label="cache (routed)")
        ax.set_yscale("log")
        ax.set_xlabel("ask (stream order)")
        ax.set_ylabel("TTFT, s")
        ax.set_title(f"{res['profile']}: {s['shots']}-shot stream, {s['asks']} asks, {s['subjects']} subjects, "
                     f"{s['nodes']} nodes: mean TTFT -{s['ttft_reduction_pct']:.1f} %")
        ax.legend()
    save_figure(fig, path)
