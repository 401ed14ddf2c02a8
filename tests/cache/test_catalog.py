"""Bloom catalog: sizing, false-positive bound, round trip, validation, leading matches; keyed
catalogs (review finding M1): who can test a key against them, and who can read whose."""

from __future__ import annotations

import math
import random

import cbor2
import pytest

from mesh.cache.catalog import KEYED_VERSION, Catalog, bloom_indices, bloom_size, key_id, leading_matches
from mesh.cache.keys import ModelKey, chunk_keys, prompt_key
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
        (_bad(v=3), "bad-version"),
        (_bad(v=2), "bad-catalog"),  # a keyed catalog must name its key
        (_bad(v=2, kid=b"short"), "bad-catalog"),
        (_bad(v=True), "bad-version"),
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


# -- keyed catalogs (mesh.cache.catalog docstring) --------------------------------------------

SECRET, OTHER = bytes(range(32)), bytes(range(1, 33))


def test_a_keyed_catalog_answers_only_with_its_key() -> None:
    mk = ModelKey("sha256:0123", "tok")
    asked = list(range(100))
    keys, pkey = chunk_keys(mk, asked), prompt_key(mk, asked)
    cat = Catalog.from_keys(MODEL, 16, [*keys, pkey], capacity=500, secret=SECRET)
    d = cbor2.loads(cbor2.dumps(cat.to_dict()))
    assert d["v"] == KEYED_VERSION and d["kid"] == key_id(SECRET) and len(d["kid"]) == 8
    # a holder of the key reads every key it holds, and the prefix depth
    mine = Catalog.from_dict(d, secret=SECRET)
    assert mine.readable and all(mine.contains(k) for k in [*keys, pkey]) and leading_matches(mine, keys) == len(keys)
    # without it (a keyless process, or another mesh's / a rotated key): unreadable, no hits
    for secret in (None, OTHER):
        theirs = Catalog.from_dict(d, secret=secret)
        assert not theirs.readable and theirs.kid == key_id(SECRET)
        assert not any(theirs.contains(k) for k in [*keys, pkey]) and leading_matches(theirs, keys) == 0
        with pytest.raises(ValueError):
            theirs.add(pkey)
    # the attacker who ignores the version and tests the bits with the public, unkeyed indices:
    # the keys it can compute are not where the filter set its bits
    probe = [all(d["bits"][j >> 3] & 1 << (j & 7) for j in bloom_indices(k, d["m"], d["k"])) for k in [*keys, pkey]]
    assert not any(probe), probe  # 7 keys in a filter sized for 500: a false positive is ~1e-14 each
    unkeyed = Catalog.from_keys(MODEL, 16, [*keys, pkey], capacity=500).to_dict()
    assert all(all(unkeyed["bits"][j >> 3] & 1 << (j & 7) for j in bloom_indices(k, unkeyed["m"], unkeyed["k"]))
               for k in [*keys, pkey])  # what the same attacker reads from an unkeyed catalog


def test_an_unkeyed_catalog_is_read_by_everyone_and_says_so() -> None:
    keys = _keys(3, 20)
    d = Catalog.from_keys(MODEL, 16, keys, capacity=100).to_dict()
    assert d["v"] == 1 and "kid" not in d
    for secret in (None, SECRET):  # a keyed node reads a node's catalog from before catalog keys
        back = Catalog.from_dict(d, secret=secret)
        assert back.readable and back.kid is None and back.secret is None and all(back.contains(k) for k in keys)


def test_keyed_indices_keep_the_false_positive_bound() -> None:
    capacity = 10_000
    cat = Catalog.from_keys(MODEL, 16, _keys(1, capacity), capacity=capacity, fp_rate=0.01, secret=SECRET)
    assert all(k in cat for k in _keys(1, capacity))
    probes = _keys(2, 50_000)
    fp = sum(cat.contains(k) for k in probes) / len(probes)
    assert 0.005 <= fp <= 0.015, fp
    assert 0.45 < cat.fill_ratio() < 0.55
    assert bloom_indices(b"k" * 16, 1000, 7, SECRET) != bloom_indices(b"k" * 16, 1000, 7, OTHER)
    assert bloom_indices(b"k" * 16, 1000, 7, SECRET) != bloom_indices(b"k" * 16, 1000, 7)


def test_catalog_keys_are_checked() -> None:
    with pytest.raises(ValueError):
        key_id(b"short")
    with pytest.raises(ValueError):  # a key that is not the one kid names
        Catalog(model=MODEL, chunk_size=16, m=64, k=2, kid=key_id(OTHER), secret=SECRET)
    assert key_id(SECRET) != key_id(OTHER) and key_id(SECRET) == key_id(bytearray(SECRET))
