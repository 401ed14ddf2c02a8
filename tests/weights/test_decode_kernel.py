"""The int8 decode kernel each machine gets, and what the x86 one (``int8mm_bf16``) computes: the
dequantised product up to the bfloat16 rounding of the input row and of the output."""

from __future__ import annotations

import pytest
import torch

from mesh.weights import modules
from mesh.weights.formats import dequantize_rows, quantize_rows
from mesh.weights.modules import Int8Linear, int8_matmul


@pytest.fixture
def restore_kernel():  # noqa: ANN201
    before = dict(modules._kernel)
    yield
    modules._kernel.update(before)


@pytest.mark.parametrize("machine,capability,want", [
    ("aarch64", "DEFAULT", "int8mm"), ("arm64", "DEFAULT", "int8mm"),  # NEON float32: the Pis
    ("x86_64", "AVX512", "int8mm_bf16"), ("x86_64", "AVX2", "int8mm_bf16"), ("x86_64", "DEFAULT", "dequant")])
def test_the_choice_is_per_machine(monkeypatch: pytest.MonkeyPatch, restore_kernel: None,
                                   machine: str, capability: str, want: str) -> None:
    monkeypatch.setattr(modules.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    modules._kernel["decode"] = None
    assert modules.kernels() == {"decode": want, "prefill": "dequant"}


@pytest.mark.parametrize("n", [40, 70_000])
def test_bf16_inputs_give_the_dequantised_product_up_to_their_rounding(restore_kernel: None, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    q, s = quantize_rows(torch.randn(n, 64, generator=g) * 0.05)
    w = dequantize_rows(q, s).double()
    x = torch.randn(1, 64, generator=g)
    x[0, 3] = 9.0  # an outlier channel does not coarsen the others (bfloat16 rounds each element)
    ref = x.double() @ w.T
    got = int8_matmul(x, q, s, "int8mm_bf16")
    assert got.shape == (1, n) and got.dtype == torch.float32
    bound = 2.0 ** -8 * (x.double().abs() @ w.abs().T) + 2.0 ** -8 * ref.abs() + 1e-6
    assert bool(((got.double() - ref).abs() <= bound).all())
    modules.set_kernel(decode="int8mm_bf16")
    layer = Int8Linear(q, s, torch.ones(n))
    with modules.decoding():  # a generated token's row: the decode kernel
        assert torch.equal(layer(x.view(1, 1, 64)), (got + 1).view(1, 1, n))
    prompt_row = layer(x.view(1, 1, 64))  # a prompt's one row: the prefill kernel, float32 arithmetic
    assert torch.allclose(prompt_row.view(1, n).double(), ref + 1, rtol=1e-4, atol=1e-4)
    several = torch.randn(3, 64, generator=g)  # more rows: the prefill kernel, float32 arithmetic
    assert torch.allclose(layer(several).double(), several.double() @ w.T + 1, rtol=1e-4, atol=1e-4)
