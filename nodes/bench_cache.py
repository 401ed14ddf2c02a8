"""`mesh bench cache`: the prompt cache on emulated devices, measured side by side.

For each device profile a testbed with two nodes comes up (pi1 and pi2, same profile, real TCP
through tbf-shaped links, CPU quotas from the calibration). Per MMLU 1-shot question:

1. ``miss``: pi2 answers with ``--no-cache`` (full recompute): the paper's miss;
2. pi1 answers the question (its quota lifted for this setup step only), so pi1 holds its KV;
3. ``hit``: pi2 answers with the cache: it finds pi1 in the catalog and fetches the KV when the
   link is cheaper than recomputing (the paper's full hit), or recomputes when it is not;
4. ``partial``: pi2 answers another question of the same subject, first without the cache,
   then with it (the shared header and example come from the cache: partial matching).

TTFT and TTLT are measured by the asking client (outside the testbed, over the same links).
Results go to JSON (every ask, per-profile summaries, the testbed description with its
calibration) and a PNG plot.
"""

from __future__ import annotations

import argparse
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
from rich.table import Table

from mesh import mmlu, topics, wire
from mesh.config import BrokerAddress
from mesh.errors import ProtocolError
from mesh.testbed_plan import device_profile, make_spec
from nodes.benchio import pyplot, save_figure, write_results
from nodes.client import MeshClient
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir

PAPER = {"ttft_miss_s": 12.59, "ttft_hit_s": 0.87, "ttft_change_pct": -93.12,
         "ttlt_miss_s": 23.74, "ttlt_hit_s": 11.86, "ttlt_change_pct": -50.07, "pi5_change_pct": +7.0}


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def _paired(diffs: list[float]) -> dict[str, Any] | None:
    """Paired differences (cache minus no cache, same question, same node): median, quartiles,
    and how many pairs the cache lost; the sign test's two-sided p for "no difference"."""
    if not diffs:
        return None
    from math import comb

    n = len(diffs)
    q = statistics.quantiles(diffs, n=4) if n >= 2 else [diffs[0]] * 3
    slower = sum(d > 0 for d in diffs)
    k = min(slower, n - slower)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"n": n, "median_s": statistics.median(diffs), "q1_s": q[0], "q3_s": q[2], "mean_s": statistics.fmean(diffs),
            "min_s": min(diffs), "max_s": max(diffs), "cache_slower": slower, "sign_test_p": round(p, 4)}


def _pct(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else round(100.0 * (new - old) / old, 2)


def run_profile(profile: str, items: list[tuple[tuple[str, mmlu.Question], tuple[str, mmlu.Question]]],
                args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from nodes.testbed import CALIBRATION_DEFAULT_DIR, Testbed, load_calibration

    cal = load_calibration(CALIBRATION_DEFAULT_DIR, profile) if profile == "pi-zero-2w" else None
    prof = device_profile(profile, cal)
    spec = make_spec(2, prof, instance=args.instance)
    rows: list[dict[str, Any]] = []
    with Testbed(spec, calibration=cal) as tb:
        tb.start_broker(args.broker)
        tb.start_nodes(args.model, extra=["--kv-wire", args.kv_wire, "--heartbeat", "1"])
        if args.peer == "cache-box":
            # The paper's topology: the devices on Wi-Fi, the cache on a wired box with CPU to spare.
            tb.set_cpu("pi1", None)
            tb.set_rate("pi1", None)
        host, port = tb.broker_address
        catalogs = CatalogWatch(BrokerAddress(host, port), "pi1")
        with MeshClient(BrokerAddress(host, port), name=f"bench-{spec.instance}") as client, catalogs:
            time.sleep(3.0)  # the nodes' first bandwidth probes (2 s after start) feed the fetch decision

            def ask(kind: str, node: str, prompt: str, q: mmlu.Question, no_cache: bool) -> dict[str, Any]:
                r = client.ask(prompt, node=node, max_new_tokens=args.tokens, stop=("\n",), no_cache=no_cache,
                               timeout=900)
                row = {"profile": profile, "kind": kind, "node": node, "subject": q.subject, "no_cache": no_cache,
                       "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens, "ttft_s": r.ttft_s,
                       "ttlt_s": r.ttlt_s, "answer": r.answer, "token_ids": r.node_figures.get("token_ids"),
                       "prefill_s": r.node_figures.get("prefill_s"), "cache": r.node_figures.get("cache")}
                rows.append(row)
                return row

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(profile, total=len(items))
                for i, ((p_full, q_full), (p_part, q_part)) in enumerate(items):
                    progress.update(task, description=f"{profile}: {q_full.subject[:28]}")
                    # Pairs alternate which of miss/hit goes first, so warm-up order favours neither.
                    miss_first = i % 2 == 0 or not args.alternate
                    if miss_first:
                        ask("miss", "pi2", p_full, q_full, True)
                    tb.set_cpu("pi1", None)  # setup only: pi1 computes the prompt that pi2 will reuse
                    epoch = catalogs.epoch
                    ask("seed", "pi1", p_full, q_full, False)
                    catalogs.wait_newer(epoch, timeout=30.0)  # pi1 advertised it...
                    time.sleep(0.5)  # ...and pi2 has read the catalog
                    if args.peer == "device":
                        tb.restore_cpu("pi1")
                    ask("hit", "pi2", p_full, q_full, False)
                    if not miss_first:
                        ask("miss", "pi2", p_full, q_full, True)
                    if miss_first:
                        ask("partial-miss", "pi2", p_part, q_part, True)
                    ask("partial", "pi2", p_part, q_part, False)
                    if not miss_first:
                        ask("partial-miss", "pi2", p_part, q_part, True)
                    progress.advance(task)
        testbed = tb.describe()
    return {"profile": profile, "peer": args.peer, "testbed": testbed, "rows": rows, "summary": summarize(rows)}


class CatalogWatch:
    """The latest catalog epoch a node published (the bench waits for it after seeding)."""

    def __init__(self, broker: BrokerAddress, node: str) -> None:
        import threading

        from mesh.bus import MqttBus

        self.epoch = -1
        self._cond = threading.Condition()
        self._bus = MqttBus(f"bench-catalog-{node}-{int(time.time() * 1000) % 10**6}", broker)
        self._bus.subscribe(topics.node_catalog(node), self._on_catalog)

    def _on_catalog(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            env = wire.decode(payload)
        except ProtocolError:
            return
        with self._cond:
            self.epoch = max(self.epoch, int(env.body.get("epoch", -1)))
            self._cond.notify_all()

    def wait_newer(self, epoch: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.epoch > epoch, timeout)

    def __enter__(self) -> "CatalogWatch":
        self._bus.start(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._bus.stop()


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(kind: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["kind"] == kind]

    miss, hit = pick("miss", "ttft_s"), pick("hit", "ttft_s")
    pmiss, part = pick("partial-miss", "ttft_s"), pick("partial", "ttft_s")
    hits = [r for r in rows if r["kind"] == "hit"]
    pairs = [(a, b) for a, b in zip([r for r in rows if r["kind"] == "miss"], hits)]
    ppairs = list(zip([r for r in rows if r["kind"] == "partial-miss"], [r for r in rows if r["kind"] == "partial"]))
    out = {
        "questions": len(hits),
        "ttft_miss_s": _mean(miss), "ttft_hit_s": _mean(hit),
        "ttlt_miss_s": _mean(pick("miss", "ttlt_s")), "ttlt_hit_s": _mean(pick("hit", "ttlt_s")),
        "ttft_partial_miss_s": _mean(pmiss), "ttft_partial_s": _mean(part),
        "hit_decisions": {d: sum((r["cache"] or {}).get("decision") == d for r in hits)
                          for d in ("remote", "recompute", "local", "no-match")},
        "partial_decisions": {d: sum((r["cache"] or {}).get("decision") == d for r in rows if r["kind"] == "partial")
                              for d in ("remote", "recompute", "local", "no-match")},
        "fetch_bytes_mean": _mean([(r["cache"] or {}).get("fetch_bytes", 0) for r in hits]),
        "fetch_s_mean": _mean([(r["cache"] or {}).get("fetch_s", 0.0) for r in hits]),
        "identical_answers": sum(a["token_ids"] == b["token_ids"] for a, b in pairs),
        "prompt_tokens_mean": _mean([float(r["prompt_tokens"]) for r in hits]),
        # never slower than no cache: the worst per-question ratio, cache over no cache
        "worst_hit_over_miss_ttft": max((b["ttft_s"] / a["ttft_s"] for a, b in pairs), default=None),
    }
    out["paired_ttft_hit_minus_miss"] = _paired([b["ttft_s"] - a["ttft_s"] for a, b in pairs])
    out["paired_ttft_partial_minus_miss"] = _paired([b["ttft_s"] - a["ttft_s"] for a, b in ppairs])
    out["identical_partial_answers"] = sum(a["token_ids"] == b["token_ids"] for a, b in ppairs)
    out["lookup_s_median"] = _median([(r["cache"] or {}).get("lookup_s") for r in rows
                                      if r["kind"] in ("hit", "partial")])
    out["ttft_median_miss_s"] = _median(miss)
    out["ttft_median_hit_s"] = _median(hit)
    out["ttft_change_pct"] = _pct(out["ttft_hit_s"], out["ttft_miss_s"])
    out["ttlt_change_pct"] = _pct(out["ttlt_hit_s"], out["ttlt_miss_s"])
    out["partial_ttft_change_pct"] = _pct(out["ttft_partial_s"], out["ttft_partial_miss_s"])
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    labels = ["peer's prompt\n(no cache)", "peer's prompt\n(cache)", "same subject\n(no cache)", "same subject\n(cache)"]
    for ax, res in zip(axes[0], results):
        s = res["summary"]
        ttft = [s["ttft_miss_s"], s["ttft_hit_s"], s["ttft_partial_miss_s"], s["ttft_partial_s"]]
        ax.bar(labels, [v or 0 for v in ttft], color=["#999", "#2a7", "#999", "#2a7"])
        for i, v in enumerate(ttft):
            ax.text(i, (v or 0), f"{v or 0:.2f}s", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{res['profile']}: TTFT (mean of {s['questions']})")
        ax.set_ylabel("seconds")
    save_figure(fig, path)


def bench_cache(args: argparse.Namespace) -> int:
    console = Console(width=None if Console().is_terminal else 140)
    if args.stream:
        return bench_stream(args, console)
    data = mmlu_dir(mesh_home(args))
    subjects = tuple(args.subjects) if args.subjects else mmlu.DEFAULT_SUBJECTS[: args.questions]
    full = mmlu.sample(data, subjects, per_subject=1, offset=0)
    part = mmlu.sample(data, subjects, per_subject=1, offset=1)
    items = list(zip(full, part))[: args.questions]
    results = [run_profile(p, items, args, console) for p in args.profiles.split(",")]
    table = Table(title="Prompt cache on emulated devices (TTFT/TTLT means, seconds)")
    for col in ("profile", "questions", "prompt tok", "TTFT miss", "TTFT hit", "change", "TTLT miss", "TTLT hit",
                "partial miss", "partial", "hit decisions", "worst hit/miss"):
        table.add_column(col)
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for res in results:
        s = res["summary"]
        table.add_row(res["profile"], str(s["questions"]), fmt(s["prompt_tokens_mean"], 0), fmt(s["ttft_miss_s"]),
                      fmt(s["ttft_hit_s"]), f"{s['ttft_change_pct']}%", fmt(s["ttlt_miss_s"]), fmt(s["ttlt_hit_s"]),
                      fmt(s["ttft_partial_miss_s"]), fmt(s["ttft_partial_s"]),
                      " ".join(f"{k}:{v}" for k, v in s["hit_decisions"].items() if v), fmt(s["worst_hit_over_miss_ttft"], 2))
    console.print(table)
    console.print(f"paper (Pi Zero 2W, Gemma-3 270M): TTFT {PAPER['ttft_miss_s']} -> {PAPER['ttft_hit_s']} s "
                  f"({PAPER['ttft_change_pct']}%), TTLT {PAPER['ttlt_miss_s']} -> {PAPER['ttlt_hit_s']} s "
                  f"({PAPER['ttlt_change_pct']}%); Pi 5 with its cache: {PAPER['pi5_change_pct']:+}%")
    out = {"bench": "cache", "model": args.model, "kv_wire": args.kv_wire, "broker": args.broker, "peer": args.peer,
           "tokens": args.tokens, "paper": PAPER, "results": results}
    write_results(out, args.json, lambda path: plot(results, path), args.plot, console)
    return 0


def bench_stream(args: argparse.Namespace, console: Console) -> int:
    from nodes.bench_stream import print_stream, run_stream

    results = [run_stream(p, args, console) for p in args.profiles.split(",")]
    print_stream(results, console)
    out = {"bench": "cache-stream", "model": args.model, "kv_wire": args.kv_wire, "broker": args.broker,
           "tokens": args.tokens, "results": results}
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


def add_bench_cache(sub: Any) -> None:
    p = sub.add_parser("cache", help="the prompt cache on emulated Pi devices (testbed, root)")
    p.add_argument("--profiles", default="pi-zero-2w,pi5", help="comma-separated device profiles")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--questions", type=int, default=4, help="MMLU subjects, one full-hit and one partial question each")
    p.add_argument("--subjects", nargs="*")
    p.add_argument("--tokens", type=int, default=4, help="max new tokens per answer")
    p.add_argument("--kv-wire", default="fp16", choices=["fp16", "int8", "fp32"])
    p.add_argument("--broker", default="mosquitto", choices=["mosquitto", "amqtt"])
    p.add_argument("--peer", default="device", choices=["device", "cache-box"],
                   help="pi1, which serves the KV: a device of the same profile (peer to peer), or an "
                        "unthrottled, wired cache box (the paper's setup)")
    p.add_argument("--instance", type=int, default=1, help="testbed instance to use")
    p.add_argument("--alternate", action=argparse.BooleanOptionalAction, default=True,
                   help="alternate which of each no-cache/cache pair is asked first (default on)")
    p.add_argument("--stream", action="store_true",
                   help="a stream of k-shot asks (--shots, --per-subject), each with and without the cache")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--per-subject", type=int, default=5)
    p.add_argument("--nodes", type=int, default=4, help="--stream: nodes in the mesh")
    p.add_argument("--seed", type=int, default=1, help="--stream: shuffle of the asks")
    p.add_argument("--home", help="models and data (default ~/.cache/mesh)")
    p.add_argument("--json", default="out/bench-cache.json")
    p.add_argument("--plot", default="out/bench-cache.png")
    p.set_defaults(func=bench_cache)
