"""Chained chunk keys: layout, golden values, determinism across processes, prefix property."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.cache.keys import (
    DEFAULT_CHUNK_SIZE,
    ModelKey,
    chunk_keys,
    KEY_BYTES,
    ChunkHash,
    extend_keys,
    key_hex,
    prompt_key,
)
from mesh.errors import ConfigError

MK = ModelKey("sha256:0123", "gemma3-270m-tok", "float32", 16, 1)
ROOT = Path(__file__).resolve().parents[2]


def full_chunks(n_tokens: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Number of full chunks in ``n_tokens`` tokens (the trailing partial chunk has no key)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return max(n_tokens, 0) // chunk_size


def key_from_hex(text: str) -> ChunkHash:
    """Parse :func:`key_hex` output; raises ValueError unless it is 32 hex characters."""
    raw = bytes.fromhex(text)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"chunk key must be {KEY_BYTES} bytes, got {len(raw)}")
    return ChunkHash(raw)


def test_golden_values_are_stable() -> None:
    # Locked: changing these breaks every cache and catalog on the mesh (bump FORMAT_VERSION).
    assert MK.hexdigest() == "a55648d99ea2178b1700c76a04c49b80"
    assert [key_hex(k) for k in chunk_keys(MK, list(range(40)))] == [
        "46a63e855ec8fd6f287eae60b9349b5c",
        "d53a9ee55bd5d73353336e8a0ccfad1b",
    ]
    assert key_hex(prompt_key(MK, list(range(40)))) == "ad9e6dfc28db2b7ab27aafb386099ce7"


def test_layout_matches_the_documented_formula() -> None:
    tokens = [7, 70000, 3, 2**32 - 1] * 8  # 32 tokens, two chunks
    h = MK.digest()
    expected = []
    for i in range(2):
        raw = struct.pack("<16I", *tokens[i * 16 : (i + 1) * 16])
        h = xxhash.xxh3_128(h + raw).digest()
        expected.append(h)
    assert chunk_keys(MK, tokens) == expected
    assert MK.h0 == MK.digest() and len(MK.h0) == 16


def test_identical_in_a_separate_process_with_another_hash_seed() -> None:
    tokens = [(i * 7919) % 262144 for i in range(200)]
    here = [key_hex(k) for k in chunk_keys(MK, tokens)]
    code = (
        "import json,sys; from mesh.cache.keys import ModelKey, chunk_keys, key_hex;"
        "mk = ModelKey('sha256:0123', 'gemma3-270m-tok', 'float32', 16, 1);"
        "print(json.dumps([key_hex(k) for k in chunk_keys(mk, json.loads(sys.argv[1]))]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(tokens)],
        capture_output=True, text=True, check=True, env=env, cwd=ROOT,
    )
    assert json.loads(out.stdout) == here
    assert len(here) == 12


def test_full_chunks_only() -> None:
    assert chunk_keys(MK, list(range(15))) == []
    assert len(chunk_keys(MK, list(range(16)))) == 1
    assert len(chunk_keys(MK, list(range(31)))) == 1
    assert len(chunk_keys(MK, list(range(32)))) == 2
    assert full_chunks(65) == 4 and DEFAULT_CHUNK_SIZE == 16
    small = dataclasses.replace(MK, chunk_size=4)
    assert len(chunk_keys(small, list(range(10)))) == 2


def test_a_changed_token_changes_its_chunk_and_all_later_keys_only() -> None:
    base = list(range(64))
    changed = base.copy()
    changed[37] += 1  # in chunk index 2
    a, b = chunk_keys(MK, base), chunk_keys(MK, changed)
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:]))
    # the trailing partial chunk never matters
    assert chunk_keys(MK, base + [1, 2, 3]) == a


@pytest.mark.parametrize(
    "field,value",
    [("model_digest", "sha256:9999"), ("tokenizer", "other"), ("kv_dtype", "float16"),
     ("format_version", 2)],
)
def test_every_model_key_field_separates_keys(field: str, value: object) -> None:
    other = dataclasses.replace(MK, **{field: value})
    assert other.digest() != MK.digest()
    assert set(chunk_keys(other, list(range(32)))).isdisjoint(chunk_keys(MK, list(range(32))))


def test_extend_keys_continues_a_chain() -> None:
    a, b = list(range(32)), list(range(100, 150))
    whole = chunk_keys(MK, a + b)
    assert extend_keys(MK, whole[1], b) == whole[2:]


def test_prompt_key_is_disjoint_and_covers_the_tail() -> None:
    toks = list(range(40))
    assert prompt_key(MK, toks) not in chunk_keys(MK, toks)
    assert prompt_key(MK, toks) != prompt_key(MK, toks[:-1])
    assert prompt_key(MK, toks) != prompt_key(MK, toks[:-1] + [999])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        chunk_keys(MK, [-1] * 16)
    with pytest.raises(ValueError):
        chunk_keys(MK, [2**32] * 16)
    with pytest.raises(ConfigError):
        ModelKey("", "tok")
    with pytest.raises(ConfigError):
        ModelKey("d", "tok", chunk_size=0)
    with pytest.raises(ValueError):
        key_from_hex("abcd")
    k = chunk_keys(MK, list(range(16)))[0]
    assert key_from_hex(key_hex(k)) == k


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=80),
    st.lists(st.integers(0, 2**32 - 1), max_size=80),
)
def test_shared_prefix_means_shared_leading_keys(a: list[int], b: list[int]) -> None:
    ka, kab = chunk_keys(MK, a), chunk_keys(MK, a + b)
    assert kab[: len(ka)] == ka
    assert len(kab) == (len(a) + len(b)) // 16
