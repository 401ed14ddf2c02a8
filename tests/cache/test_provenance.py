"""KV provenance across re-serving (issue 15, review C2/E2), with the real small model and the
real CA and keyrings (``mesh.auth.store``), no broker.

A sealed part proves who served it; these tests are about who *computed* what is in it. Nodes
are NodeCaches on SmolLM2-135M; a fetch hands the asker the parts the server's real ``serve``
encodes (as ``tests/cache/test_node_cache.py`` does). The liar serves the real KV of another
prompt of the same length under the asked keys, with the real logits of that prompt first: every
check of ``mesh.cache.codec`` passes (keys, model, shapes, checksums).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mesh import wire
from mesh.auth import store as identities
from mesh.auth.keyring import Keyring
from mesh.cache.kv import ChunkKV
from mesh.cache.lookup import PenaltyPolicy
from mesh.cache.node_cache import NodeCache
from mesh.cache.transfer import Part, payload_bytes
from mesh.config import CacheConfig
from mesh.model import Decoder, LoadedModel
from tests.cache.kit import FAST, Q1, Q2, SLOW_CPU

CONFIG = CacheConfig(kv_wire="fp16", fetch_timeout_s=5.0)


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with node identities b, h, c, a liar l (revoked), and an asker."""
    d = tmp_path_factory.mktemp("identity")
    identities.init_ca(d)
    for name in ("b", "h", "c", "l"):
        identities.issue(d, name, "node")
    identities.issue(d, "cli", "asker")
    identities.revoke(d, "l")
    return d


def ring(ids_dir: Path, name: str, role: str = "node") -> Keyring:
    keys = identities.load_keyring(ids_dir, name, role, enrol=False)
    assert keys is not None
    return keys


class Node:
    """A NodeCache with an identity (or none) and the counter its refusals go to."""

    def __init__(self, loaded: LoadedModel, keys: Keyring | None, config: CacheConfig = CONFIG) -> None:
        self.rejects = wire.RejectCounter()
        self.cache = NodeCache(loaded, config, Decoder(loaded), penalty=PenaltyPolicy(base_s=3600.0),
                               keyring=keys, rejects=self.rejects)

    def ids(self, text: str) -> list[int]:
        return self.cache.decoder.encode(text)


def fetch_from(server: NodeCache, codec_name: str = "fp16",
               tamper: Any = None) -> Any:
    """A Fetch answering from ``server.serve`` (one chunk per part), through ``tamper(body)``."""
    def fetch(peer: str, keys: list[bytes], pkey: bytes | None, timeout: float) -> Iterator[Part]:
        for body in server.serve(keys, pkey, codec_name, 1 << 30, part_bytes=1):
            if tamper is not None:
                tamper(body)
            yield body, payload_bytes(body)
    return fetch


def borrowing(honest: Node) -> Any:
    """A tamper that attaches ``honest``'s proofs (of the real chunks) to whatever is served."""
    def attach(body: dict[str, Any]) -> None:
        for ch in body["chunks"]:
            ch["prov"] = honest.cache.store.entry(ch["key"]).proof.sealed
        for part in (body.get("logits"), body.get("prompt")):
            if part is not None:
                key = part["key"] if "key" in part else part["tail"]["key"]
                part["prov"] = honest.cache.store.entry(key).proof.sealed
    return attach


def ask_via(asker: Node, server: Node, name: str, text: str, **kw: Any) -> Any:
    asker.cache.set_peer_catalog(name, server.cache.catalog().to_dict())
    got = asker.cache.prepare(asker.ids(text), SLOW_CPU, FAST, fetch_from(server.cache, **kw))
    first = got.logits.clone()
    got.finish()
    return got, first


def recompute(loaded: LoadedModel, text: str) -> torch.Tensor:
    fresh = Node(loaded, None)
    return fresh.cache.prepare_local(fresh.ids(text)).logits


def honest_chunks(loaded: LoadedModel, text: str) -> list[ChunkKV]:
    fresh = Node(loaded, None)
    ids = fresh.ids(text)
    fresh.cache.prepare_local(ids)
    keys, _ = fresh.cache.keys(ids)
    return fresh.cache.store.get_chain(keys)


def held_chunks(node: Node, text: str) -> list[ChunkKV]:
    keys, _ = node.cache.keys(node.ids(text))
    return node.cache.store.get_chain(keys)


def same_kv(a: ChunkKV, b: ChunkKV, atol: float = 1e-2) -> bool:
    """Equal up to the fp16 wire rounding."""
    return all(torch.allclose(x, y, atol=atol) for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)))


def poisoned(loaded: LoadedModel, liar: Node, text: str) -> None:
    """Fill ``liar``'s store with another prompt's real KV, tail and logits under ``text``'s keys.
    The other prompt differs in its first token only: same length, every chunk different."""
    ids = liar.ids(text)
    other = [ids[1] if ids[0] != ids[1] else ids[0] + 1, *ids[1:]]
    donor = Node(loaded, None)
    donor.cache.prepare_local(other)
    okeys, opkey = donor.cache.keys(other)
    chunks, prompt = donor.cache.store.get_chain(okeys), donor.cache.store.get_prompt(opkey)
    keys, pkey = liar.cache.keys(ids)
    assert len(chunks) == len(keys) and prompt is not None
    lc = liar.cache
    proofs, proof = None, None
    if getattr(lc, "provenance", None) is not None:  # the liar signs its lie in its own name
        proofs = [lc.provenance.sign_chunk(k, c) for k, c in zip(keys, chunks)]
        proof = lc.provenance.sign_prompt(pkey, prompt["tail"], prompt["logits"])
    with lc.lock:
        lc.store.put_chain(keys, chunks, [c.nbytes for c in chunks], proofs=proofs)
        lc.store.put_prompt(pkey, keys[-1], prompt, 1, proof)


# -- the attacks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("liar_kind", ["unsigned", "revoked", "borrowed"])
def test_a_liars_chunks_relayed_through_an_honest_node_never_reach_the_third(
        loaded: LoadedModel, ids_dir: Path, liar_kind: str) -> None:
    """The liar answers h's fetch for Q1 (a full match: its logits come first); h stores what it
    accepted and serves it on to c. Nothing of the lie may reach c's first token, logits or store."""
    tamper = None
    if liar_kind == "revoked":
        liar = Node(loaded, ring(ids_dir, "l"))  # signs in its own name: its keyring keeps signing
    else:
        liar = Node(loaded, None)  # signs nothing
        if liar_kind == "borrowed":  # attaches b's valid proofs of the real Q1 to its lie
            b = Node(loaded, ring(ids_dir, "b"))
            b.cache.prepare_local(b.ids(Q1))
            tamper = borrowing(b)
    poisoned(loaded, liar, Q1)
    h, c = Node(loaded, ring(ids_dir, "h")), Node(loaded, ring(ids_dir, "c"))
    truth = recompute(loaded, Q1)

    at_h, first_h = ask_via(h, liar, "l", Q1, tamper=tamper)
    assert int(torch.argmax(first_h)) == int(torch.argmax(truth))  # no first token from the lie
    assert torch.allclose(at_h.logits, truth, atol=1e-3)
    assert at_h.info["wasted"].startswith("bad: "), at_h.info
    refused = {"unsigned": "kv-unsigned", "revoked": "provenance-cert-revoked", "borrowed": "bad-provenance"}
    assert h.rejects.snapshot().get(refused[liar_kind], 0) >= 1, h.rejects.snapshot()

    at_c, first_c = ask_via(c, h, "h", Q1)
    assert at_c.info["decision"] == "remote" and at_c.info["full_hit"] and "wasted" not in at_c.info, at_c.info
    assert int(torch.argmax(first_c)) == int(torch.argmax(truth))
    top = torch.isfinite(at_c.logits)  # a peer's logits are its top k
    assert int(top.sum()) == 256 and torch.allclose(at_c.logits[top], truth[top], atol=1e-3)
    honest = honest_chunks(loaded, Q1)
    assert all(same_kv(x, y) for x, y in zip(held_chunks(c, Q1), honest))
    assert c.rejects.snapshot() == {}


def test_a_chunk_changed_in_memory_after_computing_is_not_served_on(loaded: LoadedModel, ids_dir: Path) -> None:
    """A bit flips in b's RAM (an exponent bit of one layer's values of its first chunk) after b computed
    and signed Q1: b must not serve the flipped bytes under its proof, and c must not take them."""
    b, c = Node(loaded, ring(ids_dir, "b")), Node(loaded, ring(ids_dir, "c"))
    b.cache.prepare_local(b.ids(Q1))
    keys, _ = b.cache.keys(b.ids(Q1))
    flipped = b.cache.store.get_chain(keys[:1])[0].values[5].view(torch.int32).reshape(-1)
    flipped ^= 1 << 25  # in place, the store's own tensor: every value x16 or /16, all finite in fp16

    got, _ = ask_via(c, b, "b", Q2)  # shares Q1's leading chunks
    held = held_chunks(c, Q2)
    honest = honest_chunks(loaded, Q2)
    assert all(same_kv(x, y) for x, y in zip(held, honest))
    assert torch.allclose(got.logits, recompute(loaded, Q2), atol=1e-2)
    assert keys[0] not in b.cache.store  # b dropped the spoiled chunk (and what hung off it)


def test_bytes_changed_on_the_way_are_refused_and_counted(loaded: LoadedModel, ids_dir: Path) -> None:
    """The relay (or anyone on the path) changes a chunk's bytes and fixes its unkeyed checksum:
    the computer's proof no longer matches, so the part is bad and counted."""
    from mesh.cache import codec

    b, c = Node(loaded, ring(ids_dir, "b")), Node(loaded, ring(ids_dir, "c"))
    b.cache.prepare_local(b.ids(Q1))

    def flip(body: dict[str, Any]) -> None:
        for ch in body["chunks"]:
            t = ch["layers"][2]["k"]
            data = bytearray(t["data"])
            data[10] ^= 0x40
            t["data"] = bytes(data)
            ch["sum"] = codec._checksum(ch["model"], ch["key"], ch["layers"])

    c.cache.set_peer_catalog("b", b.cache.catalog().to_dict())
    got = c.cache.prepare(c.ids(Q2), SLOW_CPU, FAST, fetch_from(b.cache, tamper=flip))
    assert got.info["wasted"].startswith("bad: ") and "provenance" in got.info["wasted"], got.info
    assert c.rejects.snapshot() == {"bad-provenance": 1}
    assert torch.allclose(got.logits, recompute(loaded, Q2), atol=1e-3)


def test_only_nodes_and_the_coordinator_vouch_for_kv(loaded: LoadedModel, ids_dir: Path) -> None:
    """An asker's identity is certified, but askers compute no KV for the mesh."""
    asker_signed = Node(loaded, ring(ids_dir, "cli", "asker"))
    poisoned(loaded, asker_signed, Q1)
    c = Node(loaded, ring(ids_dir, "c"))
    got, _ = ask_via(c, asker_signed, "cli", Q1)
    assert got.info["wasted"].startswith("bad: ")
    assert c.rejects.snapshot() == {"provenance-wrong-role": 1}


# -- honest relays -------------------------------------------------------------------------------

@pytest.mark.parametrize("codec_name", ["fp16", "int8", "fp32"])
def test_a_relayed_chunk_keeps_its_computers_proof(loaded: LoadedModel, ids_dir: Path, codec_name: str) -> None:
    """b computes, h fetches (in ``codec_name``) and serves on, c checks b's signature over the
    bytes h sent: accepted, exact, and c can serve them on again."""
    config = CacheConfig(kv_wire=codec_name, fetch_timeout_s=5.0)
    b, h, c = (Node(loaded, ring(ids_dir, n), config) for n in ("b", "h", "c"))
    b.cache.prepare_local(b.ids(Q1))
    at_h, _ = ask_via(h, b, "b", Q1, codec_name=codec_name)
    assert at_h.info["full_hit"] and "wasted" not in at_h.info, at_h.info
    assert h.cache.audit().passed  # type: ignore[union-attr]  # served on only once audited (test_audit.py)
    at_c, _ = ask_via(c, h, "h", Q1, codec_name=codec_name)
    assert at_c.info["full_hit"] and "wasted" not in at_c.info, at_c.info
    keys, pkey = c.cache.keys(c.ids(Q1))
    assert {p.signer for p in c.cache.store.proofs(keys)} == {"b"}
    assert c.cache.store.entry(pkey).proof.signer == "b"
    assert torch.equal(at_c.logits, at_h.logits)
    for x, y in zip(held_chunks(c, Q1), held_chunks(h, Q1)):
        assert all(torch.equal(p, q) for p, q in zip((*x.keys, *x.values), (*y.keys, *y.values)))
    assert h.rejects.snapshot() == {} and c.rejects.snapshot() == {}


def test_keyless_nodes_exchange_kv_as_before(loaded: LoadedModel) -> None:
    b, c = Node(loaded, None), Node(loaded, None)
    b.cache.prepare_local(b.ids(Q1))
    got, _ = ask_via(c, b, "b", Q1)
    assert got.info["full_hit"] and got.info["decision"] == "remote" and "wasted" not in got.info
    keys, _ = c.cache.keys(c.ids(Q1))
    assert c.cache.store.proofs(keys) == [None] * len(keys)


# -- persistence ---------------------------------------------------------------------------------

def test_persisted_chunks_keep_their_proof_and_are_checked_again(loaded: LoadedModel, ids_dir: Path,
                                                                 tmp_path: Path) -> None:
    from mesh.cache import codec
    from mesh.cache.store import decode_record, encode_record

    config = CacheConfig(kv_wire="fp16", fetch_timeout_s=5.0, persist_dir=tmp_path / "kv")
    b = Node(loaded, ring(ids_dir, "b"))
    b.cache.prepare_local(b.ids(Q1))
    h = Node(loaded, ring(ids_dir, "h"), config)
    ask_via(h, b, "b", Q1)  # h holds b's chunks (fp16 on the wire) and writes them with b's proofs
    assert h.cache.audit().passed  # type: ignore[union-attr]  # once their audit passed (test_audit.py)
    keys, pkey = h.cache.keys(h.ids(Q1))
    n = len(keys) + 1

    again = Node(loaded, ring(ids_dir, "h"), config)
    assert len(again.cache.store) == n and again.rejects.snapshot() == {}
    assert {p.signer for p in again.cache.store.proofs(keys)} == {"b"}
    c = Node(loaded, ring(ids_dir, "c"))
    at_c, _ = ask_via(c, again, "h", Q1)  # re-served after a restart: still b's proofs, still valid
    assert at_c.info["full_hit"] and "wasted" not in at_c.info, at_c.info

    # a record whose payload was rewritten (with a valid record checksum) fails its proof on load
    path = config.persist_dir / (bytes(keys[-1]).hex() + ".kv")
    model, entry = decode_record(path.read_bytes())
    chunk = codec.decode_record(entry.payload, again.cache.layout, again.cache.chunk_size)
    chunk.values[0].add_(0.5)
    path.write_bytes(encode_record(model, entry, codec.encode_record(chunk), entry.proof))
    tampered = Node(loaded, ring(ids_dir, "h"), config)
    assert len(tampered.cache.store) == n - 2  # that chunk, and the prompt entry hanging off it
    assert tampered.rejects.snapshot() == {"bad-provenance": 1}

    # a keyed node loads no record without a proof (version 1); a keyless one loads it as before
    path.write_bytes(encode_record(model, entry, entry.payload))
    assert len(Node(loaded, ring(ids_dir, "h"), config).cache.store) == n - 2
    assert len(Node(loaded, None, config).cache.store) == n


def test_persisted_chunks_of_a_revoked_computer_are_dropped_on_load(loaded: LoadedModel, tmp_path: Path) -> None:
    d = tmp_path / "identity"
    identities.init_ca(d)
    for name in ("b", "h"):
        identities.issue(d, name, "node")
    config = CacheConfig(kv_wire="fp16", fetch_timeout_s=5.0, persist_dir=tmp_path / "kv")
    b = Node(loaded, ring(d, "b"))
    b.cache.prepare_local(b.ids(Q1))
    h = Node(loaded, ring(d, "h"), config)
    ask_via(h, b, "b", Q1)
    assert h.cache.audit().passed  # type: ignore[union-attr]  # written once audited (test_audit.py)
    n = len(h.cache.store)
    assert n > 0
    identities.revoke(d, "b")
    after = Node(loaded, ring(d, "h"), config)
    assert len(after.cache.store) == 0
    assert after.rejects.snapshot() == {"provenance-cert-revoked": n}


def test_logits_encode_to_one_canonical_form_whatever_the_ties() -> None:
    """Equal logits (ties at the top-k boundary and inside it) encode the same bytes from a dense
    vector and from the vector a receiver rebuilds: their digest is what the computer signed."""
    from mesh.cache import codec

    x = torch.full((1000,), -5.0)
    x[[7, 3, 900, 500]] = 2.0
    x[[11, 600, 12]] = 1.0  # k = 5: two of three ties at the boundary
    enc = codec.encode_logits(x, top_k=5)
    ids = struct.unpack("<5i", enc["ids"])
    assert ids == (3, 7, 500, 900, 11)
    again = codec.encode_logits(codec.decode_logits(enc, 1000), top_k=5)
    assert again["ids"] == enc["ids"] and again["vals"] == enc["vals"]


def test_signing_what_an_ask_computed_does_not_hold_its_second_token(loaded: LoadedModel, ids_dir: Path) -> None:
    """Signing a prompt's chunks costs seconds at a Pi Zero's quota: it runs beside the decoder.
    Here signing cannot finish before the second token is out, so on code that signs before the
    second token the generation would wait for ever (bounded: the wait gives up after 10 s)."""
    import threading
    import time

    node = Node(loaded, ring(ids_dir, "b"))
    prov = node.cache.provenance
    second_token = threading.Event()
    signed_after: list[bool] = []
    sign_chunk = prov.sign_chunk
    give_up = time.monotonic() + 10.0

    def slow_sign(key: bytes, chunk: ChunkKV) -> Any:
        signed_after.append(second_token.wait(max(0.0, give_up - time.monotonic())))
        return sign_chunk(key, chunk)

    prov.sign_chunk = slow_sign  # type: ignore[method-assign]
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 2:
            second_token.set()

    held = []

    def prepare() -> tuple[Any, Any]:
        prepared = node.cache.prepare(node.ids(Q2), defer_store=True)
        held.append(prepared)
        return prepared.logits, prepared.cache

    gen = node.cache.decoder.generate(node.ids(Q2), 4, (), on_text, prepare=prepare)
    held[0].finish()  # what the agent does before it answers: the KV is signed and stored by then
    assert len(gen.token_ids) >= 2 and signed_after and all(signed_after)
    keys, pkey = node.cache.keys(node.ids(Q2))
    assert all(k in node.cache.store for k in keys) and pkey in node.cache.store
