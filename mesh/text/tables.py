"""The tokenizer file: a ``tokenizer.json`` boiled down to flat tables a node memory-maps.

Why a file of our own: the ``tokenizers`` library builds hash maps of every merge and piece on
load, and for Gemma's 262k pieces and 515k merges they cost hundreds of MiB resident; a node on a
Pi Zero 2W has 400 MiB in all. Here the merges are one sorted array searched by bisection and the
pieces one UTF-8 blob, both paged in from the file on demand.

Layout (version 1, little-endian)::

    magic  b"MESHTOK\\0"          8 bytes
    u32    format version (1)
    u32    header length H
    H      header, UTF-8 JSON (family, special ids, added tokens, single-character pieces,
           byte-fallback ids, section offsets and counts, the source's SHA-256 and the
           tables' own: the SHA-256 of everything else, equal whatever the source)
    pad    zeros to a multiple of 8; the header's section offsets count from here
    merge_keys   u64[M]   (left << 32 | right), ascending
    merge_vals   u64[M]   (rank << 32 | new_id), same order
    offsets      u32[V+1] piece i is blob[offsets[i]:offsets[i+1]]
    blob         UTF-8 bytes of every piece, id order

Sections start at multiples of 8. Built once by ``mesh setup`` (:func:`build_tables`); a file of
another version or a truncated one is refused with a message naming ``mesh setup``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
import sys
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError

MAGIC = b"MESHTOK\0"
VERSION = 1
FILE_NAME = "tokenizer.mesh"
_PREFIX = struct.Struct("<8sII")

METASPACE = "metaspace-bpe"  # SentencePiece-style BPE (Gemma): "▁" for spaces, byte fallback
BYTE_LEVEL = "byte-level-bpe"  # GPT-2 byte-level BPE (SmolLM2, LLaMA-3-style vocabularies)

_METASPACE_NORMALIZER = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
_METASPACE_DECODER = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                      {"type": "ByteFallback"}, {"type": "Fuse"}]


def _unsupported(what: str, value: Any) -> ConfigError:
    return ConfigError(f"tokenizer.json: unsupported {what} {json.dumps(value)[:200]}; "
                       "the mesh tokenizer knows Gemma-style and GPT-2 byte-level BPE")


def _family(spec: dict[str, Any]) -> str:
    """Which of the two supported pipelines ``spec`` describes; anything else is refused."""
    norm, pre, dec = spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")
    if norm == _METASPACE_NORMALIZER:
        split_ok = pre is None or pre == {"type": "Split", "pattern": {"String": " "},
                                          "behavior": "MergedWithPrevious", "invert": False}
        # After the normalizer no space is left for that split to cut at: a no-op.
        if not split_ok:
            raise _unsupported("pre_tokenizer", pre)
        if not (isinstance(dec, dict) and dec.get("type") == "Sequence"
                and dec.get("decoders") == _METASPACE_DECODER):
            raise _unsupported("decoder", dec)
        return METASPACE
    if norm is None:
        if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                and not pre.get("add_prefix_space", False)):
            raise _unsupported("pre_tokenizer", pre)
        if not (isinstance(dec, dict) and dec.get("type") == "ByteLevel"):
            raise _unsupported("decoder", dec)
        return BYTE_LEVEL
    raise _unsupported("normalizer", norm)


def _template(post: Any) -> tuple[list[int], list[int]]:
    """Ids the post-processor puts before and after a single sequence."""
    if post is None or (post.get("type") == "ByteLevel"):
        return [], []
    if post.get("type") != "TemplateProcessing":
        raise _unsupported("post_processor", post)
    before: list[int] = []
    after: list[int] = []
    seen_a = False
    for item in post["single"]:
        if "Sequence" in item:
            seen_a = True
            continue
        tok = item["SpecialToken"]["id"]
        special = post["special_tokens"][tok]["ids"]
        (after if seen_a else before).extend(int(i) for i in special)
    return before, after


def _config_ids(config: dict[str, Any], vocab: dict[str, int]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in ("bos", "eos", "pad", "unk"):
        tok = config.get(f"{name}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        out[f"{name}_token_id"] = vocab.get(tok) if isinstance(tok, str) else None
    return out


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _scan(raw: bytes, start: int) -> Iterator[tuple[int, int, int]]:
    """(depth, string start, string end) of each JSON string from the ``[`` at ``start`` to the
    ``]`` closing it, then one (0, end past ``]``, -1). Between strings only brackets, commas and
    whitespace can occur, so the depth moves by counting brackets there."""
    depth = 0
    pos = start
    for m in _JSON_STRING.finditer(raw, start):
        opened, closed = raw.count(b"[", pos, m.start()), raw.count(b"]", pos, m.start())
        if depth + opened - closed <= 0:
            break
        depth += opened - closed
        yield depth, m.start(), m.end()
        pos = m.end()
    for k in range(pos, len(raw)):
        if raw[k] == 0x5B:
            depth += 1
        elif raw[k] == 0x5D:
            depth -= 1
            if depth == 0:
                yield 0, k + 1, -1
                return
    raise ConfigError("tokenizer.json: the merges array is not closed")


def _merges_span(raw: bytes) -> tuple[int, int] | None:
    """Byte span of the model's ``"merges": [...]`` array in the raw JSON, or None.

    Scanned as bytes, string by string, without building the array: Gemma's 515k merges as
    Python lists, or the 33 MB file as one str (four bytes a character once an emoji is in it),
    cost more than a Pi Zero's node has. A JSON string cannot hold an unescaped quote, so
    ``"merges":`` outside a string is structural.
    """
    key = raw.rfind(b'"merges":')
    if key < 0:
        return None
    start = raw.index(b"[", key)
    for depth, end, tail in _scan(raw, start):
        if tail == -1 and depth == 0:
            return start, end
    raise ConfigError("tokenizer.json: the merges array is not closed")


def _pairs(raw: bytes, start: int) -> Iterator[tuple[str, str]]:
    """(left, right) of every merge, in file order: ``"a b"`` strings or ``["a", "b"]`` lists."""
    half: str | None = None
    for depth, s, e in _scan(raw, start):
        if e == -1:
            return
        text = json.loads(raw[s:e])
        if depth == 1:
            left, right = text.split(" ", 1)
            yield left, right
        elif half is None:
            half = text
        else:
            yield half, text
            half = None


def build_tables(tokenizer_json: Path, out: Path | None = None) -> Path:
    """Write ``tokenizer.mesh`` beside ``tokenizer.json`` (or at ``out``); return its path.

    ``tokenizer_config.json`` beside it, when present, gives the bos/eos/pad token names. The
    file is written to a temporary name and renamed, so a crash leaves no half-written file.
    """
    tokenizer_json = Path(tokenizer_json)
    out = Path(out) if out is not None else tokenizer_json.parent / FILE_NAME
    raw = tokenizer_json.read_bytes()
    source_sha256 = hashlib.sha256(raw).hexdigest()
    try:
        span = _merges_span(raw)
        spec = json.loads(raw if span is None else raw[:span[0]] + b"[]" + raw[span[1]:])
    except (ValueError, IndexError) as e:
        raise ConfigError(f"{tokenizer_json} is not valid JSON: {e}") from e
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0.0) \
            or model.get("continuing_subword_prefix") not in (None, "") \
            or model.get("end_of_word_suffix") not in (None, "") or model.get("ignore_merges"):
        raise _unsupported("model", {k: v for k, v in model.items() if k not in ("vocab", "merges")})
    family = _family(spec)
    vocab: dict[str, int] = model["vocab"]
    added = spec.get("added_tokens", [])
    for a in added:
        if a["single_word"] or a["lstrip"] or a["rstrip"] or a["normalized"]:
            raise _unsupported("added token", a)
    pieces: list[str | None] = [None] * (1 + max([*vocab.values(), *(a["id"] for a in added)]))
    for t, i in vocab.items():
        pieces[i] = t
    for a in added:
        pieces[a["id"]] = a["content"]
    if any(p is None for p in pieces):
        raise ConfigError(f"{tokenizer_json}: token ids are not contiguous (0..{len(pieces) - 1})")
    merges = ((vocab[left], vocab[right], vocab[left + right])
              for left, right in (_pairs(raw, span[0]) if span else ()))
    config_path = tokenizer_json.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    all_ids = dict(vocab)
    all_ids.update({a["content"]: a["id"] for a in added})
    prefix, suffix = _template(spec.get("post_processor"))
    return write_tables(
        out, family=family, pieces=pieces, merges=merges,  # type: ignore[arg-type]
        added=[(a["content"], a["id"], bool(a["special"])) for a in added], prefix=prefix, suffix=suffix,
        byte_fallback=bool(model.get("byte_fallback")),
        unk_id=vocab.get(model["unk_token"]) if model.get("unk_token") else None,
        fuse_unk=bool(model.get("fuse_unk")), special_ids=_config_ids(config, all_ids),
        source_sha256=source_sha256)


def write_tables(out: Path, *, family: str, pieces: list[str], merges: Iterable[tuple[int, int, int]],
                 added: list[tuple[str, int, bool]], prefix: list[int], suffix: list[int],
                 byte_fallback: bool, unk_id: int | None, fuse_unk: bool,
                 special_ids: dict[str, int | None], source_sha256: str) -> Path:
    """Write the tables file (layout in the module docstring) atomically; return ``out``.

    ``pieces[i]`` is the spelling of id ``i`` (all distinct); ``merges`` yields (left, right,
    new) ids in rank order; ``added`` holds (content, id, special) of the tokens cut out of the
    raw text first; ``special_ids`` maps ``bos_token_id``... to ids or None.
    """
    out = Path(out)
    # Pairs in rank order, then sorted by key (stable: of a repeated pair the last rank wins, as
    # in the library's hash map).
    pair_keys = array("Q")
    pair_vals = array("Q")
    for rank, (left, right, new) in enumerate(merges):
        pair_keys.append(left << 32 | right)
        pair_vals.append(rank << 32 | new)
    order = sorted(range(len(pair_keys)), key=pair_keys.__getitem__)
    keys = array("Q")
    vals = array("Q")
    for j, i in enumerate(order):
        if j + 1 < len(order) and pair_keys[order[j + 1]] == pair_keys[i]:
            continue
        keys.append(pair_keys[i])
        vals.append(pair_vals[i])
    del order, pair_keys, pair_vals

    blob = bytearray()
    offsets = array("I", [0])
    for piece in pieces:
        blob += piece.encode("utf-8")
        offsets.append(len(blob))
    ids = {p: i for i, p in enumerate(pieces)}
    header: dict[str, Any] = {
        "family": family,
        "size": len(ids),
        "pieces": len(pieces),
        "prefix_ids": prefix,
        "suffix_ids": suffix,
        "added": [list(a) for a in sorted(added, key=lambda a: a[1])],
        "chars": {p: i for p, i in ids.items() if len(p) == 1},
        "byte_ids": [ids.get(f"<0x{b:02X}>", -1) for b in range(256)] if byte_fallback else None,
        "unk_id": unk_id,
        "fuse_unk": fuse_unk,
        "source_sha256": source_sha256,
        **special_ids,
    }
    del ids
    sections = [("merge_keys", keys.tobytes(), len(keys)), ("merge_vals", vals.tobytes(), len(vals)),
                ("offsets", offsets.tobytes(), len(offsets)), ("blob", bytes(blob), len(blob))]
    # What the tokenizer does, whatever it was built from (tokenizer.json or the GGUF): the key
    # under which nodes may share KV computed from its ids.
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "source_sha256"},
                                       ensure_ascii=False, sort_keys=True).encode("utf-8"))
    for _name, data, _count in sections:
        digest.update(data)
    header["tables_sha256"] = digest.hexdigest()
    header["sections"] = {}
    pos = 0
    for name, data, count in sections:
        header["sections"][name] = [pos, count]
        pos = _align(pos + len(data))
    head = json.dumps(header, ensure_ascii=False, sort_keys=True).encode("utf-8")
    base = _align(_PREFIX.size + len(head))
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", dir=out.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, VERSION, len(head)))
            f.write(head)
            for name, data, _count in sections:
                f.write(b"\0" * (base + header["sections"][name][0] - f.tell()))
                f.write(data)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _align(n: int) -> int:
    return (n + 7) & ~7


def read_header(buf: memoryview, path: Path) -> dict[str, Any]:
    """The header of a mapped tokenizer file, checked against the file's length."""
    if sys.byteorder != "little":
        raise ConfigError("the mesh tokenizer file is little-endian; this machine is not")
    if len(buf) < _PREFIX.size:
        raise ConfigError(f"{path} is truncated; run `mesh setup` again")
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise ConfigError(f"{path} is not a mesh tokenizer file; run `mesh setup` again")
    if version != VERSION:
        raise ConfigError(f"{path} has tokenizer format {version}, this mesh reads {VERSION}; "
                          "run `mesh setup` again")
    try:
        header: dict[str, Any] = json.loads(bytes(buf[_PREFIX.size:_PREFIX.size + hlen]))
        widths = {"merge_keys": 8, "merge_vals": 8, "offsets": 4, "blob": 1}
        base = _align(_PREFIX.size + hlen)
        header["sections"] = {name: [base + start, count] for name, (start, count) in header["sections"].items()}
        end = max(start + count * widths[name] for name, (start, count) in header["sections"].items())
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} has a damaged header; run `mesh setup` again") from e
    if end > len(buf):
        raise ConfigError(f"{path} is truncated; run `mesh setup` again")
    return header


def ensure_tables(model_dir: Path) -> Path:
    """``tokenizer.mesh`` of a converted model directory, built when it is missing, damaged, of
    another format version, or made from another ``tokenizer.json``; return its path.

    What ``mesh setup`` calls for every model, also for directories converted before this file
    existed (so they need no new conversion). A directory without ``tokenizer.json`` had its
    tables built from the GGUF (``mesh.text.gguf_vocab``): they are kept when whole.
    """
    model_dir = Path(model_dir)
    source = model_dir / "tokenizer.json"
    out = model_dir / FILE_NAME
    if not source.exists():
        try:
            with open(out, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    read_header(view, out)
                finally:
                    view.release()
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{model_dir} has no tokenizer.json and no readable {FILE_NAME} ({e}); "
                              "run `mesh setup` again") from e
        return out
    if out.exists():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        try:
            with open(out, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    current = read_header(view, out)["source_sha256"] == digest
                finally:
                    view.release()
        except (OSError, ValueError, KeyError, ConfigError):
            current = False
        if current:
            return out
    return build_tables(source, out)
