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

from mesh import topics, wire
from mesh.auth import senders
from mesh.config import BrokerAddress
from mesh.errors import ProtocolError
from nodes import mmlu
from nodes.bench.cache_report import (
    CASES,
    PAPER,
    plot,
    print_results,
    summarize,
)
from nodes.bench.report import write_results
from nodes.bench.stream import bench_stream
from nodes.client import MeshClient, asker_keyring
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir
from nodes.testbed.profiles import device_profile
from nodes.testbed.spec import make_spec

ASKERS = ("pi2", "pi3", "pi4")


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

    from mesh.weights.formats import PROFILE_WEIGHTS, check_format

    cal = load_calibration(calibration_dir(mesh_home(args)), profile) if profile == "pi-zero-2w" else None
    prof = device_profile(profile, cal)
    spec = make_spec(1 + len(ASKERS), prof, instance=args.instance)
    weights = check_format(args.weights or PROFILE_WEIGHTS.get(profile, "fp32"))  # the format that fits the device
    rows: list[dict[str, Any]] = []
    with Testbed(spec, calibration=cal) as tb:
        tb.start_broker(args.broker)
        # Under a memory cap each node loads its own copy of the weights, so its cgroup is charged
        # their page cache as a Pi's would be (shared files are charged to whoever read them first).
        tb.start_nodes(args.model, extra=["--kv-wire", args.kv_wire, "--heartbeat", "1", "--weights", weights],
                       private_from=mesh_home(args) if prof.mem_cap_mib else None)
        if args.peer == "cache-box":
            # The paper's topology: the devices on Wi-Fi, the cache on a wired box with CPU to spare.
            tb.set_cpu("pi1", None)
            tb.set_rate("pi1", None)
        host, port = tb.broker_address
        catalogs = CatalogWatch(BrokerAddress(host, port), "pi1")
        with MeshClient(BrokerAddress(host, port), name=f"bench-{spec.instance}",
                        keyring=asker_keyring(mesh_home(args))) as client, catalogs:
            time.sleep(3.0)  # the nodes' first bandwidth probes (2 s after start) feed the fetch decision

            def ask(case: str, node: str, prompt: str, group: int, subject: str, no_cache: bool) -> None:
                r = client.ask(prompt, node=node, max_new_tokens=args.tokens, stop=("\n",), no_cache=no_cache,
                               timeout=900, cache_figures=True)
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
        memory = node_memory(tb)
    return {"profile": profile, "weights": weights, "peer": args.peer, "testbed": testbed, "memory": memory,
            "rows": rows, **summarize(rows)}


def node_memory(tb: Any) -> dict[str, dict[str, Any]]:
    """Each node's cgroup after the run: its cap, peak, anonymous and mapped memory, major faults
    and OOM kills (the bench must run entirely under the device's memory)."""
    out = {}
    for n in tb.spec.names:
        m = tb.memory(n)
        out[n] = {"cap_mib": tb.spec.node(n).mem_cap_mib, "peak_mib": round((m.peak_bytes or 0) / 2**20, 1),
                  "anon_mib": round(m.anon_bytes / 2**20, 1), "mapped_mib": round(m.mapped_bytes / 2**20, 1),
                  "major_faults": m.major_faults, "oom_kills": m.oom_kills}
    return out


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
            env = wire.decode(senders.unwrap(payload))  # a watcher reads the node's word unchecked
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


def bench_cache(args: argparse.Namespace) -> int:
    console = Console(width=None if Console().is_terminal else 140)
    if args.stream:
        return bench_stream(args, console)
    items = groups(mmlu_dir(mesh_home(args)), args.questions, args.shots or 1, args.seed,
                   args.subjects)
    results = [run_profile(p, items, args, console) for p in args.profiles.split(",")]
    print_results(results, console)
    out: dict[str, Any] = {"bench": "cache", "model": args.model, "kv_wire": args.kv_wire, "broker": args.broker,
                           "peer": args.peer, "shots": args.shots or 1, "tokens": args.tokens, "seed": args.seed,
                           "paper": PAPER}
    if len(results) == 1:  # one profile: its figures at the top level
        out.update({k: v for k, v in results[0].items() if k != "rows"}, rows=results[0]["rows"])
    out["results"] = results
    write_results(out, args.json, lambda path: plot(results, path), args.plot, console)
    return 0


def add_bench_cache(sub: Any) -> None:
    p = sub.add_parser("cache", help="the prompt cache on emulated Pi devices (testbed, root)")
    p.add_argument("--profiles", "--profile", default="pi-zero-2w,pi5", help="comma-separated device profiles")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--weights", help="the nodes' weight format (default: the one that fits each profile's device)")
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
