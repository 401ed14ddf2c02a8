"""Who computed a KV chunk: a signature by the computing node that travels with the chunk.

A sealed ``KV_CHUNKS`` part proves who *served* it; a node that fetched a liar's chunks, or holds a
bit-flipped chunk in RAM, would re-serve them under a fresh valid seal. So the node that computes a
chunk (its own prefill) signs it once, and the signature stays with the chunk in every store and
on every wire it crosses: a receiver checks the computer's signature over the bytes it received,
whoever served them.

What is signed, the *manifest* (little-endian, version 1, 172 bytes)::

    magic 4s b"MKVP"   version B   kind B (0 chunk, 1 prompt entry)
    model 16s (model-key digest)   key 16s (chunk key, or prompt key)
    length H (tokens in the chunk or prompt tail)   vocab I (logits size; 0 for a chunk)
    fp16 32s   int8 32s   fp32 32s   (digest of the chunk's data in each wire codec)
    logits 32s (digest of the top-k logits' wire bytes; zeros for a chunk)

Each digest is BLAKE2b-256 of the data buffers in the order ``mesh.cache.codec`` puts them on the
wire (per layer: k data, k scale, v data, v scale), so the receiver hashes exactly the bytes it
got; hashing the bytes and signing 172 of them costs far less than signing the whole part. All
three codecs have a slot because the serving node picks the codec; a computing node fills the one
it may serve in (``Provenance(codecs=...)``: its wire codec, and fp16 and int8, which
``quota.pick_codec`` may choose; zeros elsewhere), since each costs an encoding of every chunk. A node that received fp16 or int8 reproduces that codec's bytes only
(fp16 -> fp32 -> fp16 is exact), and serves in it.

The manifest is sealed with ``Keyring.seal`` under the fixed pseudo-topic :data:`TOPIC` (so the
signature stays valid on any reply topic) and checked with ``Keyring.open(..., retained=True)``
(a chunk's proof is seen many times: no replay guard). The signer must be a certified,
unrevoked ``node`` or ``coordinator``, and not one this node caught lying (:meth:`Provenance.distrust`,
after a failed audit: ``mesh.cache.audit``). Refusals raise ProtocolError with a counted reason:
``kv-unsigned`` (no proof), ``bad-provenance`` (a digest, key, model, length or signature that
does not match), ``provenance-wrong-role``, ``provenance-liar`` (a signer caught lying), or ``provenance-`` and the certificate's reason
(``provenance-cert-revoked``, ``provenance-wrong-ca``, ...).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import torch

from mesh import cbor_bounds, topics, wire
from mesh.auth.keyring import Keyring
from mesh.cache import codec
from mesh.cache.kv import ChunkKV
from mesh.errors import ProtocolError

TOPIC = f"{topics.ROOT}/kv-chunk"  # the pseudo-topic every proof is sealed for (never published)
MAGIC = b"MKVP"
VERSION = 1
CHUNK, PROMPT = 0, 1
SIGNER_ROLES = ("node", "coordinator")
_MANIFEST = struct.Struct("<4sBB16s16sHI32s32s32s32s")
_NONE = bytes(32)
# the cryptographic reasons of Keyring.open that say "these bytes are not what was signed"
_FORGED = {"unauthenticated", "malformed", "bad-version", "oversized", "bad-signature"}


@dataclass(frozen=True)
class Manifest:
    """What a computing node signed for one chunk or prompt entry (layout in the module docstring)."""

    kind: int
    model: bytes
    key: bytes
    length: int
    vocab: int
    digests: dict[str, bytes]  # per codec
    logits: bytes = _NONE

    def pack(self) -> bytes:
        return _MANIFEST.pack(MAGIC, VERSION, self.kind, self.model, self.key, self.length, self.vocab,
                              *(self.digests[c] for c in codec.CODECS), self.logits)

    @staticmethod
    def unpack(data: bytes) -> Manifest:
        if len(data) != _MANIFEST.size:
            raise ProtocolError("bad-provenance", "manifest size")
        magic, version, kind, model, key, length, vocab, *digests, logits = _MANIFEST.unpack(data)
        if magic != MAGIC or version != VERSION or kind not in (CHUNK, PROMPT):
            raise ProtocolError("bad-provenance", f"manifest version {version}, kind {kind}")
        return Manifest(kind, model, key, length, vocab, dict(zip(codec.CODECS, digests)), logits)


@dataclass(frozen=True)
class Proof:
    """A checked proof as a store keeps it: the computer's sealed manifest (what travels as
    ``"prov"``), its contents, the computer's name, and the codecs whose bytes this node
    reproduces exactly from what it holds (the ones it may serve the entry in)."""

    sealed: bytes
    manifest: Manifest
    signer: str
    codecs: tuple[str, ...]

    def serve_codec(self, wanted: str) -> str:
        """The codec to serve in: ``wanted`` if this node can reproduce its signed bytes, else the
        one it received the entry in."""
        return wanted if wanted in self.codecs else self.codecs[0]


def data_digest(layers: Sequence[Mapping[str, Any]]) -> bytes:
    """BLAKE2b-256 of a wire chunk's data buffers, in wire order (untrusted input: ProtocolError)."""
    h = hashlib.blake2b(digest_size=32, person=b"mesh-kv-data")
    try:
        for data in codec.wire_buffers(layers):
            h.update(data)
    except (KeyError, TypeError) as exc:
        raise ProtocolError("bad-chunk", f"chunk layers: {exc}") from None
    return h.digest()


def logits_digest(enc: Mapping[str, Any]) -> bytes:
    """BLAKE2b-256 of wire logits (``codec.encode_logits``): their size, ids and values."""
    h = hashlib.blake2b(digest_size=32, person=b"mesh-kv-logits")
    try:
        h.update(struct.pack("<I", int(enc["n"])))
        h.update(enc["ids"])
        h.update(enc["vals"])
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise ProtocolError("bad-logits", f"logits: {exc}") from None
    return h.digest()


def chunk_digests(chunk: ChunkKV, codecs: Sequence[str] = codec.CODECS) -> dict[str, bytes]:
    """The digest of ``chunk`` in each of ``codecs`` (what its computer signs), zeros for the
    other codecs (bytes in those never match: the entry is not served in them)."""
    return {c: data_digest(codec.encode_chunk(chunk, c)["layers"]) if c in codecs else _NONE for c in codec.CODECS}


def exact_codecs(received: str) -> tuple[str, ...]:
    """The codecs whose bytes a chunk received in ``received`` can be re-encoded to exactly."""
    return codec.CODECS if received == "fp32" else (received,)


class Provenance:
    """One node's signing and checking of KV provenance (``keyring``: its identity; ``model``:
    its model-key digest; ``rejects``: where refusals are counted, the heartbeat's counter)."""

    def __init__(self, keyring: Keyring, model: bytes, rejects: wire.RejectCounter | None = None,
                 codecs: Sequence[str] = codec.CODECS) -> None:
        """``codecs``: the ones this node signs what it computes for (it serves in the first, its
        wire codec, wherever the requester takes it). Each costs an encoding and a digest of
        every chunk it computes, on a thread beside the decoder after its first token (the
        answer waits for it, the tokens do not), so a node signs only
        the codecs it may serve in (results/2026-12-07/provenance_cost.py: 4.0 ms a SmolLM2
        chunk for all three on this x86, ~45x that at a Pi Zero's CPU quota)."""
        self.keys, self.model = keyring, bytes(model)
        self.rejects = rejects if rejects is not None else wire.RejectCounter()
        if not codecs or any(c not in codec.CODECS for c in codecs):
            raise ValueError(f"codecs must be some of {codec.CODECS}")
        self.codecs = tuple(codecs)
        self.liars: set[str] = set()  # signers caught lying (a failed audit): nothing of theirs is taken

    def distrust(self, signer: str) -> None:
        """Refuse every proof by ``signer`` from now on (it was caught lying: ``mesh.cache.audit``)."""
        self.liars.add(signer)

    # -- computing nodes ----------------------------------------------------------------------
    def _sign(self, manifest: Manifest) -> Proof:
        return Proof(self.keys.seal(manifest.pack(), TOPIC), manifest, self.keys.name, self.codecs)

    def sign_chunk(self, key: bytes, chunk: ChunkKV) -> Proof:
        """The proof for a chunk this node computed."""
        return self._sign(Manifest(CHUNK, self.model, bytes(key), chunk.length, 0, chunk_digests(chunk, self.codecs)))

    def sign_prompt(self, pkey: bytes, tail: ChunkKV, logits: torch.Tensor) -> Proof:
        """The proof for a prompt entry (tail and last logits) this node computed."""
        enc = codec.encode_logits(logits, key=pkey, model=self.model)
        return self._sign(Manifest(PROMPT, self.model, bytes(pkey), tail.length, int(enc["n"]),
                                   chunk_digests(tail, self.codecs), logits_digest(enc)))

    # -- receivers ----------------------------------------------------------------------------
    def _refuse(self, reason: str, detail: str) -> ProtocolError:
        self.rejects.add(reason)
        err = ProtocolError(reason, detail)
        err.counted = True  # type: ignore[attr-defined]  # a caller that counts refusals skips it
        return err

    def open(self, sealed: Any, kind: int, key: bytes, length: int | None = None) -> tuple[Manifest, str]:
        """A proof's manifest and signer, checked: a certified, unrevoked node or coordinator
        signed it for this model, ``key``, ``kind`` (and ``length``, when given)."""
        if not isinstance(sealed, bytes):
            raise self._refuse("kv-unsigned", f"{bytes(key).hex()}: no provenance")
        try:
            opened = self.keys.open(sealed, TOPIC, retained=True)
            manifest = Manifest.unpack(opened.inner)
        except ProtocolError as exc:
            reason = "bad-provenance" if exc.reason in _FORGED or exc.reason == "bad-provenance" \
                else f"provenance-{exc.reason}"
            raise self._refuse(reason, f"{bytes(key).hex()}: {exc}") from None
        if opened.sender.role not in SIGNER_ROLES:
            raise self._refuse("provenance-wrong-role", f"{opened.sender.name!r} ({opened.sender.role})")
        if opened.sender.name in self.liars:
            raise self._refuse("provenance-liar", f"{opened.sender.name!r} was caught lying")
        if (manifest.kind != kind or manifest.model != self.model or manifest.key != bytes(key)
                or (length is not None and manifest.length != length)):
            raise self._refuse("bad-provenance", f"{bytes(key).hex()}: signed for another chunk")
        return manifest, opened.sender.name

    def _match(self, manifest: Manifest, raw: Mapping[str, Any], key: bytes) -> str:
        """The received chunk's codec, once its data digest matches the signed one."""
        name = raw.get("codec")
        layers = raw.get("layers")
        if name not in codec.CODECS or not isinstance(layers, list):
            raise ProtocolError("bad-chunk", f"codec {name!r}")
        if data_digest(layers) != manifest.digests[name]:
            raise self._refuse("bad-provenance", f"{bytes(key).hex()}: bytes differ from what was signed")
        return name

    def check_chunk(self, raw: Mapping[str, Any], key: bytes) -> Proof:
        """A received wire chunk (``codec.encode_chunk`` form with ``"prov"``) -> its Proof."""
        sealed = raw.get("prov")
        manifest, signer = self.open(sealed, CHUNK, key)
        name = self._match(manifest, raw, key)
        assert isinstance(sealed, bytes)
        return Proof(sealed, manifest, signer, exact_codecs(name))

    def check_logits(self, raw: Mapping[str, Any], pkey: bytes) -> Proof:
        """Received wire logits (with ``"prov"``) -> the prompt entry's Proof (tail codec unknown
        yet: :meth:`check_tail` completes it)."""
        if not isinstance(raw, Mapping):  # a report's logits come unchecked (mesh.cache.evidence)
            raise ProtocolError("bad-logits", "logits are not a map")
        sealed = raw.get("prov")
        manifest, signer = self.open(sealed, PROMPT, pkey)
        if raw.get("n") != manifest.vocab or logits_digest(raw) != manifest.logits:
            raise self._refuse("bad-provenance", f"{bytes(pkey).hex()}: logits differ from what was signed")
        assert isinstance(sealed, bytes)
        return Proof(sealed, manifest, signer, ())

    def check_tail(self, raw: Mapping[str, Any], pkey: bytes, length: int, logits: Proof | None) -> Proof:
        """A received prompt tail (``raw["tail"]`` with ``raw["prov"]``) -> the prompt entry's Proof.
        With ``logits`` (checked earlier in the transfer) it must be the same proof."""
        sealed = raw.get("prov")
        if logits is not None and sealed != logits.sealed:
            raise self._refuse("bad-provenance", f"{bytes(pkey).hex()}: tail and logits signed apart")
        manifest, signer = self.open(sealed, PROMPT, pkey, length)
        tail = raw.get("tail")
        if not isinstance(tail, Mapping):
            raise ProtocolError("bad-chunk", "prompt tail")
        name = self._match(manifest, tail, pkey)
        assert isinstance(sealed, bytes)
        return Proof(sealed, manifest, signer, exact_codecs(name))

    # -- a node's own store -------------------------------------------------------------------
    def recheck(self, sealed: Any, codecs: Sequence[str], key: bytes, payload: ChunkKV | dict[str, Any]) -> Proof:
        """A stored entry (read back from disk) -> its Proof, checked again: the signature, the
        signer's certificate (today's CRL) and the digest of the codec it will be served in."""
        prompt = not isinstance(payload, ChunkKV)
        chunk = payload["tail"] if prompt else payload  # type: ignore[index]
        manifest, signer = self.open(sealed, PROMPT if prompt else CHUNK, key, chunk.length)
        if not codecs or any(c not in codec.CODECS for c in codecs):
            raise self._refuse("bad-provenance", f"{bytes(key).hex()}: stored codecs {codecs!r}")
        proof = Proof(sealed, manifest, signer, tuple(codecs))
        if not self.holds(proof, chunk) or (prompt and not self.holds_logits(proof, payload["logits"])):  # type: ignore[index]
            raise self._refuse("bad-provenance", f"{bytes(key).hex()}: stored bytes differ from what was signed")
        return proof

    @staticmethod
    def holds(proof: Proof, chunk: ChunkKV) -> bool:
        """Whether ``chunk`` still encodes to the signed bytes in the codec it would be served in."""
        name = proof.codecs[0]
        return data_digest(codec.encode_chunk(chunk, name)["layers"]) == proof.manifest.digests[name]

    @staticmethod
    def holds_logits(proof: Proof, logits: torch.Tensor) -> bool:
        enc = codec.encode_logits(logits, key=proof.manifest.key, model=proof.manifest.model)
        return logits_digest(enc) == proof.manifest.logits


# -- a proof on disk (mesh.cache.store's version 2 record) ----------------------------------------

_STORED_BOUNDS = cbor_bounds.Bounds(max_bytes=8192, max_items=16)


def encode_stored(proof: Proof) -> bytes:
    """What a store record keeps of a proof: the sealed manifest and the codecs it may be served in."""
    return cbor2.dumps({"prov": proof.sealed, "codecs": list(proof.codecs)})


def decode_stored(blob: bytes | None) -> tuple[Any, list[str]]:
    """:func:`encode_stored`'s bytes -> (sealed manifest, codecs), unchecked (``Provenance.recheck``)."""
    if blob is None:
        return None, []
    obj = cbor_bounds.loads(blob, _STORED_BOUNDS)
    codecs = obj.get("codecs") if isinstance(obj, dict) else None
    if not isinstance(codecs, list) or not all(isinstance(c, str) for c in codecs):
        raise ProtocolError("bad-provenance", "stored proof")
    return obj.get("prov"), codecs
