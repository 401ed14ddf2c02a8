"""`mesh bench load`: many asks, several in flight, against a running mesh; nothing may be lost.

N asks (1-shot MMLU prompts from real data, short answers) go out with C in flight at once, each
routed by the mesh. Per ask it records the outcome: answered, an error with its reason, or lost
(neither an answer nor an error within the timeout: a defect). A node whose bounded queue is full
answers "busy"; the benchmark client then retries that ask after an exponential backoff with
jitter, counts the busy retries, and never counts such an ask as lost. Meanwhile it samples every
node process's RSS (``/proc/<pid>/status``) and the queue and cache figures of its heartbeats,
and fits the RSS trend over the second half of the run (the first half is warm-up: the prompt
cache fills up to its byte budget, allocator pools grow). JSON + PNG.

The mesh is either one already running (``--broker`` given: its online nodes; RSS only for node
processes on this machine) or, by default, one started here: the embedded broker and ``--nodes``
node processes, stopped at the end.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import MeshError, TransportError
from nodes import mmlu
from nodes.bench import load_stats as loadstats
from nodes.bench.load_stats import ANSWERED, ERROR, LOST, AskRecord
from nodes.bench.report import pyplot, save_figure
from nodes.client import AskFailed, MeshClient

MIB = 1024 * 1024


@dataclass(frozen=True)
class LoadConfig:
    asks: int = 500
    concurrency: int = 8
    max_new_tokens: int = 4
    stop: tuple[str, ...] = ("\n",)
    model: str | None = None  # only nodes serving this model answer (None: any)
    timeout_s: float = 120.0  # per ask, busy retries included: past it the ask is lost
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    sample_s: float = 0.5  # RSS and heartbeat sampling period
    seed: int = 0  # jitter of the busy backoff

    def __post_init__(self) -> None:
        if self.asks < 1 or self.concurrency < 1 or self.timeout_s <= 0 or self.sample_s <= 0:
            raise ValueError("asks, concurrency, timeout and sample period must be positive")


# -- prompts ---------------------------------------------------------------------------------------
def mmlu_prompts(data_dir: Path, n: int, max_words: int = 256,
                 subjects: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``n`` (prompt, subject) pairs: 1-shot MMLU questions dealt round-robin over the subjects
    (default all 57), so neighbouring asks differ in subject and asks of a subject share its
    cached prefix (header and example)."""
    per_subject: list[list[tuple[str, str]]] = []
    for subject in subjects or mmlu.subjects(data_dir):
        example = mmlu.read_split(data_dir, subject, "dev")[0]
        qs = [q for q in mmlu.read_split(data_dir, subject, "test") if mmlu.word_count(q) <= max_words]
        per_subject.append([(mmlu.one_shot_prompt(example, q), subject) for q in qs])
    out: list[tuple[str, str]] = []
    depth = 0
    while len(out) < n:
        row = [items[depth] for items in per_subject if depth < len(items)]
        if not row:
            raise ValueError(f"MMLU has fewer than {n} questions of at most {max_words} words")
        out.extend(row[: n - len(out)])
        depth += 1
    return out


# -- process memory ---------------------------------------------------------------------------------
def read_rss_mib(pid: int) -> float | None:
    """VmRSS of a live process in MiB, or None when it is gone or not readable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def local_node_pid(name: str, heartbeat_pid: Any) -> int | None:
    """The pid a node's heartbeat names, if that process runs here and is that node."""
    if not isinstance(heartbeat_pid, int) or heartbeat_pid <= 0:
        return None
    try:
        argv = Path(f"/proc/{heartbeat_pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return heartbeat_pid if b"node" in argv and name.encode() in argv else None


class Sampler:
    """Samples node RSS and heartbeat figures every ``period_s`` on its own thread."""

    def __init__(self, client: MeshClient, pids: dict[str, int | None], done: Callable[[], int],
                 clock: Callable[[], float], period_s: float) -> None:
        self.client, self.pids, self.done, self.clock, self.period_s = client, pids, done, clock, period_s
        self.samples: dict[str, list[dict[str, Any]]] = {n: [] for n in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-load-sampler", daemon=True)

    def sample(self) -> None:
        t, done = self.clock(), self.done()
        beats = {v.name: v.heartbeat for v in self.client.nodes()}
        for name, pid in self.pids.items():
            hb = beats.get(name, {})
            cache = hb.get("cache") if isinstance(hb.get("cache"), dict) else {}
            self.samples[name].append({
                "t_s": round(t, 3), "asks_done": done,
                "rss_mib": None if pid is None else _round(read_rss_mib(pid), 2),
                "queue": hb.get("queue"), "queue_max": hb.get("queue_max"),
                "cache_mib": _round(cache["bytes"] / MIB, 2) if isinstance(cache.get("bytes"), (int, float)) else None,
                "busy_rejects": (hb.get("rejects") or {}).get("busy", 0),
            })

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sample()


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


# -- the run ----------------------------------------------------------------------------------------
def ask_once(client: MeshClient, rec: AskRecord, prompt: str, cfg: LoadConfig, clock: Callable[[], float],
             rng: random.Random, rng_lock: threading.Lock) -> AskRecord:
    """One ask to the end: answered, failed with a reason, or lost; "busy" is retried until the
    ask's deadline with backoff (``loadstats.busy_backoff_s``)."""
    rec.start_s = clock()
    deadline = rec.start_s + cfg.timeout_s
    while True:
        left = deadline - clock()
        if left <= 0:
            # Only busy retries can run the clock out here: refused to the end, but told so.
            rec.outcome, rec.reason, rec.message = ERROR, "busy-timeout", f"still busy after {cfg.timeout_s:g} s"
            break
        try:
            r = client.ask(prompt, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop, timeout=left, model=cfg.model)
        except AskFailed as exc:
            if exc.reason == "busy":
                rec.busy_nodes.append(exc.node or "?")
                with rng_lock:
                    u = rng.random()
                delay = loadstats.busy_backoff_s(rec.busy_retries, cfg.backoff_base_s, cfg.backoff_cap_s, u)
                rec.busy_retries += 1
                time.sleep(max(0.0, min(delay, deadline - clock())))
                continue
            rec.outcome, rec.reason, rec.node, rec.message = ERROR, exc.reason, exc.node, str(exc)
            break
        except TransportError as exc:
            # The client's own timeout: neither an answer nor an error came back.
            if clock() >= deadline - 0.05:
                rec.outcome, rec.reason = LOST, "no-reply"
            else:
                rec.outcome, rec.reason = ERROR, "transport"
            rec.message = str(exc)
            break
        except MeshError as exc:
            rec.outcome, rec.reason, rec.message = ERROR, type(exc).__name__, str(exc)
            break
        rec.outcome, rec.node = ANSWERED, r.node
        rec.ttft_s, rec.ttlt_s = r.ttft_s, r.ttlt_s
        rec.prompt_tokens, rec.new_tokens = r.prompt_tokens, r.new_tokens
        q = r.node_figures.get("queue_s")
        rec.queue_s = float(q) if isinstance(q, (int, float)) else None
        break
    rec.end_s = clock()
    return rec


def run_load(client: MeshClient, prompts: Sequence[tuple[str, str]], cfg: LoadConfig,
             on_done: Callable[[AskRecord], None] | None = None,
             clock: Callable[[], float] | None = None) -> list[AskRecord]:
    """Fire ``cfg.asks`` asks (prompts cycled) with ``cfg.concurrency`` in flight; every record
    comes back (threads end when their asks do: each ask ends by its deadline)."""
    clock = clock or time.monotonic
    records = [AskRecord(i, prompts[i % len(prompts)][1]) for i in range(cfg.asks)]
    nxt = iter(range(cfg.asks))
    lock = threading.Lock()
    rng, rng_lock = random.Random(cfg.seed), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            ask_once(client, records[i], prompts[i % len(prompts)][0], cfg, clock, rng, rng_lock)
            if on_done is not None:
                on_done(records[i])

    threads = [threading.Thread(target=worker, name=f"bench-load-{k}", daemon=True)
               for k in range(min(cfg.concurrency, cfg.asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summarise(records: Sequence[AskRecord], samples: dict[str, list[dict[str, Any]]], cfg: LoadConfig,
              rss_threshold: float) -> dict[str, Any]:
    answered = [r for r in records if r.outcome == ANSWERED]
    rss: dict[str, Any] = {}
    for name, rows in samples.items():
        pts = [(float(s["asks_done"]), float(s["rss_mib"])) for s in rows if s["rss_mib"] is not None]
        trend = loadstats.rss_trend(pts, cfg.asks, rss_threshold)
        queues = [s["queue"] for s in rows if isinstance(s["queue"], int)]
        cache = [s["cache_mib"] for s in rows if s["cache_mib"] is not None]
        # The KV cache fills up to its byte budget by design: the trend of RSS less the cache's
        # own bytes (from the heartbeat) tells a leak elsewhere from the cache filling.
        rest = [(float(s["asks_done"]), float(s["rss_mib"]) - float(s["cache_mib"])) for s in rows
                if s["rss_mib"] is not None and s["cache_mib"] is not None]
        rest_trend = loadstats.rss_trend(rest, cfg.asks, rss_threshold) if rest else None
        rss[name] = {**trend.as_json(), "start_mib": pts[0][1] if pts else None, "end_mib": pts[-1][1] if pts else None,
                     "rss_less_cache": rest_trend.as_json() if rest_trend else None,
                     "max_queue_seen": max(queues) if queues else None,
                     "queue_max": next((s["queue_max"] for s in rows if s["queue_max"] is not None), None),
                     "cache_mib_end": cache[-1] if cache else None}
    growing = [n for n, v in rss.items() if v["grows"]]
    return {
        **loadstats.tally(records),
        "latency_s": {"ttft": loadstats.latency_summary(r.ttft_s for r in answered),
                      "ttlt": loadstats.latency_summary(r.ttlt_s for r in answered),
                      "e2e_with_backoff": loadstats.latency_summary(r.e2e_s for r in answered),
                      "node_queue": loadstats.latency_summary(r.queue_s for r in answered)},
        "throughput_asks_per_s": _round(loadstats.throughput(records), 4),
        "wall_s": round(max(r.end_s for r in records) - min(r.start_s for r in records), 3),
        "rss": rss,
        "rss_growth_threshold_mib_per_100_asks": rss_threshold,
        "rss_grows": bool(growing), "rss_growing_nodes": growing,
    }


def plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    recs = [r for r in res["records"] if r["outcome"] == ANSWERED]
    plain = [r for r in recs if not r["busy_retries"]]
    retried = [r for r in recs if r["busy_retries"]]
    a.scatter([r["end_s"] for r in plain], [r["ttlt_s"] for r in plain], s=8, label="TTLT")
    a.scatter([r["end_s"] for r in plain], [r["ttft_s"] for r in plain], s=8, marker="x", label="TTFT")
    if retried:
        a.scatter([r["end_s"] for r in retried], [r["e2e_s"] for r in retried], s=10, marker="^",
                  label="after busy retries (whole ask)")
    lost = [r for r in res["records"] if r["outcome"] != ANSWERED]
    if lost:
        a.scatter([r["end_s"] for r in lost], [r["e2e_s"] for r in lost], s=30, c="red", marker="X",
                  label="error / lost")
    p = res["latency_s"]["ttlt"]
    for k, ls in (("p50", "--"), ("p99", ":")):
        if p[k] is not None:
            a.axhline(p[k], ls=ls, c="grey", lw=0.8, label=f"TTLT {k} {p[k]:.2f} s")
    a.set_ylabel("latency (s)")
    a.set_title(f"{res['asks']} asks, concurrency {res['concurrency']}, {res['node_count']} nodes ({res['model']}): "
                f"answered {res['answered']}, lost {res['lost']}, busy retries {res['busy_retries']}")
    a.legend(fontsize=7, loc="upper left")
    for name, rows in res["rss_samples"].items():
        pts = [(s["t_s"], s["rss_mib"]) for s in rows if s["rss_mib"] is not None]
        if pts:
            trend = res["rss"][name]
            slope = trend.get("slope_mib_per_100_asks")
            line, = b.plot([t for t, _ in pts], [m for _, m in pts], label=f"{name} RSS (second half: "
                           + ("-" if slope is None else f"{slope:+.1f}") + " MiB/100 asks"
                           + (", grows" if trend.get("grows") else "") + ")")
            cache = [(s["t_s"], s["cache_mib"]) for s in rows if s["cache_mib"] is not None]
            if cache:
                b.plot([t for t, _ in cache], [m for _, m in cache], ls="--", c=line.get_color(), lw=0.8,
                       label=f"{name} KV cache")
    half = [r["end_s"] for r in sorted(res["records"], key=lambda r: r["end_s"])][len(res["records"]) // 2]
    b.axvline(half, c="grey", lw=0.8, ls=":", label="second half (trend window)")
    b.set_xlabel("time since start (s)")
    b.set_ylabel("MiB")
    b.legend(fontsize=7, loc="center right")
    save_figure(fig, path)
