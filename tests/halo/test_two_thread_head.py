"""mesh.halo.head.TwoThreadHead: a decode step's LM head on two threads gives bitwise the plain head's
logits (so greedy tokens cannot change), for tied (LLaMA-style) and untied heads."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from mesh.halo.head import TwoThreadHead, two_thread_head


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=64)
    if kind == "llama-tied":
        cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif kind == "llama":
        cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **common)
    else:
        cfg = Gemma3TextConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                               final_logit_softcapping=30.0, **common)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["llama-tied", "llama", "gemma"])
def test_two_thread_head_is_bitwise_the_plain_head(kind: str, one_thread) -> None:
    model = _model(kind)
    plain = model.get_output_embeddings()
    ids = torch.randint(0, 1001, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_last = model(input_ids=ids, logits_to_keep=1).logits
        ref_all = model(input_ids=ids).logits
        head = two_thread_head(model)
        assert two_thread_head(model) is head and isinstance(model.get_output_embeddings(), TwoThreadHead)
        assert head.weight is plain.weight  # the same (tied) parameter, no copy
        helpers = [t for t in threading.enumerate() if t.name == "lm-head"]
        assert helpers and all(t.daemon for t in helpers)
        for _ in range(3):  # the helper serves one job after another
            assert torch.equal(model(input_ids=ids, logits_to_keep=1).logits, ref_last)
        assert torch.equal(model(input_ids=ids).logits, ref_all)  # many positions: the plain product


def test_a_failure_on_the_helper_reaches_the_caller(one_thread) -> None:
    head = TwoThreadHead(torch.nn.Linear(8, 10, bias=False))  # LM heads have no bias
    x = torch.randn(1, 1, 8)
    ref = torch.nn.functional.linear(x, head.weight)
    assert torch.allclose(head(x), ref)
    with pytest.raises(RuntimeError):
        head(torch.randn(1, 1, 9))  # wrong width: both halves fail, the caller sees it
    assert torch.allclose(head(x), ref)  # still serving


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_an_int8_or_q4_head_on_two_threads_is_its_own_product(fmt: str, one_thread) -> None:
    """A coordinator on int8 or q4 weights: the halves run the head's own kernel on its rows, the
    decode kernel on both threads inside ``decoding()`` (int8's differs from the prompt's)."""
    import contextlib

    from mesh.weights.formats import quantize_groups, quantize_rows
    from mesh.weights.modules import GroupLinear, Int8Linear, decoding

    g = torch.Generator().manual_seed(2)
    w = torch.randn(1001, 64, generator=g)
    head = Int8Linear(*quantize_rows(w)) if fmt == "int8" else GroupLinear(*quantize_groups(w))
    two = TwoThreadHead(head)
    x = torch.randn(1, 1, 64, generator=g)
    for decode in (False, True):
        with decoding() if decode else contextlib.nullcontext(), torch.inference_mode():
            ref, got = head(x), two(x)
            assert torch.equal(two(torch.cat([x, x], 1)), head(torch.cat([x, x], 1)))  # many positions: plain
        assert got.shape == ref.shape == (1, 1, 1001)
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max())), float((got - ref).abs().max())
        assert int(got.argmax()) == int(ref.argmax())
