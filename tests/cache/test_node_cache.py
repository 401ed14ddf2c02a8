"""NodeCache, the prompt cache on every ask's path, with the real small model and no broker.

The peer is a second NodeCache on the same model; the fetch hands the asker the parts that the
peer's real ``serve`` encodes (through ``mesh.cache.transfer.payload_bytes`` as a node would
count them), or a tampered or stalled version of them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from mesh.cache.lookup import LinkEstimate, PenaltyPolicy
from mesh.cache.node_cache import NodeCache, Prepared
from mesh.cache.transfer import Part, payload_bytes
from mesh.config import CacheConfig
from mesh.model import Decoder, LoadedModel
from tests.cache.kit import FAST, Q1, Q2, SLOW_CPU

CONFIG = CacheConfig(kv_wire="fp32", fetch_timeout_s=5.0)


def node(loaded: LoadedModel, config: CacheConfig = CONFIG, **kw: Any) -> NodeCache:
    return NodeCache(loaded, config, Decoder(loaded), **kw)


@pytest.fixture(scope="module")
def peer(loaded: LoadedModel) -> NodeCache:
    """A peer holding Q1 (every chunk, the tail and its last logits)."""
    b = node(loaded)
    b.prepare_local(b.decoder.encode(Q1))
    return b


def ids_of(cache: NodeCache, text: str) -> list[int]:
    return cache.decoder.encode(text)


def recompute(cache: NodeCache, text: str | list[int]) -> torch.Tensor:
    """The logits of a plain prefill (a fresh cache: nothing to reuse)."""
    ids = ids_of(cache, text) if isinstance(text, str) else text
    fresh = NodeCache(cache.loaded, CONFIG, cache.decoder)
    prepared = fresh.prepare_local(ids)
    assert prepared.info["decision"] == "no-match" and prepared.info["computed_tokens"] == len(ids)
    return prepared.logits


def shared_chunks(cache: NodeCache, a: str, b: str) -> int:
    ka, kb = cache.keys(ids_of(cache, a))[0], cache.keys(ids_of(cache, b))[0]
    return next((i for i, (x, y) in enumerate(zip(ka, kb)) if x != y), min(len(ka), len(kb)))


class FakeFetch:
    """A Fetch answering from ``server.serve`` (fp32, one chunk per part, encoded as they are
    read), through ``shape``."""

    def __init__(self, server: NodeCache,
                 shape: Callable[[Iterator[dict[str, Any]], float], Iterator[Part]] | None = None) -> None:
        self.server, self.shape, self.calls = server, shape, []  # type: ignore[var-annotated]

    def __call__(self, peer: str, keys: list[bytes], pkey: bytes | None, timeout: float) -> Iterator[Part]:
        self.calls.append((peer, len(keys), pkey is not None, timeout))
        bodies = self.server.serve(keys, pkey, "fp32", 1 << 30, part_bytes=1)
        if self.shape is not None:
            return self.shape(bodies, timeout)
        return ((b, payload_bytes(b)) for b in bodies)


def asker(loaded: LoadedModel, peer: NodeCache, **kw: Any) -> NodeCache:
    a = node(loaded, **kw)
    a.set_peer_catalog("b", peer.catalog().to_dict())
    return a


def finished(p: Prepared) -> Prepared:
    p.finish()  # a deferred remote full hit: the rest of the transfer and its checks
    return p


def test_a_local_full_hit_needs_no_forward_and_answers_the_same(loaded: LoadedModel) -> None:
    a = node(loaded)
    ids = ids_of(a, Q1)
    first = a.prepare_local(ids)
    again = a.prepare_local(ids)
    assert first.info["decision"] == "no-match" and first.info["computed_tokens"] == len(ids)
    assert again.info["decision"] == "local" and again.info["full_hit"] is True
    assert again.info["local_tokens"] == len(ids) and "computed_tokens" not in again.info
    assert torch.equal(again.logits, first.logits)
    # a second question after the same prefix reuses its whole chunks and computes the rest
    q2 = ids_of(a, Q2)
    shared = shared_chunks(a, Q1, Q2)
    assert shared >= 4
    part = a.prepare_local(q2)
    assert part.info["decision"] == "local" and part.info["local_tokens"] == 16 * shared
    assert part.info["computed_tokens"] == len(q2) - 16 * shared
    assert torch.allclose(part.logits, recompute(a, Q2), atol=1e-4)
    f = a.snapshot()
    assert (f["asks"], f["hits"], f["full_hits"], f["fetches"]) == (3, 2, 1, 0)


def test_a_remote_full_hit_answers_like_a_recompute(loaded: LoadedModel, peer: NodeCache) -> None:
    a = asker(loaded, peer)
    fetch = FakeFetch(peer)
    ids = ids_of(a, Q1)
    got = finished(a.prepare(ids, SLOW_CPU, FAST, fetch))
    n_chunks = len(a.keys(ids)[0])
    assert fetch.calls == [("b", n_chunks, True, pytest.approx(fetch.calls[0][3]))]
    info = got.info
    assert info["decision"] == "remote" and info["peer"] == "b" and info["first_token"] == "peer-logits"
    assert info["remote_tokens"] == len(ids) and info["local_tokens"] == 0 and "wasted" not in info
    assert info["fetch_bytes"] > n_chunks * peer.bytes_per_chunk  # the chunks, the tail, the logits
    exact = recompute(a, Q1)
    # the peer's logits: the top k of the exact ones, -inf elsewhere; greedy picks the same token
    assert int(torch.argmax(got.logits)) == int(torch.argmax(exact))
    top = torch.isfinite(got.logits)
    assert int(top.sum()) == 256 and torch.allclose(got.logits[top], exact[top], atol=1e-4)
    # the restored KV is the prompt's: the next token's logits match a recompute's too
    nxt = int(torch.argmax(exact))
    cont, _ = a.decoder.prefill([*ids, nxt], got.cache.get(), start=len(ids))
    # (float16 KV: the same stored states, attended in another summation order: ~1e-5 relative)
    want = recompute(a, [*ids, nxt])
    assert int(cont.argmax()) == int(want.argmax()) and float((cont - want).abs().max()) < 2e-3, (cont - want).abs().max()
    f = a.snapshot()
    assert (f["fetches"], f["fetched_chunks"], f["wasted_fetches"], f["full_hits"]) == (1, n_chunks, 0, 1)
    assert a.store.match_prefix(a.keys(ids)[0]) == n_chunks  # fetched chunks are stored for next time


def test_a_remote_prefix_then_a_prefill_gives_the_recompute_logits(loaded: LoadedModel, peer: NodeCache) -> None:
    a = asker(loaded, peer)
    fetch = FakeFetch(peer)
    q2 = ids_of(a, Q2)
    shared = shared_chunks(a, Q1, Q2)
    got = a.prepare(q2, SLOW_CPU, FAST, fetch)
    assert [c[1:3] for c in fetch.calls] == [(shared, False)]  # the shared chunks, no prompt entry
    assert got.info["decision"] == "remote" and got.info["remote_tokens"] == 16 * shared
    assert got.info["computed_tokens"] == len(q2) - 16 * shared
    assert torch.allclose(got.logits, recompute(a, Q2), atol=1e-4)
    assert int(torch.argmax(got.logits)) == int(torch.argmax(recompute(a, Q2)))


def test_a_poisoned_part_is_rejected_counted_recomputed_and_its_peer_shunned(loaded: LoadedModel,
                                                                             peer: NodeCache) -> None:
    def flip_a_byte(bodies: Iterator[dict[str, Any]], timeout: float) -> Iterator[Part]:
        for b in bodies:
            if b["part"] == 0:  # the first chunk
                data = bytearray(b["chunks"][0]["layers"][3]["v"]["data"])
                data[100] ^= 0x01
                b["chunks"][0]["layers"][3]["v"]["data"] = bytes(data)
            yield b, payload_bytes(b)

    # an hour's cool-down: the shun must still run when the test reads it, however slow the machine
    a = asker(loaded, peer, penalty=PenaltyPolicy(base_s=3600.0))
    fetch = FakeFetch(peer, flip_a_byte)
    q2 = ids_of(a, Q2)
    got = a.prepare(q2, SLOW_CPU, FAST, fetch)
    info = got.info
    assert len(fetch.calls) == 1
    assert info["wasted"].startswith("bad: ") and "checksum" in info["wasted"], info["wasted"]
    assert info["decision"] == "recompute" and info["remote_tokens"] == 0 and info["computed_tokens"] == len(q2)
    assert torch.allclose(got.logits, recompute(a, Q2), atol=1e-4)
    f = a.snapshot()
    assert f["wasted_fetches"] == 1 and f["wasted_by_peer"] == {"b": 1} and f["shunned"] == ["b"]
    # shunned: the next ask does not ask b, even after b republishes (a liar controls its epoch)
    a.set_peer_catalog("b", peer.catalog().to_dict())
    again = a.prepare(ids_of(a, Q1), SLOW_CPU, FAST, fetch)
    assert len(fetch.calls) == 1 and again.info["peers_skipped"] == ["b"]
    assert again.info["decision"] == "local" and again.info["remote_tokens"] == 0


def test_a_stalled_peer_costs_the_timeout_then_a_recompute(loaded: LoadedModel, peer: NodeCache) -> None:
    def stall(bodies: Iterator[dict[str, Any]], timeout: float) -> Iterator[Part]:
        time.sleep(timeout)  # the peer never answers: the reply queue times out
        return
        yield  # a generator

    a = asker(loaded, peer, config=dataclasses.replace(CONFIG, fetch_timeout_s=0.6), fetch_floor_s=0.1,
              penalty=PenaltyPolicy(base_s=3600.0))  # the shun outlives a slow machine's test
    fetch = FakeFetch(peer, stall)
    q2 = ids_of(a, Q2)
    t0 = time.perf_counter()
    got = a.prepare(q2, SLOW_CPU, FAST, fetch)
    took = time.perf_counter() - t0
    info = got.info
    assert fetch.calls[0][3] == pytest.approx(0.6) and info["fetch_timeout_s"] == pytest.approx(0.6)
    # the wait is the 0.6 s timeout, far from the 30 s cap (a loaded machine may add seconds)
    assert 0.6 <= info["fetch_s"] < 15.0 and took < 0.6 + 30.0
    assert info["wasted"] == "short: no answer" and info["decision"] == "recompute"
    assert info["remote_tokens"] == 0 and info["computed_tokens"] == len(q2)
    assert torch.allclose(got.logits, recompute(a, Q2), atol=1e-4)
    f = a.snapshot()
    assert f["wasted_fetches"] == 1 and f["shunned"] == ["b"]
    # a short strike ends when the peer republishes a new catalog epoch
    a.set_peer_catalog("b", peer.catalog().to_dict())
    assert a.snapshot()["shunned"] == []


def test_a_slow_link_estimate_recomputes_without_fetching(loaded: LoadedModel, peer: NodeCache) -> None:
    a = asker(loaded, peer)
    fetch = FakeFetch(peer)
    q1 = ids_of(a, Q1)
    crawl = LinkEstimate(bytes_per_s=1e3, rtt_s=0.05)
    got = a.prepare(q1, 500.0, crawl, fetch)
    info = got.info
    assert fetch.calls == []
    assert info["decision"] == "recompute" and info["peer"] == "b"
    assert info["est_transfer_s"] > info["est_recompute_s"] * CONFIG.fetch_margin
    assert info["computed_tokens"] == len(q1) and info["remote_tokens"] == 0
    assert a.snapshot()["recompute_decisions"] == 1 and a.snapshot()["fetches"] == 0
    # a link measured on an earlier real fetch wins over the default estimate
    measured = asker(loaded, peer)
    measured.note_link("b", 10 << 20, 0.01, 0.001)
    assert measured.prepare(q1, 500.0, crawl, fetch).info["decision"] == "remote" and len(fetch.calls) == 1


def test_a_budget_capped_answer_is_kept_and_its_peer_not_shunned(loaded: LoadedModel, peer: NodeCache) -> None:
    """A peer whose byte budget for us ran out (mesh.cache.quota) serves the leading chunks and
    ends with ``capped``: the asker keeps them, computes the rest, and asks that peer again."""
    def capped_after_two(bodies: Iterator[dict[str, Any]], timeout: float) -> Iterator[Part]:
        for b in bodies:
            if b["part"] == 2:  # what PeerTransfer.serve_one sends once the budget is spent
                end = {"chunks": [], "part": 2, "last": True, "capped": True}
                yield end, payload_bytes(end)
                return
            yield b, payload_bytes(b)

    a = asker(loaded, peer)
    fetch = FakeFetch(peer, capped_after_two)
    q2 = ids_of(a, Q2)
    assert shared_chunks(a, Q1, Q2) > 2
    got = a.prepare(q2, SLOW_CPU, FAST, fetch)
    info = got.info
    assert info["decision"] == "remote" and info.get("capped") is True and "wasted" not in info, info
    assert info["remote_tokens"] == 2 * 16 and info["computed_tokens"] == len(q2) - 2 * 16
    assert torch.allclose(got.logits, recompute(a, Q2), atol=1e-4)
    f = a.snapshot()
    assert f["wasted_fetches"] == 0 and f["shunned"] == []
    # the same peer is asked for what Q1 has beyond the shared prefix (now held here) next time
    again = finished(a.prepare(ids_of(a, Q1), SLOW_CPU, FAST, FakeFetch(peer)))
    assert again.info["decision"] == "remote" and again.info["peer"] == "b", again.info
    assert again.info["local_tokens"] == 16 * shared_chunks(a, Q1, Q2) and again.info["remote_tokens"] > 0


def test_an_empty_capped_answer_is_a_short_strike(loaded: LoadedModel, peer: NodeCache) -> None:
    """An empty bucket's answer brings nothing: the peer is skipped until it republishes."""
    def empty(bodies: Iterator[dict[str, Any]], timeout: float) -> Iterator[Part]:
        end = {"chunks": [], "part": 0, "last": True, "capped": True}
        yield end, payload_bytes(end)

    a = asker(loaded, peer, penalty=PenaltyPolicy(base_s=3600.0))
    got = a.prepare(ids_of(a, Q2), SLOW_CPU, FAST, FakeFetch(peer, empty))
    assert got.info["wasted"] == "short" and got.info["decision"] == "recompute", got.info
    assert a.snapshot()["shunned"] == ["b"]


def test_made_up_names_cannot_hold_catalogs_without_bound(loaded: LoadedModel, peer: NodeCache) -> None:
    """Review M10: catalogs (up to 16 MiB each) are kept for at most MAX_PEER_CATALOGS peers."""
    from mesh.cache.node_cache import MAX_PEER_CATALOGS

    a = node(loaded)
    body = peer.catalog().to_dict()
    for i in range(MAX_PEER_CATALOGS + 10):
        a.set_peer_catalog(f"p{i}", body)
    assert len(a.peers) == MAX_PEER_CATALOGS and "p0" in a.peers and f"p{MAX_PEER_CATALOGS}" not in a.peers
    a.set_peer_catalog("p0", None)  # one went offline: room for the next
    a.set_peer_catalog("late", body)
    assert "late" in a.peers
