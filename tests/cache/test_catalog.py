"""Bloom catalog: sizing, false-positive bound, round trip, validation, leading matches."""

from __future__ import annotations

import math
import random

import cbor2
import pytest

from mesh.cache.catalog import Catalog, bloom_indices, bloom_size, leading_matches
from mesh.cache.keys import ModelKey, chunk_keys
from mesh.errors import ProtocolError

MODEL = ModelKey("sha256:0123", "tok").digest()


def _keys(seed: int, n: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.getrandbits(128).to_bytes(16, "little") for _ in range(n)]


def test_sizing_matches_the_papers_figures() -> None:
    m, k = bloom_size(1_000_000, 0.01)
    assert k == 7
    assert 1.19e6 < m / 8 < 1.21e6  # ~1.2 MB, as in the paper
    m2, k2 = bloom_size(1000, 0.001)
    assert k2 == 10 and m2 == math.ceil(-1000 * math.log(0.001) / math.log(2) ** 2)
    with pytest.raises(ValueError):
        bloom_size(10, 1.5)


def test_indices_are_deterministic_and_in_range() -> None:
    key = bytes(range(16))
    idx = bloom_indices(key, 1000, 7)
    assert idx == bloom_indices(key, 1000, 7)
    assert len(idx) == 7 and all(0 <= j < 1000 for j in idx)


def test_false_positive_rate_stays_near_target() -> None:
    capacity = 10_000
    cat = Catalog.from_keys(MODEL, 16, _keys(1, capacity), capacity=capacity, fp_rate=0.01)
    assert all(k in cat for k in _keys(1, capacity))  # never a false negative
    probes = _keys(2, 100_000)
    fp = sum(cat.contains(k) for k in probes) / len(probes)
    assert 0.005 <= fp <= 0.015, fp
    assert abs(cat.expected_fp_rate() - 0.01) < 0.001
    assert 0.45 < cat.fill_ratio() < 0.55


def test_round_trip_through_cbor() -> None:
    keys = chunk_keys(ModelKey("sha256:0123", "tok"), list(range(160)))
    cat = Catalog.from_keys(MODEL, 16, keys, capacity=500, epoch=7)
    wire = cbor2.dumps(cat.to_dict())
    back = Catalog.from_dict(cbor2.loads(wire))
    assert back == cat
    assert (back.epoch, back.count, back.m, back.k, back.chunk_size) == (7, 10, cat.m, cat.k, 16)
    assert all(k in back for k in keys)
    assert len(wire) < cat.nbytes() + 100


def _bad(**changes: object) -> dict:
    d = Catalog.sized(MODEL, 16, 100).to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "data,reason",
    [
        ("not a map", "bad-catalog"),
        ({"v": 1}, "bad-catalog"),
        (_bad(v=2), "bad-version"),
        (_bad(model=b"short"), "bad-catalog"),
        (_bad(bits="text"), "bad-catalog"),
        (_bad(m=-1), "bad-catalog"),
        (_bad(k=0), "bad-catalog"),
        (_bad(k=99), "bad-catalog"),
        (_bad(n=True), "bad-catalog"),
        (_bad(chunk=0), "bad-catalog"),
        (_bad(bits=b"\x00"), "bad-catalog"),
        (_bad(m=2**40, bits=b""), "oversized"),
    ],
)
def test_bad_catalogs_raise_protocol_error(data: object, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        Catalog.from_dict(data)
    assert err.value.reason == reason


def test_padding_bits_must_be_zero() -> None:
    d = Catalog(model=MODEL, chunk_size=16, m=12, k=2).to_dict()
    d["bits"] = b"\x00\xff"  # bits 12..15 are padding
    with pytest.raises(ProtocolError):
        Catalog.from_dict(d)


def test_leading_matches_counts_the_advertised_prefix() -> None:
    mk = ModelKey("sha256:0123", "tok")
    prompt = list(range(100))
    keys = chunk_keys(mk, prompt)  # 6 keys
    cat = Catalog.from_keys(MODEL, 16, keys[:4], capacity=1000, fp_rate=1e-6)
    assert leading_matches(cat, keys) == 4
    assert leading_matches(cat, keys[1:]) == 3
    other = chunk_keys(mk, [5] + prompt[1:])
    assert leading_matches(cat, other) == 0
    assert leading_matches(Catalog.sized(MODEL, 16, 10), keys) == 0
