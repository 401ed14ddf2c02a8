"""Bounded decoding (``mesh.cbor_bounds`` and the per-kind caps of ``mesh.wire``), bound by bound:
each structural limit is asserted exactly (at the limit accepted, one over refused with its counted
reason), on all three lines (the header scan, cbor2 as configured, the walk) where each applies."""

from __future__ import annotations

import cbor2
import pytest

from mesh import cbor_bounds, wire
from mesh.errors import ProtocolError
from tests.fuzz.fuzzkit import hostile_value, of_items, of_size, shared_dag, shared_heartbeat, valid_bodies
from tests.fuzz.fuzzkit import raw_envelope as raw


VALID = valid_bodies()


def reason(fn, *args) -> str | None:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except ProtocolError as exc:
        return exc.reason
    return None


# -- per-kind caps, exactly ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(wire.Kind), ids=str)
def test_each_kind_byte_cap_is_exact(kind: wire.Kind) -> None:
    limit = min(wire.KIND_CAPS[kind].bytes, wire.DEFAULT_MAX_BYTES)
    assert wire.decode(of_size(kind, limit)).kind is kind
    assert reason(wire.decode, of_size(kind, limit + 1)) == "oversized"


@pytest.mark.parametrize("kind", list(wire.Kind), ids=str)
def test_each_kind_item_budget_is_exact(kind: wire.Kind) -> None:
    budget = wire.KIND_CAPS[kind].items
    assert wire.decode(of_items(kind, budget)).kind is kind
    assert reason(wire.decode, of_items(kind, budget + 1)) == "too-many-items"


@pytest.mark.parametrize("kind", list(wire.Kind), ids=str)
def test_the_walk_counts_what_the_scan_counts(kind: wire.Kind) -> None:
    data = of_items(kind, wire.KIND_CAPS[kind].items)
    assert cbor_bounds.walk(cbor2.loads(data), 1 << 30) == cbor_bounds.scan(data, 1 << 30).items
    assert reason(cbor_bounds.walk, cbor2.loads(data), wire.KIND_CAPS[kind].items - 1) == "too-many-items"


def test_a_heartbeat_needs_kilobytes_not_megabytes() -> None:
    assert wire.KIND_CAPS[wire.Kind.HEARTBEAT].bytes <= 64 * 1024
    assert reason(wire.decode, of_size(wire.Kind.HEARTBEAT, 1 << 20)) == "oversized"


def test_the_caps_follow_the_limits_they_come_from() -> None:
    from mesh.cache.catalog import MAX_BITS
    from mesh.cache.transfer import MAX_KEYS
    from mesh.config import Limits
    from mesh.uplink_probe import BANDWIDTH_PROBE_BYTES

    caps = wire.KIND_CAPS
    assert caps[wire.Kind.CATALOG].bytes > MAX_BITS // 8
    assert caps[wire.Kind.KV_FETCH].items > MAX_KEYS and caps[wire.Kind.KV_FETCH].bytes > MAX_KEYS * 17
    assert caps[wire.Kind.PING].bytes > BANDWIDTH_PROBE_BYTES
    assert caps[wire.Kind.ASK].bytes > 4 * Limits().max_prompt_chars
    bigger = wire.kind_caps(Limits(max_prompt_chars=100_000))
    assert bigger[wire.Kind.ASK].bytes > 400_000


def test_a_full_prompt_and_a_full_answer_fit_their_caps() -> None:
    """The largest ask and answer the limits allow, in the worst UTF-8, still go through."""
    from mesh.config import Limits

    lim = Limits()
    ask = wire.Envelope(wire.Kind.ASK, "cli-1", {"text": "😀" * lim.max_prompt_chars, "max_new_tokens": 4,
                                                  "stop": ["😀" * 64] * 8}, corr="c" * 32,
                        reply_to="mesh/v1/reply/" + "x" * 200)
    assert wire.decode(wire.encode(ask)) == ask
    body = {**VALID[wire.Kind.ANSWER], "text": "😀" * (32 * lim.max_new_tokens),
            "token_ids": [262_143] * lim.max_new_tokens}
    answer = wire.Envelope(wire.Kind.ANSWER, "node1", body, corr="c" * 32)
    assert wire.decode(wire.encode(answer)) == answer


# -- the review's payload ----------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [2, 13, 14, 20, 40])
def test_the_shared_heartbeat_is_refused_on_every_line(levels: int) -> None:
    payload = shared_heartbeat(levels)
    assert reason(wire.decode, payload) == "shared-value"
    assert reason(cbor_bounds.scan, payload, 1 << 20) == "shared-value"
    assert reason(cbor_bounds.cbor2_loads, payload) == "shared-value"  # the second line alone
    built = cbor2.loads(payload)  # what the old decoder built: the walk alone refuses it too
    assert reason(cbor_bounds.walk, built, 1 << 20) == "shared-value"


def test_a_shared_value_in_any_position_is_refused_by_the_walk() -> None:
    leaf = [1, 2]
    for value in ([leaf, leaf], {"a": leaf, "b": [leaf]}, [[leaf], {"x": leaf}]):
        assert reason(cbor_bounds.walk, value, 100) == "shared-value"
    assert cbor_bounds.walk([[1, 2], [1, 2]], 100) == 7  # equal but distinct lists are fine


# -- tags --------------------------------------------------------------------------------------------

def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(n)


def test_the_builtin_tag_list_is_what_cbor2_decodes_itself() -> None:
    """Re-probe cbor2: every tag it decodes without calling the tag hook must be in BUILTIN_TAGS,
    or cbor2_loads would let it through to cbor2's own decoder."""
    called: set[int] = set()

    def hook(tag: cbor2.CBORTag, *_: object) -> None:
        called.add(tag.tag)

    probe = list(range(0, 70_000)) + [2**32 - 1, 2**63, 2**64 - 1]
    for t in probe:
        for v in (b"\x00", b"\x80", b"\x40", b"\x60"):
            try:
                cbor2.loads(_head(6, t) + v, tag_hook=hook)
            except Exception:  # a built-in decoder refusing the value: still built in
                pass
    assert sorted(t for t in probe if t not in called) == sorted(cbor_bounds.BUILTIN_TAGS)


@pytest.mark.parametrize("tag", [*cbor_bounds.BUILTIN_TAGS, 6, 24, 999, 70_000, 2**32, 2**64 - 1])
def test_every_tag_is_refused_by_the_scan_and_by_cbor2_alone(tag: int) -> None:
    want = "shared-value" if tag in (28, 29) else "cbor-tag"
    for value in (b"\x00", b"\x80", b"\x41\x01", b"\x61a", b"\xa0"):
        data = _head(6, tag) + value
        assert reason(cbor_bounds.scan, data, 100) == want
        assert reason(cbor_bounds.cbor2_loads, data) == want


def test_a_tag_inside_a_valid_envelope_is_refused() -> None:
    env = raw(wire.Kind.PING, {"t": 1.0, "pad": b"ab"})
    tagged = env.replace(b"\x42ab", b"\xc2\x42ab")  # tag 2 (bignum) around the pad bytes
    assert len(tagged) == len(env) + 1
    assert reason(wire.decode, tagged) == "cbor-tag"


# -- lengths, depth, keys, leftovers -------------------------------------------------------------------

@pytest.mark.parametrize("head", [
    _head(2, 2**63), _head(3, 2**63), _head(4, 2**63), _head(5, 2**63),
    _head(2, 2**64 - 1), _head(4, 2**32), _head(5, 2**32), _head(3, 100),
])
def test_huge_declared_lengths_are_refused_before_anything_is_read(head: bytes) -> None:
    data = head + b"\x00" * 16
    assert reason(cbor_bounds.scan, data, 1 << 20) == "malformed"
    assert reason(wire.decode, b"\xa1\x61b" + data) == "malformed"


def test_declared_counts_beyond_the_budget_are_refused_at_the_header() -> None:
    data = _head(4, 1000) + b"\x00" * 1000
    assert cbor_bounds.scan(data, 1001).items == 1001
    assert reason(cbor_bounds.scan, data, 1000) == "too-many-items"


@pytest.mark.parametrize("data", [b"\x9f\x01\xff", b"\xbf\x61a\x01\xff", b"\x5f\x41a\xff", b"\x7f\x61a\xff",
                                  b"\x9f", b"\xff"])
def test_indefinite_lengths_are_refused(data: bytes) -> None:
    assert reason(cbor_bounds.scan, data, 100) in ("indefinite-length", "malformed")
    assert reason(cbor_bounds.cbor2_loads, data) is not None


def test_nesting_is_bounded_exactly_on_every_line() -> None:
    deepest = b"\x81" * (cbor_bounds.MAX_DEPTH - 1) + b"\x80"
    too_deep = b"\x81" + deepest
    assert cbor_bounds.scan(deepest, 100).items == cbor_bounds.MAX_DEPTH
    assert cbor_bounds.walk(cbor_bounds.cbor2_loads(deepest), 100) == cbor_bounds.MAX_DEPTH
    assert reason(cbor_bounds.scan, too_deep, 100) == "too-deep"
    assert reason(cbor_bounds.cbor2_loads, too_deep) == "too-deep"
    assert reason(cbor_bounds.walk, cbor2.loads(too_deep), 100) == "too-deep"
    assert reason(wire.decode, b"\x81" * 100_000 + b"\x00") == "too-deep"


@pytest.mark.parametrize("key", [0, -1, 1.5, b"k", None, True])
def test_map_keys_other_than_text_are_refused(key: object) -> None:
    data = cbor2.dumps({"b": {key: 1}})
    assert reason(cbor_bounds.scan, data, 100) == "bad-key"


def test_colliding_integer_keys_cost_nothing() -> None:
    """Integers that share one hash (multiples of 2**61 - 1) would make building the map quadratic."""
    data = cbor2.dumps({"v": 1, "k": "heartbeat", "b": {i * (2**61 - 1): 0 for i in range(1, 3)}})
    assert reason(wire.decode, data) == "bad-key"


@pytest.mark.parametrize("data", [b"\x01\x02", b"\xa0\x00", wire.encode(wire.Envelope(wire.Kind.PING, "x", {"t": 1.0})) + b"\x00"])
def test_trailing_bytes_are_refused(data: bytes) -> None:
    assert reason(cbor_bounds.scan, data, 100) == "malformed"


@pytest.mark.parametrize("data", [b"\xf7", b"\xf0", b"\xf8\x20", b"\xfc", b""])
def test_simple_values_the_mesh_never_sends_are_refused(data: bytes) -> None:
    assert reason(cbor_bounds.scan, data, 100) == "malformed"


def test_what_the_mesh_sends_passes_every_line() -> None:
    for kind, body in VALID.items():
        data = wire.encode(wire.Envelope(kind, "node1", body, corr="c", reply_to="mesh/v1/reply/x"))
        scanned = cbor_bounds.scan(data, 1 << 20)
        assert scanned.top["k"] == kind.value and scanned.top["v"] == 1 and scanned.top["s"] == "node1"
        assert cbor_bounds.walk(cbor_bounds.cbor2_loads(data), 1 << 20) == scanned.items


def test_hostile_values_from_the_fuzz_kit_are_refused() -> None:
    """The generators the fuzzers use do build what they claim (the fuzzers rely on it)."""
    import random

    r = random.Random(0)
    dag = shared_dag(r, levels=10, fan=4)
    assert reason(cbor_bounds.scan, dag, 1 << 20) == "shared-value"
    built = cbor2.loads(dag)
    assert built[-1][0] is built[-2]
    seen = {reason(cbor_bounds.scan, hostile_value(r), 1 << 20) for _ in range(500)}
    assert {"shared-value", "cbor-tag", "too-deep", "malformed", "indefinite-length", "bad-key"} <= seen
