"""The ``mesh testbed up|down|status|throttle|calibrate`` commands, and ``python -m nodes.testbed``
(the same commands plus ``probe`` and ``linkprobe``, which the testbed runs inside namespaces).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from mesh.errors import ConfigError, MeshError
from mesh.model import converted_dir
from nodes.settings import mesh_home
from nodes.testbed.bed import Testbed, identity_parts, throttle
from nodes.testbed.calibrate import (
    calibrate,
    calibration_dir,
    load_profile,
    save_calibration,
)
from nodes.testbed.plan import BROKER_KINDS
from nodes.testbed.probes import run_linkprobe, run_probe
from nodes.testbed.profiles import PROFILE_NAMES
from nodes.testbed.spec import MAX_INSTANCE, make_spec, parse_loss
from nodes.testbed.state import DEFAULT_RUN_DIR, status, teardown


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else calibration_dir(mesh_home(args))


def cmd_up(args: argparse.Namespace) -> int:
    prof, cal = load_profile(_cache_dir(args), args.profile)
    if not prof.calibrated:
        print(f"warning: profile {prof.name} is not calibrated (run `mesh testbed calibrate --profile "
              f"pi-zero-2w`); using {prof.cpu}", file=sys.stderr)
    if args.mem_cap_mib is not None and args.mem_cap_mib != prof.mem_cap_mib:
        print(f"note: memory cap {args.mem_cap_mib} MiB overrides {prof.name}'s {prof.mem_cap_mib} MiB",
              file=sys.stderr)
    spec = make_spec(args.nodes, prof, link_mbit=args.link_mbit, loss=parse_loss(args.loss or []),
                     instance=args.instance, mem_cap_mib=args.mem_cap_mib)
    tb = Testbed(spec, run_dir=Path(args.run_dir), detached=True, calibration=cal)
    tb.up()
    try:
        tb.start_broker(args.broker)
        if not args.no_nodes:
            # each node its own copy of the weights, so its cap counts their page cache
            private = None if args.shared_weights else mesh_home(args)
            if args.load_unthrottled:
                for n in spec.names:
                    tb.set_cpu(n, None)
                    home = [] if private is None else ["--home", str(tb.private_home(
                        n, private, [f"models/{args.model}", *identity_parts(private, n)]))]
                    tb.start_node(n, args.model, extra=home)
            else:
                tb.start_nodes(args.model, private_from=private)
    except BaseException:
        tb.down()
        raise
    print(json.dumps(tb.describe(), indent=2))
    if args.load_unthrottled and any(n.cpu for n in spec.nodes):
        print(f"nodes run unthrottled: `mesh testbed throttle --on --instance {spec.instance}` once they"
              " are ready", file=sys.stderr)
    return 0


def cmd_throttle(args: argparse.Namespace) -> int:
    names = throttle(args.instance, args.node, on=args.on, run_dir=Path(args.run_dir))
    print(f"cpu quota {'on' if args.on else 'off'} for {', '.join(names)}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    report = teardown(None if args.all else args.instance, Path(args.run_dir), home=mesh_home(args))
    print(json.dumps(report, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    doc = status(Path(args.run_dir))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not doc["instances"]:
        print("no testbed is up")
    for inst in doc["instances"]:
        if "error" in inst:
            print(f"instance {inst['instance']}: {inst['error']}")
            continue
        broker = inst.get("broker") or {}
        print(f"instance {inst['instance']} (since {inst['created_at']}, broker {broker.get('kind', '-')} "
              f"{broker.get('host', '')}:{broker.get('port', '')})")
        for n in inst["spec"]["nodes"]:
            cpu = n["cpu"]
            share = f"{cpu['quota_us']}/{cpu['period_us']} us" if cpu else "no quota"
            print(f"  {n['name']:<12} {inst['addresses'][n['name']]:<15} {n['profile']:<11} "
                  f"link {n['link_mbit'] or '-'} Mbit/s  loss {n['loss_pct']} %  cpu {share}")
            print(f"  {'':<12} {_memory_line(n, (inst.get('memory') or {}).get(n['name']))}")
        for p in inst["processes"]:
            print(f"  pid {p['pid']:<8} {p['role']:<8} {p['node']:<12} {'up' if p['alive'] else 'DEAD'}  "
                  f"{' '.join(p['argv'])[:80]}")
    stray = doc["stray"]
    if any(stray.values()):
        print(f"stray objects (remove with `mesh testbed down --all`): {stray}")
    return 0


def _memory_line(node: dict[str, Any], mem: dict[str, Any] | None) -> str:
    """``mem 212.3 MiB (peak 380.1) of 400 cap: anon 150.2, cache 62.1 (mapped 40.0); 12 major
    faults, 0 OOM kills`` for one node of ``status``."""
    cap = node.get("mem_cap_mib")
    override = " (override)" if cap != node.get("profile_mem_cap_mib") else ""
    if mem is None:
        return f"mem: no cgroup; cap {cap or 'none'}{override}"
    return (f"mem {mem['usage_mib']} MiB (peak {mem['peak_mib']}) of {f'{cap} MiB cap' if cap else 'no cap'}"
            f"{override}: anon {mem['anon_mib']}, cache {mem['file_mib']} (mapped {mem['mapped_mib']});"
            f" {mem['major_faults']} major faults, {mem['oom_kills']} OOM kills")


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.profile != "pi-zero-2w":
        raise ConfigError(f"only pi-zero-2w has a CPU quota to calibrate (pi4-2gb derives its own from it),"
                          f" not {args.profile}")
    cal = calibrate(
        profile=args.profile,
        model=args.model,
        tokens=args.tokens,
        target_s=args.target_s,
        period_us=int(args.period_ms * 1000),
        repeats=args.repeats,
        max_trials=args.max_trials,
        model_dir=Path(args.model_dir) if args.model_dir else None,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    path = save_calibration(_cache_dir(args), cal)
    print(json.dumps(cal.to_dict() | {"file": str(path)}, indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    # the model where every mesh process looks for it: --model-dir, else under --home / MESH_HOME
    model_dir = Path(args.model_dir) if args.model_dir else converted_dir(mesh_home(args), args.model)
    return run_probe(args.model, args.tokens, model_dir=model_dir, threads=args.threads, serve=args.serve,
                     out=sys.stdout)


def cmd_linkprobe(args: argparse.Namespace) -> int:
    return run_linkprobe(args.broker, name=args.name, count=args.count, interval_s=args.interval_ms / 1000,
                         late_s=args.late_ms / 1000, timeout_s=args.timeout_ms / 1000,
                         transfer_bytes=args.transfer_bytes, transfers=args.transfers, out=sys.stdout)


def _add_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="state and logs (default %(default)s)")

    up = sub.add_parser("up", help="bring a testbed up: namespaces, links, broker and nodes")
    up.add_argument("--nodes", type=int, required=True, help="number of nodes (pi1..piK)")
    up.add_argument("--profile", choices=PROFILE_NAMES, default="native")
    up.add_argument("--link-mbit", type=float, default=None, help="override the profile's link rate")
    up.add_argument("--mem-cap-mib", type=int, default=None,
                    help="override the profile's memory cap per node (recorded as an override)")
    up.add_argument("--loss", action="append", metavar="NODE=PCT", help="random drop per direction, repeatable")
    up.add_argument("--broker", choices=BROKER_KINDS, default="amqtt")
    up.add_argument("--model", default="gemma3-270m")
    up.add_argument("--instance", type=int, default=0, choices=range(0, MAX_INSTANCE), metavar="0..98")
    up.add_argument("--no-nodes", action="store_true", help="only the network and the broker")
    up.add_argument("--shared-weights", action="store_true",
                    help="nodes read the model from the mesh home instead of their own copy (saves disk;"
                         " the weights' page cache is then not charged to the nodes' memory caps)")
    up.add_argument("--cache-dir", default=None, help="calibration cache (default <mesh home>/testbed)")
    up.add_argument("--load-unthrottled", action="store_true",
                    help="start nodes without their CPU quota (model loading); apply it with `throttle --on`")
    common(up)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove a testbed (also after a crash); idempotent")
    down.add_argument("--instance", type=int, default=0)
    down.add_argument("--all", action="store_true", help="every instance and calibration leftover")
    common(down)
    down.set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="show what is up")
    st.add_argument("--json", action="store_true")
    common(st)
    st.set_defaults(func=cmd_status)

    thr = sub.add_parser("throttle", help="apply or lift the profile's CPU quota of running nodes")
    thr.add_argument("--instance", type=int, default=0)
    thr.add_argument("--node", action="append", help="a node (repeatable; default: all)")
    onoff = thr.add_mutually_exclusive_group(required=True)
    onoff.add_argument("--on", action="store_true")
    onoff.add_argument("--off", action="store_true")
    common(thr)
    thr.set_defaults(func=cmd_throttle)

    cal = sub.add_parser("calibrate", help="measure the CPU quota of a device profile")
    cal.add_argument("--profile", choices=PROFILE_NAMES, required=True)
    cal.add_argument("--model", default="gemma3-270m", help="gemma3-270m, or loop (a CPU loop, for tests)")
    cal.add_argument("--model-dir", default=None, help="default <mesh home>/models/<model>")
    cal.add_argument("--tokens", type=int, default=65)
    cal.add_argument("--target-s", type=float, default=12.6)
    cal.add_argument("--period-ms", type=float, default=1000.0)
    cal.add_argument("--repeats", type=int, default=3)
    cal.add_argument("--max-trials", type=int, default=8)
    cal.add_argument("--cache-dir", default=None, help="default <mesh home>/testbed")
    cal.set_defaults(func=cmd_calibrate)


def add_testbed_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``testbed up|down|status|calibrate`` on the CLI's subparsers.

    Each leaf sets ``func(args) -> int``; the CLI calls ``args.func(args)``.
    """
    tb = subparsers.add_parser("testbed", help="emulate a lossy Pi cluster on this machine (root)")
    _add_commands(tb.add_subparsers(dest="testbed_command", required=True))
    return tb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.testbed")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_commands(sub)
    probe = sub.add_parser("probe", help="time one CPU probe (model prefill or CPU loop), print JSON")
    probe.add_argument("--model", default="gemma3-270m")
    probe.add_argument("--model-dir", default=None, help="default <home>/models/<model>")
    probe.add_argument("--home", help="models and data (default ~/.cache/mesh, or MESH_HOME)")
    probe.add_argument("--tokens", type=int, default=65)
    probe.add_argument("--threads", type=int, default=1)
    probe.add_argument("--serve", action="store_true", help="answer `run` lines on stdin")
    probe.set_defaults(func=cmd_probe)
    lp = sub.add_parser("linkprobe", help="MQTT pings and transfers through the broker, print JSON")
    lp.add_argument("--broker", required=True, help="HOST:PORT")
    lp.add_argument("--name", default="probe")
    lp.add_argument("--count", type=int, default=200)
    lp.add_argument("--interval-ms", type=float, default=20.0)
    lp.add_argument("--late-ms", type=float, default=50.0)
    lp.add_argument("--timeout-ms", type=float, default=2000.0)
    lp.add_argument("--transfer-bytes", type=int, default=0)
    lp.add_argument("--transfers", type=int, default=0)
    lp.set_defaults(func=cmd_linkprobe)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MeshError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

