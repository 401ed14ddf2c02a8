"""The tokenizer tables straight from a GGUF file: no transformers, no gguf package, little memory.

Why: setup made ``tokenizer.json`` with ``transformers.AutoTokenizer`` on the GGUF, which for
Gemma costs hundreds of MiB over torch and transformers (results/2026-12-06/tokenizer_rss.json),
and the ``gguf`` package's reader builds numpy objects for every vocabulary entry; a Pi Zero 2W
running ``mesh setup`` has 400 MiB. Here the metadata is walked once over a memory map and only
the ``tokenizer.*`` values are kept.

The tables equal those built from the ``tokenizer.json`` transformers writes for the same GGUF
(``tests/core/test_tokenizer.py`` compares them section by section), because this replays what
transformers' GGUF conversion does (``integrations/gguf/gguf_tokenizer_mapping.py``):

- Gemma (``tokenizer.ggml.model == "llama"``, a Gemma architecture): pieces made only of spaces
  are respelled with "▁"; the file has no merges, so they are rebuilt from the vocabulary: every
  split of every piece into two pieces, ordered by the piece's position (the file's order is the
  merge order), then longer left part first;
- byte-level (``"gpt2"``, with the GPT-2 split): pieces outside the byte alphabet respelled
  byte by byte, merges as the file lists them;
- added tokens: the CONTROL ones (type 3) as special, USER_DEFINED ones (type 4) whose spelling
  is a piece as plain added tokens; BOS in front when ``add_bos_token`` says so.

Anything else (another split regex, SentencePiece LLaMA vocabularies, unigram) is refused with
a :class:`ConfigError` rather than tokenized differently.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from mesh.text.bpe import BYTE_CHAR
from mesh.text.tables import BYTE_LEVEL, METASPACE, write_tables

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
CONTROL, USER_DEFINED = 3, 4
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# ``tokenizer.ggml.pre`` values for which transformers keeps the plain GPT-2 split.
GPT2_SPLIT_PRE = (None, "default", "gpt2", "gpt-2", "smollm")


def read_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """``general.architecture`` and every ``tokenizer.*`` value of a GGUF (versions 2 and 3)."""
    out: dict[str, Any] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            magic, version, _tensors, n_kv = struct.unpack_from("<4sIQQ", m, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise ConfigError(f"{path} is not a GGUF file of version 2 or 3")
            pos = 24
            for _ in range(n_kv):
                key, pos = _string(m, pos)
                (vtype,) = struct.unpack_from("<I", m, pos)
                want = key.startswith("tokenizer.") or key == "general.architecture"
                value, pos = _value(m, pos + 4, vtype, want)
                if want:
                    out[key] = value
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the GGUF metadata of {path}: {e}") from e
    return out


def _string(m: Any, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", m, pos)
    return m[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _value(m: Any, pos: int, vtype: int, want: bool) -> tuple[Any, int]:
    if vtype == _STRING:
        return _string(m, pos)
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)
    if vtype != _ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype}")
    etype, count = struct.unpack_from("<IQ", m, pos)
    pos += 12
    if etype == _STRING:
        items = []
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", m, pos)
            if want:
                items.append(m[pos + 8:pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        return items, pos
    if etype not in _ARRAY_CODES:
        raise ValueError(f"unsupported GGUF array of type {etype}")
    values = array(_ARRAY_CODES[etype])
    end = pos + count * values.itemsize
    if want:
        values.frombytes(m[pos:end])
    return values, end


def _gemma_merges(pieces: list[str], ids: dict[str, int]) -> Iterator[tuple[int, int, int]]:
    """transformers' ``generate_merges`` with minus the position as the score: pieces in file
    order, and within a piece its splits with the longer left part first."""
    for new, piece in enumerate(pieces):
        for cut in range(len(piece) - 1, 0, -1):
            left, right = ids.get(piece[:cut]), ids.get(piece[cut:])
            if left is not None and right is not None:
                yield left, right, new


def _byte_level_merges(merges: list[str], ids: dict[str, int]) -> Iterator[tuple[int, int, int]]:
    for m in merges:
        left, right = m.split(" ")
        try:
            yield ids[left], ids[right], ids[left + right]
        except KeyError as e:
            raise ConfigError(f"GGUF merge {m!r} names a piece the vocabulary lacks") from e


def build_tables_from_gguf(gguf: Path, out: Path, source_sha256: str | None = None) -> Path:
    """Write ``out`` (a ``tokenizer.mesh``) from the tokenizer in a GGUF file; return it.

    ``source_sha256`` is recorded as the tokenizer's digest (setup has the GGUF's digest at hand;
    without it the file is hashed here).
    """
    md = read_tokenizer_metadata(gguf)
    kind, arch = md.get("tokenizer.ggml.model"), md.get("general.architecture")
    tokens: list[str] = md.get("tokenizer.ggml.tokens") or []
    types = list(md.get("tokenizer.ggml.token_type") or [])
    if not tokens or len(types) not in (0, len(tokens)):
        raise ConfigError(f"{gguf}: no tokenizer vocabulary in the GGUF metadata")
    if kind == "llama" and arch in GEMMA_ARCHITECTURES:
        family = METASPACE
        pieces = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    elif kind == "gpt2":
        pre = md.get("tokenizer.ggml.pre")
        if pre not in GPT2_SPLIT_PRE:
            raise ConfigError(f"{gguf}: tokenizer pre-split {pre!r} is not supported (the GPT-2 split is)")
        family = BYTE_LEVEL
        alphabet = set(BYTE_CHAR.values())
        pieces = [t if set(t) <= alphabet else "".join(BYTE_CHAR[b] for b in t.encode("utf-8")) for t in tokens]
    else:
        raise ConfigError(f"{gguf}: a {kind!r} tokenizer for {arch!r} is not supported "
                          "(Gemma SentencePiece BPE and GPT-2 byte-level BPE are)")
    ids = {p: i for i, p in enumerate(pieces)}
    if len(ids) != len(pieces):
        raise ConfigError(f"{gguf}: the vocabulary spells some pieces twice")
    alphabet = set(BYTE_CHAR.values())
    added: list[tuple[str, int, bool]] = []
    for token, ttype in zip(tokens, types):
        if ttype == CONTROL and (family == METASPACE or set(token) <= alphabet) and token in ids:
            added.append((token, ids[token], True))
        elif ttype == USER_DEFINED and token in ids:
            added.append((token, ids[token], False))

    def special(key: str) -> int | None:
        value = md.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos = md.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if family == BYTE_LEVEL and add_bos:
        raise ConfigError(f"{gguf}: a byte-level vocabulary that adds BOS is not supported")
    prefix = [bos] if add_bos and bos is not None else []
    suffix = [eos] if md.get("tokenizer.ggml.add_eos_token") and eos is not None else []
    if family == METASPACE:
        merges = _gemma_merges(pieces, ids)
        unk = special("unknown_token_id")
    else:
        merges = _byte_level_merges(md.get("tokenizer.ggml.merges") or [], ids)
        unk = None
    if source_sha256 is None:
        h = hashlib.sha256()
        with open(gguf, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        source_sha256 = h.hexdigest()
    return write_tables(
        out, family=family, pieces=pieces, merges=merges, added=added, prefix=prefix, suffix=suffix,
        byte_fallback=family == METASPACE, unk_id=unk, fuse_unk=family == METASPACE,
        special_ids={"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": special("padding_token_id"),
                     "unk_token_id": special("unknown_token_id")},
        source_sha256=source_sha256)
