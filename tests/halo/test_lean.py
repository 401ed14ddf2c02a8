"""mesh.halo.lean: the coordinator's decode step without HF's forward gives bitwise the HF forward's
logits and cache on one thread (so greedy tokens cannot change), with routed MLPs and the
two-thread head too, and declines what it does not cover."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig

from mesh.halo import groups as split
from mesh.halo.lean import LeanStep, lean_step
from mesh.halo.head import two_thread_head
from tests.halo.reference import local_mlp_fn

VOCAB = 1001


def _llama(heads: int = 4, kv_heads: int = 2, tied: bool = True, attn: str = "sdpa", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=tied, **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _decode(model: torch.nn.Module, step: LeanStep | None, prompt: torch.Tensor, feed: list[int]):
    """Prefill ``prompt`` (HF), then feed ``feed`` one token at a time: per token's logits, cache."""
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = []
        for t in feed:
            if step is None:
                out.append(model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1])
            else:
                out.append(step(t, cache))
    return out, cache


CASES = {"gqa-tied": {}, "mha-untied": {"heads": 4, "kv_heads": 4, "tied": False},
         "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_lean_step_is_bitwise_the_hf_forward(case: str, one_thread) -> None:
    model = _llama(**CASES[case])
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, 9), generator=gen)
    feed = torch.randint(0, VOCAB, (12,), generator=gen).tolist()
    ref, ref_cache = _decode(model, None, prompt, feed)
    step = lean_step(model)
    assert isinstance(step, LeanStep)
    got, cache = _decode(model, step, prompt, feed)
    assert all(torch.equal(a, b) for a, b in zip(ref, got)) and len(got) == len(feed)
    for i in range(len(model.model.layers)):
        assert torch.equal(ref_cache.layers[i].keys, cache.layers[i].keys)
        assert torch.equal(ref_cache.layers[i].values, cache.layers[i].values)
    # The projections now read views of the fused matrix: the HF forward is unchanged by it.
    again, _ = _decode(model, None, prompt, feed)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    a = model.model.layers[0].self_attn
    assert a.q_proj.weight.data_ptr() == step.qkv[0].data_ptr()


def test_routed_mlps_and_the_two_thread_head_go_through_the_lean_step(one_thread) -> None:
    model = _llama()
    layout = split.model_layout(model.config, 32)
    # Each layer's four groups on two holders, as the coordinator's workers would hold them.
    fn = local_mlp_fn(model, [[[0, 3], [1, 2]]] * 3, layout)
    prompt = torch.tensor([[5, 17, 230, 9]])
    feed = [44, 3, 900, 12, 7]
    calls: list[int] = []

    def counted(layer: int, x: torch.Tensor) -> torch.Tensor:
        calls.append(layer)
        return fn(layer, x)

    with split.routed_mlps(model, counted):
        ref, _ = _decode(model, None, prompt, feed)
        two_thread_head(model)
        step = lean_step(model)
        calls.clear()
        got, _ = _decode(model, step, prompt, feed)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert calls[len(calls) - 3 * len(feed):] == [0, 1, 2] * len(feed)  # every decode step routed, in order


@pytest.mark.parametrize("why", ["gemma", "attention-bias", "eager"])
def test_lean_step_declines_what_it_does_not_cover(why: str) -> None:
    if why == "gemma":
        cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    elif why == "attention-bias":
        model = _llama(attention_bias=True)
    else:
        model = _llama(attn="eager")
    before = [p.data_ptr() for p in model.parameters()]
    assert lean_step(model) is None
    assert [p.data_ptr() for p in model.parameters()] == before  # and left the model as it was


def test_the_lean_step_continues_a_restored_prompt_cache_like_the_hf_forward(one_thread) -> None:
    """The coordinator's prompt cache hands generation a cache restored from chunks (and prefills
    only the suffix into it); the lean step must continue it exactly as HF's forward does."""
    from mesh.cache import kv as kvstate

    model = _llama()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 24), generator=gen)
    feed = torch.randint(0, VOCAB, (6,), generator=gen).tolist()
    with torch.inference_mode():
        source = kvstate.capture_cache(model.config)
        model(input_ids=ids[:, :16], past_key_values=source, use_cache=True)
        kvstate.end_capture(source)
        chunks = kvstate.cut_chunks(source, 0, 2, 8)  # two chunks of 8 positions

    def continued(step: LeanStep | None) -> list[torch.Tensor]:
        with torch.inference_mode():
            cache = kvstate.restore_cache(model.config, chunks, capture=True)
            model(input_ids=ids[:, 16:], past_key_values=cache, use_cache=True, logits_to_keep=1)
            kvstate.end_capture(cache)
            out = []
            for t in feed:
                out.append(step(t, cache) if step is not None else
                           model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1])
        return out

    ref = continued(None)
    got = continued(lean_step(model))
    assert len(got) == len(feed) and all(torch.equal(a, b) for a, b in zip(ref, got))
