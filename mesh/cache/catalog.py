"""The catalog: a Bloom filter of the chunk keys a node holds.

Sizing (classic Bloom analysis, ``n`` items at capacity, target false-positive rate ``p``)::

    m = ceil(-n * ln(p) / ln(2)**2)      bits
    k = max(1, round(m / n * ln(2)))     hash functions
    FP(n) ~= (1 - exp(-k * n / m)) ** k

For n = 1,000,000 and p = 1 % that is m = 9,585,059 bits (1.2 MB) and k = 7, the paper's figures.

Indices (Kirsch-Mitzenmacher double hashing): the 16-byte key is rehashed with
``xxh3_128(key, seed=CATALOG_SEED)`` so that any key (not only xxh3 outputs) spreads evenly; the
low 64 bits are ``h1``, the high 64 bits with the lowest bit forced to 1 are ``h2`` (odd, so it is
never 0), and index ``i`` in ``0..k-1`` is ``(h1 + i * h2) mod m``. Bit ``j`` lives in byte ``j // 8``
at bit ``j % 8`` counting from the least significant bit. Both ends must agree on this layout: it is
part of the catalog format (``CATALOG_VERSION``).

Keyed catalogs (version 2; review finding M1). Chunk and prompt keys are computable by anyone
holding the public model, and catalogs are retained and readable by every node, the asker and
the coordinator, so an unkeyed filter answers "did anyone ask this?" for any candidate prompt (a
dictionary attack on templated Home Assistant prompts). A node that holds the mesh's catalog key
(32 random bytes the gateway's CA hands to node identities only: ``mesh.auth.store``) builds and
queries its filter over a keyed hash instead: ``x = BLAKE2b-128(key, key=<catalog key>,
person="mesh-catalog")`` (``hashlib``), ``h1`` its low 8 bytes and ``h2`` its high 8 bytes with the
lowest bit forced to 1 (little-endian), then the same indices. Testing a candidate then needs the
catalog key. The filter names the key it was built with by ``kid``, a one-way 8-byte id
(``BLAKE2b-64("", key=<catalog key>, person="mesh-catalog-id")``), so receivers never misread it:

- a keyed catalog is read only with the key its ``kid`` names; a receiver without it (a keyless
  process, a node whose key is older or newer than the publisher's: a rotation half way) keeps
  the catalog as *unreadable* (:attr:`Catalog.readable`): it holds nothing, so no hits, no fetches;
- an unkeyed catalog (version 1: a process without identities, or a node identity issued before
  catalog keys) is read as before by everyone, keyed receivers included (it hides nothing);
- code from before version 2 refuses a keyed catalog (``bad-version``) rather than misreading it.

What a keyed catalog still tells everyone: its size ``n``, its ``epoch`` (how often the store
changed) and its fill; not which keys.

Serialised form (a CBOR-able dict; every field required)::

    {"v": 1, "model": <16-byte model key digest>, "chunk": <chunk size>, "epoch": <int >= 0>,
     "n": <items added>, "m": <bits>, "k": <hashes>, "bits": <ceil(m/8) bytes, padding bits 0>}
    {"v": 2, ... the same ..., "kid": <8-byte id of the catalog key>}

``epoch`` is set by the publisher (it grows on every rebuild) so a receiver can ignore stale
retained copies. A Bloom filter cannot delete: after eviction the shell rebuilds it from the
store's live keys with :meth:`Catalog.from_keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from mesh.cache.keys import KEY_BYTES
from mesh.errors import ProtocolError

CATALOG_VERSION = 1  # unkeyed: indices from xxh3 of the key
KEYED_VERSION = 2  # keyed: indices from a keyed BLAKE2b of the key (module docstring)
KID_BYTES = 8
MIN_SECRET_BYTES = 16  # a catalog key shorter than this is a configuration mistake
_PERSON_INDEX = b"mesh-catalog"
_PERSON_KID = b"mesh-catalog-id"
CATALOG_SEED = 0x6D65_7368_2D63_6174  # "mesh-cat"
DEFAULT_FP_RATE = 0.01
MAX_HASHES = 32
MAX_BITS = 8 * 16 * 1024 * 1024  # 16 MiB of filter: ~14 M keys at 1 %; bigger is refused
_MASK64 = (1 << 64) - 1
_FIELDS = ("v", "model", "chunk", "epoch", "n", "m", "k", "bits")


def bloom_size(capacity: int, fp_rate: float = DEFAULT_FP_RATE) -> tuple[int, int]:
    """``(m, k)`` for ``capacity`` items at false-positive rate ``fp_rate`` (formulas above)."""
    if capacity < 1:
        capacity = 1
    if not 0.0 < fp_rate < 1.0:
        raise ValueError(f"fp_rate {fp_rate!r} must be in (0, 1)")
    m = math.ceil(-capacity * math.log(fp_rate) / (math.log(2) ** 2))
    m = max(m, 8)
    k = max(1, min(MAX_HASHES, round(m / capacity * math.log(2))))
    return m, k


def check_secret(secret: bytes) -> bytes:
    """A catalog key as BLAKE2b takes it (16-64 bytes); ValueError otherwise."""
    if not isinstance(secret, bytes | bytearray) or not MIN_SECRET_BYTES <= len(secret) <= hashlib.blake2b.MAX_KEY_SIZE:
        raise ValueError(f"a catalog key is {MIN_SECRET_BYTES}-{hashlib.blake2b.MAX_KEY_SIZE} bytes")
    return bytes(secret)


def key_id(secret: bytes) -> bytes:
    """The public, one-way ``kid`` naming a catalog key (module docstring)."""
    return hashlib.blake2b(b"", digest_size=KID_BYTES, key=check_secret(secret), person=_PERSON_KID).digest()


def bloom_indices(key: bytes, m: int, k: int, secret: bytes | None = None) -> list[int]:
    """The ``k`` bit indices of ``key`` in a filter of ``m`` bits (double hashing, see above):
    unkeyed (xxh3) without ``secret``, keyed (BLAKE2b with the catalog key) with it."""
    if secret is None:
        x = xxhash.xxh3_128_intdigest(bytes(key), seed=CATALOG_SEED)
    else:
        x = int.from_bytes(hashlib.blake2b(bytes(key), digest_size=16, key=secret,
                                           person=_PERSON_INDEX).digest(), "little")
    h1 = x & _MASK64
    h2 = (x >> 64) | 1
    return [(h1 + i * h2) % m for i in range(k)]


@dataclass
class Catalog:
    """A Bloom filter of 16-byte keys, tagged with the model key digest and chunk size it is for.

    Not frozen: the owner adds keys to it; receivers build one with :meth:`from_dict` and only query.
    ``secret``: the catalog key (keyed, version 2; ``kid`` is then its id); ``kid`` without
    ``secret``: a keyed catalog received without its key (:attr:`readable` is False: it holds nothing).
    """

    model: bytes
    chunk_size: int
    m: int
    k: int
    epoch: int = 0
    count: int = 0
    bits: bytearray = field(default_factory=bytearray, repr=False)
    kid: bytes | None = None
    secret: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.m < 1 or not 1 <= self.k <= MAX_HASHES:
            raise ValueError(f"bad Bloom parameters m={self.m} k={self.k}")
        if not self.bits:
            self.bits = bytearray((self.m + 7) // 8)
        elif len(self.bits) != (self.m + 7) // 8:
            raise ValueError("bits length does not match m")
        if self.secret is not None:
            kid = key_id(self.secret)
            if self.kid is None:
                self.kid = kid
            elif not hmac.compare_digest(kid, self.kid):
                raise ValueError("the catalog key is not the one kid names")

    @property
    def readable(self) -> bool:
        """Whether this process can query it: unkeyed, or keyed and holding the key."""
        return self.kid is None or self.secret is not None

    @classmethod
    def sized(
        cls,
        model: bytes,
        chunk_size: int,
        capacity: int,
        fp_rate: float = DEFAULT_FP_RATE,
        epoch: int = 0,
        secret: bytes | None = None,
    ) -> Catalog:
        """An empty catalog sized for ``capacity`` keys at ``fp_rate`` (keyed with ``secret``)."""
        m, k = bloom_size(capacity, fp_rate)
        return cls(model=bytes(model), chunk_size=chunk_size, m=m, k=k, epoch=epoch, secret=secret)

    @classmethod
    def from_keys(
        cls,
        model: bytes,
        chunk_size: int,
        keys: Iterable[bytes],
        capacity: int | None = None,
        fp_rate: float = DEFAULT_FP_RATE,
        epoch: int = 0,
        secret: bytes | None = None,
    ) -> Catalog:
        """A catalog holding ``keys``, sized for ``max(capacity, len(keys))`` items (keyed with ``secret``)."""
        keys = list(keys)
        cat = cls.sized(model, chunk_size, max(capacity or 0, len(keys), 1), fp_rate, epoch, secret)
        for key in keys:
            cat.add(key)
        return cat

    def add(self, key: bytes) -> None:
        """Set the key's ``k`` bits (``count`` counts calls, duplicates included)."""
        if not self.readable:
            raise ValueError("a keyed catalog without its key cannot take keys")
        bits = self.bits
        for j in bloom_indices(key, self.m, self.k, self.secret):
            bits[j >> 3] |= 1 << (j & 7)
        self.count += 1

    def contains(self, key: bytes) -> bool:
        """True if the key is probably present; False means certainly absent, or that this process
        cannot tell (a keyed catalog without its key: no hits)."""
        if not self.readable:
            return False
        bits = self.bits
        return all(bits[j >> 3] & (1 << (j & 7)) for j in bloom_indices(key, self.m, self.k, self.secret))

    __contains__ = contains

    def expected_fp_rate(self) -> float:
        """``(1 - exp(-k n / m)) ** k`` for the current item count."""
        return (1.0 - math.exp(-self.k * self.count / self.m)) ** self.k

    def fill_ratio(self) -> float:
        """Fraction of bits set (a filter near 0.5 is at its design capacity)."""
        return sum(bin(b).count("1") for b in self.bits) / self.m

    def nbytes(self) -> int:
        """Size of the bit array in bytes."""
        return len(self.bits)

    def to_dict(self) -> dict[str, Any]:
        """The serialised form described in the module docstring (version 2 when keyed)."""
        out: dict[str, Any] = {
            "v": CATALOG_VERSION if self.kid is None else KEYED_VERSION,
            "model": bytes(self.model),
            "chunk": self.chunk_size,
            "epoch": self.epoch,
            "n": self.count,
            "m": self.m,
            "k": self.k,
            "bits": bytes(self.bits),
        }
        if self.kid is not None:
            out["kid"] = bytes(self.kid)
        return out

    @classmethod
    def from_dict(cls, data: Any, max_bits: int = MAX_BITS, secret: bytes | None = None) -> Catalog:
        """Parse and validate a serialised catalog; raises ProtocolError on any defect.

        ``secret``: this process's catalog key, if it holds one. A keyed catalog whose ``kid``
        names it can be queried; any other keyed catalog comes back unreadable (no hits)."""
        if not isinstance(data, Mapping):
            raise ProtocolError("bad-catalog", "not a map")
        missing = [f for f in _FIELDS if f not in data]
        if missing:
            raise ProtocolError("bad-catalog", f"missing fields {missing}")
        version = data["v"]
        if isinstance(version, bool) or version not in (CATALOG_VERSION, KEYED_VERSION):
            raise ProtocolError("bad-version", f"catalog version {version!r}")
        kid = None
        if version == KEYED_VERSION:
            kid = data.get("kid")
            if not isinstance(kid, bytes) or len(kid) != KID_BYTES:
                raise ProtocolError("bad-catalog", f"a keyed catalog names its key in {KID_BYTES} bytes")
            kid = bytes(kid)
            if secret is None or not hmac.compare_digest(key_id(secret), kid):
                secret = None  # not our key: kept unreadable
        else:
            secret = None
        model, bits = data["model"], data["bits"]
        if not isinstance(model, bytes) or len(model) != KEY_BYTES:
            raise ProtocolError("bad-catalog", "model must be 16 bytes")
        if not isinstance(bits, bytes | bytearray):
            raise ProtocolError("bad-catalog", "bits must be bytes")
        ints = {f: data[f] for f in ("chunk", "epoch", "n", "m", "k")}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProtocolError("bad-catalog", f"{name} must be a non-negative int")
        m, k = ints["m"], ints["k"]
        if not 1 <= m <= max_bits:
            raise ProtocolError("oversized" if m > max_bits else "bad-catalog", f"m={m}")
        if not 1 <= k <= MAX_HASHES:
            raise ProtocolError("bad-catalog", f"k={k}")
        if ints["chunk"] < 1:
            raise ProtocolError("bad-catalog", "chunk size must be >= 1")
        if len(bits) != (m + 7) // 8:
            raise ProtocolError("bad-catalog", f"{len(bits)} bytes of bits for m={m}")
        if m % 8 and bits[-1] >> (m % 8):
            raise ProtocolError("bad-catalog", "padding bits set")
        return cls(
            model=bytes(model),
            chunk_size=ints["chunk"],
            m=m,
            k=k,
            epoch=ints["epoch"],
            count=ints["n"],
            bits=bytearray(bits),
            kid=kid,
            secret=secret,
        )


def leading_matches(catalog: Catalog, keys: Sequence[bytes]) -> int:
    """Number of leading keys the catalog (probably) holds: the advertised prefix depth."""
    n = 0
    for key in keys:
        if not catalog.contains(key):
            break
        n += 1
    return n
