"""What a node really holds beyond the parts `mesh.footprint` names: the measured slack.

One SmolLM2 node per setting, each in its own memory cgroup with a loose cap (so the plan takes
the explicit `--max-context` and `--cache-mb` as given and nothing is reclaimed), its own copy of
the weights (so their page cache is charged to it). It answers the `mesh bench cache` prompts
(MMLU 1-shot, ~240 tokens) with the cache on, then repeats them (local hits), then longer prompts
up to its context. Per node: the plan's parts from its log line, the cgroup's peak, anonymous
peak and mapped bytes, and peak - (runtime + weights + tokenizer + context + cache) = the slack
the plan must cover.

    HF_HUB_OFFLINE=1 .venv/bin/python results/2026-12-07/slack_probe.py [--weights q4] [--out F]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh.config import BrokerAddress  # noqa: E402
from nodes.bench.cache import groups  # noqa: E402
from nodes.bench.memory import MIB, Sampler  # noqa: E402
from nodes.testbed.bed import identity_parts  # noqa: E402
from nodes.client import AskFailed, MeshClient, asker_keyring  # noqa: E402
from nodes.settings import mesh_home  # noqa: E402
from nodes.setup import mmlu_dir  # noqa: E402
from nodes.testbed.bed import Testbed  # noqa: E402
from nodes.testbed.spec import NodeSpec, TestbedSpec  # noqa: E402

PLAN = re.compile(r"memory: (\d+) MiB = runtime (\d+) \+ weights (\d+) \+ tokenizer (\d+) \+ context (\d+) "
                  r"\+ cache (\d+) \+ slack (\d+)")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--weights", default="q4")
    p.add_argument("--settings", default="320:16,512:32,1024:64", help="context:cache_mb, comma-separated")
    p.add_argument("--cap-mib", type=int, default=1024)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).with_name("slack-probe.json")))
    args = p.parse_args()
    home = mesh_home(argparse.Namespace(home=None))
    items = groups(mmlu_dir(home), args.questions, 1, 0)
    prompts = [g.prompts[c] for g in items for c in ("instruction", "examples", "full")]
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
    names = [f"s{i}" for i in range(len(settings))]
    spec = TestbedSpec(nodes=tuple(NodeSpec(name=n, link_mbit=None, loss_pct=0.0, cpu=None, mem_cap_mib=args.cap_mib)
                                   for n in names), instance=7)
    rows = []
    with Testbed(spec) as tb:
        tb.start_broker("mosquitto")
        host, port = tb.broker_address
        for n, (context, cache_mb) in zip(names, settings):
            own = tb.private_home(n, home, [f"models/{args.model}", *identity_parts(home, n)])
            tb.start_nodes(args.model, names=[n], extra=["--weights", args.weights, "--max-context", str(context),
                                                         "--cache-mb", str(cache_mb), "--threads", "2",
                                                         "--heartbeat", "1", "--home", str(own)])
            with MeshClient(BrokerAddress(host, port), name=f"probe-{n}", keyring=asker_keyring(home)) as client, \
                    Sampler(tb, [n]) as sampler:
                lengths = []
                for prompt in prompts + prompts:  # misses that fill the cache, then local hits
                    r = client.ask(prompt, node=n, max_new_tokens=4, timeout=600)
                    lengths.append(r.prompt_tokens)
                # a long prompt near the context: the prefill's activations at their largest
                long = " ".join(prompts)
                words = long.split()
                while True:
                    try:
                        r = client.ask(" ".join(words), node=n, max_new_tokens=4, timeout=600)
                        lengths.append(r.prompt_tokens)
                        break
                    except AskFailed as exc:  # too long: cut to fit and retry
                        if exc.reason != "too-long" or len(words) < 50:
                            raise
                        words = words[: len(words) * 9 // 10]
                time.sleep(1.0)
                anon = sampler.anon_peak[n]
            mem = tb.memory(n)
            log = tb.log_path(f"node-{n}").read_text()
            m = PLAN.findall(log)[-1]
            total, runtime, weights, tokenizer, ctx, cache, slack = (int(x) for x in m)
            peak = (mem.peak_bytes or 0) / MIB
            parts = runtime + weights + tokenizer + ctx + cache
            rows.append({"max_context": context, "cache_mb": cache_mb, "plan_total_mib": total,
                         "plan": {"runtime": runtime, "weights": weights, "tokenizer": tokenizer, "context": ctx,
                                  "cache": cache, "slack": slack},
                         "peak_mib": round(peak, 1), "anon_peak_mib": round(anon / MIB, 1),
                         "mapped_mib": round(mem.mapped_bytes / MIB, 1), "file_mib": round(mem.file_bytes / MIB, 1),
                         "oom_kills": mem.oom_kills, "longest_prompt": max(lengths), "asks": len(lengths),
                         "measured_slack_mib": round(peak - parts, 1),
                         "measured_slack_share": round((peak - parts) / parts, 3)})
            print(json.dumps(rows[-1]), flush=True)
            tb.set_mem(n, args.cap_mib)  # keep the cap; stop the node to free the machine
            for pid in tb.process_memory(n):
                import os
                import signal
                os.kill(pid, signal.SIGTERM)
            time.sleep(3.0)
    Path(args.out).write_text(json.dumps({"model": args.model, "weights": args.weights, "cap_mib": args.cap_mib,
                                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
