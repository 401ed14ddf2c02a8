"""A node's KV chunk store: byte budget, chain-safe LRU eviction, optional persistence.

Entries are keyed by 16-byte keys (:mod:`mesh.cache.keys`). A *chunk* entry holds one chunk's KV (an
opaque payload such as :class:`mesh.cache.kv.ChunkKV`, its byte size stated by the caller) and its
parent chunk's key (``None`` for a first chunk); ``depth`` counts chunks from the root. A *prompt*
entry (key from :func:`mesh.cache.keys.prompt_key`) holds what a full hit needs beyond the chunks
(the trailing partial chunk's KV and the last logits) and hangs off the prompt's last full chunk
like a child. One byte budget covers both.

Invariants:
- Every entry's parent is in the store, so any stored key is the tip of a usable chain prefix.
  A put whose parent is absent is rejected.
- Eviction only takes leaves (entries without children): a parent never goes while a child stays.
  Among leaves the least recently used goes first; ties go to the deepest. A lookup touches every
  matched entry with one tick, so a chain ages as a unit and is eaten from its tip.
- Recency is a logical counter, not a clock: the store is pure and deterministic.

Fetched entries wait for their audit (``mesh.cache.audit``): put with ``pending=True``, they are
*unconfirmed*, and so is every entry below one (KV computed over a prefix is only as good as the
prefix). The owner uses unconfirmed entries for its own asks (:meth:`match_prefix`,
:meth:`get_chain`), but :meth:`confirmed_keys` and :meth:`serve_chain` (the catalog and what peers
are served) and :func:`save_dir` leave them out, until :meth:`confirm` (the audit passed) or
:meth:`discard` (it failed). Entries loaded from disk are confirmed (only confirmed ones are written).

Every mutating call returns a :class:`StoreChange` (added / evicted / rejected keys) so the shell
can rebuild and republish the catalog when ``change.changed``.

Persistence (:func:`save_dir` / :func:`load_dir`): one file ``<key hex>.kv`` per entry, mode 0600
in a 0700 directory (KV decodes back to its prompts), written atomically; layout (little-endian)::

    0   6s  magic b"MESHKV"          6  H   record version (1)
    8   B   kind (0 chunk, 1 prompt)  9  B   has_parent (0/1)
    10  16s model key digest          26 16s key
    42  16s parent key (zeros if none)
    58  I   depth                     62 Q   payload length L
    70  L   payload bytes             70+L 16s xxh3_128 of bytes [0, 70+L)

Version 2 (an entry with a proof, ``mesh.cache.provenance``: who computed it) adds, after the
payload, ``I`` proof length P and the P proof bytes; the xxh3_128 then covers them too. Version 1
files (no proof) are still read.

A truncated, corrupt, foreign (version, model) or undecodable file is skipped and reported; so is
one whose proof ``load_dir``'s ``check_proof`` refuses.
"""

from __future__ import annotations

import heapq
import os
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from mesh.cache.keys import KEY_BYTES, ChunkHash
from mesh.errors import ProtocolError

RECORD_VERSION = 1  # without a proof
PROOF_RECORD_VERSION = 2  # with one
RECORD_MAGIC = b"MESHKV"
_HEADER = struct.Struct("<6sHBB16s16s16sIQ")
_PROOF_LEN = struct.Struct("<I")
_NO_KEY = bytes(KEY_BYTES)
CHUNK, PROMPT = "chunk", "prompt"


@dataclass(frozen=True)
class StoreChange:
    """Keys added, evicted and rejected (over budget or orphaned) by one call."""

    added: tuple[ChunkHash, ...] = ()
    evicted: tuple[ChunkHash, ...] = ()
    rejected: tuple[ChunkHash, ...] = ()

    @property
    def changed(self) -> bool:
        """True when the set of stored keys changed (the catalog must be rebuilt)."""
        return bool(self.added or self.evicted)

    def __add__(self, other: StoreChange) -> StoreChange:
        return StoreChange(self.added + other.added, self.evicted + other.evicted,
                           self.rejected + other.rejected)


@dataclass(frozen=True)
class StoreStats:
    """Counters for heartbeats. ``hits``/``misses`` count chunks asked for by :meth:`match_prefix`."""

    chunks: int
    prompts: int
    bytes: int
    budget: int
    hits: int
    misses: int
    prompt_hits: int
    prompt_misses: int
    evictions: int
    served: int


@dataclass
class Entry:
    """One stored entry (mutable bookkeeping is private to the store)."""

    key: ChunkHash
    kind: str
    parent: ChunkHash | None
    depth: int
    payload: Any
    nbytes: int
    tick: int = 0
    children: int = 0
    proof: Any = None  # what vouches for the payload (mesh.cache.provenance.Proof); opaque here
    pending: bool = False  # fetched, its audit not passed yet (module docstring)


class KVStore:
    """Chunk and prompt entries under a byte budget (see the module docstring for invariants)."""

    def __init__(self, budget_bytes: int, model: bytes = _NO_KEY) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget = budget_bytes
        self.model = bytes(model)
        self._entries: dict[ChunkHash, Entry] = {}
        self._heap: list[tuple[int, int, int, ChunkHash]] = []
        self._seq = self._tick = self._bytes = self._n_prompts = self._n_pending = 0
        self._count: Counter[str] = Counter()  # hits, misses, prompt_hits, ... (StoreStats)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: bytes) -> Entry | None:
        """The entry for ``key`` without touching it (for persistence and inspection)."""
        return self._entries.get(ChunkHash(bytes(key)))

    def entries(self) -> list[Entry]:
        """Every entry, without touching them (e.g. to find what one computer signed)."""
        return list(self._entries.values())

    def chunk_keys(self) -> list[ChunkHash]:
        """Keys of all chunk entries (what the catalog advertises)."""
        return [k for k, e in self._entries.items() if e.kind == CHUNK]

    def prompt_keys(self) -> list[ChunkHash]:
        """Keys of all prompt entries."""
        return [k for k, e in self._entries.items() if e.kind == PROMPT]

    def unconfirmed(self) -> set[ChunkHash]:
        """Keys of the pending entries and of every entry below one (module docstring)."""
        if not self._n_pending:
            return set()
        out: set[ChunkHash] = set()
        for e in sorted(self._entries.values(), key=lambda e: e.depth):  # parents first
            if e.pending or e.parent in out:
                out.add(e.key)
        return out

    def confirmed_keys(self) -> list[ChunkHash]:
        """Keys of the confirmed entries, chunks and prompts (what the catalog advertises)."""
        held = self.unconfirmed()
        return [k for k in self._entries if k not in held]

    def confirm(self, keys: Sequence[bytes]) -> int:
        """The audit of these pending entries passed: serve, advertise and persist them. Returns
        how many were pending."""
        n = 0
        for key in keys:
            e = self._entries.get(ChunkHash(bytes(key)))
            if e is not None and e.pending:
                e.pending = False
                self._n_pending -= 1
                n += 1
        return n

    def pending_keys(self) -> list[ChunkHash]:
        return [k for k, e in self._entries.items() if e.pending]

    def peek_prefix(self, keys: Sequence[bytes]) -> int:
        """Leading keys present, without counting or touching (routing, status)."""
        n = 0
        for key in keys:
            e = self._entries.get(key)  # type: ignore[call-overload]
            if e is None or e.kind != CHUNK:
                break
            n += 1
        return n

    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """Leading keys present; touches them and counts hits (found) and misses (the rest)."""
        n = self.peek_prefix(keys)
        self._touch(keys[:n])
        self._count["hits"] += n
        self._count["misses"] += len(keys) - n
        return n

    def get_chain(self, keys: Sequence[bytes]) -> list[Any]:
        """Payloads of the leading present keys (a peer serves exactly these); touches them."""
        n = self.peek_prefix(keys)
        self._touch(keys[:n])
        self._count["served"] += n
        return [self._entries[k].payload for k in keys[:n]]  # type: ignore[index]

    def get_prompt(self, key: bytes) -> Any | None:
        """A prompt entry's payload, or None; touches it and counts a prompt hit or miss."""
        e = self._entries.get(key)  # type: ignore[call-overload]
        if e is None or e.kind != PROMPT:
            self._count["prompt_misses"] += 1
            return None
        self._count["prompt_hits"] += 1
        self._touch([key])
        return e.payload

    def serve_chain(self, keys: Sequence[bytes]) -> list[Any]:
        """:meth:`get_chain` for a peer: the leading run stops at the first unconfirmed entry."""
        held = self.unconfirmed()
        n = self.peek_prefix(keys)
        n = next((i for i, k in enumerate(keys[:n]) if k in held), n)
        return self.get_chain(keys[:n])

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        c = self._count
        return StoreStats(
            len(self._entries) - self._n_prompts, self._n_prompts, self._bytes, self.budget,
            c["hits"], c["misses"], c["prompt_hits"], c["prompt_misses"], c["evictions"], c["served"],
        )

    def put_chunk(self, key: bytes, parent: bytes | None, payload: Any, nbytes: int,
                  proof: Any = None, pending: bool = False) -> StoreChange:
        """Store one chunk under ``parent`` (None for a first chunk), with its ``proof`` if any;
        ``pending``: fetched, awaiting its audit (module docstring)."""
        return self._put(ChunkHash(bytes(key)), CHUNK, parent, payload, nbytes, proof, pending)

    def put_chain(self, keys: Sequence[bytes], payloads: Sequence[Any], nbytes: Sequence[int],
                  parent: bytes | None = None, proofs: Sequence[Any] | None = None,
                  pending: bool = False) -> StoreChange:
        """Store consecutive chunks; ``parent`` is the key before ``keys[0]`` (None at the root).

        Stops at the first rejection: later chunks would be orphans.
        """
        proofs = [None] * len(keys) if proofs is None else proofs
        if not len(keys) == len(payloads) == len(nbytes) == len(proofs):
            raise ValueError("keys, payloads, nbytes and proofs differ in length")
        change = StoreChange()
        for key, payload, size, proof in zip(keys, payloads, nbytes, proofs):
            step = self.put_chunk(key, parent, payload, size, proof, pending)
            change = change + step
            if step.rejected:
                break
            parent = key
        return change

    def put_prompt(self, key: bytes, parent: bytes | None, payload: Any, nbytes: int,
                   proof: Any = None, pending: bool = False) -> StoreChange:
        """Store a prompt entry under the prompt's last full chunk (None if it has none)."""
        return self._put(ChunkHash(bytes(key)), PROMPT, parent, payload, nbytes, proof, pending)

    def proofs(self, keys: Sequence[bytes]) -> list[Any]:
        """The proofs of the leading present chunk keys (without touching them)."""
        return [self._entries[k].proof for k in keys[:self.peek_prefix(keys)]]  # type: ignore[index]

    def discard(self, key: bytes) -> StoreChange:
        """Remove an entry and everything below it (e.g. a chunk found bad); returns the keys."""
        key = ChunkHash(bytes(key))
        if key not in self._entries:
            return StoreChange()
        doomed = {key}
        # Parents precede children in depth order, so one pass collects the subtree.
        for e in sorted(self._entries.values(), key=lambda e: e.depth):
            if e.parent in doomed:
                doomed.add(e.key)
        for k in sorted(doomed, key=lambda k: -self._entries[k].depth):
            self._remove(k)
        return StoreChange(evicted=tuple(doomed))

    def _put(self, key: ChunkHash, kind: str, parent: bytes | None, payload: Any,
             nbytes: int, proof: Any = None, pending: bool = False) -> StoreChange:
        if len(key) != KEY_BYTES or nbytes < 0:
            raise ValueError("keys must be 16 bytes and nbytes >= 0")
        if key in self._entries:
            self._touch([key])
            return StoreChange()
        parent_key = None if parent is None else ChunkHash(bytes(parent))
        parent_entry = None if parent_key is None else self._entries.get(parent_key)
        if parent_key is not None and (parent_entry is None or parent_entry.kind != CHUNK):
            return StoreChange(rejected=(key,))
        protected: set[ChunkHash] = set()
        protected_bytes = 0
        walk = parent_entry
        while walk is not None:
            protected.add(walk.key)
            protected_bytes += walk.nbytes
            walk = self._entries.get(walk.parent) if walk.parent is not None else None
        # All but the ancestor chain can be evicted leaf by leaf: an exact check, made up front.
        if protected_bytes + nbytes > self.budget:
            return StoreChange(rejected=(key,))
        evicted = self._make_room(nbytes, protected)
        depth = 1 if parent_entry is None else parent_entry.depth + 1
        self._tick += 1
        self._entries[key] = Entry(key, kind, parent_key, depth, payload, nbytes, tick=self._tick, proof=proof,
                                   pending=pending)
        self._n_pending += pending
        if parent_entry is not None:
            parent_entry.children += 1
        self._bytes += nbytes
        self._n_prompts += kind == PROMPT
        self._push(key)
        return StoreChange(added=(key,), evicted=tuple(evicted))

    def _make_room(self, nbytes: int, protected: set[ChunkHash]) -> list[ChunkHash]:
        """Evict leaves outside ``protected``, LRU then deepest, until ``nbytes`` fit."""
        evicted: list[ChunkHash] = []
        skipped: list[tuple[int, int, int, ChunkHash]] = []
        while self._bytes + nbytes > self.budget and self._heap:
            item = heapq.heappop(self._heap)
            tick, _, _, key = item
            e = self._entries.get(key)
            if e is None or e.tick != tick or e.children:
                continue  # stale heap item: re-pushed when the entry is touched or becomes a leaf
            if key in protected:
                skipped.append(item)
                continue
            self._remove(key)
            self._count["evictions"] += 1
            evicted.append(key)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return evicted

    def _remove(self, key: ChunkHash) -> None:
        e = self._entries.pop(key)
        self._bytes -= e.nbytes
        self._n_prompts -= e.kind == PROMPT
        self._n_pending -= e.pending
        if e.parent is not None and e.parent in self._entries:
            p = self._entries[e.parent]
            p.children -= 1
            if p.children == 0:
                self._push(p.key)

    def _touch(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        self._tick += 1
        for key in keys:
            e = self._entries[key]  # type: ignore[index]
            e.tick = self._tick
            if not e.children:
                self._push(e.key)
        if len(self._heap) > 4 * len(self._entries) + 64:
            live = [e for e in self._entries.values() if not e.children]
            self._heap = [(e.tick, -e.depth, i, e.key) for i, e in enumerate(live)]
            heapq.heapify(self._heap)
            self._seq = len(self._heap)

    def _push(self, key: ChunkHash) -> None:
        e = self._entries[key]
        self._seq += 1
        heapq.heappush(self._heap, (e.tick, -e.depth, self._seq, key))


# -- persistence ---------------------------------------------------------------------------------
def encode_record(model: bytes, entry: Entry, payload: bytes, proof: bytes | None = None) -> bytes:
    """One entry as a self-checking record (layout in the module docstring); version 2 with a
    ``proof``."""
    parent = _NO_KEY if entry.parent is None else bytes(entry.parent)
    head = _HEADER.pack(RECORD_MAGIC, RECORD_VERSION if proof is None else PROOF_RECORD_VERSION,
                        0 if entry.kind == CHUNK else 1, entry.parent is not None, bytes(model),
                        bytes(entry.key), parent, entry.depth, len(payload))
    body = head + payload if proof is None else b"".join((head, payload, _PROOF_LEN.pack(len(proof)), proof))
    return body + xxhash.xxh3_128_digest(body)


def decode_record(data: bytes) -> tuple[bytes, Entry]:
    """``(model digest, entry with payload bytes)``, the entry's ``proof`` the proof bytes of a
    version 2 record (None in version 1); raises ProtocolError on any defect."""
    if len(data) < _HEADER.size + 16:
        raise ProtocolError("bad-record", "truncated")
    body, digest = data[:-16], data[-16:]
    if xxhash.xxh3_128_digest(body) != digest:
        raise ProtocolError("bad-record", "checksum mismatch")
    magic, version, kind, has_parent, model, key, parent, depth, length = _HEADER.unpack_from(body)
    if magic != RECORD_MAGIC:
        raise ProtocolError("bad-record", "bad magic")
    if version not in (RECORD_VERSION, PROOF_RECORD_VERSION):
        raise ProtocolError("bad-version", f"record version {version}")
    end = _HEADER.size + length
    proof = None
    if version == PROOF_RECORD_VERSION and end + _PROOF_LEN.size <= len(body):
        (n_proof,) = _PROOF_LEN.unpack_from(body, end)
        proof = body[end + _PROOF_LEN.size:]
        if n_proof != len(proof):
            raise ProtocolError("bad-record", "inconsistent proof length")
    elif end != len(body):
        raise ProtocolError("bad-record", "inconsistent header")
    if kind not in (0, 1) or depth < 1:
        raise ProtocolError("bad-record", "inconsistent header")
    entry = Entry(ChunkHash(key), CHUNK if kind == 0 else PROMPT,
                  ChunkHash(parent) if has_parent else None, depth, body[_HEADER.size:end], length, proof=proof)
    return model, entry


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_dir` did: loaded entries and skipped files with their reasons."""

    change: StoreChange
    skipped: tuple[tuple[str, str], ...]


def save_dir(store: KVStore, directory: str | os.PathLike[str],
             encode: Callable[[Any], bytes], encode_proof: Callable[[Any], bytes] | None = None) -> int:
    """Mirror the store into ``directory``: write missing entries atomically, delete stale files.

    Entries are content-addressed, so an existing file is not rewritten. Returns files written.
    Unconfirmed entries (awaiting an audit) are not written.
    ``encode_proof``: an entry's proof as bytes (kept in a version 2 record), for entries that
    have one.
    """
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)  # whatever the umask, and a directory made before with its mode
    live = {bytes(k).hex() + ".kv": k for k in store.confirmed_keys()}
    written = 0
    for name, key in live.items():
        path = root / name
        if path.exists():
            continue
        entry = store.entry(key)
        assert entry is not None
        tmp = root / (name + ".tmp")
        proof = encode_proof(entry.proof) if encode_proof is not None and entry.proof is not None else None
        tmp.write_bytes(encode_record(store.model, entry, encode(entry.payload), proof))
        tmp.chmod(0o600)  # before it shows under its name (the 0700 directory covers the gap)
        os.replace(tmp, path)
        written += 1
    for path in root.glob("*.kv"):
        if path.name not in live:
            path.unlink(missing_ok=True)
    return written


def load_dir(store: KVStore, directory: str | os.PathLike[str], decode: Callable[[bytes], Any],
             size: Callable[[Any], int] | None = None,
             check_proof: Callable[[bytes, Any, bytes | None], Any] | None = None) -> LoadReport:
    """Fill ``store`` from ``directory`` (parents first, within budget); bad files are skipped.

    ``size(payload)`` gives an entry's budgeted bytes (default: its encoded length).
    ``check_proof(key, payload, proof bytes or None)`` returns the proof the entry is stored with,
    or raises ProtocolError (the file is skipped); without it, stored proofs are ignored.
    """
    root = Path(directory)
    skipped: list[tuple[str, str]] = []
    good: list[tuple[Entry, str]] = []
    for path in sorted(root.glob("*.kv")) if root.is_dir() else []:
        try:
            path.chmod(0o600)  # a file written before with the umask's mode
            model, entry = decode_record(path.read_bytes())
            if model != store.model:
                raise ProtocolError("wrong-model", model.hex())
            if path.name != bytes(entry.key).hex() + ".kv":
                raise ProtocolError("bad-record", "file name does not match key")
            good.append((entry, path.name))
        except (OSError, ProtocolError) as exc:
            skipped.append((path.name, str(exc)))
    change = StoreChange()
    for entry, name in sorted(good, key=lambda g: (g[0].depth, g[0].kind == PROMPT, g[1])):
        try:
            payload = decode(entry.payload)
        except Exception as exc:  # a payload the decoder refuses is one bad file, not a crash
            skipped.append((name, f"payload: {exc}"))
            continue
        proof = None
        if check_proof is not None:
            try:
                proof = check_proof(entry.key, payload, entry.proof)
            except ProtocolError as exc:
                skipped.append((name, f"proof: {exc}"))
                continue
        nbytes = size(payload) if size is not None else len(entry.payload)
        step = store._put(entry.key, entry.kind, entry.parent, payload, nbytes, proof)
        if step.rejected:
            skipped.append((name, "orphan or over budget"))
        change = change + step
    return LoadReport(change=change, skipped=tuple(skipped))
