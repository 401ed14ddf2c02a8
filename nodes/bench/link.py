"""`mesh bench link`: what real nodes report about their links at several drop rates.

A testbed with one node per drop rate (same link rate, iptables random drop on each node's link
in both directions) runs real `mesh node` processes whose link probes ping the broker; after a
settling time the heartbeats' ``link`` figures (RTT EWMA and percentiles, late and lost
fractions, bandwidth from the large probe) are collected. JSON + PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from mesh.config import BrokerAddress
from nodes.bench.report import pyplot, save_figure, write_results
from nodes.client import MeshClient, asker_keyring
from nodes.settings import mesh_home
from nodes.testbed.profiles import device_profile
from nodes.testbed.spec import make_spec


def bench_link(args: argparse.Namespace) -> int:
    from nodes.testbed.bed import Testbed

    console = Console(width=None if Console().is_terminal else 140)
    losses = [float(x) for x in args.loss.split(",")]
    names = [f"pi{i + 1}" for i in range(len(losses))]
    spec = make_spec(len(losses), device_profile("native"), link_mbit=args.link_mbit,
                     loss={n: pct for n, pct in zip(names, losses) if pct}, instance=args.instance)
    with Testbed(spec) as tb:
        tb.start_broker(args.broker)
        tb.start_nodes(args.model, extra=["--link-ping", str(args.ping), "--heartbeat", "1", "--no-cache"])
        host, port = tb.broker_address
        with MeshClient(BrokerAddress(host, port), name=f"bench-link-{spec.instance}",
                        keyring=asker_keyring(mesh_home(args))) as client, \
                Progress(console=console) as progress:
            task = progress.add_task("pinging", total=args.seconds)
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < args.seconds:
                time.sleep(1.0)
                progress.update(task, completed=min(elapsed, args.seconds))
            links = {v.name: dict(v.heartbeat.get("link", {})) for v in client.nodes() if v.online}
        testbed = tb.describe()
    rows = [{"node": n, "loss_pct": pct, **links.get(n, {})} for n, pct in zip(names, losses)]
    table = Table(title=f"Link figures from node heartbeats ({args.link_mbit} Mbit/s links, ping every {args.ping} s)")
    for col in ("drop %", "pings", "RTT ewma ms", "p50 ms", "p90 ms", "p99 ms", "late %", "lost %", "bw Mbit/s"):
        table.add_column(col, justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    num = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        table.add_row(f"{r['loss_pct']:g}", str(r.get("resolved")), num(r.get("rtt_ewma_ms")), num(r.get("rtt_p50_ms")),
                      num(r.get("rtt_p90_ms")), num(r.get("rtt_p99_ms")), pct(r.get("late_fraction")),
                      pct(r.get("loss_fraction")), num(r.get("bw_ewma_mbit")))
    console.print(table)
    out = {"bench": "link", "link_mbit": args.link_mbit, "ping_s": args.ping, "seconds": args.seconds,
           "broker": args.broker, "rows": rows, "testbed": testbed}
    write_results(out, args.json, lambda path: _plot(rows, path), args.plot, console)
    return 0


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    x = [r["loss_pct"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("rtt_p50_ms", "p50"), ("rtt_p90_ms", "p90"), ("rtt_p99_ms", "p99")):
        a.plot(x, [r.get(key) or 0 for r in rows], marker="o", label=label)
    a.set_xlabel("random drop per direction (%)")
    a.set_ylabel("round trip to broker (ms)")
    a.set_yscale("log")
    a.legend()
    b.plot(x, [100 * (r.get("late_fraction") or 0) for r in rows], marker="o", label="late")
    b.plot(x, [100 * (r.get("loss_fraction") or 0) for r in rows], marker="o", label="lost")
    b.set_xlabel("random drop per direction (%)")
    b.set_ylabel("% of pings")
    b.legend()
    save_figure(fig, path)


def add_bench_link(sub: Any) -> None:
    p = sub.add_parser("link", help="link figures of real nodes at several drop rates (testbed, root)")
    p.add_argument("--loss", default="0,1,5,10", help="comma-separated drop percentages, one node each")
    p.add_argument("--link-mbit", type=float, default=21.0)
    p.add_argument("--ping", type=float, default=0.05, help="link probe period of the nodes (s)")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--broker", default="mosquitto", choices=["mosquitto", "amqtt"])
    p.add_argument("--instance", type=int, default=2)
    p.add_argument("--json", default="out/bench-link.json")
    p.add_argument("--plot", default="out/bench-link.png")
    p.set_defaults(func=bench_link)
