"""The BPE steps of the two tokenizer families the packaged models use, as pure functions.

Each function reproduces one component of the Hugging Face ``tokenizers`` library (the tokenizer
every node used before), step by step, so that ids and text are identical, not merely similar:

- added tokens are cut out of the raw text first, leftmost-longest (``AddedVocabulary``);
- Gemma (SentencePiece-style BPE): spaces become ``"▁"``, the whole piece is one word, characters
  missing from the vocabulary fall back to ``<0xXX>`` byte tokens;
- SmolLM2 (GPT-2 byte-level BPE): the GPT-2 split regex, then every UTF-8 byte as one printable
  character (``bytes_to_unicode``);
- :func:`merge_word` is ``Word::merge_all``: a heap ordered by (rank, position), stale entries
  recognised by the new id exactly as the library does (it compares the new id only).

Lookups are injected (``pair``: ``(left, right) -> rank << 32 | new_id``, -1 for none) so the
tables can live in a memory-mapped file.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterator, Sequence

import regex

# (left, right) -> rank << 32 | new_id, or -1 when the pair never merges.
PairLookup = Callable[[int, int], int]
_LOW = 0xFFFFFFFF

# ``tokenizers``' ByteLevel pre-tokenizer pattern (use_regex=true), the GPT-2 split.
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values onto printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_CHAR = bytes_to_unicode()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}


class AddedTokens:
    """Leftmost-longest matching of the added tokens in raw text (the library's Aho-Corasick).

    Candidates start at a character that begins some added token; at each, the lengths of the
    tokens beginning with that character are tried longest first. Small (a dict and a character
    class) where a compiled alternation of Gemma's 6,384 tokens would cost megabytes.
    """

    def __init__(self, tokens: dict[str, int]) -> None:
        self.ids = tokens
        lengths: dict[str, set[int]] = {}
        for t in tokens:
            if t:
                lengths.setdefault(t[0], set()).add(len(t))
        self.lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self.starts = re.compile("[" + "".join(re.escape(c) for c in sorted(lengths)) + "]") \
            if lengths else None

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        """Yield (plain text, None) and (token, id) pieces of ``text`` in order."""
        done = 0
        if self.starts is not None:
            ids, lengths = self.ids, self.lengths
            for m in self.starts.finditer(text):
                i = m.start()
                if i < done:
                    continue
                for n in lengths[m.group()]:
                    tid = ids.get(text[i:i + n])
                    if tid is not None:
                        if i > done:
                            yield text[done:i], None
                        yield text[i:i + n], tid
                        done = i + n
                        break
        if done < len(text):
            yield text[done:], None


def byte_level_words(text: str) -> Iterator[str]:
    """The GPT-2 split of ``text``, each word spelled in the byte-to-character alphabet."""
    for word in GPT2_SPLIT.findall(text):
        yield "".join(BYTE_CHAR[b] for b in word.encode("utf-8"))


def initial_symbols(word: str, chars: dict[str, int], byte_ids: Sequence[int] | None,
                    unk_id: int | None, fuse_unk: bool) -> list[int]:
    """``BPE::merge_word`` before merging: one id per character, byte fallback, then unk.

    A character with no id, no complete byte fallback and no unk token is dropped, as the
    library drops it.
    """
    out: list[int] = []
    pending: int | None = None  # an unk not yet added: the library adds it late (and fuses runs)
    for ch in word:
        sid = chars.get(ch)
        if sid is not None:
            if pending is not None:
                out.append(pending)
                pending = None
            out.append(sid)
            continue
        if byte_ids is not None:
            fallback = [byte_ids[b] for b in ch.encode("utf-8")]
            if all(f >= 0 for f in fallback):
                out.extend(fallback)
                continue
        if unk_id is not None:
            if pending is not None and not fuse_unk:
                out.append(pending)
            pending = unk_id
    if pending is not None:
        out.append(pending)
    return out


def merge_word(ids: list[int], pair: PairLookup) -> list[int]:
    """``Word::merge_all`` of ``tokenizers`` (no dropout): apply merges lowest rank first.

    Symbols form a linked list; the heap holds (rank and new_id, position). An entry is stale when
    the symbol at its position was merged away, has no right neighbour, or no longer forms a pair
    merging into ``new_id`` (the library checks the new id, not the rank: so do we).
    """
    n = len(ids)
    if n < 2:
        return ids
    sym = ids[:]
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    alive = [True] * n
    # Entries (rank << 32 | new_id, position): one rank is one merge, hence one new id, so this
    # orders by (rank, position) exactly as the library's heap does.
    heap: list[tuple[int, int]] = []
    for i in range(n - 1):
        m = pair(sym[i], sym[i + 1])
        if m >= 0:
            heap.append((m, i))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        top, pos = pop(heap)
        if not alive[pos]:
            continue
        right = nxt[pos]
        if right == -1:
            continue
        new_id = top & _LOW
        m = pair(sym[pos], sym[right])
        if m < 0 or m & _LOW != new_id:
            continue
        sym[pos] = new_id
        alive[right] = False
        after = nxt[right]
        nxt[pos] = after
        if after != -1:
            prev[after] = pos
        before = prev[pos]
        if before != -1:
            m = pair(sym[before], new_id)
            if m >= 0:
                push(heap, (m, before))
        if after != -1:
            m = pair(new_id, sym[after])
            if m >= 0:
                push(heap, (m, pos))
    return [s for s, a in zip(sym, alive) if a]


def decode_byte_fallback(tokens: Sequence[str]) -> str:
    """Decoder chain Replace("▁", " ") -> ByteFallback -> Fuse (Gemma).

    Runs of ``<0xXX>`` tokens become their bytes as UTF-8; a run that is not valid UTF-8 becomes
    one U+FFFD per byte, as the library does.
    """
    out: list[str] = []
    run = bytearray()

    def flush() -> None:
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run.clear()

    for tok in tokens:
        tok = tok.replace("▁", " ")
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            try:
                run.append(int(tok[3:5], 16))
                continue
            except ValueError:
                pass
        flush()
        out.append(tok)
    flush()
    return "".join(out)


def decode_byte_level(tokens: Sequence[str]) -> str:
    """The ByteLevel decoder (SmolLM2): characters back to bytes, then lossy UTF-8.

    A token with a character outside the byte alphabet (an added token such as ``<|im_end|>``
    keeps its own spelling) contributes its own UTF-8 bytes, as the library does.
    """
    buf = bytearray()
    for tok in tokens:
        try:
            buf.extend(bytes([CHAR_BYTE[c] for c in tok]))
        except KeyError:
            buf.extend(tok.encode("utf-8"))
    return buf.decode("utf-8", errors="replace")
