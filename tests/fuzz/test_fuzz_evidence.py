"""The KV_EVIDENCE handler (``mesh.cache.evidence.EvidenceSync.handle`` into
``NodeCache.take_evidence``, then ``NodeCache.judge``), fed 10,000 structured reports.

A report names a signer as a liar; the handler must never let one frame an honest node. So
the garbage here is built from *genuine* material: the real signed chunks and prompt entry of an
honest node ``b`` (fp16 and int8, as ``serve`` encodes them), the receiver's own, those of a node
revoked since, and ``b``'s manifests re-signed by others (a node, an asker, another CA). Each
payload is one of: a genuine report; one with one to three structural mutations at any depth
(wrong types in each field, deleted or added fields, another unit's or another prompt's ids,
another unit's bytes, forged, borrowed, re-signed, unsigned or damaged proofs, huge or off-by-one
id lists); one with hostile CBOR spliced in at any depth (shared structures, semantic tags, deep
nesting, huge declared lengths, indefinite lengths, non-text keys); a damaged envelope; another
kind; random bytes. Each is sealed by a node, an asker, the receiver itself, a revoked node or a
stranger of another CA, or left unsealed, and published on a node's evidence topic.

The same outcome rule as ``test_fuzz_handlers.py`` (exactly one of: rejected with one counted
reason as the heartbeat publishes it; accepted, and valid by the spec below; a documented no-op),
and every accepted report is judged at once as the worker's idle time would: each must be
unfounded, and nobody may end up shunned. A control at the end shows the same rig does shun a
real liar, so "nobody shunned" is not vacuous.

The spec of what may be accepted: sealed by a certified, unrevoked principal whose name is the
envelope's sender; a KV_EVIDENCE body whose unit and ids are those of a genuine unit and whose
unit bytes are those that unit's signer signed (every field the decoders read equal; unknown
fields are ignored), with that unit's own proof or a certified node's re-signature of its
manifest. A genuine report the receiver signed itself, or whose (signer, key) it judged already,
is a documented no-op.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh import topics, wire
from mesh.auth import store as identities
from mesh.auth.certs import CertificateAuthority
from mesh.auth.keyring import Keyring
from mesh.cache import evidence as evidences
from mesh.cache import provenance as prov
from mesh.cache.evidence import EvidenceSync
from mesh.cache.node_cache import MAX_EVIDENCE_TOKENS, NodeCache
from mesh.config import CacheConfig, NodeConfig
from mesh.errors import ProtocolError
from mesh.model import Decoder, LoadedModel
from nodes.agent import NodeAgent
from tests.conftest import Broker, require_model
from tests.fuzz import fuzzkit
from tests.fuzz.test_fuzz_handlers import EXAMPLES, Case, node_of, run_case

R = fuzzkit.Rnd
NAME = "fuzzev"  # the receiving node
TEXT = "The mesh keeps the KV state of every prompt it computed, and each node signs what it computes. " * 2
OTHER = "Another prompt of about the same length, which nobody reported, keeps the same chunk size here. " * 2
WIRE = {"v", "codec", "key", "model", "layers", "sum"}  # what codec.decode_chunk reads of a chunk
TENSOR = {"dtype", "shape", "data"}
LOGITS = {"v", "key", "model", "n", "ids", "vals", "sum"}  # what decode_logits and the proof read


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return fuzzkit.tiny_loaded(require_model("smollm2-135m"))


def canon(value: Any, kind: str) -> Any:
    """The fields of a unit that a decoder or a proof reads, and nothing else (the spec compares
    these; unknown fields are ignored by every reader)."""
    if not isinstance(value, Mapping):
        return ("not-a-map", repr(value)[:64])
    if kind == "chunk":
        out = {k: value.get(k) for k in WIRE if k != "layers"}
        layers = value.get("layers")
        codec_name = value.get("codec")
        if isinstance(layers, list):
            out["layers"] = [canon_layer(layer, codec_name) for layer in layers]
        else:
            out["layers"] = ("not-a-list", repr(layers)[:64])
        return out
    if kind == "logits":
        return {k: value.get(k) for k in LOGITS}
    raise AssertionError(kind)


def canon_layer(layer: Any, codec_name: Any) -> Any:
    if not isinstance(layer, Mapping):
        return ("not-a-map", repr(layer)[:64])
    out = {}
    for name in ("k", "v"):
        t = layer.get(name)
        if not isinstance(t, Mapping):
            out[name] = ("not-a-map", repr(t)[:64])
            continue
        c = {f: t.get(f) for f in TENSOR}
        if codec_name == "int8":  # the scale is read (and hashed) only for int8
            s = t.get("scale")
            c["scale"] = {f: s.get(f) for f in TENSOR} if isinstance(s, Mapping) else ("bad", repr(s)[:64])
        else:  # another codec's scale is hashed if present: only an empty one changes nothing
            s = t.get("scale")
            c["scale"] = None if s is None or (isinstance(s, Mapping) and s.get("data") == b"") else ("bad", repr(s)[:64])
        out[name] = c
    return out


@dataclass
class Genuine:
    """One genuine report: its body as its signer's node sends it, the unit's key and codec, and
    the manifest its computer signed (``mesh.cache.provenance``)."""

    body: dict[str, Any]
    key: bytes
    codec: str
    manifest: prov.Manifest

    @property
    def unit(self) -> int:
        return int(self.body["unit"])

    def part(self, body: Mapping[str, Any]) -> Any:
        return body.get("chunk") if self.unit >= 0 else body.get("prompt")

    def matches(self, body: Mapping[str, Any], verifier: Keyring) -> str | None:
        """The signer a receiver names for ``body``, if it is this report up to what no reader
        reads, under a proof that a certified, unrevoked node or coordinator sealed over a
        manifest this unit's bytes satisfy (its own proof, or a re-signature)."""
        try:
            if body.get("unit") != self.unit or body.get("ids") != self.body["ids"]:
                return None
        except Exception:  # a value whose == misbehaves is not this report
            return None
        got, want = self.part(body), self.part(self.body)
        if not isinstance(got, Mapping):
            return None
        sealed = got.get("prov")
        if self.unit >= 0:
            if canon(got, "chunk") != canon(want, "chunk"):
                return None
        else:
            logits = got.get("logits")
            if got.get("len") != want["len"] or canon(got.get("tail"), "chunk") != canon(want["tail"], "chunk") \
                    or canon(logits, "logits") != canon(want["logits"], "logits") \
                    or not isinstance(logits, Mapping) or logits.get("prov") != sealed:
                return None
        if not isinstance(sealed, bytes):
            return None
        try:
            opened = verifier.open(sealed, prov.TOPIC, retained=True)
            m = prov.Manifest.unpack(opened.inner)
        except ProtocolError:
            return None
        g = self.manifest
        ok = (opened.sender.role in prov.SIGNER_ROLES and m.model == g.model and m.key == g.key
              and m.digests[self.codec] == g.digests[self.codec])
        if self.unit >= 0:
            ok = ok and m.kind == prov.CHUNK
        else:  # the tail's length, the logits' size and digest are checked too
            ok = ok and m.kind == prov.PROMPT and m.length == g.length and m.vocab == g.vocab and m.logits == g.logits
        return opened.sender.name if ok else None


def reports_of(cache: NodeCache, text: str, codec_name: str) -> list[dict[str, Any]]:
    """Every report ``cache`` could make of ``text`` in ``codec_name``: each chunk, then the prompt
    entry, in the bytes (and with the proofs) ``serve`` sends."""
    ids = cache.decoder.encode(text)
    keys, pkey = cache.keys(ids)
    bodies = list(cache.serve(list(keys), pkey, codec_name, 1 << 30, part_bytes=1))
    chunks = [ch for body in bodies for ch in body["chunks"]]
    assert len(chunks) == len(keys) and bodies[-1].get("prompt") is not None and bodies[0].get("logits") is not None
    C = cache.chunk_size
    out = [evidences.build(ids[:(i + 1) * C], i, chunk=ch) for i, ch in enumerate(chunks)]
    out.append(evidences.build(ids, -1, prompt=dict(bodies[-1]["prompt"], logits=bodies[0]["logits"])))
    return out


def resealed(body: dict[str, Any], by: Keyring) -> dict[str, Any]:
    """``body`` with its proof's manifest sealed again by ``by`` (a re-signature in its name)."""
    out = copy.deepcopy(body)
    part = out["chunk"] if body["unit"] >= 0 else out["prompt"]
    sealed = by.seal(prov_inner(part["prov"]), prov.TOPIC)
    part["prov"] = sealed
    if body["unit"] < 0:
        part["logits"]["prov"] = sealed
    return out


def prov_inner(sealed: bytes) -> bytes:
    from mesh.auth import seal

    return seal.parse(sealed, 1 << 20).inner


class EvidenceRig:
    def __init__(self, broker: Broker, tiny: LoadedModel, home: Path) -> None:
        d = home / "identity"
        identities.init_ca(d)
        for name, role in ((NAME, "node"), ("b", "node"), ("m", "node"), ("x", "node"), ("l", "node"),
                           ("cli", "asker")):
            identities.issue(d, name, role)

        def ring(name: str, role: str = "node") -> Keyring:
            keys = identities.load_keyring(d, name, role, enrol=False)
            assert keys is not None
            return keys

        signers = {n: ring(n) for n in ("b", "x")}
        self.m, self.cli = ring("m"), ring("cli", "asker")
        stranger_ca = CertificateAuthority.create()
        self.stranger = Keyring(stranger_ca.issue("b", "node"), stranger_ca.cert)
        self.liar_keys = ring("l")
        cfg = NodeConfig(name=NAME, broker=broker.address, home=home)

        def cache_of(keys: Keyring | None) -> NodeCache:
            return NodeCache(tiny, cfg.cache, Decoder(tiny), keyring=keys)

        # genuine material: b's (honest), x's (revoked below), the receiver's own
        made: dict[str, NodeCache] = {n: cache_of(k) for n, k in signers.items()}
        for c in made.values():
            c.prepare_local(c.decoder.encode(TEXT))
        identities.revoke(d, "x")
        self.keys = ring(NAME)  # with the CRL that revokes x
        self.agent = agent = NodeAgent(cfg, loaded=tiny, keyring=self.keys)
        agent.decoder = Decoder(tiny)
        agent.cache = cache = NodeCache(tiny, cfg.cache, agent.decoder, keyring=self.keys, rejects=agent.rejects)
        agent.evidence = self.sync = EvidenceSync(agent.bus, cache, NAME, rejects=agent.rejects,
                                                  max_message_bytes=agent.limits.max_message_bytes, keyring=self.keys)
        agent.bus.start(10.0)
        own = cache_of(self.keys)
        own.prepare_local(own.decoder.encode(TEXT))

        made["b"].prepare_local(made["b"].decoder.encode(OTHER))
        self.genuine: list[Genuine] = []
        self.refused: list[dict[str, Any]] = []  # signed, but by one whose proofs are refused
        for codec_name in ("fp16", "int8"):
            for body in [*reports_of(made["b"], TEXT, codec_name), *reports_of(made["b"], OTHER, codec_name)]:
                self.genuine += [self.genuine_of(body, codec_name), self.genuine_of(resealed(body, self.m), codec_name)]
                self.refused += [resealed(body, self.cli), resealed(body, self.stranger)]
            self.genuine += [self.genuine_of(body, codec_name) for body in reports_of(own, TEXT, codec_name)]
            self.refused += reports_of(made["x"], TEXT, codec_name)
        self.other_ids = own.decoder.encode(OTHER)
        self.sealers: list[Keyring | None] = [self.m] * 6 + [signers["b"], self.cli, self.keys, signers["x"],
                                                             self.stranger, None]
        self.verifier = Keyring(self.keys.identity, self.keys.ca, self.keys.crl)  # the spec's own checks
        self.was_judged: set[tuple[str, bytes]] = set()
        self.counted_before: dict[str, int] = {}
        self.calls = 0

    def genuine_of(self, body: dict[str, Any], codec_name: str) -> Genuine:
        keys, pkey = self.agent.cache.keys(body["ids"])  # type: ignore[union-attr]
        part = body["chunk"] if body["unit"] >= 0 else body["prompt"]
        manifest = prov.Manifest.unpack(prov_inner(part["prov"]))
        return Genuine(body, keys[body["unit"]] if body["unit"] >= 0 else pkey, codec_name, manifest)

    def stop(self) -> None:
        self.agent.bus.stop()

    # -- the strategy --------------------------------------------------------------------------
    def mutated(self, r: R, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with one to three structural mutations (module docstring)."""
        body = copy.deepcopy(body)
        for _ in range(r.randint(1, 3)):
            op = r.random()
            if op < 0.35:  # a wrong or odd value at any depth, or a deleted or added field
                path = r.choice(fuzzkit.paths(body))
                container, key = path
                how = r.random()
                if how < 0.6:
                    container[key] = wrong_type(r, container[key])
                elif how < 0.8 and isinstance(container, dict):
                    del container[key]
                elif isinstance(container, dict):
                    container[fuzzkit.rtext(r, 6) or "zz"] = fuzzkit.cbor_value(r)
                else:
                    container.append(fuzzkit.cbor_value(r))
            elif op < 0.5:  # the ids: another prompt's, cut, grown, out of the vocabulary, huge
                body["ids"] = odd_ids(r, body.get("ids"), self.other_ids)
            elif op < 0.6:  # the unit index
                body["unit"] = fuzzkit.pick(r, -1, -2, 0, 1, 2, 3, 2 ** 63 - 1, True, 1.0, "0", None,
                                            lambda r: r.randint(-5, 8))
            elif op < 0.75:  # the proof: borrowed from another unit, damaged, re-signed, unsigned
                part = body.get("chunk") if "chunk" in body else body.get("prompt")
                if isinstance(part, dict):
                    part["prov"] = self.forged_prov(r, part.get("prov"))
                    if isinstance(part.get("logits"), dict) and r.random() < 0.8:
                        part["logits"]["prov"] = part["prov"]
            elif op < 0.9:  # another unit's bytes, or the other part, under these ids
                donor = r.choice([g.body for g in self.genuine] + self.refused)
                for name in ("chunk", "prompt"):
                    if name in donor and r.random() < 0.7:
                        body[name] = copy.deepcopy(donor[name])
            else:  # tensor bytes flipped (the digest no longer matches)
                body = flip_tensor(r, body)
        return body

    def forged_prov(self, r: R, sealed: Any) -> Any:
        others = [(g.body.get("chunk") or g.body["prompt"])["prov"] for g in self.genuine]
        how = r.random()
        if not isinstance(sealed, bytes) or not sealed:  # mutated before: forge from a genuine one
            sealed = r.choice(others)
        if how < 0.25:
            return r.choice(others)  # borrowed: another unit's, codec's or signer's proof
        if how < 0.45 and isinstance(sealed, bytes):
            return fuzzkit.damaged(r, sealed)  # a forged or broken signature
        if how < 0.65 and isinstance(sealed, bytes):
            by = r.choice([self.cli, self.stranger, self.m, self.liar_keys])
            try:
                return by.seal(prov_inner(sealed), prov.TOPIC)  # re-signed, by the right role or not
            except ProtocolError:
                return sealed
        if how < 0.8 and isinstance(sealed, bytes):  # a manifest changed under a fresh seal
            try:
                inner = bytearray(prov_inner(sealed))
            except ProtocolError:
                return sealed
            inner[r.randrange(len(inner))] ^= 1 << r.randrange(8)
            return r.choice([self.m, self.liar_keys]).seal(bytes(inner), prov.TOPIC)
        return fuzzkit.pick(r, None, b"", lambda r: fuzzkit.rbytes(r, 600), fuzzkit.cbor_value)

    def inner(self, r: R, sender: str) -> bytes:
        """The sealed bytes: a KV_EVIDENCE envelope, mostly near-genuine (module docstring)."""
        g = r.choice(self.genuine)
        how = r.random()
        if how < 0.15:
            body: Any = g.body
        elif how < 0.6:
            body = self.mutated(r, g.body)
        elif how < 0.65:
            body = copy.deepcopy(r.choice(self.refused))
        elif how < 0.75:  # hostile structure at any depth of a genuine report
            return fuzzkit.hostile_at(r, fuzzkit.envelope_dict(wire.Kind.KV_EVIDENCE, g.body, sender=sender))
        elif how < 0.78:
            return fuzzkit.hostile_payload(r, wire.Kind.KV_EVIDENCE, g.body)
        elif how < 0.88:
            return fuzzkit.damaged(r, fuzzkit.dumps(fuzzkit.envelope_dict(wire.Kind.KV_EVIDENCE, g.body,
                                                                          sender=sender)))
        elif how < 0.95:
            return fuzzkit.cbor_payload(wire.Kind.KV_EVIDENCE, body=g.body, sender=lambda r: sender)(r)
        else:
            return fuzzkit.rbytes(r, 256)
        env = fuzzkit.envelope_dict(wire.Kind.KV_EVIDENCE, body, sender=sender if r.random() < 0.95 else "b")
        if r.random() < 0.05:
            env["k"] = r.choice([k.value for k in wire.Kind])
        return fuzzkit.dumps(env)

    def message(self, r: R) -> tuple[str, bytes, bool]:
        sealer = r.choice(self.sealers)
        name = sealer.name if sealer is not None else r.choice(["m", "b"])
        topic = topics.node_kv_evidence(name) if r.random() < 0.8 else fuzzkit.node_topic(topics.KV_EVIDENCE.name)(r)
        inner = self.inner(r, name)
        payload = inner if sealer is None else sealer.seal(inner, topic)
        if sealer is not None and r.random() < 0.04:
            payload = fuzzkit.damaged(r, payload)  # the envelope's seal forged or broken
        elif r.random() < 0.01:
            payload = b""
        return topic, payload, r.random() < 0.5

    # -- the spec ------------------------------------------------------------------------------
    def named(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """(signer, key) of a genuine report that a certified, unrevoked principal sealed as its
        envelope's sender (the spec of acceptance), else None."""
        try:
            opened = self.verifier.open(payload, topic, retained=True)
            env = wire.decode(opened.inner)
        except ProtocolError:
            return None
        if env.kind is not wire.Kind.KV_EVIDENCE or env.sender != opened.sender.name:
            return None
        for g in self.genuine:
            signer = g.matches(env.body, self.verifier)
            if signer is not None:
                return signer, g.key
        return None

    def prepare(self, topic: str, payload: bytes) -> None:
        cache = self.agent.cache
        assert cache is not None
        with cache.lock:
            self.calls += 1
            if self.calls % 8:  # mostly judged afresh; a repeat of one judged already is a no-op
                cache.judged.clear()
            self.was_judged = set(cache.judged)
        self.counted_before = self.counted()

    def ignored(self, topic: str, payload: bytes, retained: bool) -> bool:
        if node_of(topic) is None:  # refused (bad-topic) before anything else
            return False
        if node_of(topic) == NAME or payload == b"":
            return True
        if self.counted() != self.counted_before:
            return False  # refused: the spec below is looser than the decoders on types (1.0 for 1)
        named = self.named(topic, payload)
        return named is not None and (named[0] == NAME or named in self.was_judged)

    def valid(self, topic: str, payload: bytes, retained: bool) -> bool:
        return node_of(topic) is not None and self.named(topic, payload) is not None

    def state(self) -> int:
        return self.agent.cache.reports_waiting()  # type: ignore[union-attr]

    def consume(self, topic: str, payload: bytes) -> None:
        """What the worker's idle time does: judge it. Every accepted report is of an honest unit."""
        cache = self.agent.cache
        assert cache is not None
        assert cache.judge() is False, f"a report was upheld against an honest unit: {payload[:200]!r}"
        assert cache.provenance is not None and cache.provenance.liars == set()

    def counted(self) -> dict[str, int]:
        return self.agent.rejects.snapshot()

    def known_bad(self) -> list[tuple[str, bytes, bool]]:
        """Reproducers of what this fuzzing found: b's genuine prompt-entry report with its logits
        replaced by a number (``Provenance.check_logits`` called ``.get`` on it: AttributeError out
        of the network handler; now ``bad-logits``)."""
        g = next(g for g in self.genuine if g.unit < 0 and g.codec == "fp16")
        body = copy.deepcopy(g.body)
        body["prompt"]["logits"] = -1
        topic = topics.node_kv_evidence("m")
        return [(topic, self.m.seal(wire.encode(wire.Envelope(wire.Kind.KV_EVIDENCE, "m", body)), topic), True)]

    def case(self) -> Case:
        return Case(self.sync.handle, self.message, self.counted, self.state, self.valid, prepare=self.prepare,
                    ignored=self.ignored, consume=self.consume, known_bad=self.known_bad(), reasons=8)


def wrong_type(r: R, value: Any) -> Any:
    """A value of another type than ``value`` (or an odd one of its type)."""
    return fuzzkit.pick(r, None, True, -1, 0, 2 ** 64 - 1, -(2 ** 63), 1.5, float("nan"), "", "fp16", "int8",
                        b"", b"\x00" * 17, [], [value], {}, {"data": value}, lambda r: fuzzkit.rbytes(r, 32),
                        fuzzkit.cbor_value)


def odd_ids(r: R, ids: Any, other: list[int]) -> Any:
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):  # mutated before
        ids = other[:16]
    n = len(ids)
    return fuzzkit.pick(r, lambda r: other[:n], lambda r: ids[:-1], lambda r: ids + [ids[-1]],
                        lambda r: [*ids[:-1], 49_152], lambda r: [*ids[:-1], -1], lambda r: [*ids[:-1], 2 ** 40],
                        lambda r: [0] * (MAX_EVIDENCE_TOKENS + 1), lambda r: [1] * MAX_EVIDENCE_TOKENS,
                        lambda r: ids[:16], [], lambda r: [str(i) for i in ids], lambda r: [float(i) for i in ids],
                        fuzzkit.cbor_value)


def flip_tensor(r: R, body: dict[str, Any]) -> dict[str, Any]:
    datas = [(c, k) for c, k in fuzzkit.paths(body) if k == "data" and isinstance(c[k], bytes) and c[k]]
    if datas:
        c, k = r.choice(datas)
        data = bytearray(c[k])
        data[r.randrange(len(data))] ^= 1 << r.randrange(8)
        c[k] = bytes(data)
    return body


@pytest.fixture
def evrig(amqtt_broker: Broker, tiny: LoadedModel, tmp_path: Path) -> Iterator[EvidenceRig]:
    r = EvidenceRig(amqtt_broker, tiny, tmp_path)
    yield r
    r.stop()


def test_the_evidence_handler_takes_no_garbage_and_shuns_nobody_on_a_forged_report(evrig: EvidenceRig) -> None:
    t0 = time.monotonic()
    case = evrig.case()
    outcomes = run_case(case)
    print(f"agent.kv_evidence: {sum(outcomes.values())} payloads in {time.monotonic() - t0:.1f} s: {dict(outcomes)}")
    assert sum(outcomes.values()) >= EXAMPLES
    rejected = {k for k in outcomes if k.startswith("rejected:")}
    assert len(rejected) >= case.reasons and outcomes["accepted"] >= 20, outcomes
    # the checks of every layer were reached: the seal, the body, the proof, the bytes
    for reason in ("unauthenticated", "bad-kv-evidence", "kv-unsigned", "bad-provenance", "provenance-cert-revoked",
                   "provenance-wrong-role", "provenance-wrong-ca", "bad-signature"):
        assert f"rejected:{reason}" in outcomes, (reason, outcomes)
    cache = evrig.agent.cache
    assert cache is not None and cache.provenance is not None
    assert cache.provenance.liars == set() and cache.snapshot()["shunned"] == []
    assert cache.snapshot()["evidence_upheld"] == 0 and cache.snapshot()["evidence_unfounded"] == outcomes["accepted"]
    published = dict(evrig.agent.heartbeat_body()["rejects"])
    assert published == evrig.counted()
    for reason in rejected:
        assert published.get(reason.removeprefix("rejected:"), 0) >= outcomes[reason], (reason, published)

    # the control: the same rig shuns a real liar on the evidence of its lie
    liar = NodeCache(evrig.agent.loaded, CacheConfig(), Decoder(evrig.agent.loaded),  # type: ignore[arg-type]
                     keyring=evrig.liar_keys)
    lie = lied(liar, evrig.agent.loaded)  # type: ignore[arg-type]
    evrig.sync.handle(topics.node_kv_evidence("m"), evrig.m.seal(wire.encode(wire.Envelope(
        wire.Kind.KV_EVIDENCE, "m", lie)), topics.node_kv_evidence("m")), True)
    assert cache.reports_waiting() == 1 and cache.judge() is True
    assert cache.provenance.liars == {"l"} and cache.snapshot()["shunned"] == ["l"]


def lied(liar: NodeCache, loaded: LoadedModel) -> dict[str, Any]:
    """A report of ``liar``'s first chunk of TEXT, where it signed the KV of another prompt."""
    ids = liar.decoder.encode(TEXT)
    other = [ids[1] if ids[0] != ids[1] else ids[0] + 1, *ids[1:]]
    donor = NodeCache(loaded, liar.config, Decoder(loaded))
    donor.prepare_local(other)
    chunks = donor.store.get_chain(donor.keys(other)[0])
    keys, _ = liar.keys(ids)
    assert liar.provenance is not None
    proofs = [liar.provenance.sign_chunk(k, c) for k, c in zip(keys, chunks)]
    with liar.lock:
        liar.store.put_chain(keys, chunks, [c.nbytes for c in chunks], proofs=proofs)
    served = next(iter(liar.serve(keys[:1], None, "fp16", 1 << 30)))["chunks"][0]
    return evidences.build(ids[:liar.chunk_size], 0, chunk=served)
