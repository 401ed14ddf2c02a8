"""Stored KV chunks are one allocation each, whichever way they were made.

A chunk made of 2 x layers separate small tensors fragmented the node's malloc heap as the full
prompt cache replaced entries: RSS grew 5-6 MiB per 100 asks under `mesh bench load` (3 Gemma-3
nodes, 500 asks) and stayed flat within 2 MiB per 100 asks once every chunk became one buffer
(``mesh.cache.kv.pack``). These tests fail if a path that feeds the store goes back to separate
tensors: cutting from a cache, the prompt tail, decoding a peer's chunk, a dtype change.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from mesh.cache import codec as kvcodec
from mesh.cache import kv as kvstate

C = 4


def _storages(chunk: kvstate.ChunkKV) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*chunk.keys, *chunk.values)}


def _one_buffer(chunk: kvstate.ChunkKV) -> None:
    assert len(_storages(chunk)) == 1
    # the buffer is exactly the chunk: nothing else rides along, nothing is budgeted twice
    assert chunk.keys[0].untyped_storage().nbytes() == chunk.nbytes
    assert all(t.is_contiguous() for t in (*chunk.keys, *chunk.values))


@pytest.fixture(scope="module")
def cache() -> tuple[object, object]:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    cache = kvstate.capture_cache(model.config)
    with torch.inference_mode():
        model(input_ids=torch.arange(1, 4 * C + 3).unsqueeze(0), past_key_values=cache, use_cache=True)
    return model.config, cache


def test_cut_chunks_and_tail_are_one_buffer_each(cache: tuple[object, object]) -> None:
    config, kv = cache
    chunks = kvstate.cut_chunks(kv, 0, 4, C)
    for chunk in chunks:
        _one_buffer(chunk)
    assert len(set().union(*(_storages(c) for c in chunks))) == 4  # and no chunk shares another's
    tail = kvstate.cut_span(kv, 4 * C, 4 * C + 2)
    _one_buffer(tail)
    # the copies hold the cache's values (a restore from them is the prefix)
    layer = kv.layers[1]
    assert torch.equal(torch.cat([c.keys[1] for c in chunks], dim=1), layer.keys[0, :, :4 * C])
    assert torch.equal(tail.values[1], layer.values[0, :, 4 * C:4 * C + 2])


@pytest.mark.parametrize("codec", kvcodec.CODECS)
def test_decoded_and_converted_chunks_are_one_buffer(cache: tuple[object, object], codec: str) -> None:
    config, kv = cache
    chunk = kvstate.cut_chunks(kv, 1, 1, C)[0]
    wire = kvcodec.encode_chunk(chunk, codec, key=b"k" * 16, model=b"m" * 16)
    got = kvcodec.decode_chunk(wire, kvstate.kv_layout(config), C, key=b"k" * 16, model=b"m" * 16)
    _one_buffer(got)
    _one_buffer(got.to(torch.float16))
    if codec == "fp32":
        assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, chunk.keys + chunk.values))
