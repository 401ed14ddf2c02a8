"""Token chunking and chained chunk keys.

A prompt's token ids are cut into full chunks of ``C`` tokens (``ModelKey.chunk_size``, default 16);
a trailing partial chunk gets no key. Chunk ``i`` (1-based) is named by a chained hash::

    h_0 = ModelKey.digest()                                  (16 bytes)
    h_i = xxh3_128(h_{i-1} || tokens[(i-1)*C : i*C] as little-endian uint32)

``xxh3_128`` is used with seed 0 and its canonical (big-endian) 16-byte digest. Because every key
folds in its parent, equal keys mean equal token prefixes (up to hash collisions) under the same
model key, so "the first n keys match" is "the first n*C tokens match": this is what makes
template-agnostic partial matching work. Keys never depend on the process, the machine or Python's
``hash()``; ``tests/cache/test_keys.py`` locks golden values.

The model key names everything that makes KV bytes interchangeable (as LMCache's
``CacheEngineKey`` does): the model file digest, the tokenizer, the KV dtype, the chunk size and
this module's format version. Any change to one of them gives disjoint keys.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import numpy as np
import xxhash

from mesh.errors import ConfigError

ChunkHash = NewType("ChunkHash", bytes)
"""A 16-byte chained chunk key (or a prompt key from :func:`prompt_key`)."""

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 16
KEY_BYTES = 16
MAX_TOKEN_ID = 2**32 - 1

# Domain tags keep the three kinds of 128-bit names disjoint even if their inputs coincide.
_MODEL_KEY_TAG = b"mesh/model-key/v1\x00"
_PROMPT_KEY_TAG = b"mesh/prompt-key/v1\x00"


def _field(value: str | int) -> bytes:
    """Length-prefixed UTF-8 encoding of one model key field (unambiguous concatenation)."""
    raw = str(value).encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


@dataclass(frozen=True)
class ModelKey:
    """What makes KV bytes compatible between two nodes.

    ``model_digest``: digest of the model file(s) (e.g. hex sha256 or xxh3 of the GGUF/safetensors).
    ``tokenizer``: tokenizer id or digest. ``kv_dtype``: dtype the KV is computed and stored in
    (``"float32"`` for fp32 inference); the wire codec (fp16/int8) is a transport detail and is not
    part of the key. ``chunk_size``: tokens per chunk. ``format_version``: this module's format.
    """

    model_digest: str
    tokenizer: str
    kv_dtype: str = "float32"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.model_digest:
            raise ConfigError("model key: empty model_digest")
        if not self.tokenizer:
            raise ConfigError("model key: empty tokenizer")
        if not self.kv_dtype:
            raise ConfigError("model key: empty kv_dtype")
        if not isinstance(self.chunk_size, int) or not 1 <= self.chunk_size <= 65536:
            raise ConfigError(f"model key: chunk_size {self.chunk_size!r} not in 1..65536")
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ConfigError(f"model key: bad format_version {self.format_version!r}")

    def digest(self) -> bytes:
        """16-byte stable digest: xxh3_128 over the tag and the length-prefixed fields, in order
        model_digest, tokenizer, kv_dtype, chunk_size, format_version."""
        fields = (self.model_digest, self.tokenizer, self.kv_dtype, self.chunk_size,
                  self.format_version)
        payload = b"".join(_field(v) for v in fields)
        return xxhash.xxh3_128_digest(_MODEL_KEY_TAG + payload)

    def hexdigest(self) -> str:
        """:meth:`digest` as 32 lowercase hex characters (for topics, logs and JSON)."""
        return self.digest().hex()

    @property
    def h0(self) -> ChunkHash:
        """The root of every chunk chain under this model key."""
        return ChunkHash(self.digest())


def tokens_to_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32; raises ValueError for ids outside 0..2**32-1."""
    arr = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID):
        raise ValueError("token id outside 0..2**32-1")
    return arr.astype("<u4").tobytes()


def chunk_keys(model_key: ModelKey, token_ids: Sequence[int]) -> list[ChunkHash]:
    """Chained keys ``[h_1, ..., h_n]`` of the ``n = len(token_ids) // C`` full chunks."""
    return extend_keys(model_key, model_key.h0, token_ids)


def extend_keys(
    model_key: ModelKey, parent: ChunkHash, token_ids: Sequence[int]
) -> list[ChunkHash]:
    """Keys of the full chunks of ``token_ids`` continuing a chain whose last key is ``parent``.

    ``extend_keys(mk, chunk_keys(mk, a)[-1], b) == chunk_keys(mk, a + b)[len(a)//C:]`` when
    ``len(a)`` is a multiple of C: used to key a conversation turn without rehashing the history.
    """
    if len(parent) != KEY_BYTES:
        raise ValueError("parent key must be 16 bytes")
    c = model_key.chunk_size
    raw = tokens_to_bytes(token_ids)
    step = 4 * c
    keys: list[ChunkHash] = []
    prev = bytes(parent)
    for i in range(len(raw) // step):
        prev = xxhash.xxh3_128_digest(prev + raw[i * step : (i + 1) * step])
        keys.append(ChunkHash(prev))
    return keys


def prompt_key(model_key: ModelKey, token_ids: Sequence[int]) -> ChunkHash:
    """Key of a complete token sequence (for "last logits" entries of full prompts).

    xxh3_128(tag || model key digest || token count as uint64 LE || all tokens as uint32 LE). The
    domain tag keeps it disjoint from chunk keys, so both can share one catalog.
    """
    raw = tokens_to_bytes(token_ids)
    head = _PROMPT_KEY_TAG + model_key.digest() + struct.pack("<Q", len(raw) // 4)
    return ChunkHash(xxhash.xxh3_128_digest(head + raw))


def key_hex(key: bytes) -> str:
    """A key as lowercase hex (JSON, logs, file names)."""
    return bytes(key).hex()
