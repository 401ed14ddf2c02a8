"""Audits of fetched KV (issue 15: "Fetched entries are then audited after the answer"), with the
real small model, the real CA and keyrings, no broker.

Nodes are NodeCaches on SmolLM2-135M (``tests/cache/test_provenance.py``'s helpers); a fetch hands
the asker the parts the server's real ``serve`` encodes. The liar holds valid credentials: it
signs, in its own name, the real KV of another prompt of the same length under the asked keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mesh.auth import store as identities
from mesh.auth.keyring import Keyring
from mesh.cache import audit as audits
from mesh.cache import evidence as evidences
from mesh.cache.evidence import EvidenceSync
from mesh.cache.kv import pack
from mesh.cache.node_cache import NodeCache
from mesh.config import CacheConfig
from mesh.model import LoadedModel
from tests.cache.kit import FAST, Q1, Q2, SLOW_CPU
from tests.cache.test_provenance import (Node, ask_via, fetch_from, held_chunks, honest_chunks, poisoned, recompute,
                                         ring, same_kv)

CONFIG = CacheConfig(kv_wire="fp16", fetch_timeout_s=5.0)


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with honest nodes b, h, c and a liar m whose certificate is valid."""
    d = tmp_path_factory.mktemp("identity")
    identities.init_ca(d)
    for name in ("b", "h", "c", "m"):
        identities.issue(d, name, "node")
    return d


def advertised(cache: NodeCache, text: str) -> int:
    """How many of ``text``'s chunk keys (and its prompt key) ``cache``'s catalog lists."""
    cat = cache.catalog()
    keys, pkey = cache.keys(cache.decoder.encode(text))
    return sum(cat.contains(k) for k in keys) + cat.contains(pkey)


def on_disk(config: CacheConfig) -> set[str]:
    assert config.persist_dir is not None
    return {p.name for p in Path(config.persist_dir).glob("*.kv")}


def served(server: NodeCache, text: str) -> int:
    """Chunks ``server`` would send a peer asking for all of ``text``'s."""
    keys, pkey = server.keys(server.decoder.encode(text))
    return sum(len(b["chunks"]) for b in server.serve(list(keys), pkey, "fp16", 1 << 30))


@pytest.mark.parametrize("codec_name", ["fp16", "int8"])
def test_an_honest_fetch_is_used_at_once_and_shared_once_its_audit_passed(
        loaded: LoadedModel, ids_dir: Path, tmp_path: Path, codec_name: str) -> None:
    config = CacheConfig(kv_wire=codec_name, fetch_timeout_s=5.0, persist_dir=tmp_path / "kv")
    b = Node(loaded, ring(ids_dir, "b"), dataclasses.replace(config, persist_dir=None))
    b.cache.prepare_local(b.ids(Q1))
    keys, pkey = b.cache.keys(b.ids(Q1))
    n = len(keys) + 1
    assert advertised(b.cache, Q1) == n and b.cache.audits_waiting() == 0  # computed: advertised at once

    h = Node(loaded, ring(ids_dir, "h"), config)
    got, _ = ask_via(h, b, "b", Q1, codec_name=codec_name)
    assert got.info["full_hit"] and "wasted" not in got.info, got.info
    # held for this node's own asks, but not advertised, served or written before its audit
    assert h.cache.prepare_local(h.ids(Q1)).info["full_hit"]
    assert advertised(h.cache, Q1) == 0 and served(h.cache, Q1) == 0 and on_disk(config) == set()
    assert h.cache.audits_waiting() == 1

    verdict = h.cache.audit()
    assert verdict is not None and verdict.passed and verdict.culprit is None, verdict
    assert verdict.error <= 1.0 and h.cache.audits_waiting() == 0
    assert advertised(h.cache, Q1) == n and served(h.cache, Q1) == len(keys)
    assert on_disk(config) == {bytes(k).hex() + ".kv" for k in (*keys, pkey)}
    f = h.cache.snapshot()
    assert (f["audits_passed"], f["audits_failed"], f["audits_pending"]) == (1, 0, 0)
    # and a third node takes them from h, still under b's proofs
    c = Node(loaded, ring(ids_dir, "c"), dataclasses.replace(config, persist_dir=None))
    at_c, _ = ask_via(c, h, "h", Q1, codec_name=codec_name)
    assert at_c.info["full_hit"] and at_c.info["peer"] == "h" and "wasted" not in at_c.info, at_c.info
    assert {p.signer for p in c.cache.store.proofs(keys)} == {"b"}


@pytest.mark.parametrize("codec_name", ["fp16", "int8"])
def test_every_unit_of_an_honest_fetch_is_within_its_bound(loaded: LoadedModel, ids_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch, codec_name: str) -> None:
    """Whichever unit the CSPRNG picks, an honest fetch passes (the bounds of mesh.cache.audit)."""
    config = CacheConfig(kv_wire=codec_name, fetch_timeout_s=5.0)
    b = Node(loaded, ring(ids_dir, "b"), config)
    b.cache.prepare_local(b.ids(Q2))
    n = len(b.cache.keys(b.ids(Q2))[0])
    for unit in range(n):  # whichever chunk is picked; the prompt entry is audited every time
        h = Node(loaded, ring(ids_dir, "h"), config)
        ask_via(h, b, "b", Q2, codec_name=codec_name)
        monkeypatch.setattr(audits, "pick", lambda units, u=unit: u)
        verdict = h.cache.audit()
        assert verdict is not None and verdict.passed, (unit, verdict)
        assert verdict.audited == (unit, -1)


def test_self_computed_chunks_over_a_fetched_prefix_wait_with_it(loaded: LoadedModel, ids_dir: Path) -> None:
    """KV this node computes over fetched entries is only as good as they are: it is held back
    with them, and shared with them once their audit passed."""
    b, h = Node(loaded, ring(ids_dir, "b")), Node(loaded, ring(ids_dir, "h"))
    b.cache.prepare_local(b.ids(Q1))
    h.cache.set_peer_catalog("b", b.cache.catalog().to_dict())
    got = h.cache.prepare(h.ids(Q2), SLOW_CPU, FAST, fetch_from(b.cache))
    assert got.info["remote_tokens"] > 0 and got.info["computed_tokens"] > 0, got.info
    assert advertised(h.cache, Q2) == 0 and served(h.cache, Q2) == 0
    assert h.cache.audit().passed  # type: ignore[union-attr]
    keys, _ = h.cache.keys(h.ids(Q2))
    assert advertised(h.cache, Q2) == len(keys) + 1 and served(h.cache, Q2) == len(keys)
    assert torch.allclose(got.logits, h.cache.prepare_local(h.ids(Q2)).logits, atol=1e-3)
    assert all(same_kv(x, y) for x, y in zip(held_chunks(h, Q2), honest_chunks(loaded, Q2)))


# -- liars with valid credentials ----------------------------------------------------------------

P = Q1.replace("astronomy", "botany")  # a prompt the liar serves honestly, before it lies


def signed_by(node: Node, signer: str) -> list[bytes]:
    """The entries of Q1, Q2 and P that ``node`` holds under ``signer``'s proof."""
    out = []
    for text in (Q1, Q2, P):
        keys, pkey = node.cache.keys(node.ids(text))
        for key in (*keys, pkey):
            e = node.cache.store.entry(key)
            if e is not None and e.proof is not None and e.proof.signer == signer and key not in out:
                out.append(key)
    return out


def test_a_liar_is_caught_when_its_poisoned_chunk_is_audited_and_everything_it_computed_is_dropped(
        loaded: LoadedModel, ids_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """m holds a valid certificate. It serves P honestly (h's audit passes, h keeps P on disk, and
    so does c, which serves it on), then signs another prompt's KV under Q1's keys. h's audit
    picks a poisoned chunk: m is shunned, its Q1 and P entries leave h's RAM and disk, b's stay,
    and m's proofs are refused even when c relays them."""
    config = dataclasses.replace(CONFIG, persist_dir=tmp_path / "kv")
    b, m = Node(loaded, ring(ids_dir, "b")), Node(loaded, ring(ids_dir, "m"))
    h, c = Node(loaded, ring(ids_dir, "h"), config), Node(loaded, ring(ids_dir, "c"))
    b.cache.prepare_local(b.ids(Q2))
    m.cache.prepare_local(m.ids(P))
    ask_via(h, b, "b", Q2)
    assert h.cache.audit().passed  # type: ignore[union-attr]
    ask_via(h, m, "m", P)
    assert h.cache.audit().passed  # type: ignore[union-attr]  # m was honest this time
    ask_via(c, m, "m", P)
    assert c.cache.audit().passed  # type: ignore[union-attr]
    of_b, of_m = signed_by(h, "b"), signed_by(h, "m")
    assert of_b and of_m and on_disk(config) == {bytes(k).hex() + ".kv" for k in (*of_b, *of_m)}

    poisoned(loaded, m, Q1)  # signed in m's own name: every provenance check passes
    got, first = ask_via(h, m, "m", Q1)  # h holds Q1's leading chunks (b's Q2 shares them)
    assert got.info["decision"] == "remote" and got.info["peer"] == "m" and "wasted" not in got.info, got.info
    assert got.info["local_tokens"] > 0 and got.info["audit"] == "pending"
    monkeypatch.setattr(audits, "pick", lambda n: 0)  # the first fetched chunk: poisoned
    verdict = h.cache.audit()
    assert verdict is not None and not verdict.passed and verdict.culprit == "m", verdict
    assert verdict.error > 1.0

    assert signed_by(h, "m") == [] and set(signed_by(h, "b")) == set(of_b)
    assert on_disk(config) == {bytes(k).hex() + ".kv" for k in of_b}
    f = h.cache.snapshot()
    assert f["shunned"] == ["m"] and (f["audits_passed"], f["audits_failed"]) == (2, 1)
    assert h.rejects.snapshot() == {"kv-audit-failed": 1}
    # the next ask does not go to m, whatever it advertises; h answers Q1 as a recompute would
    h.cache.set_peer_catalog("m", m.cache.catalog().to_dict())
    again = h.cache.prepare(h.ids(Q1), SLOW_CPU, FAST, fetch_from(m.cache))
    assert again.info["peers_skipped"] == ["m"] and again.info["remote_tokens"] == 0, again.info
    assert torch.allclose(again.logits, recompute(loaded, Q1), atol=1e-2)
    # c (which audited P from m when m was honest) serves it on: h refuses m's proofs now
    relayed, _ = ask_via(h, c, "c", P)
    assert relayed.info["wasted"].startswith("bad: ") and "lying" in relayed.info["wasted"], relayed.info
    assert h.rejects.snapshot() == {"kv-audit-failed": 1, "provenance-liar": 1}
    # a restart finds nothing of m's on disk
    assert signed_by(Node(loaded, ring(ids_dir, "h"), config), "m") == []


def test_a_liar_poisoning_one_chunk_passes_an_audit_of_another(loaded: LoadedModel, ids_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What an audit cannot see (RELIABILITY.md): one poisoned chunk of the n fetched passes when a
    chunk before it is picked, and is caught when it, or a chunk after it, is picked (a chunk after
    it disagrees with the poisoned prefix held; the recomputation from the first token then finds
    the poisoned one and its signer). h asks Q1 of m, which holds Q2: the shared chunks are fetched,
    no prompt entry (whose audit, on a full hit, would catch this lie every time)."""
    m = Node(loaded, ring(ids_dir, "m"))
    m.cache.prepare_local(m.ids(Q2))
    keys, _ = m.cache.keys(m.ids(Q2))
    shared = next(i for i, (x, y) in enumerate(zip(keys, m.cache.keys(m.ids(Q1))[0])) if x != y)
    assert shared >= 4
    bad = shared - 2  # one chunk: its values scaled, re-signed by m
    e = m.cache.store.entry(keys[bad])
    assert e is not None
    lie = pack([k * 1.5 for k in e.payload.keys], [v * 1.5 for v in e.payload.values])
    e.payload, e.proof = lie, m.cache.provenance.sign_chunk(keys[bad], lie)  # type: ignore[union-attr]
    for unit, caught in ((bad - 1, False), (bad, True), (bad + 1, True)):
        h = Node(loaded, ring(ids_dir, "h"))
        got, _ = ask_via(h, m, "m", Q1)
        assert got.info["remote_tokens"] == 16 * shared and not got.info["full_hit"], got.info
        monkeypatch.setattr(audits, "pick", lambda units, u=unit: u)
        verdict = h.cache.audit()
        assert verdict is not None and verdict.passed is not caught and verdict.audited == (unit,), (unit, verdict)
        assert (verdict.culprit == "m") is caught and (h.cache.snapshot()["shunned"] == ["m"]) is caught
        assert not caught or verdict.wrong == bad  # the poisoned chunk, whichever was audited


def test_a_lie_in_the_last_logits_is_caught_on_every_full_hit(loaded: LoadedModel, ids_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Review E2 with valid credentials: m's chunks are honest, its signed last logits make
    " London" the first token. The prompt entry is audited on every full hit: caught whichever
    chunk the CSPRNG picks."""
    m = Node(loaded, ring(ids_dir, "m"))
    m.cache.prepare_local(m.ids(Q1))
    _, pkey = m.cache.keys(m.ids(Q1))
    e = m.cache.store.entry(pkey)
    assert e is not None
    logits = e.payload["logits"].clone()
    london = m.cache.decoder.encode(" London")[0]
    logits[london] = float(logits.max()) + 10.0
    e.payload = {"tail": e.payload["tail"], "logits": logits}
    e.proof = m.cache.provenance.sign_prompt(pkey, e.payload["tail"], logits)  # type: ignore[union-attr]
    h = Node(loaded, ring(ids_dir, "h"))
    got, first = ask_via(h, m, "m", Q1)
    assert int(first.argmax()) == london  # the residual: the first answer is the lie's
    verdict = h.cache.audit()
    assert verdict is not None and not verdict.passed and verdict.unit == -1 and verdict.culprit == "m", verdict
    assert verdict.wrong == -1 and verdict.evidence["unit"] == -1
    assert h.cache.snapshot()["shunned"] == ["m"] and h.cache.store.entry(pkey) is None
    again = h.cache.prepare_local(h.ids(Q1))  # the chunks were m's too: all dropped, recomputed
    assert int(again.logits.argmax()) != london and again.info["decision"] == "no-match"
    # the evidence of a lie in the logits convinces a node that never fetched it, too
    c = Node(loaded, ring(ids_dir, "c"))
    assert c.cache.take_evidence(dict(verdict.evidence)) and c.cache.judge() is True
    assert c.cache.snapshot()["shunned"] == ["m"]


# -- evidence any node can re-check (mesh.cache.evidence) ----------------------------------------

class Broker:
    """An in-memory bus: what one node publishes reaches every handler subscribed (the real
    sealing, size caps and decoding of mesh.auth.senders and mesh.wire on both ends)."""

    def __init__(self) -> None:
        self.handlers: list = []  # type: ignore[type-arg]
        self.published: list[tuple[str, int, bool]] = []

    def subscribe(self, topic: str, handler, qos: int = 0) -> None:  # type: ignore[no-untyped-def]
        self.handlers.append(handler)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, len(payload), retain))
        for handler in self.handlers:
            handler(topic, payload, False)


def joined(broker: Broker, node: Node, name: str, keys: Keyring) -> EvidenceSync:
    sync = EvidenceSync(broker, node.cache, name, rejects=node.rejects, max_message_bytes=16 << 20, keyring=keys)
    sync.start()
    return sync


def test_the_evidence_of_a_lie_has_another_node_shun_the_liar_and_drop_what_it_computed(
        loaded: LoadedModel, ids_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """h's audit catches m; h publishes the evidence; c, which never fetched the lie, re-checks
    it with its own recomputation, shuns m and drops m's entries it held (P, audited when m was
    honest); b's stay."""
    b, m = Node(loaded, ring(ids_dir, "b")), Node(loaded, ring(ids_dir, "m"))
    h, c = Node(loaded, ring(ids_dir, "h")), Node(loaded, ring(ids_dir, "c"))
    b.cache.prepare_local(b.ids(Q2))
    m.cache.prepare_local(m.ids(P))
    for node in (h, c):
        ask_via(node, b, "b", Q2)
        assert node.cache.audit().passed  # type: ignore[union-attr]
    ask_via(c, m, "m", P)
    assert c.cache.audit().passed  # type: ignore[union-attr]
    of_b, of_m = set(signed_by(c, "b")), signed_by(c, "m")
    assert of_m

    poisoned(loaded, m, Q1)
    ask_via(h, m, "m", Q1)
    monkeypatch.setattr(audits, "pick", lambda n: 0)
    verdict = h.cache.audit()
    assert verdict is not None and verdict.culprit == "m" and verdict.evidence, verdict

    broker = Broker()
    joined(broker, c, "c", ring(ids_dir, "c"))
    joined(broker, h, "h", ring(ids_dir, "h")).publish(dict(verdict.evidence))
    assert broker.published == [("mesh/v1/node/h/kv-evidence", broker.published[0][1], True)]
    assert c.cache.reports_waiting() == 1 and c.cache.snapshot()["shunned"] == []
    assert c.cache.judge() is True
    assert c.cache.snapshot()["shunned"] == ["m"] and c.cache.snapshot()["evidence_upheld"] == 1
    assert signed_by(c, "m") == [] and set(signed_by(c, "b")) == of_b
    assert c.rejects.snapshot() == {}
    # the same report again (a retained copy after a reconnect) is not judged twice
    joined(broker, h, "h", ring(ids_dir, "h")).publish(dict(verdict.evidence))
    assert c.cache.reports_waiting() == 0


def test_a_forged_report_cannot_frame_an_honest_node(loaded: LoadedModel, ids_dir: Path) -> None:
    """m (valid credentials) reports b's honest KV as lies, in every form a report can take:
    b's signed chunk and prompt entry (c's recomputation agrees: unfounded), b's chunk under
    another prompt's ids, with altered bytes, or unsigned (refused before any recomputation).
    b is never shunned and c keeps what b computed."""
    b, c = Node(loaded, ring(ids_dir, "b")), Node(loaded, ring(ids_dir, "c"))
    b.cache.prepare_local(b.ids(Q1))
    ask_via(c, b, "b", Q1)
    assert c.cache.audit().passed  # type: ignore[union-attr]
    held = set(signed_by(c, "b"))
    ids, q2 = b.ids(Q1), b.ids(Q2)
    keys, pkey = b.cache.keys(ids)
    bodies = list(b.cache.serve(list(keys), pkey, "fp16", 1 << 30, part_bytes=1))
    chunks = [ch for body in bodies for ch in body["chunks"]]
    prompt = dict(bodies[-1]["prompt"], logits=bodies[0]["logits"])
    last = len(keys) - 1
    assert q2[:(last + 1) * 16] != ids[:(last + 1) * 16]

    def altered(ch: dict) -> dict:  # type: ignore[type-arg]
        t = dict(ch["layers"][0]["k"])
        t["data"] = bytes(x ^ 0x10 for x in t["data"][:64]) + t["data"][64:]
        return dict(ch, layers=[dict(ch["layers"][0], k=t), *ch["layers"][1:]])

    reports = [
        evidences.build(ids[:(last + 1) * 16], last, chunk=chunks[last]),  # honest: unfounded
        evidences.build(ids, -1, prompt=prompt),  # honest prompt entry: unfounded
        evidences.build(q2[:(last + 1) * 16], last, chunk=chunks[last]),  # another prompt: not what b signed
        evidences.build(ids[:16], 0, chunk=altered(chunks[0])),  # bytes b did not sign
        evidences.build(ids[:32], 1, chunk={k: v for k, v in chunks[1].items() if k != "prov"}),  # unsigned
    ]
    broker = Broker()
    joined(broker, c, "c", ring(ids_dir, "c"))
    forger = joined(broker, Node(loaded, None), "m", ring(ids_dir, "m"))
    for body in reports:
        forger.publish(body)
    assert c.cache.reports_waiting() == 2
    assert c.cache.judge() is False and c.cache.judge() is False and c.cache.judge() is None
    assert c.cache.snapshot()["shunned"] == [] and c.cache.provenance.liars == set()  # type: ignore[union-attr]
    assert set(signed_by(c, "b")) == held
    assert c.rejects.snapshot() == {"kv-evidence-unfounded": 2, "bad-provenance": 2, "kv-unsigned": 1}
    again = c.cache.prepare(c.ids(Q1), SLOW_CPU, FAST, fetch_from(b.cache))
    assert again.info["decision"] == "local" and again.info["full_hit"]
