"""E8 (review H6): a KV fetch of a few kilobytes cannot make a node push hundreds of megabytes.

Before the fix a node served any KV_FETCH: any reply topic (``mesh/v1/answer``, an automation's
topic, one nobody reads), any ``model`` field, in the codec the requester named (fp32 twice the
bytes of the node's fp16), with no limit per requester and an unbounded outgoing queue. Now the
reply goes only to the requester's own node inbox, the model must be the node's, the node picks
the codec (never fp32 unless it is its own), and bytes per requester are metered
(``mesh.cache.quota``): what a request asks beyond the budget is not sent.

Real processes on a real amqtt broker: one SmolLM2 node with its prompt cache, metered at a burst
of 4 MiB and 1 MiB/s per requester (``MESH_KV_SERVE_BURST_MB``/``MESH_KV_SERVE_MB_S``, the
environment form of ``--kv-serve-burst-mb``/``--kv-serve-mb-s``); a raw MQTT client asks.

Where the nodes hold identities, the requester holds a node's credential (a stranger's fetch is
refused unread: ``unauthenticated``), so the metering is what is under test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from mesh.cache.node_cache import NodeCache
from mesh.config import CacheConfig
from mesh.model import Decoder, load_model
from nodes.client import MeshClient
from nodes.up import spawn
from tests.conftest import CACHE_ROOT, ENV, Broker, NodeProcess, asker_keys, mesh_argv, peer_keys, require_model
from tests.system.rogue import Rogue, rejects_of

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
NAME = "kvnode"
TEXT = "The quick brown fox jumps over the lazy dog. " * 30  # ~300 tokens: ~14 MB of fp32 KV
BURST, RATE = 4 << 20, 1 << 20
REQUESTS = 8


@pytest.fixture(scope="module")
def primed(amqtt_broker: Broker, log_dir: Path) -> Iterator[tuple[list[bytes], bytes]]:
    """The node, its cache holding TEXT's chunks, and their keys and the model digest."""
    require_model(MODEL)
    log = log_dir / f"{NAME}-{amqtt_broker.port}.log"
    proc = spawn(mesh_argv("node", "--name", NAME, "--broker", f"127.0.0.1:{amqtt_broker.port}", "--model", MODEL,
                           "--heartbeat", "0.5", "--home", str(CACHE_ROOT), "--threads", "1"),
                 open(log, "wb"), env={**ENV, "MESH_KV_SERVE_BURST_MB": str(BURST >> 20),
                                       "MESH_KV_SERVE_MB_S": str(RATE >> 20)})
    handle = NodeProcess(NAME, proc, log)
    try:
        with MeshClient(amqtt_broker.address, keyring=asker_keys()) as client:
            client.wait_online([NAME], 240, ready=lambda v: v.model == MODEL)
            client.ask(TEXT, node=NAME, max_new_tokens=1, timeout=300)
        loaded = load_model(CACHE_ROOT, MODEL)
        decoder = Decoder(loaded)
        cache = NodeCache(loaded, CacheConfig(), decoder)
        keys, _ = cache.keys(decoder.encode(TEXT))
        yield [bytes(k) for k in keys], cache.digest
    finally:
        handle.stop()


def flood(amqtt_broker: Broker, sender: str, reply_to: str, keys: list[bytes], model: bytes,
          codec: str = "fp32") -> tuple[int, float, set]:
    """REQUESTS fetches of every key; bytes that came back on ``reply_to`` until 3 s of quiet, the
    seconds that took, and the codecs of the chunks."""
    sink = Rogue(amqtt_broker, f"sink-{time.monotonic_ns()}", keys=peer_keys(sender))  # a node's credential
    try:
        sink.subscribe(reply_to)
        t0 = time.monotonic()
        for i in range(REQUESTS):
            sink.envelope(topics.node_kv(NAME), wire.Kind.KV_FETCH, sender,
                          {"keys": keys, "codec": codec, "model": model}, corr=f"flood-{i}", reply_to=reply_to)
        codecs: set[str] = set()
        last = time.monotonic()
        while time.monotonic() - last < 3.0 and time.monotonic() - t0 < 300:
            got = sink.next(0.5)
            if got is None:
                continue
            last = time.monotonic()
            env = wire.decode(got[1])
            codecs |= {c.get("codec") for c in env.body.get("chunks", [])}
        return sink.bytes_in, last - t0, codecs
    finally:
        sink.close()


def test_a_fetch_is_answered_only_to_the_requesters_inbox_for_its_model(
        amqtt_broker: Broker, primed: tuple[list[bytes], bytes]) -> None:
    keys, digest = primed
    wrong_model, _, _ = flood(amqtt_broker, "anyone", topics.reply("node-anyone"), keys, b"x" * 16)
    answer_topic, _, _ = flood(amqtt_broker, "anyone", topics.ANSWER, keys, digest)  # Home Assistant's sensor
    elsewhere, _, _ = flood(amqtt_broker, "anyone", "sink/kv", keys, digest)  # off the reply allow-list too
    assert (wrong_model, answer_topic, elsewhere) == (0, 0, 0)
    for reason in ("bad-kv-model", "bad-kv-reply", "bad-kv-fetch"):
        assert rejects_of(amqtt_broker, NAME, reason) >= 1, reason


def test_a_requester_gets_the_nodes_codec_within_its_byte_budget(
        amqtt_broker: Broker, primed: tuple[list[bytes], bytes]) -> None:
    keys, digest = primed
    # fp32 only: the node's wire codec is fp16 and it never serves fp32 but its own, so nothing
    got, _, codecs = flood(amqtt_broker, "attacker", topics.reply("node-attacker"), keys, digest)
    assert codecs == set() and got < 2048 * REQUESTS, (got, codecs)  # empty answers: nobody waits
    assert rejects_of(amqtt_broker, NAME, "bad-kv-codec") >= 1
    got, seconds, codecs = flood(amqtt_broker, "attacker2", topics.reply("node-attacker2"), keys, digest, "fp16")
    assert codecs == {"fp16"}, codecs
    one_part = 1 << 20  # mesh.cache.transfer.PART_BYTES: the budget is checked after each part
    assert 0 < got <= BURST + RATE * seconds + 2 * one_part, f"{got / 1e6:.1f} MB in {seconds:.1f} s"
    assert rejects_of(amqtt_broker, NAME, "kv-rate-limited") >= 1
