"""Poisoned and interrupted KV transfers (issue #7), end to end.

A real broker and a real node process (``v1``, the asker) with SmolLM2-135M. The attacker is a
peer in this process that speaks the real wire protocol: it computes real KV with the real model
and its own ``NodeCache``, advertises a real catalog, and serves the real parts, then tampers with
them (bytes under the wrong key, another model's key, a truncated tensor) or stops halfway. The
last test SIGKILLs a real peer node process in the middle of a transfer.

What must hold: the asker detects it, answers exactly as without the cache, counts a wasted fetch
against that peer (heartbeat and ``mesh ask --json``), skips that peer for its next ask, and never
waits for a fetch longer than its recompute estimate (within a small floor).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh import topics, wire
from mesh.auth import senders
from mesh.cache import codec as kvcodec
from nodes import mmlu
from mesh.mqtt.bus import MqttBus
from nodes.client import AskResult, MeshClient
from tests.conftest import CACHE_ROOT, Broker, NodeProcess, asker_keys, peer_keys, start_node

pytestmark = pytest.mark.e2e

# one thread: prefill is ~1.5x slower, so the cost model clearly prefers fetching over loopback
ASKER_FLAGS = ("--kv-wire", "int8", "--threads", "1")


def mmlu_prompts(subject: str, n: int, shots: int = 3, max_words: int = 60) -> list[str]:
    """``n`` real MMLU ``shots``-shot prompts of one subject sharing the same examples."""
    from nodes.setup import mmlu_dir

    data = mmlu_dir(CACHE_ROOT)
    examples = mmlu.read_split(data, subject, "dev")[:shots]
    tests = [q for q in mmlu.read_split(data, subject, "test") if mmlu.word_count(q) <= max_words][:n]
    return [mmlu.few_shot_prompt(examples, q) for q in tests]


LONG_B = ("nutrition", "us_foreign_policy", "marketing", "high_school_geography")


def long_prompt(subjects: tuple[str, ...], question: int) -> str:
    """A long prompt (~1,300 tokens): the dev examples of four subjects, then one test question."""
    from nodes.setup import mmlu_dir

    data = mmlu_dir(CACHE_ROOT)
    text = ""
    for subject in subjects:
        text += mmlu.header(subject) + "".join(mmlu.format_question(q, True) + "\n\n"
                                               for q in mmlu.read_split(data, subject, "dev")[:5])
    q = mmlu.read_split(data, "sociology", "test")[question]
    return text + mmlu.format_question(q, False)


class Attacker:
    """A peer that computes real KV, advertises it, and serves it through ``tamper``.

    ``tamper(parts, keys)`` gets the honest reply bodies (``NodeCache.serve``, one chunk per part)
    and returns what is really published.
    """

    def __init__(self, broker: Broker, name: str, loaded: Any) -> None:
        from mesh.config import CacheConfig
        from mesh.model import Decoder
        from mesh.cache.node_cache import NodeCache

        self.loaded = loaded
        self.decoder = Decoder(self.loaded)
        # with the tests' identities, the attacker's KV carries proofs in its own name (mesh.cache.provenance)
        self.cache = NodeCache(self.loaded, CacheConfig(), self.decoder, keyring=peer_keys(name))
        self.name = name
        self.tamper: Callable[[list[dict[str, Any]], list[bytes]], list[dict[str, Any]]] = lambda p, k: p
        self.requests = 0
        self.bus = MqttBus(f"attacker-{name}", broker.address, will=(topics.node_status(name), topics.OFFLINE, 1, True))
        self.bus.subscribe(topics.node_kv(name), self._on_fetch)
        self.bus.start(10)

    def learn(self, *prompts: str) -> None:
        """Compute the prompts' real KV into our store (no peers: a plain prefill)."""
        for p in prompts:
            self.cache.prepare_local(self.decoder.encode(p))

    def keys(self, prompt: str) -> list[bytes]:
        return list(self.cache.keys(self.decoder.encode(prompt))[0])

    def _on_fetch(self, topic: str, payload: bytes, retained: bool) -> None:
        env = wire.decode(senders.unwrap(payload))
        self.requests += 1
        keys = list(env.body["keys"])
        pkey = env.body.get("prompt_key")
        honest = list(self.cache.serve(keys, pkey, str(env.body["codec"]), 16 << 20, part_bytes=1))
        for body in self.tamper(honest, keys):
            reply = wire.Envelope(wire.Kind.KV_CHUNKS, self.name, body, corr=env.corr)
            self.bus.publish(env.reply_to, senders.encode(peer_keys(self.name), reply, env.reply_to), qos=1)

    def lie(self, prompt: str, target: str) -> None:
        """Sign, in our own name (valid credentials), another prompt's KV under ``prompt``'s keys
        (its first token changed: same length, every chunk different), with last logits that make
        ``target`` the first token: every check on receipt passes (mesh.cache.provenance)."""
        from mesh.cache.node_cache import NodeCache
        from mesh.config import CacheConfig

        p = self.cache.provenance
        assert p is not None, "the attacker needs an identity to sign its lie"
        ids = self.decoder.encode(prompt)
        other = [ids[1] if ids[0] != ids[1] else ids[0] + 1, *ids[1:]]
        donor = NodeCache(self.loaded, CacheConfig(), self.decoder)
        donor.prepare_local(other)
        okeys, opkey = donor.keys(other)
        chunks, entry = donor.store.get_chain(okeys), donor.store.get_prompt(opkey)
        logits = entry["logits"].clone()
        logits[self.decoder.encode(target)[0]] = float(logits.max()) + 10.0
        keys, pkey = self.cache.keys(ids)
        with self.cache.lock:
            self.cache.store.put_chain(keys, chunks, [c.nbytes for c in chunks],
                                       proofs=[p.sign_chunk(k, c) for k, c in zip(keys, chunks)])
            self.cache.store.put_prompt(pkey, keys[-1], {"tail": entry["tail"], "logits": logits}, 1,
                                        p.sign_prompt(pkey, entry["tail"], logits))

    def advertise(self) -> None:
        """Publish our real catalog, a heartbeat (a fast link) and ``online``; retained."""
        cat = self.cache.catalog()
        self.advertised = [cat.epoch, cat.count]  # what the asker must hold before a test asks
        hb = {"seq": int(time.time()), "model": "smollm2-135m", "model_key": self.loaded.model_key, "queue": 0,
              "load": 0.0, "prefill_tps": 1.0, "rtt_ms": 0.1, "link_bw_Bps": 1e10, "time": time.time()}
        for topic, env in ((topics.node_heartbeat(self.name), wire.Envelope(wire.Kind.HEARTBEAT, self.name, hb)),
                           (topics.node_catalog(self.name),
                            wire.Envelope(wire.Kind.CATALOG, self.name, cat.to_dict()))):
            self.bus.publish_wait(topic, senders.encode(peer_keys(self.name), env, topic), qos=1, retain=True)
        self.bus.publish_wait(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)

    def close(self) -> None:
        for t in (topics.node_status(self.name), topics.node_heartbeat(self.name), topics.node_catalog(self.name)):
            self.bus.publish_wait(t, b"", qos=1, retain=True)
        self.bus.stop()


@pytest.fixture(scope="module")
def asker(amqtt_broker: Broker, log_dir: Path) -> Iterator[NodeProcess]:
    node = start_node(amqtt_broker, "v1", "smollm2-135m", log_dir, *ASKER_FLAGS)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def model() -> Any:
    from mesh.model import load_model

    return load_model(CACHE_ROOT, "smollm2-135m", threads=1)


@pytest.fixture
def attacker(amqtt_broker: Broker, asker: NodeProcess, model: Any, request: pytest.FixtureRequest) -> Iterator[Attacker]:
    """A fresh attacker per test (the asker remembers a peer that lied)."""
    a = Attacker(amqtt_broker, f"z-{request.node.name.split('[')[-1].strip(']')[:20]}", model)
    yield a
    a.close()


def ask(client: MeshClient, text: str, **kw: Any) -> AskResult:
    return client.ask(text, node="v1", max_new_tokens=4, timeout=120, cache_figures=True, **kw)


def cache_figures(client: MeshClient, node: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The node's heartbeat cache figures once ``ready`` holds (or the last seen after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        view = next((v for v in client.nodes() if v.name == node), None)
        cache = dict(view.heartbeat.get("cache", {})) if view is not None else {}
        if (cache and ready(cache)) or time.monotonic() > deadline:
            return cache
        time.sleep(0.1)


def wait_advertised(client: MeshClient, attacker: Attacker, prompt: str, timeout: float = 30.0) -> None:
    """Until the asker's heartbeat says it holds the attacker's current catalog (epoch and items)
    and has measured its own link (before that its cost model assumes a slow default link)."""
    want = attacker.advertised
    deadline = time.monotonic() + timeout
    seen, measured = None, False
    while time.monotonic() < deadline:
        for v in client.nodes():
            if v.name == "v1":
                seen = (v.heartbeat.get("cache") or {}).get("peer_catalogs", {}).get(attacker.name)
                measured = "link_bw_Bps" in v.heartbeat
        if seen == want and measured:
            return
        time.sleep(0.05)
    raise AssertionError(f"the asker never held the attacker's catalog {want} (last seen {seen}) "
                         f"with its link measured ({measured})")


# -- the lies ----------------------------------------------------------------------------------

def relabel(parts: list[dict[str, Any]], keys: list[bytes]) -> list[dict[str, Any]]:
    """Each chunk's real bytes served under the next chunk's key (checksum left as it was)."""
    chunks = [c for p in parts for c in p["chunks"]]
    layers = [c["layers"] for c in chunks]
    for i, c in enumerate(chunks):
        c["layers"] = layers[(i + 1) % len(layers)]
    return parts


def other_model(parts: list[dict[str, Any]], keys: list[bytes]) -> list[dict[str, Any]]:
    """Well-formed chunks with a consistent checksum, but labelled with another model key."""
    for p in parts:
        for c in p["chunks"]:
            c["model"] = bytes(16)
            c["sum"] = kvcodec._checksum(c["model"], c["key"], c["layers"])
    return parts


def truncate(parts: list[dict[str, Any]], keys: list[bytes]) -> list[dict[str, Any]]:
    """The last chunk's last value tensor cut short."""
    last = [c for p in parts for c in p["chunks"]][-1]
    t = last["layers"][-1]["v"]
    t["data"] = t["data"][: len(t["data"]) // 2]
    return parts


FIGURES = ("decision", "remote_tokens", "fetch_s", "fetch_timeout_s", "est_recompute_s", "est_transfer_s", "wasted",
           "first_token")

LIES = {"relabelled": relabel, "other-model": other_model, "truncated": truncate}


def test_an_honest_attacker_is_used(amqtt_broker: Broker, asker: NodeProcess, attacker: Attacker) -> None:
    """Control: the same peer serving its real parts is fetched from, and the answer is exact."""
    prompt = mmlu_prompts("astronomy", 1)[0]
    attacker.learn(prompt)
    attacker.tamper = lambda parts, keys: parts
    attacker.advertise()
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        wait_advertised(client, attacker, prompt)
        before = attacker.requests
        passed = cache_figures(client, "v1", lambda c: True).get("audits_passed", 0)
        got = ask(client, prompt)
        exact = ask(client, prompt, no_cache=True)
        audited = cache_figures(client, "v1", lambda c: c.get("audits_passed", 0) > passed)
    c = got.node_figures["cache"]
    assert attacker.requests == before + 1
    # the audit after the answer passed: v1 advertises and serves what it fetched (mesh.cache.audit)
    assert audited["audits_passed"] == passed + 1 and audited["audits_failed"] == 0, audited
    assert attacker.name not in audited["shunned"], audited
    assert c["decision"] == "remote" and c["peer"] == attacker.name and c["full_hit"], c
    assert c.get("first_token") == "peer-logits" and "wasted" not in c, c
    assert got.node_figures["token_ids"] == exact.node_figures["token_ids"]


@pytest.mark.parametrize("lie", sorted(LIES))
def test_poisoned_chunks_are_rejected_and_the_peer_is_skipped(amqtt_broker: Broker, asker: NodeProcess,
                                                              attacker: Attacker, lie: str) -> None:
    subject = {"relabelled": "anatomy", "other-model": "virology", "truncated": "philosophy"}[lie]
    first, second = mmlu_prompts(subject, 2)
    attacker.learn(first, second)  # the catalog lists both prompts' chunks
    attacker.tamper = LIES[lie]
    attacker.advertise()
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        wait_advertised(client, attacker, first)
        before = cache_figures(client, "v1", lambda c: True).get("wasted_by_peer", {}).get(attacker.name, 0)
        requests = attacker.requests
        got = ask(client, first)
        exact = ask(client, first, no_cache=True)
        figures = cache_figures(client, "v1",
                                lambda c: c.get("wasted_by_peer", {}).get(attacker.name, 0) > before)
        # the next ask that the attacker's catalog matches best: nothing is asked of it
        after = ask(client, second)
        after_exact = ask(client, second, no_cache=True)
    c = got.node_figures["cache"]
    assert attacker.requests == requests + 1
    # chunks that verified before the bad one are kept (they passed the same checks as any fetch)
    kept = 16 * (len(attacker.keys(first)) - 1) if lie == "truncated" else 0
    assert c["peer"] == attacker.name and c["remote_tokens"] == kept and not c["full_hit"], c
    assert c["decision"] == ("remote" if kept else "recompute") and c["wasted"].startswith("bad:"), c
    assert got.node_figures["token_ids"] == exact.node_figures["token_ids"]
    assert figures["wasted_by_peer"][attacker.name] == before + 1
    assert attacker.name in figures["shunned"]
    a = after.node_figures["cache"]
    assert attacker.requests == requests + 1, "the asker fetched again from a peer that just lied"
    # without the penalty the attacker (the whole prompt) would beat the shared examples held locally
    assert a["peers_skipped"] == [attacker.name] and a["decision"] == "local" and a["remote_tokens"] == 0, a
    assert after.node_figures["token_ids"] == after_exact.node_figures["token_ids"]


def test_a_stalled_transfer_is_given_up_at_the_recompute_estimate(amqtt_broker: Broker, asker: NodeProcess,
                                                                  attacker: Attacker) -> None:
    """The peer sends its first part, then nothing, and stays online: the asker waits no longer
    than its recompute estimate, keeps the chunk that came, and recomputes the rest exactly."""
    prompt = mmlu_prompts("college_biology", 1, shots=5)[0]  # ~500 tokens: a recompute estimate well over the floor
    attacker.learn(prompt)
    attacker.tamper = lambda parts, keys: parts[:2]  # the logits, then one chunk
    attacker.advertise()
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        wait_advertised(client, attacker, prompt)
        requests = attacker.requests
        got = ask(client, prompt)
        exact = ask(client, prompt, no_cache=True)
    c = got.node_figures["cache"]
    print("stalled:", {k: c.get(k) for k in FIGURES}, "ttlt", got.node_figures["ttlt_s"], exact.node_figures["ttlt_s"])
    assert attacker.requests == requests + 1
    assert c["peer"] == attacker.name and c["wasted"].startswith("short"), c
    assert c["remote_tokens"] == 16 and c["local_tokens"] == 0, c  # the one chunk that came is used
    # the timeout is the recompute estimate (over the 0.25 s floor here), and it was kept to
    assert c["fetch_timeout_s"] == pytest.approx(c["est_recompute_s"], abs=1e-3) and c["fetch_timeout_s"] > 0.25
    assert c["fetch_timeout_s"] <= c["fetch_s"] < c["fetch_timeout_s"] + 0.5, c
    assert got.node_figures["token_ids"] == exact.node_figures["token_ids"]


def test_a_peer_killed_mid_transfer(amqtt_broker: Broker, asker: NodeProcess, log_dir: Path) -> None:
    """A real peer node is SIGKILLed as soon as its first KV part reaches the asker's inbox: the
    asker stops waiting when the broker publishes the peer's last will, uses the parts that came,
    recomputes the rest, and answers exactly as without the cache, well within its timeout."""
    peer = start_node(amqtt_broker, "k1", "smollm2-135m", log_dir)
    killed = threading.Event()
    watcher = MqttBus("kill-watch", amqtt_broker.address)

    def on_reply(topic: str, payload: bytes, retained: bool) -> None:
        try:
            env = wire.decode(senders.unwrap(payload))
        except Exception:
            return
        if env.kind is wire.Kind.KV_CHUNKS and env.sender == "k1" and not killed.is_set():
            os.kill(peer.proc.pid, signal.SIGKILL)
            killed.set()

    watcher.subscribe(topics.reply("node-v1"), on_reply, qos=0)
    watcher.start(10)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.ask(long_prompt(LONG_B, 1), node="k1", max_new_tokens=2, timeout=120)
            wait = time.monotonic() + 10  # k1's catalog reaches v1
            while time.monotonic() < wait and cache_figures(client, "k1", lambda c: True).get("chunks", 0) < 80:
                time.sleep(0.1)
            time.sleep(0.5)
            got = ask(client, long_prompt(LONG_B, 2))
            exact = ask(client, long_prompt(LONG_B, 2), no_cache=True)
    finally:
        watcher.stop()
        peer.stop()
    c = got.node_figures["cache"]
    print("killed:", {k: c.get(k) for k in FIGURES}, "ttlt", got.node_figures["ttlt_s"], exact.node_figures["ttlt_s"])
    shared = c["est_recompute_s"] is not None and c["peer"] == "k1"
    assert killed.is_set() and shared, c
    assert c["wasted"].startswith("short"), c
    assert 0 < c["remote_tokens"] < 1200, c  # some parts came, most did not
    assert c["fetch_s"] < c["fetch_timeout_s"], c  # the last will ended the wait, not the timeout
    assert got.node_figures["token_ids"] == exact.node_figures["token_ids"]
    assert got.node_figures["ttlt_s"] < exact.node_figures["ttlt_s"] + c["fetch_timeout_s"] + 1.0


def test_a_liar_with_valid_credentials_decides_one_answer_then_its_audit_catches_it(
        amqtt_broker: Broker, asker: NodeProcess, attacker: Attacker) -> None:
    """E2 with valid credentials (issue 15): the attacker signs another prompt's KV, and logits
    that make " London" the first token, in its own name. Every check on receipt passes, so v1's
    first answer is the lie (no audit after the answer can prevent that: RELIABILITY.md). v1's
    audit in its idle time catches it: the attacker is shunned, its KV dropped, the evidence
    published (retained) for every node, and the same ask is answered exactly."""
    if attacker.cache.provenance is None:
        pytest.skip("the tests' identities are off: a keyless liar is refused by test_provenance")
    prompt = mmlu_prompts("computer_security", 1)[0]
    attacker.lie(prompt, " London")
    attacker.advertise()
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        wait_advertised(client, attacker, prompt)
        failed = cache_figures(client, "v1", lambda c: True).get("audits_failed", 0)
        got = ask(client, prompt)
        deadline = time.monotonic() + 120  # the audit, then a prefill from the first token, at one thread
        while True:
            view = next(v for v in client.nodes() if v.name == "v1")
            figures, rejects = view.heartbeat.get("cache", {}), view.heartbeat.get("rejects", {})
            if attacker.name in figures.get("shunned", []) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        again = ask(client, prompt)
        exact = ask(client, prompt, no_cache=True)
    c = got.node_figures["cache"]
    assert c["peer"] == attacker.name and c["full_hit"] and c.get("first_token") == "peer-logits", c
    assert c.get("audit") == "pending" and got.answer.startswith(" London"), (c, got.answer)
    assert attacker.name in figures["shunned"] and figures["audits_failed"] == failed + 1, figures
    assert rejects.get("kv-audit-failed", 0) >= 1, rejects
    a = again.node_figures["cache"]
    assert attacker.name in a.get("peers_skipped", []) and a["remote_tokens"] == 0, a
    assert again.node_figures["token_ids"] == exact.node_figures["token_ids"]
    evidence = retained_evidence(amqtt_broker, "v1")
    assert evidence.kind is wire.Kind.KV_EVIDENCE and evidence.sender == "v1"
    assert evidence.body["unit"] >= -1 and len(evidence.body["ids"]) > 0


def retained_evidence(broker: Broker, node: str, timeout: float = 10.0) -> wire.Envelope:
    """The evidence ``node`` published last (retained on its kv-evidence topic)."""
    import queue

    got: queue.Queue[bytes] = queue.Queue()
    bus = MqttBus(f"evidence-watch-{time.monotonic_ns() % 10**6}", broker.address)
    bus.subscribe(topics.node_kv_evidence(node), lambda t, p, r: got.put(p))
    bus.start(10)
    try:
        return wire.decode(senders.unwrap(got.get(timeout=timeout)))
    finally:
        bus.stop()
