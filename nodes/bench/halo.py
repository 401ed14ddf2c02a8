"""`mesh bench halo`: strict vs relaxed HALO sync on the testbed, per loss rate on the lossy workers.

Layout: testbed nodes ``pi1`` (the coordinator) and ``pi2..pi(K+1)`` (workers, each a `mesh node
--roles worker --no-answer`: its neuron groups only, ``nodes.worker``), Mosquitto in the gateway
namespace; the last ``--lossy-workers`` workers get each loss rate (iptables random drop, both directions). The client runs on the host.

Per loss rate: strict and relaxed time per output token (TPOT, from the coordinator's per-forward
timing) and end-to-end time of a greedy generation, ``--reps`` of each, alternating on one
coordinator (the sync rule is the only difference; a shared machine's load hits both alike),
medians reported; relaxed perplexity and top-1 agreement with
lossless (strict is exact, so lossless = strict) on held-out Wikipedia tokens (teacher forced,
one token per forward, like decode); relaxed MMLU accuracy on a fixed 1-shot sample. Then the
ablation: importance vs random placement, both without the local fallback (late groups count as
zero), at the ablation loss rate: what placement decides shows in quality.
Output: JSON (``points``, ``speedup_at_5pct``, ``ablation``, ``testbed``...) and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mesh.config import BrokerAddress
from mesh.errors import ConfigError, TransportError
from nodes.mmlu import LETTERS, sample
from nodes.testbed.profiles import device_profile
from nodes.testbed.spec import make_spec
from nodes.client import MeshClient, asker_keyring
from nodes.bench.halo_report import ZeroedShares, ablation_arm, median_run, plot
from nodes.bench.report import write_results
from mesh.halo.predictor import predictor_path
from nodes.halo_data import load_split, token_windows
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir
from nodes.testbed.bed import Testbed
from nodes.testbed.calibrate import load_calibration
from nodes.testbed.shell import REPO_ROOT
from nodes.testbed.state import DEFAULT_RUN_DIR, in_use

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
ABLATION_LOSS = 5.0
# Without the local fallback the important groups are waited for; at the coordinator's default
# (0.99) nearly every group would be, and placement could not show. 0.95: what run 14 measured.
ABLATION_TARGET_SHARE = 0.95
REPLAN_S = 5.0  # the coordinator's drift re-plan interval in the bench (membership re-plans at once)


def _free_instance() -> int:
    for i in range(10, 90):
        if in_use(DEFAULT_RUN_DIR, i) is None:
            return i
    raise ConfigError("no free testbed instance in 10..89")


class HaloMesh:
    """The processes of one bench run on a testbed."""

    def __init__(self, tb: Testbed, args: argparse.Namespace, workers: list[str]) -> None:
        self.tb, self.args, self.workers = tb, args, workers
        self.env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
        self.coord: Any = None  # the coordinator process
        self.home = mesh_home(args)

    def _cli(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "nodes.cli", *argv, "--broker", self.tb.broker_url,
                "--home", str(self.home)]

    def start_workers(self) -> None:
        for w in self.workers:
            self.tb.spawn(w, self._cli("node", "--name", w, "--model", self.args.model, "--roles", "worker",
                                       "--no-answer", "--threads", "1", "--heartbeat", "0.5"),
                          env=self.env, role="node", log=self.tb.log_path(f"node-{w}"))

    def start_coordinator(self, placement: str, reliability_weight: float = 2.0, fallback: str = "important",
                          target_share: float | None = None) -> None:
        target_share = target_share or getattr(self.args, "target_share", None)
        if self.coord is not None and self.coord.poll() is None:
            self.coord.terminate()
            self.coord.wait(20)
        self.coord = self.tb.spawn("pi1", self._cli(
            "coordinator", "--model", self.args.model, "--threads", "1", "--heartbeat", "0.5",
            "--placement", placement, "--replan-interval", str(REPLAN_S), "--no-cache",
            "--reliability-weight", str(reliability_weight), "--fallback", fallback,
            "--local-speed", str(getattr(self.args, "local_speed", 0.0)),
            *(("--target-share", str(target_share)) if target_share else ())),
            env=self.env, role="coordinator",
            log=self.tb.log_path(f"coordinator-{placement}-{reliability_weight:g}-{fallback}"))

    def wait_ready(self, client: MeshClient, timeout: float = 300.0) -> dict[str, Any]:
        """Until every worker is online and the coordinator's active plan uses all of them."""
        started = time.time()
        deadline = time.monotonic() + timeout
        client.wait_online([*self.workers, "coordinator"], timeout,
                           ready=lambda v: v.model == self.args.model)
        while time.monotonic() < deadline:
            v = client.peers.get("coordinator")
            halo = (v.heartbeat.get("halo") or {}) if v else {}
            fresh = v is not None and float(v.heartbeat.get("time", 0)) > started  # not a stale retained one
            if fresh and v.online and sorted(halo.get("workers", [])) == sorted(self.workers) and halo.get("pending") is None:
                return halo
            time.sleep(0.2)
        raise TransportError("the coordinator never planned over every worker")


def _ask(client: MeshClient, sync: str, tokens: int) -> dict[str, Any]:
    r = _ask_raw(client, {"text": PROMPT, "max_new_tokens": tokens, "halo_sync": sync, "no_cache": True})
    return {"tpot_s": r.get("tpot_s"), "ttlt_s": r.get("ttlt_s"), "new_tokens": r.get("new_tokens"),
            "halo": r.get("halo"), "token_ids": r.get("token_ids")}


def _ask_raw(client: MeshClient, body: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """One ask to the coordinator with extra body fields; the ANSWER body."""
    extra = {k: v for k, v in body.items() if k not in ("text", "max_new_tokens")}
    result = client.ask(body["text"], node="coordinator", max_new_tokens=int(body["max_new_tokens"]),
                        timeout=timeout, extra=extra)
    return dict(result.node_figures)


def _eval(client: MeshClient, sync: str, ids: list[int], start: int, score_ids: list[int] = ()) -> dict[str, Any]:
    body = {"text": "eval", "max_new_tokens": 1, "halo_sync": sync,
            "halo_eval": {"ids": ids, "start": start, "score_ids": list(score_ids)}}
    return _ask_raw(client, body)


class Quality:
    """Held-out perplexity windows and the MMLU sample, tokenized once."""

    def __init__(self, args: argparse.Namespace) -> None:
        from mesh.text import load_tokenizer

        from mesh.model import converted_dir

        home = mesh_home(args)
        self.tok = load_tokenizer(converted_dir(home, args.model))
        held = load_split(home).held_out
        self.windows = token_windows(self.tok, held, args.ppl_tokens, 1)
        per = max(1, math.ceil(args.mmlu / 6))
        self.mmlu = [(self.tok(p)["input_ids"], q.answer) for p, q in sample(mmlu_dir(home), per_subject=per)][: args.mmlu]
        self.letters = [self.tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in LETTERS]

    def run(self, client: MeshClient, sync: str) -> dict[str, Any]:
        nll: list[float] = []
        top: list[int] = []
        t0 = time.monotonic()
        shares = ZeroedShares()
        for w in self.windows:
            r = _eval(client, sync, w, 16)
            nll += r["eval"]["nll"]
            top += r["eval"]["argmax"]
            shares.add(r["halo"])
        correct = 0
        picks: list[int] = []
        for ids, answer in self.mmlu:
            r = _eval(client, sync, ids, len(ids), self.letters)
            scores = r["eval"]["scores"]
            shares.add(r["halo"])
            picks.append(max(range(4), key=lambda i: scores[i]))
            correct += int(picks[-1] == answer)
        return {"ppl": math.exp(sum(nll) / len(nll)), "argmax": top, "accuracy": correct / max(1, len(self.mmlu)),
                "picks": picks, "nll": nll, "n_ppl_tokens": len(nll), "n_mmlu": len(self.mmlu),
                "quality_s": round(time.monotonic() - t0, 1), **shares.figures()}


def _settle(client: MeshClient) -> None:
    """Warm-up asks: the coordinator's late rates and the plan adapt to the new loss rate."""
    _ask(client, "relaxed", 8)
    time.sleep(REPLAN_S + 0.5)
    _ask(client, "relaxed", 4)


def _quality_point(client: MeshClient, q: Quality, lossless: dict[str, Any]) -> dict[str, Any]:
    qual = q.run(client, "relaxed")
    agree = sum(a == b for a, b in zip(qual["argmax"], lossless["argmax"])) / max(1, len(lossless["argmax"]))
    same = sum(a == b for a, b in zip(qual["picks"], lossless["picks"])) / max(1, len(lossless["picks"]))
    return {"ppl_lossless": lossless["ppl"], "ppl_relaxed": qual["ppl"],
            "ppl_change_pct": 100.0 * (qual["ppl"] / lossless["ppl"] - 1.0), "agreement": agree,
            "accuracy_lossless": lossless["accuracy"], "accuracy_relaxed": qual["accuracy"],
            "mmlu_answer_agreement": same, "quality_s": qual["quality_s"],
            **{k: qual[k] for k in ("eval_steps", "eval_zeroed_steps", "eval_multi_steps",
                                    "eval_zeroed_multi_steps", "zeroed_share_predicted", "zeroed_share_true")}}


def _set_loss(tb: Testbed, lossy: list[str], loss: float) -> None:
    for w in lossy:
        tb.set_loss(w, loss)


def run_bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ConfigError("mesh bench halo needs root (the testbed)")
    # SIGTERM unwinds like Ctrl-C, so the testbed (namespaces, processes, rules) is removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    losses = [float(x) for x in str(args.loss).split(",") if x.strip()]
    if args.lossy_workers > args.workers:
        raise ConfigError("--lossy-workers exceeds --workers")
    home = mesh_home(args)
    cal = load_calibration(home / "testbed", args.profile) if args.profile == "pi-zero-2w" else None
    spec = make_spec(args.workers + 1, device_profile(args.profile, cal), instance=_free_instance())
    workers = [f"pi{i}" for i in range(2, args.workers + 2)]
    lossy = workers[len(workers) - args.lossy_workers:]
    q = Quality(args)
    result: dict[str, Any] = {"model": args.model, "workers": args.workers, "lossy_workers": lossy,
                              "tokens": args.tokens, "prompt": PROMPT, "profile": args.profile,
                              "reps": args.reps,
                              "baseline": "strict sync (wait for every partial) on the same coordinator and plan",
                              "halo": "relaxed sync, predictor, importance placement, reliability-weighted shares",
                              "method": "per loss rate, strict and relaxed asks alternate (reps each) on one "
                                        "coordinator, so both see the same machine load; TPOT = median",
                              "wire": "shared MLP-input topic, halo_wire frames over the coordinator's "
                                      "direct link, workers' frames on their own connections (mesh.mqtt.lite), "
                                      "LM head on two threads, lean decode step"}
    pred_report = predictor_path(home, args.model, 64).with_suffix(".json")
    if pred_report.exists():
        result["predictor"] = json.loads(pred_report.read_text())
    t_start = time.monotonic()
    n_tasks = len(losses) + (0 if args.no_ablation else 2)
    with Testbed(spec, calibration=cal) as tb, Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn()) as bar:
        result["testbed"] = tb.describe()
        tb.start_broker(args.broker_kind)
        mesh = HaloMesh(tb, args, workers)
        mesh.start_workers()
        task = bar.add_task("starting", total=n_tasks)
        host, port = tb.broker_address
        with MeshClient(BrokerAddress(host, port), keyring=asker_keyring(mesh.home)) as client:
            # One coordinator for both syncs: the sync rule is the only difference, and the
            # machine's load (shared, noisy) hits both alike because their asks alternate.
            mesh.start_coordinator("importance")
            result["plan"] = mesh.wait_ready(client)
            bar.update(task, description="lossless reference (strict)")
            lossless = q.run(client, "strict")
            result["lossless"] = {k: v for k, v in lossless.items() if k not in ("argmax", "picks", "nll")}
            points = []
            for loss in losses:
                _set_loss(tb, lossy, loss)
                bar.update(task, description=f"strict vs relaxed, loss {loss:g} %")
                _settle(client)
                runs: dict[str, list[dict[str, Any]]] = {"strict": [], "relaxed": []}
                loads = []
                for _ in range(args.reps):
                    for sync in ("strict", "relaxed"):
                        runs[sync].append(_ask(client, sync, args.tokens))
                        loads.append(os.getloadavg()[0])
                s, relaxed = median_run(runs["strict"]), median_run(runs["relaxed"])
                p = {"loss_pct": loss, "strict_tpot_s": s["tpot_s"], "relaxed_tpot_s": relaxed["tpot_s"],
                     "speedup": s["tpot_s"] / relaxed["tpot_s"] if relaxed["tpot_s"] else None,
                     "strict_e2e_s": s["ttlt_s"], "relaxed_e2e_s": relaxed["ttlt_s"],
                     "strict_tpot_runs_s": [r["tpot_s"] for r in runs["strict"]],
                     "relaxed_tpot_runs_s": [r["tpot_s"] for r in runs["relaxed"]],
                     "load_avg_1min": loads,
                     **_quality_point(client, q, lossless), "strict_halo": s["halo"],
                     "relaxed_halo": relaxed["halo"], "relaxed_plan": _plan_of(client)}
                points.append(p)
                bar.console.print(f"loss {loss:4.1f} %: strict {p['strict_tpot_s'] * 1000:7.1f} ms/token, relaxed "
                                  f"{p['relaxed_tpot_s'] * 1000:7.1f} (x{p['speedup']:.2f}), ppl {p['ppl_relaxed']:.3f} "
                                  f"vs {p['ppl_lossless']:.3f} ({p['ppl_change_pct']:+.2f} %), agreement "
                                  f"{p['agreement']:.3f}, MMLU {p['accuracy_relaxed']:.3f} vs {p['accuracy_lossless']:.3f} "
                                  f"(same answer {p['mmlu_answer_agreement']:.3f})")
                bar.advance(task)
            floor = [p["relaxed_tpot_s"] for p in points if p["loss_pct"] == 0.0]
            for p in points:
                if floor and floor[0]:
                    p["relaxed_vs_lossfree"] = p["relaxed_tpot_s"] / floor[0]
            result["points"] = points
            at5 = [p for p in points if p["loss_pct"] == 5.0]
            result["speedup_at_5pct"] = at5[0]["speedup"] if at5 else None
            if not args.no_ablation:
                result["ablation"] = _ablation(args, tb, mesh, client, q, lossless, lossy, bar, task)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    write_results(result, args.json, lambda path: plot(result, path), args.plot, Console())
    print(json.dumps({k: result.get(k) for k in ("speedup_at_5pct", "elapsed_s")} | {"json": str(args.json)}))
    return 0


def _ablation(args: argparse.Namespace, tb: Testbed, mesh: HaloMesh, client: MeshClient, q: Quality,
              lossless: dict[str, Any], lossy: list[str], bar: Progress, task: Any) -> dict[str, Any]:
    """Placement ablation: importance vs random placement, both without the local fallback (a
    late group counts as zero whatever its importance), so what placement decides, which groups
    sit on the lossy worker and are lost with it, shows in quality. ``--ablation-reps`` rounds,
    the arms alternating (the order swapped every round), each on a fresh coordinator settled at
    the loss rate: one timed generation and one quality run per arm and round. Quality is pooled
    over the rounds (perplexity over all scored tokens), with the importance share each arm
    summed as zero (true: measured from the full weights at every zeroed step) beside it, so the
    comparison is at the zeroed share and the speed each arm really had."""
    out: dict[str, Any] = {"loss_pct": ABLATION_LOSS, "fallback": "none", "rounds": args.ablation_reps,
                           "target_share": ABLATION_TARGET_SHARE,
                           "method": "arms alternate, order swapped each round; fresh coordinator per "
                                     "arm and round; quality pooled over rounds"}
    runs: dict[str, list[dict[str, Any]]] = {"importance": [], "random": []}
    for rnd in range(args.ablation_reps):
        arms = ("importance", "random") if rnd % 2 == 0 else ("random", "importance")
        for placement in arms:
            bar.update(task, description=f"ablation round {rnd + 1}: {placement} placement, no fallback")
            _set_loss(tb, lossy, 0.0)
            mesh.start_coordinator(placement, fallback="none", target_share=ABLATION_TARGET_SHARE)
            mesh.wait_ready(client)
            _set_loss(tb, lossy, ABLATION_LOSS)
            _settle(client)
            r = _ask(client, "relaxed", args.tokens)
            qual = q.run(client, "relaxed")
            runs[placement].append({"relaxed_tpot_s": r["tpot_s"], "halo": r["halo"], "quality": qual,
                                    "plan": _plan_of(client), "load": os.getloadavg()[0]})
            bar.console.print(f"ablation {placement:10s} round {rnd + 1}: {r['tpot_s'] * 1000:8.1f} ms/token, "
                              f"ppl {qual['ppl']:.3f}, zeroed share true {qual['zeroed_share_true']:.4f} "
                              f"predicted {qual['zeroed_share_predicted']:.4f}")
    for placement, rs in runs.items():
        out[placement] = ablation_arm(rs, lossless)
        a = out[placement]
        bar.console.print(f"ablation {placement:10s}: {a['relaxed_tpot_s'] * 1000:8.1f} ms/token (median of "
                          f"{len(rs)}), ppl {a['ppl_relaxed']:.3f} ({a['ppl_change_pct']:+.2f} %), agreement "
                          f"{a['agreement']:.3f}, MMLU {a['accuracy_relaxed']:.3f}, zeroed share true "
                          f"{a['zeroed_share_true']:.4f} (steps {a['zeroed_steps_fraction']:.3f})")
    bar.advance(task, 2)
    return out


def _plan_of(client: MeshClient) -> dict[str, Any]:
    v = client.peers.get("coordinator")
    halo = (v.heartbeat.get("halo") or {}) if v else {}
    return {k: halo.get(k) for k in ("epoch", "groups", "local_groups", "deadline_ms", "straggler_ms", "partials",
                                     "placement")}
