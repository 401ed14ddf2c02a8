"""KV store: budget, chain-safe LRU eviction, prompt entries, counters, persistence."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.cache.catalog import Catalog
from mesh.cache.keys import ModelKey, chunk_keys, prompt_key
from mesh.cache.store import KVStore, StoreChange, decode_record, load_dir, save_dir

MK = ModelKey("sha256:0123", "tok", chunk_size=4)
MODEL = MK.digest()


def chain(first: int, n: int) -> list[bytes]:
    """Keys of a prompt of n chunks whose tokens all differ from other chains' from the start."""
    return list(chunk_keys(MK, [first] * (4 * n)))


def put(store: KVStore, keys: list[bytes], size: int = 10) -> StoreChange:
    return store.put_chain(keys, [f"kv{i}".encode() for i in range(len(keys))], [size] * len(keys))


def prefix_closed(store: KVStore) -> bool:
    for key in store.chunk_keys() + store.prompt_keys():
        e = store.entry(key)
        assert e is not None
        if e.parent is not None and e.parent not in store:
            return False
    return True


def test_put_and_match_count_hits_and_misses() -> None:
    s = KVStore(1000, MODEL)
    a = chain(1, 5)
    change = put(s, a[:3])
    assert change.added == tuple(a[:3]) and change.changed and not change.evicted
    assert s.match_prefix(a) == 3
    assert s.peek_prefix(chunk_keys(MK, [2] + [1] * 19)) == 0  # first token differs
    st_ = s.stats()
    assert (st_.chunks, st_.bytes, st_.hits, st_.misses) == (3, 30, 3, 2)
    assert s.get_chain(a) == [b"kv0", b"kv1", b"kv2"] and s.stats().served == 3
    assert put(s, a[:2]) == StoreChange()  # already there: nothing changes


def test_orphans_and_oversized_entries_are_rejected() -> None:
    s = KVStore(25, MODEL)
    a = chain(1, 3)
    assert s.put_chunk(a[1], a[0], b"x", 1).rejected == (a[1],)  # parent absent
    assert s.put_chunk(a[0], None, b"x", 26).rejected == (a[0],)  # larger than the budget
    assert len(s) == 0


def test_lru_chain_is_eaten_from_its_tip() -> None:
    s = KVStore(100, MODEL)
    a, b = chain(1, 5), chain(2, 5)
    put(s, a)
    put(s, b)
    s.match_prefix(a)  # a is now more recent than b
    c = chain(3, 3)
    change = put(s, c)
    assert change.added == tuple(c)
    assert change.evicted == (b[4], b[3], b[2])  # deepest first, from the least recent chain
    assert s.peek_prefix(b) == 2 and s.peek_prefix(a) == 5
    assert prefix_closed(s) and s.stats().bytes == 100 and s.stats().evictions == 3


def test_a_new_chunk_never_evicts_its_own_ancestors() -> None:
    s = KVStore(30, MODEL)
    a = chain(1, 5)
    change = put(s, a)
    assert change.added == tuple(a[:3]) and change.rejected == (a[3],) and not change.evicted
    assert s.peek_prefix(a) == 3


def test_a_new_chain_can_replace_an_old_one_entirely() -> None:
    s = KVStore(30, MODEL)
    a, b = chain(1, 3), chain(2, 3)
    put(s, a)
    change = put(s, b)
    assert change.added == tuple(b) and set(change.evicted) == set(a)
    assert prefix_closed(s)


def test_prompt_entries_hang_off_their_last_chunk() -> None:
    s = KVStore(100, MODEL)
    toks = [5] * 10  # two full chunks of 4, tail of 2
    keys = chunk_keys(MK, toks)
    pk = prompt_key(MK, toks)
    put(s, keys)
    change = s.put_prompt(pk, keys[-1], {"logits": 1}, 50)
    assert change.added == (pk,)
    assert s.get_prompt(pk) == {"logits": 1} and s.get_prompt(prompt_key(MK, [1])) is None
    st_ = s.stats()
    assert (st_.prompts, st_.chunks, st_.bytes, st_.prompt_hits, st_.prompt_misses) == (1, 2, 70, 1, 1)
    assert pk not in s.chunk_keys() and s.prompt_keys() == [pk]
    # room for a new 40-byte chain: the prompt entry (a leaf) goes before its chunks
    change = put(s, chain(9, 1), 40)
    assert change.evicted == (pk,) and s.peek_prefix(keys) == 2


def test_discard_removes_a_subtree() -> None:
    s = KVStore(1000, MODEL)
    a = chain(1, 4)
    put(s, a)
    s.put_prompt(prompt_key(MK, [1] * 16), a[3], b"p", 5)
    change = s.discard(a[2])
    assert set(change.evicted) == {a[2], a[3], prompt_key(MK, [1] * 16)}
    assert s.peek_prefix(a) == 2 and s.stats().bytes == 20 and prefix_closed(s)


def test_evicted_chunks_leave_a_rebuilt_catalog() -> None:
    s = KVStore(50, MODEL)
    a, b = chain(1, 5), chain(2, 3)
    put(s, a)
    before = Catalog.from_keys(MODEL, 4, s.chunk_keys(), capacity=64, fp_rate=1e-9)
    change = put(s, b)
    assert change.changed and change.evicted == (a[4], a[3], a[2])
    after = Catalog.from_keys(MODEL, 4, s.chunk_keys(), capacity=64, fp_rate=1e-9, epoch=1)
    assert all(k in before for k in a)
    assert [k in after for k in a] == [True, True, False, False, False]
    assert all(k in after for k in b)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6), st.integers(1, 30),
                          st.booleans()), max_size=40))
def test_budget_and_prefix_invariants_hold(ops: list[tuple[int, int, int, bool]]) -> None:
    s = KVStore(100, MODEL)
    sizes: dict[bytes, int] = {}
    for root, n, size, lookup in ops:
        keys = chain(root, n)
        if lookup:
            s.match_prefix(keys)
        else:
            change = put(s, keys, size)
            for k in change.added:
                sizes[k] = size
        live = s.chunk_keys()
        assert s.stats().bytes == sum(sizes[k] for k in live) <= 100
        assert prefix_closed(s)


def test_persistence_round_trip_skips_corrupt_files(tmp_path: Path) -> None:
    s = KVStore(1000, MODEL)
    a, b = chain(1, 3), chain(2, 2)
    put(s, a)
    put(s, b)
    pk = prompt_key(MK, [1] * 13)
    s.put_prompt(pk, a[2], b"logits", 6)
    assert save_dir(s, tmp_path, bytes) == 6
    assert save_dir(s, tmp_path, bytes) == 0  # content-addressed: nothing rewritten

    fresh = KVStore(1000, MODEL)
    report = load_dir(fresh, tmp_path, bytes)
    assert not report.skipped and len(report.change.added) == 6
    assert fresh.peek_prefix(a) == 3 and fresh.get_prompt(pk) == b"logits"
    assert fresh.get_chain(b) == [b"kv0", b"kv1"]

    # corrupt b's first chunk: it is skipped, and so is its child (an orphan); a is intact
    path = tmp_path / (b[0].hex() + ".kv")
    raw = bytearray(path.read_bytes())
    raw[75] ^= 0xFF
    path.write_bytes(bytes(raw))
    (tmp_path / (a[2].hex() + ".kv")).write_bytes(b"MESHKV")  # truncated
    (tmp_path / "junk.kv").write_bytes(b"\x00" * 100)
    again = KVStore(1000, MODEL)
    report = load_dir(again, tmp_path, bytes)
    skipped = dict(report.skipped)
    assert "checksum" in skipped[b[0].hex() + ".kv"] and "truncated" in skipped[a[2].hex() + ".kv"]
    assert "orphan" in skipped[b[1].hex() + ".kv"] and "orphan" in skipped[pk.hex() + ".kv"]
    assert again.peek_prefix(a) == 2 and again.peek_prefix(b) == 0 and prefix_closed(again)

    # another model's store loads nothing; a smaller budget loads the shallow entries first
    other = KVStore(1000, ModelKey("sha256:ffff", "tok", chunk_size=4).digest())
    assert not load_dir(other, tmp_path, bytes).change.added
    small = KVStore(25, MODEL)
    load_dir(small, tmp_path, bytes, size=lambda p: 10)
    assert small.stats().bytes <= 25 and prefix_closed(small)


def test_save_removes_stale_files(tmp_path: Path) -> None:
    s = KVStore(20, MODEL)
    a, b = chain(1, 2), chain(2, 2)
    put(s, a)
    save_dir(s, tmp_path, bytes)
    put(s, b)  # evicts a
    save_dir(s, tmp_path, bytes)
    names = sorted(p.name for p in tmp_path.glob("*.kv"))
    assert names == sorted(k.hex() + ".kv" for k in b)
    model, entry = decode_record((tmp_path / names[0]).read_bytes())
    assert model == MODEL and entry.kind == "chunk"


def test_pending_entries_and_what_hangs_off_them_are_used_but_not_shared(tmp_path: Path) -> None:
    """Fetched entries wait for their audit (mesh.cache.audit): the owner matches them, the
    catalog, a peer and the disk do not see them or anything below them until confirmed."""
    s = KVStore(1000, MODEL)
    a = chain(1, 5)
    put(s, a[:2])  # computed here
    s.put_chain(a[2:4], [b"f2", b"f3"], [10, 10], parent=a[1], pending=True)  # fetched
    s.put_chunk(a[4], a[3], b"kv4", 10)  # computed here over the fetched ones
    assert s.match_prefix(a) == 5 and len(s.get_chain(a)) == 5
    assert s.unconfirmed() == set(a[2:]) and set(s.confirmed_keys()) == set(a[:2])
    assert s.serve_chain(a) == [b"kv0", b"kv1"]
    assert save_dir(s, tmp_path, bytes) == 2
    assert s.confirm(a[2:4]) == 2 and s.unconfirmed() == set()
    assert len(s.serve_chain(a)) == 5 and save_dir(s, tmp_path, bytes) == 3
    s.put_chunk(chain(2, 1)[0], None, b"x", 10, pending=True)
    s.discard(chain(2, 1)[0])
    assert s.unconfirmed() == set() and s._n_pending == 0
