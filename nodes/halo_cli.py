"""HALO commands for the `mesh` CLI: `coordinator`, `halo train-predictor`, `bench halo`, and the
`--roles` flag of `mesh node`.

``nodes/cli.py`` registers them::

    from nodes.halo_cli import add_halo_commands, add_node_halo_arguments, halo_extensions_from_args
    add_halo_commands(sub)                        # in build_parser()
    add_node_halo_arguments(p)                    # on the `node` parser
    extensions += halo_extensions_from_args(args, config)   # in cmd_node
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mesh.halo import groups as split
from mesh.errors import ConfigError
from nodes.settings import add_broker_arguments

log = logging.getLogger(__name__)


def add_node_halo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roles", default="", help="extra roles, comma separated: worker (HALO neuron groups)")
    parser.add_argument("--halo-group-size", type=int, default=split.DEFAULT_GROUP_SIZE,
                        help="neurons per HALO group (must match the coordinator; default 64)")
    parser.add_argument("--no-answer", action="store_true",
                        help="with --roles worker: answer no asks and load no model, only the HALO groups each "
                             "plan gives this node, read from its weight file (--weights fp32, int8 or q4)")


def _roles(args: argparse.Namespace) -> list[str]:
    roles = [r.strip() for r in (getattr(args, "roles", "") or "").split(",") if r.strip()]
    unknown = set(roles) - {"worker"}
    if unknown:
        raise ConfigError(f"unknown role(s) {sorted(unknown)}: known roles: worker")
    return roles


def worker_only(args: argparse.Namespace) -> bool:
    """``--no-answer``: a worker-only node (:mod:`nodes.worker`); ConfigError without ``--roles worker``."""
    if not getattr(args, "no_answer", False):
        return False
    if "worker" not in _roles(args):
        raise ConfigError("--no-answer leaves a node nothing to do without a role: add --roles worker")
    return True


def worker_group_size(args: argparse.Namespace) -> int:
    return int(getattr(args, "halo_group_size", split.DEFAULT_GROUP_SIZE))


def worker_node_from_args(args: argparse.Namespace, node_config: Any, weights: str, extensions: list[Any],
                          capacity: int | None = None) -> Any:
    """The worker-only node of ``mesh node --roles worker --no-answer`` (not started); ``capacity``:
    the most neuron groups it may hold at once (``nodes.memory.fit_worker``; None: no bound)."""
    from mesh.auth.store import identity_dir, load_keyring
    from mesh.halo.shard import FileGroups
    from mesh.halo.worker import HaloWorker
    from mesh.model import converted_dir
    from nodes.worker import WorkerNode

    group_size = worker_group_size(args)
    keyring = load_keyring(identity_dir(node_config.home), node_config.name)
    source = FileGroups(converted_dir(node_config.home, node_config.model), node_config.model, weights, group_size)
    return WorkerNode(node_config, HaloWorker(group_size, keyring, source=source, capacity=capacity), node_config.model,
                      extensions=extensions, keyring=keyring)


def halo_extensions_from_args(args: argparse.Namespace, node_config: Any) -> list[Any]:
    roles = _roles(args)
    if "worker" not in roles:
        return []
    from mesh.auth.store import identity_dir, load_keyring
    from mesh.halo.worker import HaloWorker

    return [HaloWorker(int(getattr(args, "halo_group_size", split.DEFAULT_GROUP_SIZE)),
                       load_keyring(identity_dir(node_config.home), node_config.name))]


_WIRE = {"fp16": "float16", "fp32": "float32"}


def coordinator_config(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from mesh.config import CacheConfig
    from mesh.halo.ledger import Liveness
    from mesh.halo.placement import ReplanPolicy
    from nodes.coordinator import CoordinatorConfig
    from nodes.settings import broker_address, mesh_home, node_weights

    base = CoordinatorConfig().policy
    policy = replace(base, target_share=args.target_share, max_deadline_s=args.max_deadline_ms / 1000.0,
                     min_deadline_s=args.min_deadline_ms / 1000.0,
                     default_deadline_s=min(base.default_deadline_s, args.max_deadline_ms / 1000.0))
    return CoordinatorConfig(
        broker=broker_address(args), name=args.name, model=args.model, weights=node_weights(args), home=mesh_home(args),
        threads=args.threads or 0, group_size=args.group_size, sync=args.sync, policy=policy,
        replan=ReplanPolicy(min_interval_s=args.replan_interval), placement=args.placement,
        fallback=args.fallback, local_speed=args.local_speed, reliability_weight=args.reliability_weight,
        wire_dtype=_WIRE[args.wire], strict_timeout_s=args.strict_timeout,
        strict_resend_s=args.strict_resend, heartbeat_s=args.heartbeat,
        liveness=Liveness(factor=args.silence_factor, min_silence_s=args.min_silence),
        predictor=Path(args.predictor) if args.predictor else None,
        cache=CacheConfig(enabled=not args.no_cache),
    )


def cmd_coordinator(args: argparse.Namespace) -> int:
    from mesh.loops import work_on_main_thread
    from nodes.coordinator import Coordinator

    config = coordinator_config(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    coord = Coordinator(config)
    coord.start(work_here=True)
    print(f"coordinator {config.name} online ({coord.loaded.model_key}, sync {config.sync}) on {config.broker}",
          file=sys.stderr, flush=True)
    work_on_main_thread(coord.work, stop, coord.stop)  # the forwards on the main thread: NodeAgent.work
    return 0


def cmd_train_predictor(args: argparse.Namespace) -> int:
    import torch

    from mesh.halo import predictor as pm
    from mesh.model import load_model
    from mesh.halo.predictor import predictor_path
    from nodes.halo_data import load_split, token_windows
    from nodes.settings import mesh_home

    home = mesh_home(args)
    t0 = time.perf_counter()
    # fp32 (where setup trains it), float32 KV: transformers' numbers (tests/lm/test_model.py); the
    # predictor serves every weight format of the model (mesh.halo.predictor.same_weights)
    loaded = load_model(home, args.model, args.threads or 0, weights="fp32", kv_dtype="float32")
    layout = split.model_layout(loaded.model.config, args.group_size)
    data = load_split(home)
    length = 128
    train_w = token_windows(loaded.tokenizer, data.train, length, -(-args.pairs // length))
    held_w = token_windows(loaded.tokenizer, data.held_out, length, -(-args.held_out_pairs // length))
    t1 = time.perf_counter()
    order = None
    if args.neuron_order == "importance":
        # Groups of neurons sorted by measured importance: cold groups that are really cold.
        means = pm.neuron_importance(loaded.model, (torch.tensor([w]) for w in train_w), args.pairs)
        order = [split.neuron_order(m) for m in means]
        split.permute_neurons(loaded.model, order)
    train = pm.record_pairs(loaded.model, (torch.tensor([w]) for w in train_w), layout, args.pairs)
    held = pm.record_pairs(loaded.model, (torch.tensor([w]) for w in held_w), layout, args.held_out_pairs)
    t2 = time.perf_counter()
    predictor = pm.train_predictor(train, layout, loaded.model_key, rank=args.rank, model=loaded.model,
                                   order=order)
    t3 = time.perf_counter()
    k = max(1, layout.n_groups // 4)
    report = {"model": args.model, "model_key": loaded.model_key, "group_size": args.group_size,
              "n_groups": layout.n_groups, "rank": args.rank, "neuron_order": args.neuron_order,
              "train_pairs": train.n_pairs, "held_out_pairs": held.n_pairs, "k": k,
              **pm.evaluate(predictor, held, k), **pm.cold_share(train, held),
              "record_s": round(t2 - t1, 2), "fit_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2)}
    out = Path(args.out) if args.out else predictor_path(home, args.model, args.group_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    predictor.save(out)
    report["path"] = str(out)
    (out.with_suffix(".json")).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def cmd_bench_halo(args: argparse.Namespace) -> int:
    from nodes.bench.halo import run_bench

    return run_bench(args)


def add_halo_commands(subparsers: Any) -> None:
    """`coordinator`, `halo train-predictor` and `bench halo` (the `bench` parser is created here if
    the CLI has none yet; pass it as ``bench_parser`` otherwise via :func:`add_bench_halo`)."""
    from mesh.halo.ledger import Liveness
    from mesh.weights.formats import WEIGHT_FORMATS
    from nodes.coordinator import CoordinatorConfig

    c = CoordinatorConfig()  # the defaults, in one place
    policy, live = c.policy, Liveness()
    p = subparsers.add_parser("coordinator", help="run the HALO coordinator")
    p.add_argument("--name", default=c.name)
    p.add_argument("--model", default=c.model)
    p.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="weight format, as `mesh node --weights` picks it (MESH_WEIGHTS, [node] weights in "
                        "--config, default fp32): workers of the same format join its plans")
    p.add_argument("--home", help="converted models and data (default ~/.cache/mesh, or MESH_HOME)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--sync", choices=["strict", "relaxed"], default=c.sync,
                   help="default sync of asks (an ask may name its own with halo_sync)")
    p.add_argument("--group-size", type=int, default=c.group_size)
    p.add_argument("--target-share", type=float, default=policy.target_share,
                   help="relaxed: wait for (or compute here) the groups holding this share of predicted importance")
    p.add_argument("--max-deadline-ms", type=float, default=policy.max_deadline_s * 1000.0,
                   help="relaxed: cap of the layer deadline")
    p.add_argument("--min-deadline-ms", type=float, default=policy.min_deadline_s * 1000.0,
                   help="relaxed: floor of the layer deadline")
    p.add_argument("--placement", choices=["importance", "random"], default=c.placement)
    p.add_argument("--fallback", choices=["important", "none"], default=c.fallback,
                   help="relaxed: compute late predicted-important groups here (none: count them as zero)")
    p.add_argument("--reliability-weight", type=float, default=c.reliability_weight,
                   help="worker shares ~ speed x reliability^W (0: by speed only, the TP baseline)")
    p.add_argument("--local-speed", type=float, default=c.local_speed,
                   help="neuron-rows/s the coordinator computes itself (0: every group on workers)")
    p.add_argument("--wire", choices=list(_WIRE), default={v: k for k, v in _WIRE.items()}[c.wire_dtype],
                   help="dtype of MLP inputs on the wire")
    p.add_argument("--strict-timeout", type=float, default=c.strict_timeout_s,
                   help="strict: after this many seconds compute a silent worker's groups here (stays exact)")
    p.add_argument("--strict-resend", type=float, default=c.strict_resend_s,
                   help="strict: send a step's input again to workers that have not answered, this often (s)")
    p.add_argument("--silence-factor", type=float, default=live.factor,
                   help="a worker silent for this many of its heartbeat periods counts as gone")
    p.add_argument("--min-silence", type=float, default=live.min_silence_s,
                   help="seconds of silence before a worker counts as gone")
    p.add_argument("--replan-interval", type=float, default=c.replan.min_interval_s,
                   help="seconds between drift re-plans")
    p.add_argument("--heartbeat", type=float, default=c.heartbeat_s)
    p.add_argument("--predictor", help="predictor file (default: the trained one next to the model)")
    p.add_argument("--no-cache", action="store_true", help="no prompt cache")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_coordinator)

    halo = subparsers.add_parser("halo", help="HALO tools")
    hsub = halo.add_subparsers(dest="halo_command", required=True)
    p = hsub.add_parser("train-predictor", help="train the importance predictor on Wikipedia text")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--home")
    p.add_argument("--group-size", type=int, default=split.DEFAULT_GROUP_SIZE)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--pairs", type=int, default=4096, help="training tokens")
    p.add_argument("--held-out-pairs", type=int, default=1024)
    p.add_argument("--neuron-order", choices=("importance", "model"), default="importance",
                   help="cut groups from neurons sorted by measured importance (default) or in the model's order")
    p.add_argument("--out", help="predictor file (default: next to the model, where the coordinator looks)")
    p.add_argument("--threads", type=int)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train_predictor)

    bench = subparsers.choices.get("bench") or subparsers.add_parser("bench", help="benchmarks")
    add_bench_halo(bench)


def add_bench_halo(bench_parser: argparse.ArgumentParser) -> None:
    from nodes.coordinator import CoordinatorConfig

    bsub = next((a for a in bench_parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if bsub is None:
        bsub = bench_parser.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("halo", help="HALO on the testbed: strict vs relaxed under loss")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--home")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--lossy-workers", type=int, default=1)
    p.add_argument("--loss", default="0,1,2,5,10", help="loss percentages on the lossy workers")
    p.add_argument("--profile", default="native", help="testbed device profile (native, pi5, pi-zero-2w)")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per timed generation")
    p.add_argument("--reps", type=int, default=3, help="strict/relaxed generations per loss rate (alternating)")
    # 200 questions: one changed answer is 0.5 point, so "within 1 point" is resolvable (at 12 or
    # 60 one answer was 8 or 1.7 points); 512 tokens: one window, 496 scored positions.
    p.add_argument("--ppl-tokens", type=int, default=512, help="held-out tokens for perplexity/agreement")
    p.add_argument("--mmlu", type=int, default=200, help="MMLU questions (fixed sample, 1-shot)")
    p.add_argument("--no-ablation", action="store_true", help="skip the random-placement ablation")
    p.add_argument("--local-speed", type=float, default=CoordinatorConfig().local_speed,
                   help="the coordinator's --local-speed (neuron-rows/s it computes itself; 0: none)")
    p.add_argument("--target-share", type=float,
                   help="the coordinator's --target-share (default: the coordinator's own default)")
    p.add_argument("--ablation-reps", type=int, default=2,
                   help="ablation rounds (each: one generation and one quality run per placement, alternating)")
    p.add_argument("--broker-kind", default="mosquitto", choices=["mosquitto", "amqtt"])
    p.add_argument("--json", default="out/bench-halo.json")
    p.add_argument("--plot", default="out/bench-halo.png")
    p.set_defaults(func=cmd_bench_halo)
