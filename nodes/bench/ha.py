"""`mesh bench ha`: the home workload. Short Home Assistant commands behind one long system prompt.

A real mesh comes up on loopback (the embedded amqtt broker and K node processes). Commands come
from Home Assistant's own English templates (``nodes.bench.ha_workload``: hassil + home-assistant-intents,
expanded over a described home); each prompt is the shared system prompt (the home's devices and
the answer format), the command, and an answer cue. Two phases:

1. ``routed``: every command goes to the mesh without naming a node, so cache-aware routing
   sends it to the node that holds the system prompt's chunks (a local partial hit; a repeated
   command is a full hit). Every ``--pair-every``-th command is first asked with ``no_cache`` on
   the node that answered the previous command (where the routed ask is expected to land), so
   TTFT without and with the cache are paired on the same command and, normally, the same node.
2. ``cross-node``: each node that answered nothing yet gets two new commands named to it: the
   first (paired with a no-cache ask) finds the system prompt only in a peer's catalog and
   fetches it when the link is cheaper than recomputing; the second then hits locally.

TTFT and TTLT are measured by the asking client. The JSON holds every ask (text, intent, expected
action, reply and its score, node, cache decision, tokens, timings) and a summary; the PNG shows
TTFT with and without the cache.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from dataclasses import dataclass
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
from rich.table import Table

from nodes.bench import ha_workload as hw
from nodes.bench.ha_home import default_home
from nodes.bench.ha_prompt import build_prompt, score, system_prompt
from mesh.errors import MeshError
from nodes.bench.report import pyplot, save_figure, write_results
from nodes.bench.stats import mean, median, percentile
from nodes.client import MeshClient, asker_keyring
from nodes.settings import mesh_home
from nodes.up import MeshProcesses, free_port


@dataclass(frozen=True)
class PlannedAsk:
    phase: str  # "routed" or "cross-node"
    index: int  # the command's position in its phase
    command: hw.Command
    repeat: bool  # the same text was asked before in this run
    paired: bool  # preceded by a no-cache ask of the same command on the same node
    node: str | None = None  # None: the mesh routes it


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "mean_s": mean(xs), "median_s": median(xs), "p90_s": percentile(xs, 90)}


def _cache(row: dict[str, Any]) -> dict[str, Any]:
    return row.get("cache") or {}


def cache_kind(row: dict[str, Any]) -> str:
    """What the cache did for one ask: no cache, miss, partial/full hit, local/remote."""
    if row.get("no_cache"):
        return "no cache"
    c = row.get("cache") or {}
    local, remote = int(c.get("local_tokens") or 0), int(c.get("remote_tokens") or 0)
    if local + remote == 0:
        return "miss"
    where = "remote" if remote else "local"
    return f"{'full' if c.get('full_hit') else 'partial'} hit ({where})"


def plan_routed(commands: list[hw.Command], pair_every: int) -> list[PlannedAsk]:
    seen: set[str] = set()
    plan: list[PlannedAsk] = []
    for i, c in enumerate(commands):
        plan.append(PlannedAsk("routed", i, c, c.text in seen, pair_every > 0 and i % pair_every == 0))
        seen.add(c.text)
    return plan


def plan_cross(extra: list[hw.Command], nodes: list[str]) -> list[PlannedAsk]:
    """Two new commands per node that has not answered yet: a paired one (fetch), then a local hit."""
    plan: list[PlannedAsk] = []
    it = iter(extra)
    for node in nodes:
        for paired in (True, False):
            plan.append(PlannedAsk("cross-node", len(plan), next(it), False, paired, node))
    return plan


class Runner:
    """Asks the plan through one client and records one row per ask."""

    def __init__(self, client: MeshClient, system: str, args: argparse.Namespace, first_node: str) -> None:
        self.client = client
        self.system = system
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.last_node = first_node  # where the next routed ask is expected to land

    def ask(self, a: PlannedAsk, node: str | None, no_cache: bool, pair: int | None) -> dict[str, Any]:
        c = a.command
        row: dict[str, Any] = {"ask": len(self.rows), "phase": a.phase, "index": a.index, "text": c.text,
                               "intent": c.intent, "target": c.target, "expected": c.expected, "slots": dict(c.slots),
                               "template": c.template, "repeat": a.repeat,
                               "no_cache": no_cache, "pair": pair, "asked_node": node}
        try:
            r = self.client.ask(build_prompt(self.system, c), node=node, max_new_tokens=self.args.tokens,
                                stop=("\n",), timeout=self.args.timeout, no_cache=no_cache, cache_figures=True)
            f = r.node_figures
            row.update(node=r.node, prompt_tokens=r.prompt_tokens, new_tokens=r.new_tokens, ttft_s=r.ttft_s,
                       ttlt_s=r.ttlt_s, node_ttft_s=f.get("ttft_s"), queue_s=f.get("queue_s"),
                       prefill_s=f.get("prefill_s"), decode_s=f.get("decode_s"), reply=r.answer,
                       token_ids=f.get("token_ids"), cache=f.get("cache"), **score(c, r.answer))
        except MeshError as exc:
            row.update(node=None, error=str(exc))
        row["kind"] = cache_kind(row) if "error" not in row else "error"
        self.rows.append(row)
        return row

    def run(self, plan: list[PlannedAsk], console: Console, label: str) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(label, total=len(plan))
            for a in plan:
                progress.update(task, description=f"{label}: {a.command.text[:40]:<40}")
                pair = None
                if a.paired:
                    pair = len(self.rows)
                    self.ask(a, a.node or self.last_node, True, pair)
                row = self.ask(a, a.node, False, pair)
                if a.node is None and row.get("node"):
                    self.last_node = row["node"]
                progress.advance(task)


def summarize(rows: list[dict[str, Any]], nodes: list[str]) -> dict[str, Any]:
    ok = [r for r in rows if "ttft_s" in r]
    cached = [r for r in ok if not r["no_cache"]]
    hits = [r for r in cached if r["kind"] not in ("miss",)]
    kinds = Counter(r["kind"] for r in cached)
    reused = [int(_cache(r).get("local_tokens") or 0) + int(_cache(r).get("remote_tokens") or 0) for r in cached]
    remote = [r for r in cached if _cache(r).get("decision") == "remote"]
    partial_local = [int(_cache(r).get("local_tokens") or 0) for r in cached if r["kind"] == "partial hit (local)"]
    by_pair: dict[int, dict[bool, dict[str, Any]]] = {}
    for r in ok:
        if r["pair"] is not None:
            by_pair.setdefault(r["pair"], {})[r["no_cache"]] = r
    pairs = [(p[True], p[False]) for p in by_pair.values() if True in p and False in p]
    ratios = [b["ttft_s"] / a["ttft_s"] for a, b in pairs if a["ttft_s"] > 0]
    paired = {
        "pairs": len(pairs),
        "same_node": sum(a["node"] == b["node"] for a, b in pairs),
        "ttft_no_cache": _stats([a["ttft_s"] for a, _ in pairs]),
        "ttft_cache": _stats([b["ttft_s"] for _, b in pairs]),
        "ttlt_no_cache": _stats([a["ttlt_s"] for a, _ in pairs]),
        "ttlt_cache": _stats([b["ttlt_s"] for _, b in pairs]),
        "ttft_ratio_median": median(ratios),  # cache over no cache, per command
        "ttft_ratio_worst": max(ratios, default=None),
        "identical_answers": sum(a.get("token_ids") == b.get("token_ids") for a, b in pairs),
        # per cache outcome of the cached ask: what the same commands cost without the cache
        "by_kind": {k: {"n": sum(b["kind"] == k for _, b in pairs),
                        "ttft_no_cache_mean_s": mean([a["ttft_s"] for a, b in pairs if b["kind"] == k]),
                        "ttft_cache_mean_s": mean([b["ttft_s"] for _, b in pairs if b["kind"] == k]),
                        "ttlt_no_cache_mean_s": mean([a["ttlt_s"] for a, b in pairs if b["kind"] == k]),
                        "ttlt_cache_mean_s": mean([b["ttlt_s"] for _, b in pairs if b["kind"] == k])}
                    for k in sorted({b["kind"] for _, b in pairs})},
    }
    for key in ("ttft", "ttlt"):
        old, new = paired[f"{key}_no_cache"]["mean_s"], paired[f"{key}_cache"]["mean_s"]
        paired[f"{key}_change_pct"] = None if not old or new is None else round(100.0 * (new - old) / old, 2)
    scored = [r for r in cached if "intent_ok" in r]
    return {
        "asks": len(rows), "answered": len(ok), "errors": len(rows) - len(ok),
        "cached_asks": len(cached), "no_cache_asks": len(ok) - len(cached),
        "prompt_tokens_mean": mean([float(r["prompt_tokens"]) for r in ok]),
        "system_prompt_tokens_reused": max(partial_local, default=None),
        "hit_rate": len(hits) / len(cached) if cached else None,
        "full_hit_rate": sum(r["kind"].startswith("full") for r in cached) / len(cached) if cached else None,
        "kinds": dict(sorted(kinds.items())),
        "decisions": dict(sorted(Counter(str(_cache(r).get("decision")) for r in cached).items())),
        "tokens_reused_mean": mean([float(x) for x in reused]),
        "reused_share_mean": mean([x / r["prompt_tokens"] for x, r in zip(reused, cached) if r["prompt_tokens"]]),
        "remote_fetches": len(remote),
        "fetch_bytes_mean": mean([float(_cache(r).get("fetch_bytes") or 0) for r in remote]),
        "fetch_s_mean": mean([float(_cache(r).get("fetch_s") or 0.0) for r in remote]),
        "recompute_decisions": sum(_cache(r).get("decision") == "recompute" for r in cached),
        "ttft_cached": _stats([r["ttft_s"] for r in cached]),
        "ttlt_cached": _stats([r["ttlt_s"] for r in cached]),
        "ttft_by_kind": {k: _stats([r["ttft_s"] for r in ok if r["kind"] == k])
                         for k in sorted({r["kind"] for r in ok})},
        "ttlt_by_kind": {k: _stats([r["ttlt_s"] for r in ok if r["kind"] == k])
                         for k in sorted({r["kind"] for r in ok})},
        "paired": paired,
        "asks_per_node": {n: sum(r["node"] == n for r in cached) for n in nodes},
        "routed_asks_per_node": {n: sum(r["node"] == n for r in cached if r["phase"] == "routed") for n in nodes},
        "answers": {"scored": len(scored),
                    "intent_accuracy": mean([float(r["intent_ok"]) for r in scored]),
                    "target_accuracy": mean([float(r["target_ok"]) for r in scored]),
                    "exact_accuracy": mean([float(r["ok"]) for r in scored]),
                    "parsed": sum(r["parsed_intent"] is not None for r in scored)},
    }


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    ok = [r for r in rows if "ttft_s" in r]
    colors = {"no cache": "#888", "miss": "#c33", "partial hit (local)": "#2a7", "partial hit (remote)": "#27c",
              "full hit (local)": "#a6d", "full hit (remote)": "#f90"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.6]})
    kinds = [k for k in colors if any(r["kind"] == k for r in ok)]
    data = [[r["ttft_s"] for r in ok if r["kind"] == k] for k in kinds]
    box = ax1.boxplot(data, patch_artist=True, showfliers=True)
    for patch, k in zip(box["boxes"], kinds):
        patch.set_facecolor(colors[k])
    ax1.set_xticks(range(1, len(kinds) + 1),
                   [f"{k.replace(' (', chr(10) + '(')}\nn={len(d)}" for k, d in zip(kinds, data)], fontsize=7)
    ax1.set_ylabel("TTFT (s)")
    ax1.set_yscale("log")
    p = summary["paired"]
    ax1.set_title(f"TTFT by cache outcome; paired means {p['ttft_no_cache']['mean_s'] or 0:.2f} s -> "
                  f"{p['ttft_cache']['mean_s'] or 0:.2f} s", fontsize=9)
    for k in kinds:
        pts = [r for r in ok if r["kind"] == k]
        ax2.scatter([r["ask"] for r in pts], [r["ttft_s"] for r in pts], s=14, color=colors[k], label=k,
                    marker="x" if k == "no cache" else "o")
    for r in ok:  # join each pair: the same command without and with the cache
        if r["pair"] is not None and not r["no_cache"]:
            base = next((b for b in ok if b["pair"] == r["pair"] and b["no_cache"]), None)
            if base is not None:
                ax2.plot([base["ask"], r["ask"]], [base["ttft_s"], r["ttft_s"]], color="#bbb", lw=0.7, zorder=0)
    cross = [r["ask"] for r in ok if r["phase"] == "cross-node"]
    if cross:
        ax2.axvspan(min(cross) - 0.5, max(cross) + 0.5, color="#eef", zorder=-1, label="cross-node phase")
    ax2.set_xlabel("ask (in order)")
    ax2.set_ylabel("TTFT (s)")
    ax2.set_yscale("log")
    ax2.set_title(f"hit rate {summary['hit_rate'] or 0:.0%} of {summary['cached_asks']} cached asks; "
                  f"~{summary['prompt_tokens_mean'] or 0:.0f}-token prompts", fontsize=9)
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Home workload: Home Assistant commands behind one shared system prompt", fontsize=10)
    save_figure(fig, path)


def print_report(summary: dict[str, Any], console: Console) -> None:
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    t = Table(title="Home workload: TTFT / TTLT by cache outcome (seconds)")
    for col in ("asks", "n", "TTFT mean", "TTFT median", "TTFT p90", "TTLT mean"):
        t.add_column(col, justify="left" if col == "asks" else "right")
    for k, s in summary["ttft_by_kind"].items():
        t.add_row(k, str(s["n"]), fmt(s["mean_s"]), fmt(s["median_s"]), fmt(s["p90_s"]),
                  fmt(summary["ttlt_by_kind"][k]["mean_s"]))
    console.print(t)
    p = summary["paired"]
    a = summary["answers"]
    console.print(
        f"[bold]Hit rate[/bold] {summary['hit_rate'] or 0:.1%} of {summary['cached_asks']} cached asks "
        f"(full hits {summary['full_hit_rate'] or 0:.1%}); kinds {summary['kinds']}; "
        f"tokens reused per ask {summary['tokens_reused_mean'] or 0:.0f} of {summary['prompt_tokens_mean'] or 0:.0f} "
        f"({summary['reused_share_mean'] or 0:.0%}); remote fetches {summary['remote_fetches']} "
        f"(mean {(summary['fetch_bytes_mean'] or 0) / 1e6:.1f} MB in {summary['fetch_s_mean'] or 0:.3f} s)")
    console.print(
        f"[bold]Paired[/bold] ({p['pairs']} commands, {p['same_node']} on the same node): TTFT "
        f"{fmt(p['ttft_no_cache']['mean_s'])} -> {fmt(p['ttft_cache']['mean_s'])} s mean "
        f"({p['ttft_change_pct']}%), median {fmt(p['ttft_no_cache']['median_s'])} -> "
        f"{fmt(p['ttft_cache']['median_s'])}; TTLT {fmt(p['ttlt_no_cache']['mean_s'])} -> "
        f"{fmt(p['ttlt_cache']['mean_s'])} s ({p['ttlt_change_pct']}%); identical answers "
        f"{p['identical_answers']}/{p['pairs']}")
    for k, v in p["by_kind"].items():
        console.print(f"  paired, cached ask a {k} (n={v['n']}): TTFT {fmt(v['ttft_no_cache_mean_s'])} -> "
                      f"{fmt(v['ttft_cache_mean_s'])} s, TTLT {fmt(v['ttlt_no_cache_mean_s'])} -> "
                      f"{fmt(v['ttlt_cache_mean_s'])} s")
    console.print(f"[bold]Nodes[/bold]: cached asks per node {summary['asks_per_node']} "
                  f"(routed phase {summary['routed_asks_per_node']}); [bold]answers[/bold]: intent "
                  f"{a['intent_accuracy'] or 0:.0%}, target {a['target_accuracy'] or 0:.0%}, both "
                  f"{a['exact_accuracy'] or 0:.0%} of {a['scored']}")


def bench_ha(args: argparse.Namespace) -> int:
    console = Console(width=None if Console().is_terminal else 140)
    root = mesh_home(args)
    home = default_home()
    system = system_prompt(home)
    names = [f"node{i + 1}" for i in range(args.nodes)]
    commands = hw.sample_commands(args.commands, home, seed=args.seed, repeat_share=args.repeats)
    used = {c.text for c in commands}
    extra = [c for c in hw.expand_commands(home, limit=args.commands + 4 * len(names), seed=args.seed + 1)
             if c.text not in used]
    out_json, out_png = Path(args.json), Path(args.plot)
    log_dir = out_json.parent / "logs"
    port = free_port()
    console.print(f"Home workload: {len(commands)} commands ({len(used)} distinct) from home-assistant-intents "
                  f"over the {home.name} home ({len(home.entities)} devices, {len(home.areas)} areas); system "
                  f"prompt {len(system)} chars. Broker 127.0.0.1:{port}, {len(names)} nodes ({args.model}), "
                  f"logs in {log_dir}")
    t0 = time.monotonic()
    procs = MeshProcesses(names, args.model, port, home=root, log_dir=log_dir,
                          node_args=["--heartbeat", "1"])
    with console.status("waiting for nodes to load the model and come online"):
        procs.start(timeout=600)
    startup_s = time.monotonic() - t0
    console.print(f"{len(names)} nodes online after {startup_s:.1f} s")
    try:
        with MeshClient(procs.address, name=f"bench-ha-{port}", keyring=asker_keyring(procs.home)) as client:
            time.sleep(3.0)  # the nodes' first link probes feed the cost-aware fetch decision
            runner = Runner(client, system, args, names[0])
            runner.run(plan_routed(commands, args.pair_every), console, "routed")
            answered = {r["node"] for r in runner.rows if r.get("node") and not r["no_cache"]}
            idle = [n for n in names if n not in answered]
            if idle:
                runner.run(plan_cross(extra, idle), console, "cross-node")
    finally:
        procs.stop()
    rows = runner.rows
    summary = summarize(rows, names)
    print_report(summary, console)
    result = {"bench": "ha", "model": args.model, "nodes": names, "broker": "amqtt (embedded)",
              "commands": args.commands, "distinct_commands": len(used), "tokens": args.tokens,
              "pair_every": args.pair_every, "repeat_share": args.repeats, "seed": args.seed,
              "home": {"name": home.name, "floors": [vars(f) for f in home.floors],
                       "areas": [vars(a) for a in home.areas], "entities": [vars(e) for e in home.entities]},
              "system_prompt": system, "startup_s": startup_s,
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "summary": summary, "rows": rows}
    write_results(result, out_json, lambda path: plot(rows, summary, path), out_png, console)
    return 0 if summary["errors"] == 0 else 1


def add_bench_ha(sub: Any) -> None:
    p = sub.add_parser("ha", help="the home workload: Home Assistant commands behind a shared system prompt")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--commands", type=int, default=60, help="commands asked through the mesh (routed phase)")
    p.add_argument("--tokens", type=int, default=12, help="max new tokens per answer")
    p.add_argument("--pair-every", type=int, default=3,
                   help="every N-th command is also asked without the cache, right before (0: never)")
    p.add_argument("--repeats", type=float, default=0.1, help="share of commands that repeat an earlier one")
    p.add_argument("--seed", type=int, default=0, help="command sampling seed")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per ask")
    p.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--json", default="out/bench-ha.json")
    p.add_argument("--plot", default="out/bench-ha.png")
    p.set_defaults(func=bench_ha)
