"""End to end: the distributed prompt cache with real nodes, real models and a real broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from mesh.auth import senders
from mesh.mqtt.bus import MqttBus
from mesh.cache.catalog import Catalog
from nodes.client import AskResult, MeshClient
from tests.cache.kit import retained_catalog
from tests.conftest import Broker, NodeProcess, asker_keys, peer_keys, require_model, start_node

pytestmark = pytest.mark.e2e

PREFIX = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
          "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n")
Q1 = "Which planet has the most moons?\nA. Saturn\nB. Mars\nC. Venus\nD. Mercury\nAnswer:"
Q2 = "What is the largest planet?\nA. Earth\nB. Jupiter\nC. Mars\nD. Venus\nAnswer:"
Q3 = "Which star is nearest to Earth?\nA. Sirius\nB. Vega\nC. The Sun\nD. Polaris\nAnswer:"


@pytest.fixture(scope="module")
def nodes(amqtt_broker: Broker, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    started = {
        "c1": start_node(amqtt_broker, "c1", "smollm2-135m", log_dir),
        "c2": start_node(amqtt_broker, "c2", "smollm2-135m", log_dir),
        "c3": start_node(amqtt_broker, "c3", "smollm2-135m", log_dir, "--kv-wire", "int8"),
        "c4": start_node(amqtt_broker, "c4", "smollm2-135m", log_dir, "--fetch-margin", "1000000"),
    }
    yield started
    for n in started.values():
        n.stop()


def shared_chunk_tokens(a: str, b: str, chunk: int = 16) -> int:
    """Tokens of the full chunks two prompts share (SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(require_model("smollm2-135m"))
    x, y = tok(a)["input_ids"], tok(b)["input_ids"]
    n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return n // chunk * chunk


def ask(client: MeshClient, text: str, node: str | None = None, **kw: object) -> AskResult:
    return client.ask(text, node=node, max_new_tokens=kw.pop("max_new_tokens", 6), timeout=120,  # type: ignore[arg-type]
                      cache_figures=True, **kw)


def wait_catalog(client: MeshClient, broker: Broker, node: str, min_items: int, timeout: float = 10.0) -> Catalog:
    """The node's retained catalog once it lists at least ``min_items`` keys, read as a node reads it
    (with the catalog key, when the tests hold identities: mesh.cache.catalog)."""
    holder = peer_keys(node)
    return Catalog.from_dict(retained_catalog(broker, node, min_items, timeout),
                             secret=holder.catalog_key if holder is not None else None)


def wait_audited(client: MeshClient, node: str, served: int, timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
    """The node's heartbeat cache figures once it has answered ``served`` asks and no fetch of
    its waits for an audit (a fetched entry is persisted, advertised and served only after its
    audit: mesh.cache.audit)."""
    deadline = time.monotonic() + timeout
    while True:
        hb = next((v.heartbeat for v in client.nodes() if v.name == node), {})
        cache = hb.get("cache", {})
        if hb.get("served", 0) >= served and cache.get("audits_pending") == 0:
            return cache
        assert time.monotonic() < deadline, f"{node}'s fetches were not audited: {cache}"
        time.sleep(0.2)


def test_repeated_prompt_is_a_full_local_hit(amqtt_broker: Broker, nodes: dict) -> None:
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        first = ask(client, PREFIX + Q1, "c1")
        second = ask(client, PREFIX + Q1, "c1")
        baseline = ask(client, PREFIX + Q1, "c1", no_cache=True)
    assert first.node_figures["cache"]["decision"] in ("no-match", "recompute")
    c = second.node_figures["cache"]
    assert c["decision"] == "local" and c["full_hit"] and c["local_tokens"] == second.prompt_tokens
    assert baseline.node_figures["cache"]["decision"] == "no-cache"
    assert second.node_figures["token_ids"] == first.node_figures["token_ids"] == baseline.node_figures["token_ids"]
    # no forward pass for the first token: the node-side prefill is a restore
    assert second.node_figures["prefill_s"] < first.node_figures["prefill_s"] / 3


def test_shared_prefix_is_fetched_from_the_peer_that_holds_it(amqtt_broker: Broker, nodes: dict) -> None:
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        ask(client, PREFIX + Q2, "c1")
        cat = wait_catalog(client, amqtt_broker, "c1", 5)
        got = ask(client, PREFIX + Q2.replace("largest", "smallest"), "c2")
        again = ask(client, PREFIX + Q2.replace("largest", "smallest"), "c2", no_cache=True)
        full = ask(client, PREFIX + Q2, "c2")  # c2 has the shared chunks, c1 the rest and the last logits
        full_exact = ask(client, PREFIX + Q2, "c2", no_cache=True)
    f = full.node_figures["cache"]
    # One chunk plus the tail is left to fetch: on a loaded machine the round trip alone can cost
    # more than recomputing ~20 tokens, and then the cost model rightly recomputes (the remote
    # full hit itself is asserted in test_poison.py and test_cache_gemma.py).
    if f["decision"] == "remote":
        assert f["full_hit"] and f["peer"] == "c1" and f["local_tokens"] > 0, f
    else:
        assert f["decision"] == "recompute" and f["est_transfer_s"] * 1.2 >= f["est_recompute_s"], f
    assert full.node_figures["token_ids"] == full_exact.node_figures["token_ids"]
    c = got.node_figures["cache"]
    shared = shared_chunk_tokens(PREFIX + Q2, PREFIX + Q2.replace("largest", "smallest"))
    assert cat.count >= 5 and shared >= 48
    assert c["decision"] == "remote" and c["peer"] == "c1", c
    assert c["remote_tokens"] == shared and c["local_tokens"] == 0 and c["fetch_bytes"] > 0 and c["fetch_s"] > 0
    assert c["est_transfer_s"] < c["est_recompute_s"]
    assert got.node_figures["token_ids"] == again.node_figures["token_ids"]


def test_int8_wire_moves_fewer_bytes_with_the_same_answer(amqtt_broker: Broker, nodes: dict) -> None:
    # a prefix each that neither c2 nor c3 has seen, and only c1 holds: a chunk relayed by the other
    # would come in the codec it was received in, the only one whose signed bytes the relay can
    # reproduce (mesh.cache.provenance)
    prefix = PREFIX.replace("astronomy", "planetary science").replace("closest to", "nearest")
    other = PREFIX.replace("astronomy", "planetary geology").replace("closest to", "nearest")
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        before = wait_catalog(client, amqtt_broker, "c1", 0).count
        ask(client, prefix + Q3, "c1")
        ask(client, other + Q3, "c1")
        wait_catalog(client, amqtt_broker, "c1", before + 10)  # two prompts: 4 chunks and a prompt key each
        int8 = ask(client, prefix + Q1, "c3")
        exact = ask(client, prefix + Q1, "c3", no_cache=True)
        fp16 = ask(client, other + Q2, "c2")
    a, b = fp16.node_figures["cache"], int8.node_figures["cache"]
    assert a["decision"] == b["decision"] == "remote" and not a["full_hit"] and not b["full_hit"], (a, b)
    per_token = a["fetch_bytes"] / a["remote_tokens"], b["fetch_bytes"] / b["remote_tokens"]
    # SmolLM2: 30 layers x 2 x 3 heads x 64 dims = 11,520 values per token
    assert 23_040 <= per_token[0] < 23_040 * 1.02
    # int8 plus fp32 per-channel scales over 16 tokens: (1 + 4/16) / 2 = 0.625 of fp16
    assert 0.6 < per_token[1] / per_token[0] < 0.65, per_token
    assert int8.node_figures["token_ids"] == exact.node_figures["token_ids"]


def test_fetch_is_skipped_when_recompute_is_cheaper(amqtt_broker: Broker, nodes: dict) -> None:
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        ask(client, PREFIX + "Name a dwarf planet.\nAnswer:", "c1")
        wait_catalog(client, amqtt_broker, "c1", 6)
        got = ask(client, PREFIX + "Name a comet.\nAnswer:", "c4")
    c = got.node_figures["cache"]
    assert c["decision"] == "recompute" and c["peer"] in ("c1", "c2", "c3") and c["remote_tokens"] == 0, c
    assert c["est_transfer_s"] * 1_000_000 >= c["est_recompute_s"]


def test_asks_without_node_go_to_the_node_holding_the_prefix(amqtt_broker: Broker, nodes: dict) -> None:
    text = PREFIX + "Which planet is called the morning star?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\nAnswer:"
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        ask(client, text, "c2")
        wait_catalog(client, amqtt_broker, "c2", 8)
        routed = [ask(client, text, model="smollm2-135m") for _ in range(3)]
    assert [r.node for r in routed] == ["c2"] * 3
    assert all(r.node_figures["cache"]["decision"] == "local" for r in routed)


def test_heartbeat_carries_cache_figures(amqtt_broker: Broker, nodes: dict) -> None:
    with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
        ask(client, PREFIX + Q1, "c1")
        deadline = time.monotonic() + 10
        while True:
            hb = next(v.heartbeat for v in client.nodes() if v.name == "c1")
            cache = hb.get("cache", {})
            if cache.get("hits", 0) >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert cache["chunks"] >= 5 and cache["bytes"] > 0 and cache["hits"] >= 1 and cache["served_requests"] >= 1
    assert 0 < cache["hit_rate"] <= 1 and "wasted_fetches" in cache and hb["link_bw_Bps"] > 0


def test_restarted_node_keeps_its_cache(amqtt_broker: Broker, log_dir: Path, tmp_path: Path, nodes: dict) -> None:
    store = tmp_path / "kv"
    node = start_node(amqtt_broker, "p1", "smollm2-135m", log_dir, "--cache-dir", str(store))
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            first = ask(client, PREFIX + Q2, "p1", no_cache=False)
            wait_audited(client, "p1", 1)  # p1 may have fetched the prompt from c1: written once audited
    finally:
        node.stop()
    assert any(store.glob("*.kv"))
    node = start_node(amqtt_broker, "p1", "smollm2-135m", log_dir, "--cache-dir", str(store))
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            cat = wait_catalog(client, amqtt_broker, "p1", 5)
            again = ask(client, PREFIX + Q2, "p1")
    finally:
        node.stop()
    assert cat.count >= 5
    assert again.node_figures["cache"]["decision"] == "local" and again.node_figures["cache"]["full_hit"]
    assert again.node_figures["token_ids"] == first.node_figures["token_ids"]


# -- peers that lie, and eviction --------------------------------------------------------------

class FakePeer:
    """A peer that advertises a prompt's chunks in its catalog and then serves ``serve(keys)``."""

    def __init__(self, broker: Broker, name: str, prompt: str, serve) -> None:  # type: ignore[no-untyped-def]
        from mesh.config import CacheConfig
        from mesh.model import Decoder, load_model
        from mesh.cache.node_cache import NodeCache
        from tests.conftest import CACHE_ROOT

        loaded = load_model(CACHE_ROOT, "smollm2-135m")
        self.cache = NodeCache(loaded, CacheConfig(), Decoder(loaded))
        self.decoder = Decoder(loaded)
        self.keys = self.keys_of(prompt)
        self.name, self.serve, self.requests = name, serve, 0
        self.bus = MqttBus(f"fake-{name}", broker.address, will=(topics.node_status(name), topics.OFFLINE, 1, True))
        self.bus.subscribe(topics.node_kv(name), self._on_fetch)
        self.bus.start(10)

    def keys_of(self, text: str) -> list[bytes]:
        return list(self.cache.keys(self.decoder.encode(text))[0])

    def _on_fetch(self, topic: str, payload: bytes, retained: bool) -> None:
        env = wire.decode(senders.unwrap(payload))
        self.requests += 1
        body = {"chunks": self.serve(list(env.body["keys"]), self.cache.digest), "part": 0, "last": True}
        reply = wire.Envelope(wire.Kind.KV_CHUNKS, self.name, body, corr=env.corr)
        self.bus.publish(env.reply_to, senders.encode(peer_keys(self.name), reply, env.reply_to), qos=1)

    def advertise(self, link_bw_Bps: float = 1e10) -> None:
        cat = Catalog.from_keys(self.cache.digest, 16, self.keys, capacity=1000)
        hb = {"seq": 0, "model": "smollm2-135m", "model_key": "fake", "queue": 0, "load": 0.0, "prefill_tps": 1.0,
              "rtt_ms": 0.1, "link_bw_Bps": link_bw_Bps, "time": time.time()}
        for topic, env in ((topics.node_heartbeat(self.name), wire.Envelope(wire.Kind.HEARTBEAT, self.name, hb)),
                           (topics.node_catalog(self.name), wire.Envelope(wire.Kind.CATALOG, self.name, cat.to_dict()))):
            self.bus.publish_wait(topic, senders.encode(peer_keys(self.name), env, topic), qos=1, retain=True)
        self.bus.publish_wait(topics.node_status(self.name), topics.ONLINE, qos=1, retain=True)
        time.sleep(1.0)  # every node has read the catalog

    def close(self) -> None:
        for t in (topics.node_status(self.name), topics.node_heartbeat(self.name), topics.node_catalog(self.name)):
            self.bus.publish_wait(t, b"", qos=1, retain=True)
        self.bus.stop()


def _wasted(client: MeshClient, node: str, at_least: int) -> int:
    deadline = time.monotonic() + 10
    while True:
        hb = next(v.heartbeat for v in client.nodes() if v.name == node)
        got = int(hb.get("cache", {}).get("wasted_fetches", 0))
        if got >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.parametrize("lie", ["empty", "corrupt"])
def test_a_peer_that_lacks_or_corrupts_chunks_leads_to_recompute(amqtt_broker: Broker, nodes: dict, lie: str) -> None:
    prompt = PREFIX.replace("astronomy", f"geology ({lie})") + "Which rock is igneous?\nA. Basalt\nB. Shale\nAnswer:"

    def serve(keys: list[bytes], model: bytes) -> list:  # type: ignore[type-arg]
        if lie == "empty":
            return []
        # well-formed but wrong bytes: the checksum binds them to the key and model
        layers = [{"k": {"dtype": "float16", "shape": [3, 16, 64], "data": bytes(3 * 16 * 64 * 2)},
                   "v": {"dtype": "float16", "shape": [3, 16, 64], "data": bytes(3 * 16 * 64 * 2)}}] * 30
        return [{"v": 1, "codec": "fp16", "key": k, "model": model, "layers": layers, "sum": 12345} for k in keys]

    fake = FakePeer(amqtt_broker, f"a-liar-{lie}", prompt, serve)
    try:
        fake.advertise()
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            before = _wasted(client, "c2", 0)
            got = ask(client, prompt, "c2")
            exact = ask(client, prompt, "c2", no_cache=True)
            after = _wasted(client, "c2", before + 1)
    finally:
        fake.close()
    c = got.node_figures["cache"]
    assert fake.requests == 1 and c["peer"] == fake.name and c["remote_tokens"] == 0, c
    assert c["decision"] == "recompute" and after == before + 1
    assert got.node_figures["token_ids"] == exact.node_figures["token_ids"]


def test_evicted_chunks_leave_the_published_catalog(amqtt_broker: Broker, log_dir: Path, nodes: dict) -> None:
    from mesh.cache.catalog import leading_matches

    # SmolLM2 keeps 369 KB of float16 KV per 16-token chunk: 3 MB hold one of these prompts, not two
    node = start_node(amqtt_broker, "e1", "smollm2-135m", log_dir, "--cache-mb", "3")
    a = PREFIX + Q1
    b = PREFIX.replace("astronomy", "botany").replace("planet", "plant") + Q2.replace("planet", "tree")
    fake = FakePeer(amqtt_broker, "keys-only", a, lambda keys, model: [])  # never advertised: only computes keys
    keys_b = fake.keys_of(b)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            ask(client, a, "e1")
            first = wait_catalog(client, amqtt_broker, "e1", 5)
            ask(client, b, "e1")
            time.sleep(1.5)
            second = wait_catalog(client, amqtt_broker, "e1", 1)
    finally:
        fake.bus.stop()
        node.stop()
    assert leading_matches(first, fake.keys) == len(fake.keys) >= 4
    assert leading_matches(second, keys_b) == len(keys_b)
    assert leading_matches(second, fake.keys) < len(fake.keys)  # a's chain was eaten from its tip
    assert second.epoch > first.epoch
