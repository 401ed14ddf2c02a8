"""The wire module: round trips, golden bytes, and rejection of bad payloads with counted reasons."""

from __future__ import annotations

import json

import cbor2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import ProtocolError

ASK = wire.Envelope(wire.Kind.ASK, "cli-1", {"text": "Hi", "max_new_tokens": 4}, corr="c1",
                    reply_to="mesh/v1/reply/cli-1")

# The exact bytes of ASK: canonical CBOR, keys sorted by length then bytewise. If this changes,
# every deployed node stops understanding the new ones: bump WIRE_VERSION instead.
GOLDEN_ASK = bytes.fromhex(
    "a6"                                      # map of 6, keys in canonical order b c k r s v
    "6162" "a2"                               # "b": map of 2 (shorter key first)
    "6474657874" "624869"                     #   "text": "Hi"
    "6e6d61785f6e65775f746f6b656e73" "04"     #   "max_new_tokens": 4
    "6163" "626331"                           # "c": "c1"
    "616b" "6361736b"                         # "k": "ask"
    "6172" "736d6573682f76312f7265706c792f636c692d31"  # "r": "mesh/v1/reply/cli-1"
    "6173" "65636c692d31"                     # "s": "cli-1"
    "6176" "01"                               # "v": 1
)


def test_round_trip_keeps_every_field() -> None:
    back = wire.decode(wire.encode(ASK))
    assert back == ASK


def test_golden_bytes() -> None:
    data = wire.encode(ASK)
    assert cbor2.loads(data) == {"v": 1, "k": "ask", "s": "cli-1", "c": "c1", "r": "mesh/v1/reply/cli-1",
                                 "b": {"text": "Hi", "max_new_tokens": 4}}
    assert data == GOLDEN_ASK


def test_encoding_is_deterministic_whatever_the_dict_order() -> None:
    a = wire.Envelope(wire.Kind.ASK, "x", {"text": "t", "max_new_tokens": 1, "stop": ["\n"]})
    b = wire.Envelope(wire.Kind.ASK, "x", {"stop": ["\n"], "max_new_tokens": 1, "text": "t"})
    assert wire.encode(a) == wire.encode(b)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe\x00garbage", "malformed"),
        (cbor2.dumps([1, 2, 3]), "malformed"),
        (cbor2.dumps({"v": 2, "k": "ask", "s": "x", "b": {"text": "a", "max_new_tokens": 1}}), "bad-version"),
        (cbor2.dumps({"k": "ask", "s": "x", "b": {}}), "bad-version"),
        (cbor2.dumps({"v": True, "k": "ask", "s": "x", "b": {}}), "bad-version"),
        (cbor2.dumps({"v": 1, "k": "launch-missiles", "s": "x", "b": {}}), "unknown-kind"),
        (cbor2.dumps({"v": 1, "k": "ask", "s": "", "b": {"text": "a", "max_new_tokens": 1}}), "malformed"),
        (cbor2.dumps({"v": 1, "k": "ask", "s": "x", "b": {"text": "a"}}), "missing-field"),
        (cbor2.dumps({"v": 1, "k": "ask", "s": "x", "b": {"text": 3, "max_new_tokens": 1}}), "bad-field"),
        (cbor2.dumps({"v": 1, "k": "ask", "s": "x", "b": {"text": "a", "max_new_tokens": True}}), "bad-field"),
        (cbor2.dumps({"v": 1, "k": "ping", "s": "x", "b": {"t": float("nan")}}), "bad-field"),
        (cbor2.dumps({"v": 1, "k": "ask", "s": "x", "r": "mesh/+/x", "b": {"text": "a", "max_new_tokens": 1}}),
         "bad-reply-topic"),
        (cbor2.dumps({"v": 1, "k": "ask", "s": "x", "c": 5, "b": {"text": "a", "max_new_tokens": 1}}), "malformed"),
        (cbor2.dumps({"v": 1, "k": "ask", "s": "x", "b": "not a map"}), "malformed"),
    ],
)
def test_rejections_carry_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode(payload)
    assert info.value.reason == reason


def test_oversized_is_rejected_on_both_sides() -> None:
    big = wire.Envelope(wire.Kind.ASK, "x", {"text": "a" * 2000, "max_new_tokens": 1})
    with pytest.raises(ProtocolError) as info:
        wire.encode(big, max_bytes=1000)
    assert info.value.reason == "oversized"
    with pytest.raises(ProtocolError) as info:
        wire.decode(wire.encode(big), max_bytes=1000)
    assert info.value.reason == "oversized"


def test_deeply_nested_cbor_is_rejected_not_crashing() -> None:
    payload = b"\x81" * 100_000 + b"\x00"  # 100k nested arrays
    with pytest.raises(ProtocolError):
        wire.decode(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "k", "s", "c", "r", "b", "x"]),
                       st.one_of(st.integers(), st.text(max_size=20), st.none(), st.booleans(),
                                 st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
                                 st.lists(st.integers(), max_size=3))))
def test_random_envelopes_are_accepted_or_rejected_cleanly(raw: dict) -> None:
    try:
        env = wire.decode(cbor2.dumps(raw))
    except ProtocolError:
        return
    assert wire.decode(wire.encode(env)) == env


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64])
def test_tensor_round_trip(dtype: torch.dtype) -> None:
    t = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 7).to(dtype)
    packed = wire.pack_tensor(t)
    assert packed["shape"] == [2, 3, 4] and len(packed["data"]) == 24 * t.element_size()
    back = wire.unpack_tensor(cbor2.loads(cbor2.dumps(packed)))
    assert back.dtype == dtype and torch.equal(back, t)


def test_tensor_bytes_are_little_endian() -> None:
    assert wire.pack_tensor(torch.tensor([1], dtype=torch.int32))["data"] == b"\x01\x00\x00\x00"


@pytest.mark.parametrize("bad", [
    {"dtype": "float64", "shape": [1], "data": b"\x00" * 8},
    {"dtype": "float32", "shape": [2], "data": b"\x00" * 4},
    {"dtype": "float32", "shape": [-1], "data": b""},
    {"dtype": "float32", "shape": "2", "data": b"\x00" * 8},
    {"dtype": "float32", "shape": [1 << 20, 1 << 20], "data": b""},
    [1, 2],
])
def test_bad_tensors_are_rejected(bad: object) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.unpack_tensor(bad)
    assert info.value.reason == "bad-tensor"


def test_json_ask() -> None:
    ask = wire.decode_json_ask(json.dumps({"text": "Hi", "reply_to": "home/answer", "max_new_tokens": 5}).encode(),
                               1000, 64, 100)
    assert (ask.text, ask.reply_to, ask.max_new_tokens) == ("Hi", "home/answer", 5)
    assert wire.decode_json_ask(b'{"text": "Hi"}', 1000, 64, 100).max_new_tokens == 64
    # Home Assistant's budget reaches the node (it was dropped here before)
    assert wire.decode_json_ask(b'{"text": "Hi", "deadline_s": 2.5}', 1000, 64, 100).deadline_s == 2.5
    assert wire.decode_json_ask(b'{"text": "Hi"}', 1000, 64, 100).deadline_s is None


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "malformed"),
    (b"\xff\xfe", "malformed"),
    (b"[1]", "malformed"),
    (b'{"text": ""}', "missing-field"),
    (b'{"text": "a", "max_new_tokens": 0}', "bad-field"),
    (b'{"text": "a", "max_new_tokens": 1000}', "bad-field"),
    (b'{"text": "a", "reply_to": "a/#"}', "bad-reply-topic"),
    (b'{"text": "a", "deadline_s": -1}', "bad-deadline"),
    (b'{"text": "a", "deadline_s": "soon"}', "bad-deadline"),
    (b'{"text": "a", "deadline_s": true}', "bad-deadline"),
    (b'{"text": "' + b"a" * 2000 + b'"}', "oversized"),
])
def test_json_ask_rejections(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_json_ask(payload, 1000, 64, 100)
    assert info.value.reason == reason


def test_reject_counter() -> None:
    c = wire.RejectCounter()
    for r in ("malformed", "malformed", "oversized"):
        c.add(r)
    assert c.snapshot() == {"malformed": 2, "oversized": 1} and c.total() == 3


def test_an_evaluation_ask_of_the_size_the_coordinator_takes_passes_the_ask_cap() -> None:
    """`mesh bench halo` scores perplexity and MMLU through asks that carry token ids
    (``halo_eval``, mesh.halo.evaluate: up to MAX_EVAL_IDS): the ask cap of 256 CBOR items refused
    every window over ~250 tokens (its default 512), and the bench waited 900 s for an answer."""
    ids = list(range(1000, 1000 + wire.MAX_EVAL_IDS))
    body = {"text": "eval", "max_new_tokens": 1, "halo_sync": "strict",
            "halo_eval": {"ids": ids, "start": 1, "score_ids": [330, 389, 340, 422]}}
    env = wire.Envelope(wire.Kind.ASK, "asker", body, corr="c", reply_to="mesh/v1/reply/cli-1")
    assert wire.decode(wire.encode(env)).body["halo_eval"]["ids"] == ids
    body["halo_eval"]["ids"] = ids * 2  # far beyond what evaluate() takes: refused before cbor2 walks it
    with pytest.raises(ProtocolError, match="too-many-items"):
        wire.decode(wire.encode(wire.Envelope(wire.Kind.ASK, "asker", body, corr="c", reply_to="mesh/v1/reply/cli-1")))
