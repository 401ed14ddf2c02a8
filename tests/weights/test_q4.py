"""The q4 weight format: 4-bit codes in groups of 32 with a float16 scale and minimum, built by
`mesh setup --weights q4` from the GGUF, memory-mapped by the node. GGUF Q4_1 blocks (SmolLM2's
layers) come through bit for bit; other types are re-quantised within half a step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mesh.model import Decoder, LoadedModel, load_model
from mesh.weights.formats import Q4_GROUP, dequantize_groups, quantize_groups, weights_file
from mesh.weights.modules import Q4Embedding, Q4Linear, q4_matmul
from tests.conftest import CACHE_ROOT, require_model


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


@pytest.mark.parametrize("rows,m", [(300, 1), (70_000, 1), (70_000, 3), (16, 5)])
def test_the_kernel_is_the_dequantised_matmul(rows: int, m: int) -> None:
    """One and several input rows, weights smaller and larger than one unpacking block."""
    gen = torch.Generator().manual_seed(rows + m)
    packed, scales, mins = quantize_groups(torch.randn(rows, 64, generator=gen))
    x = torch.randn(m, 64, generator=gen)
    ref = x @ dequantize_groups(packed, scales, mins).t()
    assert torch.allclose(q4_matmul(x, packed, scales, mins), ref, atol=1e-4, rtol=0)
    emb = Q4Embedding(packed, scales, mins)
    ids = torch.tensor([0, rows - 1, rows // 2])
    assert torch.equal(emb(ids), dequantize_groups(packed, scales, mins)[ids])


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    path = require_model("smollm2-135m")
    if not weights_file(path, "q4").exists():
        pytest.fail(f"smollm2-135m has no q4 weights under {path}: run `mesh setup --weights q4`")
    return load_model(CACHE_ROOT, "smollm2-135m", weights="q4")


def _mapped(path: Path) -> list[tuple[int, int]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def test_q4_weights_are_views_of_the_mapped_file(smol: LoadedModel) -> None:
    model = smol.model
    assert not [n for n, p in model.named_parameters() if p.dim() >= 2]
    linears = [mod for mod in model.modules() if isinstance(mod, Q4Linear)]
    assert len(linears) == 30 * 7 + 1
    embed = model.get_input_embeddings()
    assert isinstance(embed, Q4Embedding) and model.lm_head.qweight.data_ptr() == embed.qweight.data_ptr()
    ranges = _mapped(weights_file(require_model("smollm2-135m"), "q4"))
    for mod in [*linears, embed]:
        for t in (mod.qweight, mod.scales, mod.mins):
            assert any(a <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= b for a, b in ranges)
    assert smol.model_key.endswith("/q4")


def test_smollm2_q4_layers_are_the_gguf_blocks_and_it_answers_like_fp32(smol: LoadedModel) -> None:
    fp32 = load_model(CACHE_ROOT, "smollm2-135m")
    for i in (0, 17, 29):  # Q4_1 in the GGUF: exact
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            q = smol.model.get_submodule(f"model.layers.{i}.{name}")
            ref = fp32.model.get_submodule(f"model.layers.{i}.{name}").weight
            assert torch.equal(dequantize_groups(q.qweight, q.scales, q.mins), ref), (i, name)
    embed = smol.model.get_input_embeddings()  # Q8_0 in the GGUF: re-quantised, half a step
    rows = slice(0, 4096)
    err = (dequantize_groups(embed.qweight[rows], embed.scales[rows], embed.mins[rows])
           - fp32.model.get_input_embeddings().weight[rows]).abs().view(4096, -1, Q4_GROUP).amax(dim=2)
    assert torch.all(err <= embed.scales[rows].float() / 2 + 1e-6)
    a, b = Decoder(smol), Decoder(fp32)
    ids = a.encode("The capital of France is")
    assert a.generate(ids, 6).token_ids == b.generate(ids, 6).token_ids
