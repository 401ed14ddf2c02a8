"""KV chunks <-> transformers caches on tiny random Llama and Gemma-3 models, and the codecs."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig

from mesh.errors import ProtocolError
from mesh.cache.codec import decode_chunk, encode_chunk, wire_bytes_per_token
from mesh.cache.kv import (
    ChunkKV,
    capture_cache,
    cut_chunks,
    end_capture,
    kv_layout,
    restore_cache,
)

C = 16
WINDOW = 8
N_TOKENS = 75  # 4 full chunks + an 11-token tail
KEY, MODEL = bytes(range(16)), bytes(range(16, 32))


def _llama() -> Any:
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _gemma() -> Any:
    return Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # Tiny tensors: extra OpenMP threads only spin against other work on a shared 2-core box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def setup(request: pytest.FixtureRequest) -> dict[str, Any]:
    torch.manual_seed(0)
    config = _llama() if request.param == "llama" else _gemma()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = DynamicCache(config=model.config)
        full = model(ids, past_key_values=plain).logits
        cap = capture_cache(model.config)
        captured = model(ids, past_key_values=cap).logits
        chunks = cut_chunks(cap, 0, N_TOKENS // C, C)
    return {"name": request.param, "model": model, "ids": ids, "full": full, "plain": plain,
            "captured": captured, "chunks": chunks, "cap": cap}


@torch.inference_mode()
def _greedy(model: Any, cache: Any, logits: torch.Tensor, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), past_key_values=cache).logits
    return out


def test_capture_does_not_change_logits(setup: dict[str, Any]) -> None:
    assert torch.equal(setup["full"], setup["captured"])
    for layer in setup["cap"].layers:  # every layer kept every position
        assert layer.keys.shape[-2] == N_TOKENS


@pytest.mark.parametrize("prefix_chunks", [1, 2, 4])
def test_restored_prefix_gives_the_same_logits_and_tokens(setup: dict[str, Any], prefix_chunks: int) -> None:
    model, ids, full = setup["model"], setup["ids"], setup["full"]
    p = prefix_chunks * C  # 16..64 tokens: all longer than Gemma's window of 8
    with torch.inference_mode():
        cache = restore_cache(model.config, setup["chunks"][:prefix_chunks])
        assert cache.get_seq_length() == p
        out = model(ids[:, p:], past_key_values=cache).logits
    assert (out - full[:, p:]).abs().max().item() < 1e-4
    restored = _greedy(model, cache, out, 6)
    baseline_cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        base_logits = model(ids, past_key_values=baseline_cache).logits
    assert restored == _greedy(model, baseline_cache, base_logits, 6)


@pytest.mark.parametrize("setup", ["gemma3"], indirect=True)
def test_sliding_layers_hold_only_the_window_but_know_the_prefix_length(setup: dict[str, Any]) -> None:
    cache = restore_cache(setup["model"].config, setup["chunks"][:4])
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert sliding and all(layer.keys.shape[-2] == WINDOW - 1 for layer in sliding)
    assert all(layer.cumulative_length == 64 for layer in sliding)


@pytest.mark.parametrize("setup", ["gemma3"], indirect=True)
def test_the_pitfall_restoring_trimmed_sliding_kv_goes_wrong(setup: dict[str, Any]) -> None:
    model, ids, full = setup["model"], setup["ids"], setup["full"]
    with torch.inference_mode():
        plain = DynamicCache(config=model.config)
        model(ids[:, :64], past_key_values=plain)
        # what a naive store would keep: each layer's .keys/.values after an ordinary prefill
        naive = DynamicCache(ddp_cache_data=[(l.keys, l.values) for l in plain.layers], config=model.config)
        out = model(ids[:, 64:], past_key_values=naive).logits
    assert (out - full[:, 64:]).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="capture"):
        cut_chunks(plain, 0, 4, C)  # the sliding layers no longer hold positions 0..56


def test_extending_a_restored_prefix_yields_the_same_new_chunks(setup: dict[str, Any]) -> None:
    model, ids, chunks = setup["model"], setup["ids"], setup["chunks"]
    with torch.inference_mode():
        cache = restore_cache(model.config, chunks[:2], capture=True)
        out = model(ids[:, 32:], past_key_values=cache).logits
        new = cut_chunks(cache, 2, 2, C)
        end_capture(cache)
        if setup["name"] == "gemma3":
            assert all(l.keys.shape[-2] == WINDOW - 1 for l in cache.layers if l.is_sliding)
    for got, want in zip(new, chunks[2:4]):
        for a, b in zip(got.keys + got.values, want.keys + want.values):
            assert torch.allclose(a, b, atol=1e-5)
    assert _greedy(model, cache, out, 4) == _greedy(model, *_fresh(model, ids), 4)


def _fresh(model: Any, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        return cache, model(ids, past_key_values=cache).logits


def test_fp16_in_memory_restores_into_an_fp32_model(setup: dict[str, Any]) -> None:
    model, ids, full = setup["model"], setup["ids"], setup["full"]
    half = [c.to(torch.float16) for c in setup["chunks"][:3]]
    assert half[0].nbytes * 2 == setup["chunks"][0].nbytes
    with torch.inference_mode():
        cache = restore_cache(model.config, half, dtype=torch.float32)
        out = model(ids[:, 48:], past_key_values=cache).logits
    assert (out - full[:, 48:]).abs().max().item() < 5e-3


def test_chunk_shapes_and_sizes(setup: dict[str, Any]) -> None:
    config, chunk = setup["model"].config, setup["chunks"][0]
    layout = kv_layout(config)
    assert len(chunk.keys) == len(layout) and chunk.length == C
    assert [tuple(k.shape) for k in chunk.keys] == [(h, C, d) for h, d in layout]
    assert chunk.nbytes == sum(2 * h * C * d * 4 for h, d in layout)


@pytest.mark.parametrize("codec,max_err", [("fp32", 1e-5), ("fp16", 5e-3), ("int8", 5e-2)])
def test_codecs_round_trip_with_bounded_logit_error(setup: dict[str, Any], codec: str, max_err: float) -> None:
    model, ids, full = setup["model"], setup["ids"], setup["full"]
    layout = kv_layout(model.config)
    wire = [cbor2.dumps(encode_chunk(c, codec, KEY, MODEL)) for c in setup["chunks"]]
    back = [decode_chunk(cbor2.loads(w), layout, C, KEY, MODEL) for w in wire]
    payload = sum(len(t["data"]) + len(t.get("scale", {}).get("data", b""))
                  for layer in encode_chunk(setup["chunks"][0], codec)["layers"] for t in layer.values())
    assert payload / C == wire_bytes_per_token(model.config, codec, C)
    with torch.inference_mode():
        cache = restore_cache(model.config, back)
        out = model(ids[:, 64:], past_key_values=cache).logits
    err = (out - full[:, 64:]).abs().max().item()
    assert err < max_err, err
    if codec != "int8":
        assert torch.equal(out.argmax(-1), full[:, 64:].argmax(-1))


def test_wire_sizes_of_the_real_models() -> None:
    gemma = Gemma3TextConfig(num_hidden_layers=18, hidden_size=640, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=256)
    smol = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert wire_bytes_per_token(gemma, "fp16") == 18_432  # DESIGN.md's figures
    assert wire_bytes_per_token(smol, "fp16") == 23_040
    assert wire_bytes_per_token(gemma, "int8") == 11_520  # 1 B/value + fp32 scales over 16 tokens
    assert wire_bytes_per_token(smol, "int8") == 14_400


def _chunk() -> ChunkKV:
    g = torch.Generator().manual_seed(3)
    return ChunkKV(keys=tuple(torch.randn(2, C, 8, generator=g) for _ in range(2)),
                   values=tuple(torch.randn(2, C, 8, generator=g) for _ in range(2)))


LAYOUT = [(2, 8), (2, 8)]


def test_int8_error_is_within_half_a_step_per_channel() -> None:
    chunk = _chunk()
    back = decode_chunk(encode_chunk(chunk, "int8"), LAYOUT, C)
    for a, b in zip(chunk.keys + chunk.values, back.keys + back.values):
        step = a.abs().amax(dim=1, keepdim=True) / 127
        assert ((a - b).abs() <= step / 2 + 1e-7).all()
    zero = ChunkKV(keys=(torch.zeros(2, C, 8),) * 2, values=(torch.zeros(2, C, 8),) * 2)
    assert all(torch.equal(t, torch.zeros(2, C, 8)) for t in decode_chunk(encode_chunk(zero, "int8"), LAYOUT, C).keys)


def _mutate(d: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    target = d
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    "path,value,reason",
    [
        (["v"], 2, "bad-version"),
        (["codec"], "fp8", "bad-chunk"),
        (["key"], bytes(16), "wrong-key"),
        (["model"], bytes(16), "wrong-model"),
        (["layers"], [], "bad-chunk"),
        (["layers", 0, "k", "shape"], [2, C, 4], "bad-chunk"),
        (["layers", 0, "k", "dtype"], "float32", "bad-chunk"),
        (["layers", 0, "k", "data"], b"\x00" * 10, "bad-chunk"),
        (["layers", 1, "v", "scale", "shape"], [2, C, 8], "bad-chunk"),
        (["sum"], 0, "bad-checksum"),
    ],
)
def test_bad_chunks_raise_protocol_error(path: list[Any], value: Any, reason: str) -> None:
    d = cbor2.loads(cbor2.dumps(encode_chunk(_chunk(), "int8", KEY, MODEL)))
    with pytest.raises(ProtocolError) as err:
        decode_chunk(_mutate(d, path, value), LAYOUT, C, KEY, MODEL)
    assert err.value.reason == reason


def test_flipped_byte_and_bad_values_are_rejected() -> None:
    d = encode_chunk(_chunk(), "fp16", KEY, MODEL)
    raw = bytearray(d["layers"][1]["v"]["data"])
    raw[7] ^= 0x01
    d["layers"][1]["v"]["data"] = bytes(raw)
    with pytest.raises(ProtocolError, match="bad-checksum"):
        decode_chunk(d, LAYOUT, C, KEY, MODEL)
    bad = ChunkKV(keys=(torch.full((2, C, 8), float("nan")),) * 2, values=(torch.zeros(2, C, 8),) * 2)
    with pytest.raises(ProtocolError, match="non-finite"):
        decode_chunk(encode_chunk(bad, "fp16"), LAYOUT, C)
    with pytest.raises(ProtocolError):
        decode_chunk("nope", LAYOUT, C)


@pytest.mark.parametrize("codec", ["fp16", "int8", "fp32"])
def test_an_empty_tail_round_trips_in_every_codec(codec: str) -> None:
    """A prompt of whole chunks leaves a zero-length tail; serving it must not fail."""
    empty = ChunkKV(keys=(torch.zeros(2, 0, 8),) * 3, values=(torch.zeros(2, 0, 8),) * 3)
    back = decode_chunk(encode_chunk(empty, codec, key=b"k" * 16, model=b"m" * 16),
                        [(2, 8)] * 3, 0, key=b"k" * 16, model=b"m" * 16)
    assert back.length == 0 and len(back.keys) == 3


# -- last logits on the wire --------------------------------------------------------------------

def test_logits_travel_as_their_top_k_and_keep_the_argmax() -> None:
    from mesh.cache.codec import decode_logits, encode_logits

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(262_144, generator=g) * 4
    wire_form = encode_logits(logits, key=b"k" * 16, model=b"m" * 16, top_k=256)
    assert len(cbor2.dumps(wire_form)) < 2_300  # vs 524,288 B of fp16 logits
    dense = decode_logits(cbor2.loads(cbor2.dumps(wire_form)), 262_144, key=b"k" * 16, model=b"m" * 16)
    assert int(torch.argmax(dense)) == int(torch.argmax(logits))
    top = torch.topk(logits, 256)
    assert torch.equal(dense[top.indices], top.values)  # exact fp32, not rounded
    assert torch.isinf(dense).sum() == 262_144 - 256
    # a sparse vector (as a fetched entry is stored) re-encodes to the same top k
    again = decode_logits(encode_logits(dense, b"k" * 16, b"m" * 16), 262_144)
    assert torch.equal(again, dense)


@pytest.mark.parametrize("lie", ["key", "model", "values", "ids", "size", "vocab", "repeated"])
def test_tampered_logits_are_rejected(lie: str) -> None:
    from mesh.cache.codec import decode_logits, encode_logits

    w = encode_logits(torch.arange(1000, dtype=torch.float32), key=b"k" * 16, model=b"m" * 16, top_k=8)
    if lie == "values":
        w["vals"] = w["vals"][:-4] + torch.tensor([5000.0]).numpy().tobytes()
    elif lie == "ids":
        w["ids"] = bytes(4) + w["ids"][4:]
    elif lie == "size":
        w["vals"] = w["vals"][:-4]
    elif lie == "repeated":
        w["ids"] = w["ids"][:4] * 8
    key, model, vocab = b"k" * 16, b"m" * 16, 1000
    if lie == "key":
        key = b"x" * 16
    elif lie == "model":
        model = b"x" * 16
    elif lie == "vocab":
        vocab = 2000
    with pytest.raises(ProtocolError):
        decode_logits(w, vocab, key=key, model=model)
