"""The packed decode (mesh.weights.packed): every quantised layout through torch's 4-bit kernel gives
the dequantised product up to bfloat16's rounding of the input and of the group constants; only a
generated token's row uses it; blocks of rows pack as the whole does."""

from __future__ import annotations

import pytest
import torch

from mesh.weights import modules, packed
from mesh.weights.formats import (dequantize_groups, dequantize_groups8, dequantize_rows, quantize_groups,
                                  quantize_groups8, quantize_rows)
from mesh.weights.modules import GroupLinear, Int8Linear

pytestmark = pytest.mark.skipif(not packed.available(), reason="torch's 4-bit kernel is vectorised on x86 only")


def _weights(kind: str, n: int, k: int, seed: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "q4":
        c, s, m = quantize_groups(w)
        return GroupLinear(c, s, m), dequantize_groups(c, s, m), (s.float().abs() + m.float().abs())
    if kind == "int8-groups":
        c, s = quantize_groups8(w)
        return GroupLinear(c, s), dequantize_groups8(c, s), s.float().abs() * 127
    q, s = quantize_rows(w)
    return Int8Linear(q, s), dequantize_rows(q, s), (s.abs() * 127)[:, None]


@pytest.mark.parametrize("kind", ["q4", "int8-groups", "int8-rows"])
@pytest.mark.parametrize("n,k", [(48, 64), (4096 + 64, 96), (576, 1536)])
def test_the_packed_product_is_the_dequantised_one_up_to_bfloat16(kind: str, n: int, k: int) -> None:
    layer, w, magnitude = _weights(kind, n, k, n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(7))
    x[0, 5] = 6.0  # an outlier input does not coarsen the others (bfloat16 rounds each element)
    ref = x.double() @ w.double().T
    assert packed.pack_model(layer) == layer.packed.nbytes == packed.packed_bytes(layer)
    with modules.decoding():
        got = layer(x.view(1, 1, k)).view(1, n)
    assert got.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: of each input, and of each group's scale and zero
    bound = 3 * 2.0 ** -8 * (x.double().abs() @ w.double().abs().T) + 2.0 ** -8 * (
        x.double().abs() @ (magnitude.double().max(dim=1).values[:, None].expand(n, k)).T) + 1e-6
    assert bool(((got.double() - ref).abs() <= bound).all()), float((got.double() - ref).abs().max())
    prompt_row = layer(x.view(1, 1, k)).view(1, n)  # outside decoding: the mapped kernel, float32
    assert torch.allclose(prompt_row.double(), ref, rtol=1e-4, atol=1e-4)
    packed.unpack_model(layer)
    with modules.decoding():  # unpacked: the mapped kernel at decode too
        mapped = (modules.group_matmul(x, layer.qweight, layer.scales, layer.mins) if isinstance(layer, GroupLinear)
                  else modules.int8_matmul(x, layer.qweight, layer.scales))
        assert layer.packed is None and torch.equal(layer(x).view(1, n), mapped)


def test_blocks_of_rows_pack_as_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    c, s, m = quantize_groups(torch.randn(256, 64, generator=torch.Generator().manual_seed(1)))
    whole = packed.pack_q4(c, s, m)
    monkeypatch.setattr(packed, "PACK_ROWS", 64)
    assert torch.equal(packed.pack_q4(c, s, m).weight, whole.weight)


def test_a_layer_the_kernel_cannot_take_keeps_the_mapped_kernel() -> None:
    q, s = quantize_rows(torch.randn(40, 64))  # 40 rows: the packing wants a multiple of 16
    layer = Int8Linear(q, s)
    assert packed.pack_model(layer) == 0 == packed.packed_bytes(layer) and layer.packed is None


@pytest.mark.parametrize("machine,capability,want", [
    ("aarch64", "DEFAULT", False), ("x86_64", "AVX512", True), ("x86_64", "AVX2", True), ("x86_64", "DEFAULT", False)])
def test_only_x86_with_avx2_or_avx512_packs(monkeypatch: pytest.MonkeyPatch, machine: str, capability: str,
                                            want: bool) -> None:
    monkeypatch.setattr(packed.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert packed.available() is want


def test_fused_projections_are_their_parts_side_by_side() -> None:
    """q, k and v (with Qwen2's biases) as one packed product: each output is its part's alone."""
    g = torch.Generator().manual_seed(3)
    parts = []
    for n in (64, 32, 32):
        c, s, m = quantize_groups(torch.randn(n, 96, generator=g) * 0.05)
        parts.append(GroupLinear(c, s, m, torch.randn(n, generator=g)))
    owner = torch.nn.Module()
    owner.q_proj, owner.k_proj, owner.v_proj = parts
    owner.qkv = None
    added = packed.pack_model(owner)
    assert added == packed.packed_bytes(owner) > 0 and owner.qkv is not None
    assert all(p.packed is None for p in parts)  # fused: no second copy of any part
    x = torch.randn(1, 96, generator=g)
    fused = owner.qkv(x)
    for p, y in zip(parts, fused):
        p.packed = packed.pack_q4(p.qweight, p.scales, p.mins)
        with modules.decoding():
            assert torch.allclose(y, p(x), rtol=1e-3, atol=1e-3)
    packed.unpack_model(owner)
    assert owner.qkv is None and all(p.packed is None for p in parts)


def test_gemma_rotates_and_normalises_q_and_k_in_one_call_bit_for_bit() -> None:
    """Gemma-3's packed decode normalises q and k as one tensor, each head's row times its norm's
    multiplier after, then rotates both at once: the logits of every step equal, bit for bit, those
    of q's and k's own norms (fewer calls, the same numbers)."""
    from mesh.model import Decoder, load_model
    from tests.conftest import CACHE_ROOT, require_model

    require_model("gemma3-270m")
    loaded = load_model(CACHE_ROOT, "gemma3-270m", 2, weights="q4", verify=False)
    packed.pack_model(loaded.model)
    attns = [layer.self_attn for layer in loaded.model.model.layers]
    merged = [a.qk_mult for a in attns]
    assert all(m is not None for m in merged)
    dec = Decoder(loaded)
    ids = dec.encode("A short history of the printing press:")

    def steps() -> list[torch.Tensor]:
        logits, cache = dec.prefill(ids)
        out, t = [], int(logits.argmax())
        for _ in range(6):
            out.append(dec.next_logits(t, cache))
            t = int(out[-1].argmax())
        return out

    one = steps()
    for a in attns:
        a.qk_mult = None
    two = steps()
    assert all(torch.equal(x, y) for x, y in zip(one, two))


@pytest.mark.parametrize("kind", ["int8-groups", "int8-rows"])
def test_a_grouped_8bit_weight_packs_one_scale_and_zero_per_group_for_both_halves(kind: str) -> None:
    """A weight group's two 4-bit halves sit in one kernel group (the input as 16 x_g, x_g), so a
    grouped 8-bit weight's copy carries one (scale, zero) per group, not one per half: Gemma-3's
    head reads a tenth less. An int8 weight with a scale per row keeps its halves side by side
    (its scales are few, and the shared layout costs two calls more per product)."""
    n, k = 64, 256
    layer, w, _ = _weights(kind, n, k, 11)
    p = packed.pack_int8(layer.qweight, layer.scales)
    if kind == "int8-groups":
        group = k // int(layer.scales.shape[1])
        assert p.doubled and p.shared and p.group == 2 * group and p.scales_zeros.shape == (k // group, n, 2)
        assert p.nbytes == n * k + (k // group) * n * 4
    else:
        group = packed.row_group(k)
        assert p.doubled and not p.shared and p.group == group and p.scales_zeros.shape == (2 * k // group, n, 2)
    assert p.nbytes == packed.packed_bytes(layer)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(p.matmul(x).double(), x.double() @ w.double().T, rtol=2e-2, atol=2e-2)
