"""A node under a flood of garbage: ask latency flooded vs not, side by side, and the counted rejects.

:func:`measure_flood` takes a running broker and node. It asks the node ``pairs`` pairs of real
questions: in each pair one ask runs on a quiet bus and the other while a second MQTT client
publishes garbage on every topic the node serves, as fast as ``rate`` allows (the order within a
pair alternates, and the cache is off, so neither side gets a warm prefix). Each garbage message is
built so that exactly one known reject reason must count it (``garbage``), which lets the result
say how many of the published messages the node counted, by reason, from its own heartbeat.

``python -m nodes.bench.flood [--rate R] [--pairs N]`` runs it against a fresh embedded broker and a
SmolLM2 node and writes ``out/flood.json`` and ``out/flood.png``; the e2e test
(tests/system/test_flood.py) does the same with bounds.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics, wire
from mesh.config import BrokerAddress
from mesh.auth.keyring import Keyring
from nodes.client import MeshClient

PROMPTS = [
    "Question: Which planet is known as the red planet?\nAnswer:",
    "The three primary colours are",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
    "A haiku about the sea:\n",
    "Water boils at a temperature of",
    "The largest ocean on Earth is the",
]


def garbage(node: str, reply_topic: str, seed: int = 0, keyed: bool = False) -> list[tuple[str, bytes, str]]:
    """One of each kind of garbage a node must reject, with the reason it must count:
    ``(topic, payload, reason)``. Cycle through it (payload bytes vary by ``seed``). ``keyed``: the
    node holds keys (``mesh.auth``), so everything unsealed on its ask, routed, heartbeat, catalog,
    KV and inbox topics is refused before it is read (``unauthenticated``): the flooder is a stranger."""
    r = random.Random(seed)
    stranger = "unauthenticated" if keyed else None

    def env(kind: wire.Kind, body: dict[str, Any], reply_to: str | None = None, corr: str = "flood") -> bytes:
        return wire.encode(wire.Envelope(kind, "flooder", body, corr=corr, reply_to=reply_to))

    junk = b"\xff" + r.randbytes(40)  # 0xff is a CBOR "break" with nothing to break: never decodes
    ghost = f"ghost{r.randrange(1000)}"
    cases = [
        (topics.node_ask(node), junk, "malformed"),
        (topics.node_ask(node), env(wire.Kind.ASK, {"text": "hi", "max_new_tokens": 4}), "bad-reply-topic"),
        # Answered with an error on the flooder's reply topic: the reply path is loaded too.
        (topics.node_ask(node), env(wire.Kind.ASK, {"text": "hi", "max_new_tokens": 0}, reply_to=reply_topic,
                                    corr=uuid.uuid4().hex), "bad-max-new-tokens"),
        (topics.node_ask(node), env(wire.Kind.TOKEN, {"i": 0, "text": "x"}), "unexpected-kind"),
        (topics.ROUTE, env(wire.Kind.ASK, {"text": "", "max_new_tokens": 4}), "bad-reply-topic"),
        (topics.ASK, b"{not json" + r.randbytes(8).hex().encode(), "malformed"),
        (topics.ASK_TEXT, b"   ", "bad-text-ask"),
        (topics.node_heartbeat(ghost), junk, "malformed"),
        (topics.node_status(ghost), b"garbage", "bad-status"),
        (topics.node_catalog(ghost), junk, "malformed"),
        (topics.node_kv(node), env(wire.Kind.KV_FETCH, {"keys": [b"short"], "codec": "fp16", "model": b"m" * 16},
                                   reply_to=reply_topic), "bad-kv-fetch"),
        (topics.reply(f"node-{node}"), env(wire.Kind.PING, {"t": 0.0}, corr="zz"), "unexpected-reply"),
        (topics.reply(f"node-{node}"), env(wire.Kind.PING, {"t": 0.0}, reply_to="a/+/b"), "bad-reply-topic"),
    ]
    sealed = (topics.node_ask(node), topics.ROUTE, topics.node_heartbeat(ghost), topics.node_catalog(ghost),
              topics.node_kv(node), topics.reply(f"node-{node}"))
    return [(t, p, stranger if stranger and t in sealed else reason) for t, p, reason in cases]


class Flooder:
    """A second MQTT client publishing garbage at up to ``rate`` messages/s (QoS 0, as a LAN device
    spraying the broker would) in bursts, at most ``max_messages`` in all."""

    def __init__(self, broker: BrokerAddress, node: str, rate: float, max_messages: int, keyed: bool = False) -> None:
        self.keyed = keyed
        self.name = f"flooder-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name, protocol=mqtt.MQTTv311)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        self.replies = 0  # the node's error replies to garbage asks that named our reply topic
        self.client.on_message = self._on_reply
        self.reply_topic = topics.reply(self.name)
        self.client.subscribe(self.reply_topic, qos=0)
        self.node, self.rate, self.max_messages = node, rate, max_messages
        self.sent: Counter[str] = Counter()  # by expected reason
        self.busy_s = 0.0  # seconds spent flooding
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._limit = 0

    def _on_reply(self, client: Any, userdata: Any, msg: Any) -> None:
        self.replies += 1

    def total(self) -> int:
        return sum(self.sent.values())

    def start(self, limit: int) -> None:
        """Flood until stopped or ``limit`` more messages went out."""
        self._limit = min(self.total() + limit, self.max_messages)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="flooder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        self.stop()
        self.client.loop_stop()
        self.client.disconnect()

    def _run(self) -> None:
        batch = garbage(self.node, self.reply_topic, seed=self.total(), keyed=self.keyed)
        t0 = time.monotonic()
        start_total = self.total()
        i = 0
        while not self._stop.is_set() and self.total() < self._limit:
            # Pace by the clock: after n messages, at least n / rate seconds have passed.
            ahead = (self.total() - start_total) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                self._stop.wait(ahead)
                continue
            topic, payload, reason = batch[i % len(batch)]
            self.client.publish(topic, payload, qos=0)
            self.sent[reason] += 1
            i += 1
        self.busy_s += time.monotonic() - t0


def node_rejects(client: MeshClient, node: str) -> tuple[int, dict[str, int]]:
    view = client.peers.get(node)
    if view is None:
        return -1, {}
    return view.seq, dict(view.heartbeat.get("rejects") or {})


def node_served(client: MeshClient, node: str) -> tuple[int, int]:
    """(served, failed) asks from the node's last heartbeat."""
    view = client.peers.get(node)
    hb = view.heartbeat if view is not None else {}
    return int(hb.get("served", 0)), int(hb.get("failed", 0))


def wait_heartbeat_after(client: MeshClient, node: str, seq: int, timeout: float) -> dict[str, int]:
    """The rejects of the first heartbeat newer than ``seq`` (blocks up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s, rejects = node_rejects(client, node)
        if s > seq:
            return rejects
        time.sleep(0.05)
    raise TimeoutError(f"no heartbeat from {node} after seq {seq} within {timeout:g} s")


def wait_counted(client: MeshClient, node: str, base: dict[str, int], expected: int, timeout: float) -> dict[str, int]:
    """Heartbeat rejects once they rose by ``expected`` over ``base`` (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    rejects = base
    while time.monotonic() < deadline:
        _, rejects = node_rejects(client, node)
        if sum(rejects.values()) - sum(base.values()) >= expected:
            break
        time.sleep(0.1)
    return rejects


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure_flood(broker: BrokerAddress, node: str, pairs: int = 4, rate: float = 2000.0,
                  max_messages: int = 60_000, max_new_tokens: int = 12, timeout: float = 120.0,
                  log: Callable[[str], None] = print, keyring: Keyring | None = None) -> dict[str, Any]:
    """Ask ``node`` ``pairs`` x 2 questions, one of each pair under a garbage flood; return the figures.
    ``keyring``: the asker's identity (``nodes.client.asker_keyring``) when the node holds keys.

    Each flood lasts from 0.2 s before its ask until the answer, at most ``max_messages / pairs``
    messages (``covered`` says the budget lasted the whole ask). After it, the next ask waits until
    the node's heartbeat has counted every message sent (``drain_s``: the broker's backlog), so
    quiet asks are quiet."""
    flooder = Flooder(broker, node, rate, max_messages, keyed=keyring is not None)
    asks: list[dict[str, Any]] = []
    try:
        with MeshClient(broker, keyring=keyring) as client:
            client.wait_online([node], 30.0)
            seq0, _ = node_rejects(client, node)
            before = wait_heartbeat_after(client, node, seq0, 10.0)
            served0, failed0 = node_served(client, node)
            for i in range(pairs):
                prompt = PROMPTS[i % len(PROMPTS)]
                order = (False, True) if i % 2 == 0 else (True, False)
                answers = {}
                for flooded in order:
                    flood: dict[str, Any] = {}
                    if flooded:
                        sent0, busy0 = flooder.total(), flooder.busy_s
                        flooder.start(max_messages // pairs)
                        time.sleep(0.2)  # the flood is on before the ask goes out
                    try:
                        res = client.ask(prompt, node=node, max_new_tokens=max_new_tokens, no_cache=True,
                                         timeout=timeout)
                    finally:
                        if flooded:
                            flooder.stop()
                    if flooded:
                        # Until the node has counted all of it (the broker may still hold a backlog),
                        # so the next quiet ask is quiet; heartbeats come every 0.5 s in the tests.
                        stopped = time.monotonic()
                        wait_counted(client, node, before, flooder.total(), 60.0)
                        drain = time.monotonic() - stopped
                        n, secs = flooder.total() - sent0, flooder.busy_s - busy0
                        # Covered: the flood still ran when the answer came (its budget was not spent).
                        flood = {"flood_sent": n, "flood_s": round(secs, 3), "drain_s": round(drain, 3),
                                 "covered": n < max_messages // pairs,
                                 "counted_rate_msgs_per_s": round(n / (secs + drain), 1)}
                    answers[flooded] = res.answer
                    asks.append({"pair": i, "flooded": flooded, "ttft_s": round(res.ttft_s, 4),
                                 "ttlt_s": round(res.ttlt_s, 4), "new_tokens": res.new_tokens,
                                 "node_ttft_s": res.node_figures.get("ttft_s"),
                                 "node_decode_s": res.node_figures.get("decode_s"),
                                 "sends": res.node_figures.get("sends", 1), "answer": res.answer, **flood})
                    log(f"pair {i} {'flooded' if flooded else 'quiet  '}: TTFT {res.ttft_s:.3f} s, "
                        f"TTLT {res.ttlt_s:.3f} s, {res.new_tokens} tokens, flood sent so far {flooder.total()}")
                asks[-1]["same_answer"] = asks[-2]["same_answer"] = answers[True] == answers[False]
            sent = flooder.total()
            after = wait_counted(client, node, before, sent, 30.0)
            seq1, _ = node_rejects(client, node)
            wait_heartbeat_after(client, node, seq1, 10.0)  # one more: served counts the last answer
            served1, failed1 = node_served(client, node)
    finally:
        flooder.close()
    quiet = [a for a in asks if not a["flooded"]]
    loud = [a for a in asks if a["flooded"]]
    counted = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
               if after.get(k, 0) != before.get(k, 0)}
    q_ttft, l_ttft = _median([a["ttft_s"] for a in quiet]), _median([a["ttft_s"] for a in loud])
    q_ttlt, l_ttlt = _median([a["ttlt_s"] for a in quiet]), _median([a["ttlt_s"] for a in loud])

    def node_side(asks_: list[dict[str, Any]]) -> dict[str, float]:
        # The node's own view (from receiving the ask): what the broker's backlog does not blur.
        return {"node_ttft_s_median": _median([a["node_ttft_s"] for a in asks_]),
                "node_decode_s_median": _median([a["node_decode_s"] for a in asks_])}

    return {
        "broker": f"{broker.host}:{broker.port}", "node": node, "pairs": pairs, "max_new_tokens": max_new_tokens,
        "flood": {"sent": sent, "seconds": round(flooder.busy_s, 3),
                  "rate_msgs_per_s": round(sent / flooder.busy_s, 1) if flooder.busy_s else None,
                  "counted_rate_msgs_per_s_min": min((a["counted_rate_msgs_per_s"] for a in loud), default=None),
                  "drain_s_max": max((a["drain_s"] for a in loud), default=None),
                  "target_rate": rate, "sent_by_reason": dict(flooder.sent),
                  "error_replies_received": flooder.replies},
        "rejects_counted": counted, "rejects_counted_total": sum(counted.values()),
        "node_served": served1 - served0, "node_failed": failed1 - failed0,
        "quiet": {"ttft_s_median": q_ttft, "ttlt_s_median": q_ttlt, "n": len(quiet), **node_side(quiet)},
        "flooded": {"ttft_s_median": l_ttft, "ttlt_s_median": l_ttlt, "n": len(loud), **node_side(loud)},
        "ttft_ratio": round(l_ttft / q_ttft, 3), "ttlt_ratio": round(l_ttlt / q_ttlt, 3),
        "answers_identical": all(a["same_answer"] for a in asks),
        "asks": asks,
    }


def write_json(figures: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")


def write_plot(figures: dict[str, Any], path: Path) -> None:
    """Per pair, TTFT and TTLT quiet vs flooded (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({a["pair"] for a in figures["asks"]})
    by = {(a["pair"], a["flooded"]): a for a in figures["asks"]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ttft_s", "TTFT (s)"), (axes[1], "ttlt_s", "TTLT (s)")):
        xs = range(len(pairs))
        ax.bar([x - 0.2 for x in xs], [by[(p, False)][key] for p in pairs], 0.4, label="quiet")
        ax.bar([x + 0.2 for x in xs], [by[(p, True)][key] for p in pairs], 0.4, label="flooded")
        ax.set_xticks(list(xs), [f"pair {p}" for p in pairs])
        ax.set_ylabel(label)
        ax.legend()
    f = figures["flood"]
    fig.suptitle(f"node {figures['node']}: {f['sent']} garbage messages at {f['rate_msgs_per_s']}/s, "
                 f"{figures['rejects_counted_total']} counted; median TTLT x{figures['ttlt_ratio']}, "
                 f"TTFT x{figures['ttft_ratio']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:  # pragma: no cover - a convenience over the e2e test's fixtures
    import argparse
    import tempfile

    from rich.progress import Progress

    from tests.conftest import REPO, asker_keys, start_amqtt, start_mosquitto, start_node

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--max-messages", type=int, default=60_000)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--broker", choices=["amqtt", "mosquitto"], default="amqtt")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "flood.json")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="flood-"))
    with Progress() as progress:
        task = progress.add_task("starting broker and node", total=2 * args.pairs + 1)
        broker = (start_amqtt if args.broker == "amqtt" else start_mosquitto)(logs)
        node = start_node(broker, "f1", "smollm2-135m", logs)
        progress.update(task, advance=1, description="asking, quiet and flooded")
        try:
            figures = measure_flood(broker.address, "f1", pairs=args.pairs, rate=args.rate,
                                    max_messages=args.max_messages, max_new_tokens=args.max_new_tokens,
                                    log=lambda line: progress.update(task, advance=1, description=line),
                                    keyring=asker_keys())
        finally:
            node.stop()
            broker.stop()
    write_json(figures, args.out)
    write_plot(figures, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in figures.items() if k != "asks"}, indent=2))


if __name__ == "__main__":
    main()
