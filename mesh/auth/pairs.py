"""Pairwise keys and the hot path's MACs.

Two principals agree one 32-byte key without a message: static X25519 (each certificate carries
its X25519 public key, signed by the CA, ``mesh.auth.certs``) and HKDF-SHA256 over the shared
secret, bound to both names and both certificate serials (a re-issued identity gets a new key; a
revoked one is simply never looked up again). Deriving costs one X25519 and one HKDF per pair and
process, never per message.

Per frame the hot path computes a keyed BLAKE2b (``hashlib.blake2b(key=...)``, 16-byte digest):
the Pi Zero 2W, Pi 3 and Pi 4 have no ARMv8 crypto extensions, where BLAKE2b runs several times
faster than SHA-256/HMAC, and one keyed hash per frame costs far less than an Ed25519 signature.
``person`` separates uses (an MLP input's tag cannot pass as a partial's); the frame's own header
(kind, epoch, step, layer, sender) is inside the MAC'd bytes, so a tag binds all of them.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh.auth.certs import Identity, Peer
from mesh.errors import ProtocolError

KEY_BYTES = 32
TAG_BYTES = 16
_INFO = b"mesh pair key v1"


def pair_key(own: Identity, peer: Peer) -> bytes:
    """The key ``own`` shares with ``peer`` (both sides compute the same bytes)."""
    if own.name == peer.name:
        raise ProtocolError("name-mismatch", "no pair key with oneself")
    try:
        secret = own.exchange_key.exchange(x25519.X25519PublicKey.from_public_bytes(peer.exchange_key))
    except ValueError as exc:  # a low-order point gives an all-zero secret: cryptography refuses it
        raise ProtocolError("bad-cert", "unusable exchange key") from exc
    ends = sorted([(own.name, own.serial), (peer.name, peer.serial)])
    info = b"\0".join([_INFO, *(f"{n}\0{s:x}".encode() for n, s in ends)])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def tag(key: bytes, data: bytes | memoryview, person: bytes) -> bytes:
    """A TAG_BYTES keyed BLAKE2b of ``data``; ``person`` (<= 16 bytes) names the use."""
    return hashlib.blake2b(data, digest_size=TAG_BYTES, key=key, person=person).digest()


def tag_ok(key: bytes, data: bytes | memoryview, person: bytes, got: bytes | memoryview) -> bool:
    return hmac.compare_digest(tag(key, data, person), bytes(got))
