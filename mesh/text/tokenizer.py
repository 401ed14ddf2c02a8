"""The node's tokenizer: the same ids and text as the Hugging Face one, from a memory-mapped file.

It provides exactly what the node, setup, bench and probes call on a tokenizer, with the same
results as ``transformers.AutoTokenizer`` over the same ``tokenizer.json``:

- ``tok(text, add_special_tokens=True)["input_ids"]`` and ``tok.encode(...)``: ids, with the
  post-processor's special tokens (Gemma's ``<bos>``) when ``add_special_tokens``;
- ``tok.decode(ids, skip_special_tokens=False)``: text; a node streams by decoding the growing
  list of generated ids after each token, and that is the same function;
- ``len(tok)`` (vocabulary with added tokens), ``eos_token_id``, ``bos_token_id``,
  ``pad_token_id``, and ``digest`` (of the tables: equal for a tokenizer built from the
  ``tokenizer.json`` or from the GGUF) for cache keys.

Imports neither torch nor transformers. The merge table and the pieces stay in the page cache of
the mapped file; only the single-character pieces, the added tokens and a bounded memo of pair
lookups become Python objects. One instance may serve several threads: the memo only ever holds
answers that are the same whoever computes them.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path
from mesh.errors import ConfigError
import mesh.text.bpe as bpe
from mesh.text.tables import BYTE_LEVEL, FILE_NAME, METASPACE, read_header

# Pair lookups remembered (about 100 bytes each) before the memo is cleared.
PAIR_CACHE = 1 << 15


class Tokenizer:
    """Encode and decode with the tables of one ``tokenizer.mesh`` file (see ``tables``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot map tokenizer file {self.path}: {e}; run `mesh setup`") from e
        buf = self._buf = memoryview(self._map)
        h = read_header(buf, self.path)
        sec = h["sections"]
        self.family: str = h["family"]
        if self.family not in (METASPACE, BYTE_LEVEL):
            raise ConfigError(f"{self.path}: unknown tokenizer family {self.family!r}; run `mesh setup`")

        def view(name: str, width: int, fmt: str) -> memoryview:
            start, count = sec[name]
            return buf[start:start + count * width].cast(fmt)

        self._keys = view("merge_keys", 8, "Q")
        self._vals = view("merge_vals", 8, "Q")
        self._offsets = view("offsets", 4, "I")
        self._blob = view("blob", 1, "B")
        self._n_merges = len(self._keys)
        self._seen: dict[int, int] = {}
        self._n_pieces: int = h["pieces"]
        self._size: int = h["size"]
        self.digest: str = h["tables_sha256"]  # equal for equal tables, whatever they came from
        self.source_sha256: str = h["source_sha256"]
        self.bos_token_id: int | None = h["bos_token_id"]
        self.eos_token_id: int | None = h["eos_token_id"]
        self.pad_token_id: int | None = h["pad_token_id"]
        self.unk_token_id: int | None = h["unk_token_id"]
        self._prefix: list[int] = h["prefix_ids"]
        self._suffix: list[int] = h["suffix_ids"]
        self._chars: dict[str, int] = h["chars"]
        self._byte_ids: list[int] | None = h["byte_ids"]
        self._unk: int | None = h["unk_id"]
        self._fuse_unk: bool = h["fuse_unk"]
        self._special: frozenset[int] = frozenset(i for _t, i, special in h["added"] if special)
        self._added = bpe.AddedTokens({t: i for t, i, _special in h["added"]})

    # What transformers' tokenizer offers and the mesh calls -----------------------------------

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": ids}``, the shape ``tokenizer(text)["input_ids"]`` call sites read."""
        return {"input_ids": self.encode(text, add_special_tokens)}

    def __len__(self) -> int:
        return self._size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = list(self._prefix) if add_special_tokens else []
        for piece, added_id in self._added.split(text):
            if added_id is not None:
                ids.append(added_id)
            elif self.family == METASPACE:
                ids.extend(self._word(piece.replace(" ", "▁")))
            else:
                for word in bpe.byte_level_words(piece):
                    ids.extend(self._word(word))
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids outside the vocabulary are skipped, as the library skips them."""
        tokens = [self.piece(i) for i in ids
                  if 0 <= i < self._n_pieces and not (skip_special_tokens and i in self._special)]
        if self.family == METASPACE:
            return bpe.decode_byte_fallback(tokens)
        return bpe.decode_byte_level(tokens)

    # The tables -------------------------------------------------------------------------------

    def piece(self, i: int) -> str:
        """The token string of id ``i`` (as the vocabulary spells it: ``"▁the"``, ``"Ġthe"``)."""
        return bytes(self._blob[self._offsets[i]:self._offsets[i + 1]]).decode("utf-8")

    def merge(self, left: int, right: int) -> int:
        """``rank << 32 | new_id`` of the merge of ``left`` then ``right``, or -1 if none.

        Answers are kept in a small dict (cleared when full): a bisection of the mapped table
        costs far more than a dict hit, and the same few thousand pairs recur in any text.
        """
        key = left << 32 | right
        v = self._seen.get(key)
        if v is None:
            keys = self._keys
            i = bisect_left(keys, key)
            v = self._vals[i] if i < self._n_merges and keys[i] == key else -1
            if len(self._seen) >= PAIR_CACHE:
                self._seen.clear()
            self._seen[key] = v
        return v

    def _word(self, word: str) -> list[int]:
        if not word:
            return []
        ids = bpe.initial_symbols(word, self._chars, self._byte_ids, self._unk, self._fuse_unk)
        return bpe.merge_word(ids, self.merge)

    def close(self) -> None:
        """Drop the mapping (views first); the object is unusable afterwards."""
        for v in (self._keys, self._vals, self._offsets, self._blob, self._buf):
            v.release()
        self._map.close()

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, {self.family}, {self._size} tokens)"


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of a converted model directory (``mesh setup`` writes ``tokenizer.mesh``)."""
    path = Path(model_dir) / FILE_NAME
    if not path.exists():
        raise ConfigError(f"no {FILE_NAME} in {model_dir}; run `mesh setup`")
    return Tokenizer(path)

