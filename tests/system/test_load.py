"""Load: many asks in flight on real node processes with small bounded queues.

Two SmolLM2 nodes behind the embedded broker, each with a queue of 2 asks: more asks in flight
than the mesh holds. The load client must get every ask answered (busy ones retried with
backoff, none lost); a burst at one node must get clear "busy" errors for what does not fit,
while the node's queue stays at its bound.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes import mmlu
from nodes.bench.load_stats import ANSWERED, AskRecord
from nodes.bench.load import LoadConfig, Sampler, mmlu_prompts, plot, read_rss_mib, run_load, summarise
from nodes.client import AskFailed, MeshClient
from nodes.setup import mmlu_dir
from nodes.up import MeshProcesses, free_port
from tests.conftest import CACHE_ROOT, asker_keys, require_model

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def mesh(log_dir: Path) -> Iterator[MeshProcesses]:
    require_model(MODEL)
    procs = MeshProcesses(["ld1", "ld2"], MODEL, free_port(), home=CACHE_ROOT, log_dir=log_dir / "load",
                          node_args=["--threads", "1", "--heartbeat", "0.5", "--max-queue", str(MAX_QUEUE)])
    procs.start(timeout=300)
    yield procs
    procs.stop()


@pytest.fixture(scope="module")
def prompts() -> list[tuple[str, str]]:
    # Short questions of four subjects: after the first of a subject, its header and example come
    # from the prompt cache, which keeps the test fast.
    return mmlu_prompts(mmlu_dir(CACHE_ROOT), 40, max_words=40, subjects=mmlu.DEFAULT_SUBJECTS[:4])


def test_load_over_capacity_loses_nothing_and_retries_busy(mesh: MeshProcesses, prompts: list,
                                                           tmp_path: Path) -> None:
    cfg = LoadConfig(asks=40, concurrency=8, max_new_tokens=2, timeout_s=90.0, sample_s=0.25, model=MODEL)
    pids = {n: p.pid for n, p in mesh.nodes.items()}
    done: list[AskRecord] = []
    t0 = time.monotonic()
    clock = lambda: time.monotonic() - t0  # noqa: E731
    with MeshClient(mesh.address, keyring=asker_keys()) as client:
        sampler = Sampler(client, pids, lambda: len(done), clock, cfg.sample_s)
        sampler.start()
        try:
            records = run_load(client, prompts, cfg, done.append, clock)
        finally:
            sampler.stop()
    s = summarise(records, sampler.samples, cfg, rss_threshold=1.0)
    assert (s["answered"], s["errors"], s["lost"]) == (40, 0, 0), s["errors_by_reason"]
    assert len(done) == 40 and all(r.outcome == ANSWERED and r.node in pids for r in records)
    # 8 in flight, room for 2 x (2 queued + 1 running): some asks must have been refused and retried.
    assert s["busy_retries"] >= 1 and set(s["busy_by_node"]) <= set(pids)
    assert set(s["answers_per_node"]) == set(pids)  # the router spreads the load
    for name, v in s["rss"].items():
        assert v["max_queue_seen"] is not None and v["max_queue_seen"] <= MAX_QUEUE + 1  # bounded
        assert v["start_mib"] > 100 and v["end_mib"] > 100  # a loaded model, read from /proc
    for key in ("ttft", "ttlt", "e2e_with_backoff"):
        lat = s["latency_s"][key]
        assert lat["n"] == 40 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert s["latency_s"]["ttft"]["p50"] <= s["latency_s"]["ttlt"]["p50"]
    assert s["throughput_asks_per_s"] > 0
    retried = [r for r in records if r.busy_retries]
    assert all(r.e2e_s >= r.ttlt_s for r in retried)  # the backoff is part of the whole ask
    result = {**s, "records": [r.as_json() for r in records], "rss_samples": sampler.samples, "asks": 40,
              "concurrency": 8, "node_count": 2, "model": MODEL}
    json.dumps(result)
    plot(result, tmp_path / "load.png")
    assert (tmp_path / "load.png").stat().st_size > 10_000


def test_burst_beyond_the_queue_gets_busy_errors_and_the_queue_stays_bounded(mesh: MeshProcesses,
                                                                             prompts: list) -> None:
    burst = 16
    node = "ld1"
    pid = mesh.nodes[node].pid
    results: list[dict] = []
    lock = threading.Lock()
    with MeshClient(mesh.address, keyring=asker_keys()) as client:
        client.wait_online([node], 10)
        busy_before = int((client.peers.get(node).heartbeat.get("rejects") or {}).get("busy", 0))
        rss_before = read_rss_mib(pid)
        go = threading.Event()

        def one(i: int) -> None:
            go.wait(10)
            t = time.monotonic()
            try:
                # Long answers with no stop: the first asks hold the node while the burst arrives.
                r = client.ask(prompts[i][0], node=node, max_new_tokens=12, timeout=120)
                out = {"outcome": "answered", "start": t, "end": time.monotonic(), "node": r.node}
            except AskFailed as exc:
                out = {"outcome": exc.reason, "start": t, "end": time.monotonic(), "message": str(exc),
                       "node": exc.node}
            except Exception as exc:  # a timeout here would be a lost ask
                out = {"outcome": f"lost: {exc}", "start": t, "end": time.monotonic()}
            with lock:
                results.append(out)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(burst)]
        for t in threads:
            t.start()
        queue_seen: list[int] = []
        go.set()
        while any(t.is_alive() for t in threads):
            view = client.peers.get(node)
            if view is not None and isinstance(view.heartbeat.get("queue"), int):
                queue_seen.append(view.heartbeat["queue"])
            time.sleep(0.1)
        for t in threads:
            t.join()
        # The node's own count of busy refusals reaches its heartbeat.
        deadline = time.monotonic() + 10
        busy = [r for r in results if r["outcome"] == "busy"]
        while time.monotonic() < deadline:
            rejects = client.peers.get(node).heartbeat.get("rejects") or {}
            if int(rejects.get("busy", 0)) - busy_before >= len(busy):
                break
            time.sleep(0.2)
    answered = [r for r in results if r["outcome"] == "answered"]
    assert len(results) == burst and len(answered) + len(busy) == burst, [r["outcome"] for r in results]
    assert int(rejects.get("busy", 0)) - busy_before == len(busy)
    # What fits is the queue plus the ask being answered, plus whatever finished during the burst.
    last_sent = max(r["start"] for r in results)
    finished_early = sum(r["end"] < last_sent for r in answered)
    assert MAX_QUEUE <= len(answered) <= MAX_QUEUE + 1 + finished_early
    assert len(busy) >= burst - (MAX_QUEUE + 1 + finished_early)
    for r in busy:  # a clear error naming the node, sent at once rather than after a wait
        assert r["node"] == node and f"node {node} is busy" in r["message"] and r["end"] - r["start"] < 10
    assert queue_seen and max(queue_seen) <= MAX_QUEUE + 1
    assert read_rss_mib(pid) is not None and rss_before is not None
