"""The q4 weight format: 4-bit codes in groups of 32 with a float16 scale and minimum (8-bit groups
with a float16 scale where the GGUF holds a tensor in 8 bits), built by `mesh setup --weights q4`
from the GGUF, memory-mapped by the node. GGUF Q4_1 and Q8_0 blocks come through bit for bit, so
SmolLM2 in q4 is its GGUF's weights exactly; other types are re-quantised within half a step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mesh.model import Decoder, LoadedModel, load_model
from mesh.weights.formats import (
    Q4_GROUP,
    dequantize_groups,
    dequantize_groups8,
    quantize_groups,
    quantize_groups8,
    quantize_groups_on,
    weights_file,
)
from mesh.weights.modules import GroupEmbedding, GroupLinear, group_matmul
from tests.conftest import CACHE_ROOT, require_model
from tests.weights.kit import mapped_ranges


def _q4_1_like(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A matrix as GGUF's Q4_1 dequantiser makes it (numpy, float32 ``q * d + m``), its d and m."""
    gen = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half()
    m = (-torch.rand(n, k // 32, generator=gen) * 0.1).half()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen)
    q[..., 3], q[..., 7] = 0, 15  # the quantiser maps a block's minimum to 0, its maximum to 15
    w = q.numpy().astype(np.float32) * d.numpy().astype(np.float32)[..., None] + m.numpy().astype(np.float32)[..., None]
    return torch.from_numpy(w.reshape(n, k)), d, m


def test_a_q4_1_block_survives_bit_for_bit() -> None:
    w, d, m = _q4_1_like(48, 192)
    packed, scales, mins = quantize_groups(w)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 96) and scales.shape == (48, 192 // Q4_GROUP)
    assert torch.equal(scales, d) and torch.equal(mins, m)
    assert torch.equal(dequantize_groups(packed, scales, mins), w)


def test_any_matrix_is_within_half_a_step_and_flat_groups_are_exact() -> None:
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    w[5, :32] = 0.25  # a flat group
    packed, scales, mins = quantize_groups(w)
    err = (dequantize_groups(packed, scales, mins) - w).abs().view(40, 4, 32).amax(dim=2)
    assert torch.all(err <= scales.float() / 2 + 1e-6)
    assert torch.equal(dequantize_groups(packed, scales, mins)[5, :32], w[5, :32])
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(4, 48))


def _q4_k_like(n: int, k: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A matrix as GGUF's Q4_K dequantiser makes it: per 32 inputs ``d * sc * q - dmin * m`` with
    float16 ``d``, ``dmin`` and 6-bit ``sc``, ``m`` (so a scale float16 cannot hold), codes that
    need not reach 0 or 15 (llama.cpp picks the grid by least squares): w, scales, mins, codes."""
    gen = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 256, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    dmin = (torch.rand(n, k // 256, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    sc = torch.randint(1, 64, (n, k // 256, 8), generator=gen).float()
    m = torch.randint(0, 64, (n, k // 256, 8), generator=gen).float()
    scales, mins = (d * sc).view(n, -1), (-(dmin * m)).view(n, -1)
    q = torch.randint(2, 14, (n, k // 32, 32), generator=gen)  # neither 0 nor 15 used
    w = (q.float() * scales[..., None] + mins[..., None]).view(n, k)
    return w, scales, mins, q


def test_a_q4_k_sub_block_keeps_its_codes() -> None:
    """Re-quantising a Q4_K tensor to a new grid from each group's extremes cost Gemma-3 q4 most of
    its 14 % of perplexity over fp32; on the sub-block's own grid the codes are the GGUF's and
    only the float16 rounding of scale and minimum is lost."""
    w, scales, mins, q = _q4_k_like(16, 512)
    packed, s16, m16 = quantize_groups_on(w, scales, mins)
    codes = torch.cat((packed & 15, packed >> 4), dim=1).view(16, 16, 32)
    assert torch.equal(codes.long(), q)
    on_grid = (dequantize_groups(packed, s16, m16) - w).abs().view(16, 16, 32).amax(dim=2)
    fp16_rounding = (15 * scales.abs() + mins.abs()) * 2.0 ** -11
    assert torch.all(on_grid <= fp16_rounding + 1e-9)
    fresh = (dequantize_groups(*quantize_groups(w)) - w).abs().view(16, 16, 32).amax(dim=2)
    assert fresh.mean() > 10 * on_grid.mean()  # the old way: a new grid, up to half of its step
    flat_w = torch.full((1, 32), -0.5)  # a sub-block with scale 0: every value its minimum
    packed, s16, m16 = quantize_groups_on(flat_w, torch.zeros(1, 1), torch.full((1, 1), -0.5))
    assert torch.equal(dequantize_groups(packed, s16, m16), flat_w)


def test_gemma_q4_keeps_its_gguf_grid_and_its_wider_types_at_8_bits() -> None:
    """Gemma-3's GGUF mixes Q5_0 (q, k, gate, up, half of v), Q4_K (o, half of down), Q6_K (the other
    half of down) and Q8_0 (the embedding): q4 holds the Q4_K layers on their own grid and the
    wider ones at 8 bits, so it stays within float16's rounding of fp32 (perplexity x0.995, was x1.14)."""
    from safetensors import safe_open

    path = require_model("gemma3-270m")
    q4 = weights_file(path, "q4")
    if not q4.exists():
        pytest.fail(f"gemma3-270m has no q4 weights under {path}: run `mesh setup --weights q4`")
    with safe_open(str(q4), "pt") as f, safe_open(str(path / "model.safetensors"), "pt") as ref:
        o = "model.layers.0.self_attn.o_proj"  # Q4_K
        scales = f.get_tensor(f"{o}.scales").float()
        got = dequantize_groups(f.get_tensor(f"{o}.qweight"), f.get_tensor(f"{o}.scales"), f.get_tensor(f"{o}.mins"))
        want = ref.get_tensor(f"{o}.weight")
        err = (got - want).abs().view(want.shape[0], -1, 32).amax(dim=2)
        assert torch.all(err <= scales / 2)  # on the grid, never more than half a step off
        assert err.mean() < 0.01 * scales.mean()  # and in practice float16's rounding, not a new grid's
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"):  # Q5_0
            assert f.get_tensor(f"{name}.qweight").dtype == torch.int8  # 8-bit groups, no minimums
            assert f"{name}.mins" not in f.keys()


def test_a_q8_0_block_survives_bit_for_bit() -> None:
    """GGUF's Q8_0: int8 codes with a float16 scale per 32, the block's largest magnitude at 127."""
    gen = torch.Generator().manual_seed(2)
    d = (torch.rand(24, 4, generator=gen) * 0.01 + 1e-3).half()
    q = torch.randint(-127, 128, (24, 4, 32), generator=gen)
    q[..., 0] = 127
    w = (q.float() * d.float()[..., None]).view(24, 128)
    codes, scales = quantize_groups8(w)
    assert codes.dtype == torch.int8 and torch.equal(scales, d)
    assert torch.equal(dequantize_groups8(codes, scales), w)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,m", [(300, 1), (70_000, 1), (70_000, 3), (16, 5)])
def test_the_kernel_is_the_dequantised_matmul(rows: int, m: int, bits: int) -> None:
    """One and several input rows, weights smaller and larger than one unpacking block."""
    gen = torch.Generator().manual_seed(rows + m)
    w = torch.randn(rows, 64, generator=gen)
    if bits == 4:
        codes, scales, mins = quantize_groups(w)
        ref_w = dequantize_groups(codes, scales, mins)
    else:
        (codes, scales), mins = quantize_groups8(w), None
        ref_w = dequantize_groups8(codes, scales)
    x = torch.randn(m, 64, generator=gen)
    assert torch.allclose(group_matmul(x, codes, scales, mins), x @ ref_w.t(), atol=1e-4, rtol=0)
    assert torch.allclose(GroupLinear(codes, scales, mins)(x), x @ ref_w.t(), atol=1e-4, rtol=0)
    emb = GroupEmbedding(codes, scales, mins)
    ids = torch.tensor([0, rows - 1, rows // 2])
    assert torch.equal(emb(ids), ref_w[ids])


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    path = require_model("smollm2-135m")
    if not weights_file(path, "q4").exists():
        pytest.fail(f"smollm2-135m has no q4 weights under {path}: run `mesh setup --weights q4`")
    return load_model(CACHE_ROOT, "smollm2-135m", weights="q4")


def test_q4_weights_are_views_of_the_mapped_file(smol: LoadedModel) -> None:
    model = smol.model
    assert not [n for n, p in model.named_parameters() if p.dim() >= 2]
    linears = [mod for mod in model.modules() if isinstance(mod, GroupLinear)]
    assert len(linears) == 30 * 7 + 1 and {mod.bits for mod in linears[:-1]} == {4}
    embed = model.get_input_embeddings()
    assert isinstance(embed, GroupEmbedding) and model.lm_head.qweight.data_ptr() == embed.qweight.data_ptr()
    assert embed.bits == 8 and embed.mins is None  # Q8_0 in the GGUF: kept at 8 bits
    ranges = mapped_ranges(weights_file(require_model("smollm2-135m"), "q4"))
    for mod in [*linears, embed]:
        for t in (mod.qweight, mod.scales, *([mod.mins] if mod.mins is not None else [])):
            assert any(a <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= b for a, b in ranges)
    assert smol.model_key.endswith("/q4")


CONTINUATIONS = ["Once upon a time, in a small village by the sea, there lived", "The capital of France is",
                 "def fibonacci(n):", "The three primary colours are", "Water boils at", "My favourite book is",
                 "To bake bread, first", "The largest planet in the solar system", "In 1969, the first",
                 "A good way to learn a language is"]


def test_smollm2_q4_is_its_gguf_and_answers_as_fp32(smol: LoadedModel) -> None:
    """Every SmolLM2 tensor is Q4_1 or Q8_0 in its GGUF, so q4 holds the fp32 copy's weights
    exactly and greedy continuations are fp32's token for token."""
    fp32 = load_model(CACHE_ROOT, "smollm2-135m")
    for i in (0, 17, 29):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            q = smol.model.get_submodule(f"model.layers.{i}.{name}")
            ref = fp32.model.get_submodule(f"model.layers.{i}.{name}").weight
            assert torch.equal(dequantize_groups(q.qweight, q.scales, q.mins), ref), (i, name)
    embed = smol.model.get_input_embeddings()
    assert torch.equal(dequantize_groups8(embed.qweight, embed.scales), fp32.model.get_input_embeddings().weight)
    a, b = Decoder(smol), Decoder(fp32)
    for text in CONTINUATIONS:
        ids = a.encode(text)
        assert a.generate(ids, 16).token_ids == b.generate(ids, 16).token_ids, text
