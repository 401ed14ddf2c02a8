"""Two measuring tools run inside the testbed: ``python -m nodes.testbed probe`` (CPU probe:
Gemma-3 prefill or a CPU loop) and ``python -m nodes.testbed linkprobe`` (MQTT pings and
transfers through the broker). Each prints JSON lines.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable

from mesh.errors import ConfigError, TransportError
from mesh.uplink_stats import LinkStats, LinkStatsConfig

LOOP_ITERS_PER_TOKEN = 100_000


def _cpu_loop(iterations: int) -> int:
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) & 0xFFFF
    return acc


def _prompt_ids(tokenizer: Any, tokens: int) -> list[int]:
    """Exactly ``tokens`` ids of an MMLU-style 1-shot prompt (BOS included when the tokenizer adds one)."""
    text = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "A car accelerates uniformly from rest to 20 m/s in 5 s. What is its acceleration?\n"
        "A. 2 m/s^2\nB. 4 m/s^2\nC. 5 m/s^2\nD. 100 m/s^2\nAnswer: B\n\n"
        "Which quantity is conserved in every collision between two isolated bodies?\n"
        "A. kinetic energy\nB. momentum\nC. velocity\nD. temperature\nAnswer:"
    )
    ids: list[int] = tokenizer(text)["input_ids"]
    while len(ids) < tokens:
        ids = ids + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:tokens]


def _load_work(model: str, tokens: int, model_dir: Path, threads: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """The unit of work a probe times, plus facts about it."""
    if model == "loop":
        n = tokens * LOOP_ITERS_PER_TOKEN
        return (lambda: None if _cpu_loop(n) < 0 else None), {"iterations": n}
    path = model_dir
    if not path.is_dir():
        raise ConfigError(f"no model cache at {path}: run the project's model setup first")
    import torch
    from transformers import AutoModelForCausalLM

    from mesh.text import load_tokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_prompt_ids(tok, tokens)], dtype=torch.long)  # [1, tokens]

    def prefill() -> None:
        with torch.inference_mode():
            lm(input_ids=ids, logits_to_keep=1, use_cache=True)

    return prefill, {"load_s": round(load_s, 3), "torch": torch.__version__, "model_dir": str(path)}


def run_probe(model: str, tokens: int, *, model_dir: Path, threads: int, serve: bool, out: IO[str]) -> int:
    """Time the probe work (after one warm-up run).

    One-shot: print one JSON line with ``seconds`` (wall) and ``cpu_seconds`` (process CPU time).
    ``serve``: print ``{"ready": true, ...}``, then one ``{"seconds", "cpu_seconds"}`` line per
    ``run`` line read from stdin, until ``quit`` or EOF.
    """
    work, facts = _load_work(model, tokens, model_dir, threads)
    base = {"model": model, "tokens": tokens, "threads": threads, "pid": os.getpid()} | facts
    work()  # warm-up: first-call allocations are not part of the steady-state time

    def timed() -> dict[str, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        work()
        t1, c1 = time.perf_counter(), time.process_time()
        return {"seconds": round(t1 - t0, 4), "cpu_seconds": round(c1 - c0, 4)}

    if not serve:
        print(json.dumps(base | timed()), file=out, flush=True)
        return 0
    print(json.dumps(base | {"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "run":
            print(json.dumps(timed()), file=out, flush=True)
    return 0


def run_linkprobe(
    broker: str,
    *,
    name: str,
    count: int,
    interval_s: float,
    late_s: float,
    timeout_s: float,
    transfer_bytes: int,
    transfers: int,
    out: IO[str],
) -> int:
    """Ping the broker over MQTT (publish to an own topic, wait for the echo) and print the
    :class:`LinkStats` snapshot as JSON. Transfers are big messages echoed the same way; the
    broker stores and forwards, so the echo moves the bytes up then down: the recorded link
    bandwidth is ``2 * bytes / seconds`` (``echo_mbit`` is ``bytes / seconds``: a peer fetch
    through the broker over two such links).
    """
    import paho.mqtt.client as mqtt

    host, _, port = broker.rpartition(":")
    topic = f"mesh-tb/linkprobe/{name}/{os.getpid()}"
    stats = LinkStats(LinkStatsConfig(timeout_s=timeout_s, late_s=late_s, window=max(1, count)))
    lock = threading.Condition()
    subscribed = threading.Event()
    transfer_done: "queue.Queue[float]" = queue.Queue()

    def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        sock = client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(topic, qos=0)

    def on_subscribe(*_: object) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        kind, seq = msg.payload[:1], int.from_bytes(msg.payload[1:9], "big")
        if kind == b"P":
            with lock:
                stats.reply_received(seq, now)
                lock.notify_all()
        elif kind == b"T":
            transfer_done.put(now)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"linkprobe-{name}-{os.getpid()}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(host, int(port), keepalive=30)
    except OSError as e:
        raise TransportError(f"cannot reach broker {broker}: {e}") from e
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise TransportError(f"no SUBACK from {broker}")
        start = time.monotonic()
        for seq in range(count):
            tick = start + seq * interval_s
            delay = tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing of the measurement, not waiting for an event
            with lock:
                now = time.monotonic()
                stats.expire(now)
                stats.ping_sent(seq, now)
            client.publish(topic, b"P" + seq.to_bytes(8, "big") + bytes(32), qos=0)
        end = time.monotonic() + timeout_s
        with lock:
            while stats.snapshot()["outstanding"] and time.monotonic() < end:
                lock.wait(max(0.0, end - time.monotonic()))
            stats.expire(time.monotonic() + timeout_s)  # whatever is still out is lost
        echo: list[float] = []
        for k in range(transfers):
            t0 = time.monotonic()
            client.publish(topic, b"T" + k.to_bytes(8, "big") + bytes(transfer_bytes), qos=0)
            try:
                t1 = transfer_done.get(timeout=max(30.0, transfer_bytes * 8 / 1e6))
            except queue.Empty:
                raise TransportError(f"transfer {k} of {transfer_bytes} B did not come back") from None
            stats.record_transfer(2 * (transfer_bytes + 9), t1 - t0)
            echo.append(round((transfer_bytes + 9) * 8 / (t1 - t0) / 1e6, 3))
    finally:
        client.loop_stop()
        client.disconnect()
    doc = {"name": name, "broker": broker, "count": count, "interval_ms": interval_s * 1000}
    doc |= stats.snapshot() | {"transfer_bytes": transfer_bytes, "echo_mbit": echo}
    print(json.dumps(doc), file=out, flush=True)
    return 0
