"""`mesh bench cache`: the paper's table (arXiv 2602.22812) on emulated devices, side by side.

For each device profile a testbed comes up with a seeding node (pi1, which computes) and three
asking nodes (pi2-pi4), same profile: real TCP through tbf-shaped links, CPU quotas from the
calibration. Questions are MMLU k-shot (``--shots``, default 1), at most 256 words, drawn from
all 57 subjects in a shuffled order (``--seed``). Per question group (one subject) three test
questions are asked, one per case, each on its own asking node and each also with
``--no-cache`` on that same node (the miss, its pair):

- ``instruction``: pi1 first answered a prompt with the same instruction header but other
  examples, so only the instruction's chunks can come from a peer;
- ``examples``: pi1 answered another question with the same header and examples: the shared
  instruction plus examples can come from a peer;
- ``full``: pi1 answered this very prompt: a full hit (KV and first-token logits).

Each case runs on a different asker because an asker keeps what it computed: the next case's
prompt would otherwise be a local hit, not the case it stands for. The seeding pi1 runs
unthrottled while it seeds (setup only). Every ask's TTFT/TTLT (measured by the asking client)
is split into the node's tokenize, catalog (lookup), fetch, prefill (restore and forward) and
decode times, and "mesh" (queue, broker and links: the rest). The JSON carries every ask, the
per-case medians (``cases``), the paper's figures (``ttft_reduction_full_hit``, ...), whether
every cached answer equals its no-cache pair, lookups and wasted fetches; the PNG is the
paper's table as stacked bars.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
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

from mesh import topics, wire
from mesh.config import BrokerAddress
from mesh.errors import ProtocolError
from nodes import mmlu
from nodes.bench.report import pyplot, save_figure, write_results
from nodes.bench.stats import mean, median
from nodes.client import MeshClient
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir
from nodes.testbed.profiles import device_profile
from nodes.testbed.spec import make_spec

PAPER = {"ttft_miss_s": 12.59, "ttft_hit_s": 0.87, "ttft_change_pct": -93.12,
         "ttlt_miss_s": 23.74, "ttlt_hit_s": 11.86, "ttlt_change_pct": -50.07, "pi5_change_pct": +7.0}


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


CASES = ("instruction", "examples", "full")
ASKERS = ("pi2", "pi3", "pi4")
PHASES = ("mesh", "tokenize", "catalog", "fetch", "prefill", "decode")


@dataclass(frozen=True)
class Group:
    """One subject's three case prompts and what pi1 computes before each (its seed)."""

    subject: str
    prompts: dict[str, str]  # case -> the prompt the asker sends
    seeds: dict[str, str]  # case -> the prompt pi1 answers first


def groups(data_dir: Path, n: int, shots: int, seed: int, subjects: Sequence[str] | None = None) -> list[Group]:
    """``n`` question groups over all subjects (shuffled), each from one subject's test split."""
    names = list(subjects) if subjects else mmlu.subjects(data_dir)
    random.Random(seed).shuffle(names)
    out: list[Group] = []
    for i in range(n):
        subject, rnd = names[i % len(names)], i // len(names)
        dev = mmlu.read_split(data_dir, subject, "dev")
        if not 2 <= len(dev) or shots > len(dev):
            raise ValueError(f"{subject}: {len(dev)} dev questions for {shots}-shot")
        examples = dev[:shots]
        other_examples = (dev[1:] + dev[:1])[:shots]  # another first example: shares only the header
        tests = [q for q in mmlu.read_split(data_dir, subject, "test") if mmlu.word_count(q) <= 256]
        picked = tests[4 * rnd:4 * rnd + 4]
        if len(picked) < 4:
            raise ValueError(f"{subject}: too few test questions of at most 256 words for group {i}")
        *qs, other = picked
        prompts = {c: mmlu.few_shot_prompt(examples, q) for c, q in zip(CASES, qs)}
        seeds = {"instruction": mmlu.few_shot_prompt(other_examples, other),
                 "examples": mmlu.few_shot_prompt(examples, other), "full": prompts["full"]}
        out.append(Group(subject, prompts, seeds))
    return out


def phases(r: Any) -> dict[str, float]:
    """An ask's TTFT/TTLT cut into the node's own timings and the rest ("mesh": queue, broker,
    links). ``fetch`` is the transfer; when a peer's logits gave the first token early, the
    rest of the transfer ran during decode and is taken out of it."""
    f, c = r.node_figures, r.node_figures.get("cache") or {}
    tokenize, catalog, fetch = float(f.get("tokenize_s", 0.0)), float(c.get("lookup_s", 0.0)), float(c.get("fetch_s", 0.0))
    prefill_all, decode_all = float(f.get("prefill_s", 0.0)), float(f.get("decode_s", 0.0))
    early = c.get("first_token") == "peer-logits"
    prefill = max(prefill_all - catalog - (0.0 if early else fetch), 0.0)
    decode = max(decode_all - (fetch if early else 0.0), 0.0)
    mesh_ttft = max(r.ttft_s - tokenize - prefill_all, 0.0)
    return {"mesh": mesh_ttft + max(r.ttlt_s - r.ttft_s - decode_all, 0.0), "mesh_ttft": mesh_ttft,
            "tokenize": tokenize, "catalog": catalog, "fetch": fetch, "fetch_ttft": 0.0 if early else fetch,
            "prefill": prefill, "decode": decode}


def run_profile(profile: str, items: list[Group], args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from nodes.testbed.bed import Testbed
    from nodes.testbed.calibrate import calibration_dir, load_calibration

    cal = load_calibration(calibration_dir(mesh_home(args)), profile) if profile == "pi-zero-2w" else None
    prof = device_profile(profile, cal)
    spec = make_spec(1 + len(ASKERS), prof, instance=args.instance)
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

            def ask(case: str, node: str, prompt: str, group: int, subject: str, no_cache: bool) -> None:
                r = client.ask(prompt, node=node, max_new_tokens=args.tokens, stop=("\n",), no_cache=no_cache,
                               timeout=900)
                rows.append({"profile": profile, "case": case, "group": group, "node": node, "subject": subject,
                             "no_cache": no_cache, "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens,
                             "ttft_s": r.ttft_s, "ttlt_s": r.ttlt_s, "phases": phases(r), "answer": r.answer,
                             "token_ids": r.node_figures.get("token_ids"), "cache": r.node_figures.get("cache")})

            def seed(prompt: str, group: int, subject: str) -> None:
                tb.set_cpu("pi1", None)  # setup only: pi1 computes what the asker may reuse
                epoch = catalogs.epoch
                ask("seed", "pi1", prompt, group, subject, False)
                catalogs.wait_newer(epoch, timeout=30.0)  # pi1 advertised it...
                time.sleep(1.0)  # ...the askers have read the catalog, and pi1's work after the answer is done
                if args.peer == "device":
                    tb.restore_cpu("pi1")

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(profile, total=len(items))
                for i, g in enumerate(items):
                    progress.update(task, description=f"{profile}: {g.subject[:28]}")
                    askers = ASKERS[i % len(ASKERS):] + ASKERS[:i % len(ASKERS)]  # each node plays every case
                    for k, (case, node) in enumerate(zip(CASES, askers)):
                        # Pairs alternate which of miss/cache goes first, so warm-up order favours neither.
                        miss_first = (i + k) % 2 == 0 or not args.alternate
                        if miss_first:
                            ask(f"{case}-miss", node, g.prompts[case], i, g.subject, True)
                        seed(g.seeds[case], i, g.subject)
                        ask(case, node, g.prompts[case], i, g.subject, False)
                        if not miss_first:
                            ask(f"{case}-miss", node, g.prompts[case], i, g.subject, True)
                    progress.advance(task)
        testbed = tb.describe()
    return {"profile": profile, "peer": args.peer, "testbed": testbed, "rows": rows, **summarize(rows)}


class CatalogWatch:
    """The latest catalog epoch a node published (the bench waits for it after seeding)."""

    def __init__(self, broker: BrokerAddress, node: str) -> None:
        import threading

        from mesh.mqtt.bus import MqttBus

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
    """Per case: medians of TTFT, TTLT and each phase, paired with the same prompt's miss on the
    same node (the pair's difference, its sign test); the paper's reductions for the full hit."""
    cases: dict[str, Any] = {}
    pairs_all: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for case in ("miss", *CASES):
        if case == "miss":
            got = [r for r in rows if r["case"].endswith("-miss")]
            pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        else:
            got = [r for r in rows if r["case"] == case]
            misses = {r["group"]: r for r in rows if r["case"] == f"{case}-miss"}
            pairs = [(misses[r["group"]], r) for r in got if r["group"] in misses]
            pairs_all += pairs
        entry: dict[str, Any] = {
            "n": len(got), "ttft_s_median": median([r["ttft_s"] for r in got]),
            "ttlt_s_median": median([r["ttlt_s"] for r in got]),
            "ttft_s_mean": mean([r["ttft_s"] for r in got]), "ttlt_s_mean": mean([r["ttlt_s"] for r in got]),
            "prompt_tokens_median": median([r["prompt_tokens"] for r in got]),
            "phases_s_median": {ph: median([_phase(r, ph) for r in got]) for ph in (*PHASES, "mesh_ttft", "fetch_ttft")},
        }
        if case != "miss":
            entry.update(
                decisions={d: sum((r["cache"] or {}).get("decision") == d for r in got)
                           for d in ("local", "remote", "recompute", "no-match")},
                reused_tokens_median=median([(r["cache"] or {}).get("local_tokens", 0)
                                              + (r["cache"] or {}).get("remote_tokens", 0) for r in got]),
                fetch_bytes_median=median([(r["cache"] or {}).get("fetch_bytes", 0) for r in got]),
                paired_ttft_minus_miss=_paired([b["ttft_s"] - a["ttft_s"] for a, b in pairs]),
                paired_ttlt_minus_miss=_paired([b["ttlt_s"] - a["ttlt_s"] for a, b in pairs]),
                ttft_reduction_median_pct=_reduction(pairs, "ttft_s"),
                ttlt_reduction_median_pct=_reduction(pairs, "ttlt_s"),
                worst_ttft_over_miss=max((b["ttft_s"] / a["ttft_s"] for a, b in pairs), default=None),
                identical=sum(a["token_ids"] == b["token_ids"] for a, b in pairs),
            )
        cases[case] = entry
    cached = [r for r in rows if r["case"] in CASES]
    wasted = [r for r in cached if (r["cache"] or {}).get("wasted")]
    full = cases["full"]
    return {
        "questions": full["n"], "cases": cases,
        # the paper's figures: the full hit's median TTFT/TTLT against the miss, in percent
        "ttft_reduction_full_hit": full["ttft_reduction_median_pct"],
        "ttlt_reduction_full_hit": full["ttlt_reduction_median_pct"],
        "identical_outputs": bool(pairs_all) and all(a["token_ids"] == b["token_ids"] for a, b in pairs_all),
        "lookups": len(cached), "fetches": sum((r["cache"] or {}).get("decision") == "remote" for r in cached),
        "wasted_fetches": len(wasted), "wasted": [(r["cache"] or {}).get("wasted") for r in wasted],
        "fetch_bytes_total": sum(int((r["cache"] or {}).get("fetch_bytes", 0)) for r in cached),
        # never slower than no cache: per case, the pairs where the cache lost and by how much
        "cache_slower_pairs": {c: (cases[c]["paired_ttft_minus_miss"] or {}).get("cache_slower") for c in CASES},
    }


def _phase(row: dict[str, Any], name: str) -> float:
    """A phase of a row; ``fetch_ttft`` (the fetch before the first token) for older rows too."""
    if name == "fetch_ttft" and name not in row["phases"]:
        early = (row["cache"] or {}).get("first_token") == "peer-logits"
        return 0.0 if early else row["phases"]["fetch"]
    return float(row["phases"][name])


def _reduction(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> float | None:
    """Median over pairs of the per-prompt reduction (miss - cache) / miss, in percent."""
    got = [100.0 * (a[key] - b[key]) / a[key] for a, b in pairs if a[key] > 0]
    return round(statistics.median(got), 2) if got else None


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """The paper's table as bars: per case the median TTFT and TTLT, stacked by phase."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 4.8), squeeze=False)
    colors = {"mesh": "#bbb", "tokenize": "#e9c46a", "catalog": "#f4a261", "fetch": "#2a9d8f",
              "prefill": "#e76f51", "decode": "#264653"}
    for ax, res in zip(axes[0], results):
        names = ["miss", *CASES]
        for j, metric in enumerate(("TTFT", "TTLT")):
            xs = [i * 2.6 + j for i in range(len(names))]
            bottom = [0.0] * len(names)
            for ph in PHASES:
                if metric == "TTFT" and ph == "decode":
                    continue
                key = f"{ph}_ttft" if (metric == "TTFT" and ph in ("mesh", "fetch")) else ph
                vals = [res["cases"][c]["phases_s_median"][key] or 0.0 for c in names]
                ax.bar(xs, vals, bottom=bottom, color=colors[ph], width=0.9, label=ph if metric == "TTLT" else None)
                bottom = [b + v for b, v in zip(bottom, vals)]
            for x, c in zip(xs, names):
                v = res["cases"][c][f"{metric.lower()}_s_median"] or 0.0
                ax.text(x, v, f"{metric}\n{v:.2f}s", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i * 2.6 + 0.5 for i in range(len(names))],
                      [f"{c}\n(n={res['cases'][c]['n']})" for c in names])
        ax.set_ylabel("seconds (medians; phases stacked)")
        full = res["ttft_reduction_full_hit"]
        ax.set_title(f"{res['profile']}: full hit TTFT -{full or 0:.1f} %, TTLT -{res['ttlt_reduction_full_hit'] or 0:.1f} %")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def bench_cache(args: argparse.Namespace) -> int:
    console = Console(width=None if Console().is_terminal else 140)
    if args.stream:
        return bench_stream(args, console)
    items = groups(mmlu_dir(mesh_home(args)), args.questions, args.shots or 1, args.seed,
                   args.subjects)
    results = [run_profile(p, items, args, console) for p in args.profiles.split(",")]
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for res in results:
        table = Table(title=f"{res['profile']}: prompt cache, {res['questions']} prompts per case (medians, s)")
        for col in ("case", "n", "TTFT", "TTLT", *PHASES, "decisions", "cache - miss TTFT (median, slower/n)",
                    "identical"):
            table.add_column(col)
        for case, e in res["cases"].items():
            paired = e.get("paired_ttft_minus_miss") or {}
            table.add_row(case, str(e["n"]), fmt(e["ttft_s_median"]), fmt(e["ttlt_s_median"]),
                          *(fmt(e["phases_s_median"][ph]) for ph in PHASES),
                          " ".join(f"{k}:{v}" for k, v in (e.get("decisions") or {}).items() if v),
                          f"{fmt(paired.get('median_s'))} ({paired.get('cache_slower')}/{paired.get('n')})" if paired else "",
                          str(e.get("identical", "")))
        console.print(table)
        console.print(f"full hit: TTFT -{res['ttft_reduction_full_hit']} %, TTLT -{res['ttlt_reduction_full_hit']} %; "
                      f"identical outputs {res['identical_outputs']}; wasted fetches {res['wasted_fetches']}"
                      f"/{res['lookups']} lookups")
    console.print(f"paper (Pi Zero 2W, Gemma-3 270M): TTFT {PAPER['ttft_miss_s']} -> {PAPER['ttft_hit_s']} s "
                  f"({PAPER['ttft_change_pct']}%), TTLT {PAPER['ttlt_miss_s']} -> {PAPER['ttlt_hit_s']} s "
                  f"({PAPER['ttlt_change_pct']}%); Pi 5 with its cache: {PAPER['pi5_change_pct']:+}%")
    out: dict[str, Any] = {"bench": "cache", "model": args.model, "kv_wire": args.kv_wire, "broker": args.broker,
                           "peer": args.peer, "shots": args.shots or 1, "tokens": args.tokens, "seed": args.seed,
                           "paper": PAPER}
    if len(results) == 1:  # one profile: its figures at the top level
        out.update({k: v for k, v in results[0].items() if k != "rows"}, rows=results[0]["rows"])
    out["results"] = results
    write_results(out, args.json, lambda path: plot(results, path), args.plot, console)
    return 0


def bench_stream(args: argparse.Namespace, console: Console) -> int:
    from nodes.bench.stream import print_stream, run_stream

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


def add_bench_cache(sub: Any) -> None:
    p = sub.add_parser("cache", help="the prompt cache on emulated Pi devices (testbed, root)")
    p.add_argument("--profiles", "--profile", default="pi-zero-2w,pi5", help="comma-separated device profiles")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--questions", type=int, default=8,
                   help="question groups (one subject each, all subjects in shuffled order): per group one prompt "
                        "per case, each also asked without the cache; --stream: subjects")
    p.add_argument("--subjects", nargs="*")
    p.add_argument("--tokens", "--max-new-tokens", dest="tokens", type=int, default=4, help="max new tokens per answer")
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
    p.add_argument("--shots", type=int, help="examples per prompt (default 1; --stream 5)")
    p.add_argument("--per-subject", type=int, default=5)
    p.add_argument("--nodes", type=int, default=4, help="--stream: nodes in the mesh")
    p.add_argument("--seed", type=int, default=1, help="shuffle of the subjects (--stream: of the asks)")
    p.add_argument("--home", help="models and data (default ~/.cache/mesh)")
    p.add_argument("--json", default="out/bench-cache.json")
    p.add_argument("--plot", default="out/bench-cache.png")
    p.set_defaults(func=bench_cache)
