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

Serialised form (a CBOR-able dict; every field required)::

    {"v": 1, "model": <16-byte model key digest>, "chunk": <chunk size>, "epoch": <int >= 0>,
     "n": <items added>, "m": <bits>, "k": <hashes>, "bits": <ceil(m/8) bytes, padding bits 0>}

``epoch`` is set by the publisher (it grows on every rebuild) so a receiver can ignore stale
retained copies. A Bloom filter cannot delete: after eviction the shell rebuilds it from the
store's live keys with :meth:`Catalog.from_keys`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from mesh.cache.keys import KEY_BYTES
from mesh.errors import ProtocolError

CATALOG_VERSION = 1
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


def bloom_indices(key: bytes, m: int, k: int) -> list[int]:
    """The ``k`` bit indices of ``key`` in a filter of ``m`` bits (double hashing, see above)."""
    x = xxhash.xxh3_128_intdigest(bytes(key), seed=CATALOG_SEED)
    h1 = x & _MASK64
    h2 = (x >> 64) | 1
    return [(h1 + i * h2) % m for i in range(k)]


@dataclass
class Catalog:
    """A Bloom filter of 16-byte keys, tagged with the model key digest and chunk size it is for.

    Not frozen: the owner adds keys to it; receivers build one with :meth:`from_dict` and only query.
    """

    model: bytes
    chunk_size: int
    m: int
    k: int
    epoch: int = 0
    count: int = 0
    bits: bytearray = field(default_factory=bytearray, repr=False)

    def __post_init__(self) -> None:
        if self.m < 1 or not 1 <= self.k <= MAX_HASHES:
            raise ValueError(f"bad Bloom parameters m={self.m} k={self.k}")
        if not self.bits:
            self.bits = bytearray((self.m + 7) // 8)
        elif len(self.bits) != (self.m + 7) // 8:
            raise ValueError("bits length does not match m")

    @classmethod
    def sized(
        cls,
        model: bytes,
        chunk_size: int,
        capacity: int,
        fp_rate: float = DEFAULT_FP_RATE,
        epoch: int = 0,
    ) -> Catalog:
        """An empty catalog sized for ``capacity`` keys at ``fp_rate``."""
        m, k = bloom_size(capacity, fp_rate)
        return cls(model=bytes(model), chunk_size=chunk_size, m=m, k=k, epoch=epoch)

    @classmethod
    def from_keys(
        cls,
        model: bytes,
        chunk_size: int,
        keys: Iterable[bytes],
        capacity: int | None = None,
        fp_rate: float = DEFAULT_FP_RATE,
        epoch: int = 0,
    ) -> Catalog:
        """A catalog holding ``keys``, sized for ``max(capacity, len(keys))`` items."""
        keys = list(keys)
        cat = cls.sized(model, chunk_size, max(capacity or 0, len(keys), 1), fp_rate, epoch)
        for key in keys:
            cat.add(key)
        return cat

    def add(self, key: bytes) -> None:
        """Set the key's ``k`` bits (``count`` counts calls, duplicates included)."""
        bits = self.bits
        for j in bloom_indices(key, self.m, self.k):
            bits[j >> 3] |= 1 << (j & 7)
        self.count += 1

    def contains(self, key: bytes) -> bool:
        """True if the key is probably present; False means certainly absent."""
        bits = self.bits
        return all(bits[j >> 3] & (1 << (j & 7)) for j in bloom_indices(key, self.m, self.k))

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
        """The serialised form described in the module docstring."""
        return {
            "v": CATALOG_VERSION,
            "model": bytes(self.model),
            "chunk": self.chunk_size,
            "epoch": self.epoch,
            "n": self.count,
            "m": self.m,
            "k": self.k,
            "bits": bytes(self.bits),
        }

    @classmethod
    def from_dict(cls, data: Any, max_bits: int = MAX_BITS) -> Catalog:
        """Parse and validate a serialised catalog; raises ProtocolError on any defect."""
        if not isinstance(data, Mapping):
            raise ProtocolError("bad-catalog", "not a map")
        missing = [f for f in _FIELDS if f not in data]
        if missing:
            raise ProtocolError("bad-catalog", f"missing fields {missing}")
        if data["v"] != CATALOG_VERSION:
            raise ProtocolError("bad-version", f"catalog version {data['v']!r}")
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
        )


def leading_matches(catalog: Catalog, keys: Sequence[bytes]) -> int:
    """Number of leading keys the catalog (probably) holds: the advertised prefix depth."""
    n = 0
    for key in keys:
        if not catalog.contains(key):
            break
        n += 1
    return n
