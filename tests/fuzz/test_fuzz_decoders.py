"""Every decoder of untrusted bytes, fed 10,000 random and mutated payloads per message kind.

A decoder may accept a payload or reject it with a ProtocolError carrying a reason; nothing else
may escape (that would kill a network loop). Mutations start from a valid payload of each kind,
so most inputs get past the CBOR layer and exercise the field checks.
"""

from __future__ import annotations

import json

import cbor2
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.cache import codec as kvcodec
from mesh.cache import kv as kvstate
from mesh.cache.catalog import Catalog
from mesh.errors import ProtocolError

EXAMPLES = 10_000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

_TENSOR = wire.pack_tensor(torch.ones(2, 3, dtype=torch.float16))
VALID: dict[wire.Kind, dict] = {
    wire.Kind.HEARTBEAT: {"seq": 1, "model": "m", "model_key": "k", "queue": 0, "load": 0.1, "prefill_tps": 9.0},
    wire.Kind.ASK: {"text": "hi", "max_new_tokens": 4, "stop": ["\n"]},
    wire.Kind.TOKEN: {"i": 0, "text": "a"},
    wire.Kind.ANSWER: {"text": "a", "node": "n", "prompt_tokens": 1, "new_tokens": 1, "ttft_s": 0.1, "ttlt_s": 0.2},
    wire.Kind.ERROR: {"reason": "busy", "message": "m"},
    wire.Kind.PING: {"t": 1.0},
    wire.Kind.CATALOG: Catalog.from_keys(b"m" * 16, 16, [bytes([i]) * 16 for i in range(5)], capacity=64).to_dict(),
    wire.Kind.KV_FETCH: {"keys": [b"k" * 16], "codec": "fp16", "model": b"m" * 16},
    wire.Kind.KV_CHUNKS: {"chunks": [], "part": 0, "last": True},
    wire.Kind.HALO_PLAN: {"epoch": 1, "plan": {}},
    wire.Kind.HALO_ACK: {"epoch": 1},
    wire.Kind.ROUTED: {"node": "n1"},
    wire.Kind.KV_EVIDENCE: {"ids": [1, 2, 3], "unit": 0, "chunk": {}},
}


def valid_bytes(kind: wire.Kind) -> bytes:
    return wire.encode(wire.Envelope(kind, "fuzz", VALID[kind], corr="c", reply_to="mesh/v1/reply/x"))


def test_every_kind_has_a_valid_sample() -> None:
    assert set(VALID) == set(wire.Kind)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """Random bytes, or ``base`` with byte flips, a cut, an insertion or a splice."""
    how = draw(st.sampled_from(["random", "flip", "cut", "insert", "splice"]))
    data = bytearray(base)
    if how == "random":
        return draw(st.binary(max_size=2 * len(base)))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif how == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    else:
        i, j = sorted((draw(st.integers(0, len(data))), draw(st.integers(0, len(data)))))
        data[i:j] = draw(st.binary(max_size=32))
    return bytes(data)


def _decode_all(payload: bytes) -> None:
    """What a node does with a payload: the envelope, then the kind's own decoder."""
    try:
        env = wire.decode(payload, max_bytes=1 << 20)
    except ProtocolError:
        return
    body = dict(env.body)
    try:
        if env.kind is wire.Kind.CATALOG:
            Catalog.from_dict(body)
        elif env.kind is wire.Kind.KV_CHUNKS:
            for chunk in body["chunks"]:
                kvcodec.decode_chunk(chunk, [(2, 4)] * 2, 16)
    except ProtocolError:
        return


@pytest.mark.parametrize("kind", list(wire.Kind), ids=str)
def test_mutated_payloads_only_ever_raise_protocol_errors(kind: wire.Kind) -> None:
    base = valid_bytes(kind)

    @FUZZ
    @given(mutated(base))
    def run(payload: bytes) -> None:
        _decode_all(payload)

    run()


def test_mutated_json_asks_only_ever_raise_protocol_errors() -> None:
    base = json.dumps({"text": "turn on the light", "reply_to": "home/answer", "max_new_tokens": 8}).encode()

    @FUZZ
    @given(mutated(base))
    def run(payload: bytes) -> None:
        try:
            wire.decode_json_ask(payload, 4096, 64, 1024)
        except ProtocolError:
            pass

    run()


def test_mutated_kv_chunks_are_rejected_not_crashing() -> None:
    chunk = kvstate.ChunkKV(keys=(torch.randn(2, 16, 4),) * 2, values=(torch.randn(2, 16, 4),) * 2)
    base = cbor2.dumps(kvcodec.encode_chunk(chunk, "int8", key=b"k" * 16, model=b"m" * 16))
    accepted = 0

    @settings(max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutated(base))
    def run(payload: bytes) -> None:
        nonlocal accepted
        try:
            kvcodec.decode_chunk(cbor2.loads(payload), [(2, 4)] * 2, 16, key=b"k" * 16, model=b"m" * 16)
            accepted += 1
        except ProtocolError:
            pass
        except Exception:  # cbor2's own errors on garbage: the caller (wire.decode) maps them
            pass

    run()
    assert accepted < 2_000  # the checksum catches changed bytes


def test_mutated_tensors_only_ever_raise_protocol_errors() -> None:
    """``wire.unpack_tensor`` (the cache's logits record) on mutated ``pack_tensor`` maps."""
    base = cbor2.dumps(_TENSOR)

    @FUZZ
    @given(mutated(base))
    def run(payload: bytes) -> None:
        try:
            obj = cbor2.loads(payload)
        except Exception:  # cbor2's own errors on garbage: the caller (wire.decode) maps them
            return
        try:
            wire.unpack_tensor(obj)
        except ProtocolError:
            pass

    run()


# Tensor fields the fuzzer found (or the code review around them proved) that once escaped as
# something other than a ProtocolError: kept as fixed examples so the fix cannot regress.
@pytest.mark.parametrize("tensor", [
    {"dtype": ["float16"], "shape": [2, 3], "data": b"\0" * 12},
    {"dtype": {"float16": 1}, "shape": [2, 3], "data": b"\0" * 12},
    {"dtype": {"float16"}, "shape": [2, 3], "data": b"\0" * 12},  # a CBOR set (tag 258)
    # An empty tensor whose other dims are huge: torch.empty raised TypeError / RuntimeError.
    {"dtype": "float16", "shape": [0, 2**64 - 1], "data": b""},
    {"dtype": "float16", "shape": [2**63, 0], "data": b""},
    {"dtype": "float16", "shape": [0, 2**40, 2**40], "data": b""},
], ids=["dtype-list", "dtype-map", "dtype-set", "zero-then-u64", "i64-then-zero", "zero-stride-overflow"])
def test_bad_tensor_fields_are_protocol_errors(tensor: dict) -> None:
    with pytest.raises(ProtocolError) as err:
        wire.unpack_tensor(cbor2.loads(cbor2.dumps(tensor)))  # as it comes off the wire
    assert err.value.reason == "bad-tensor"


def test_empty_tensors_still_decode() -> None:
    for shape in ([0], [0, 3], [4, 0, 2]):
        t = wire.unpack_tensor(wire.pack_tensor(torch.empty(shape, dtype=torch.float16)))
        assert list(t.shape) == shape


@pytest.mark.parametrize("shape", [(0, 2**32 - 1, 2**32 - 1), (0, 2**32 - 1, 2**32 - 1, 2**32 - 1), (2**32 - 1, 0)])
def test_empty_halo_frame_with_huge_dims_is_a_protocol_error(shape: tuple[int, ...]) -> None:
    """An empty tensor beside huge dims: torch.empty raised RuntimeError (stride overflow); the last
    shape decoded, and is now refused by the same element bound."""
    import struct

    from mesh.halo import frame as halo_wire

    head = halo_wire._HEADER.pack(halo_wire.MAGIC, halo_wire.FRAME_VERSION, halo_wire.PARTIAL, 1, len(shape),
                                  1, 0, 0, 2, 0, 0)
    with pytest.raises(ProtocolError) as err:
        halo_wire.decode(head + struct.pack(f"<{len(shape)}I", *shape) + b"w1", 1 << 20)
    assert err.value.reason == "bad-tensor"
