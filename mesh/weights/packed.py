"""The fast decode of a quantised model on x86: torch's 4-bit kernel over a packed copy of its weights.

A generated token multiplies one row by every weight. The kernels of :mod:`mesh.weights.modules`
do it over the mapped file: int8 through ``torch._weight_int8pack_mm``, q4 by unpacking nibbles
into float32 a block at a time (several float32 passes per weight per token: q4 decoded 10-25x
slower than int8 on this machine). ``torch._weight_int4pack_mm_for_cpu`` reads 4-bit codes with a
(scale, zero) per group of inputs and is vectorised on x86 (AVX2, AVX-512) for bfloat16 inputs
(float32 inputs fall to scalar code, 20-25x slower). Its dequantiser is ``(c - 8) * scale + zero``
for a code ``c`` in 0..15, so:

- a q4 group (``w = q * s + m``) packs as its codes with (s, m + 8 s);
- an 8-bit weight (int8 per row, and the grouped int8 q4 keeps for Q8_0 tensors such as both
  models' embedding and tied LM head) splits into two 4-bit halves, ``q = 16 hi + lo`` with
  ``hi = q >> 4`` (-8..7, stored as ``hi + 8``) and ``lo = q & 15``, side by side in one kernel
  group per weight group of ``g`` inputs: ``g`` hi codes, then ``g`` lo codes, the input given
  as ``16 x_g`` then ``x_g`` (a power of two: exact in bfloat16). So both halves share one
  (scale, zero): ``s`` and ``z = 8 s / 17``, since the group then sums
  ``s (16 hi + lo) . x + (16 z + z - 8 s) sum(x_g)`` and ``17 z = 8 s`` cancels the kernel's
  ``- 8`` on the lo codes (bfloat16 rounds ``z`` within ``s / 64``: a group error of
  ``s / 64 |sum(x_g)|``, under a tenth of what rounding ``s`` itself costs). One byte per weight
  as before and one (scale, zero) per group, not two: the 262k-row head of Gemma-3 reads 189 MB
  a token instead of 210 (10.99 -> 10.42 ms). The kernel's groups go up to 256 inputs, so a
  weight group is at most 128 (:data:`GROUPS_8BIT`). That is for 8-bit weights with a scale per
  group (q4's Q8_0, Q5_0, Q6_K tensors); an int8 weight with one scale per row keeps the halves
  side by side, the input given twice as a whole, ``(16 s, 0)`` and ``(s, 8 s)``: its scales are
  already few (one per 64-256 inputs), the shared layout showed no gain for it streamed over
  every layer, and three pi5 bench runs with it read SmolLM2 int8 lower (see the README).

The packed layout depends on the CPU capability (AVX2 and AVX-512 pack differently), so it is
made at load, in anonymous memory, beside the mapped file the prompt's prefill and the embedding
lookup keep reading: a quantised model's weights twice (SmolLM2 q4 +93 MiB, int8 +141; Gemma-3 q4
+276 MiB, int8 +270; q4's were 97 and 305 with a (scale, zero) per half).
A node packs only where its memory plan has room for that without shrinking its context or
cache (``nodes.memory.decode_copy_fits``; ``mesh node --no-packed-decode`` never). A file that is
its GGUF's own weights (``mesh_exact`` in its header: SmolLM2's q4, whose greedy tokens are fp32's
through the mapped kernels) loses that exactness to bfloat16's rounding when packed, and its node
says so at start. aarch64 keeps the mapped kernels: under qemu's Cortex-A53 the 4-bit kernel was
no faster than unpacking (results/2026-12-07/packed_decode.py).

Only decode (one row inside :func:`mesh.weights.modules.decoding`) uses the packed copy; a prompt's
prefill runs the mapped kernels, so a prompt's KV does not depend on whether a node packed.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

GROUPS = (256, 128, 64, 32)  # group sizes the kernel takes, largest first (fewer scales)
GROUPS_8BIT = (128, 64, 32)  # an 8-bit weight's groups: twice as long in the kernel (both halves)
PACK_ROWS = 4096  # rows packed at once (the int32 codes of one block are the transient)
ROW_MULTIPLE = 16  # the kernel's packing needs N % 16 == 0


def available() -> bool:
    """Whether the 4-bit kernel is vectorised here: x86 with AVX2 or AVX-512, in this torch."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu") or not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return False
    capability = str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")())
    return capability.startswith(("AVX2", "AVX512"))


@dataclass(frozen=True)
class Packed:
    """One weight in the kernel's layout: ``weight`` (uint8, (N, K'/2)), ``scales_zeros``
    (bfloat16, (K'/group, N, 2)); ``doubled``: an 8-bit weight, whose input is given twice
    (K' = 2 K): ``shared``, each weight group as ``16 x_g`` then ``x_g`` (``group`` is twice the
    weight group); else the whole row twice."""

    weight: Tensor
    scales_zeros: Tensor
    group: int
    doubled: bool
    shared: bool = False

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scales_zeros.numel() * 2

    def matmul(self, x: Tensor) -> Tensor:
        """``x (1, K) float32 -> (1, N) float32``, the input and the group constants rounded to
        bfloat16, the products summed in float32 by the kernel."""
        a = x.to(torch.bfloat16)
        if self.shared:
            v = a.view(1, -1, 1, self.group // 2)
            a = torch.cat((v * 16, v), dim=2).view(1, -1)
        elif self.doubled:
            a = torch.cat((a, a), dim=1)
        return torch._weight_int4pack_mm_for_cpu(a, self.weight, self.group, self.scales_zeros).float()


def _codes_4bit(codes: Tensor) -> Tensor:
    """q4's packed nibbles (column j low, j + K/2 high) as int32 codes (R, K) in 0..15."""
    return torch.cat((codes & 15, codes >> 4), dim=1).to(torch.int32)


def _codes_8bit(codes: Tensor, group: int) -> Tensor:
    """int8 codes (R, K) as the two 4-bit halves (R, 2K), per group of ``group`` inputs its
    ``hi + 8`` codes then its ``lo`` codes."""
    q = codes.to(torch.int32)
    r, k = (int(n) for n in q.shape)
    hi, lo = ((q >> 4) + 8).view(r, k // group, 1, group), (q & 15).view(r, k // group, 1, group)
    return torch.cat((hi, lo), dim=2).view(r, 2 * k)


def _pack_codes(codes: Tensor, to_4bit) -> Tensor:  # noqa: ANN001
    with torch.inference_mode(False):
        parts = [torch._convert_weight_to_int4pack_for_cpu(to_4bit(codes[r0:r0 + PACK_ROWS]).contiguous(), 1)
                 for r0 in range(0, int(codes.shape[0]), PACK_ROWS)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scales_zeros(scale: Tensor, zero: Tensor) -> Tensor:
    """Per row and group (N, G) scale and zero -> the kernel's (G, N, 2) bfloat16."""
    with torch.inference_mode(False):
        return torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()


def row_group(k: int) -> int | None:
    """The group size for a per-row (8-bit) weight of ``k`` inputs (the largest that divides it)."""
    return next((g for g in GROUPS if k % g == 0), None)


def packable(n: int, k: int, group: int | None) -> bool:
    return group is not None and n % ROW_MULTIPLE == 0 and k % group == 0


def pack_q4(codes: Tensor, scales: Tensor, mins: Tensor) -> Packed:
    """A q4 weight (uint8 (N, K/2), float16 scales and minimums (N, K/group))."""
    n, groups = (int(s) for s in scales.shape)
    k = 2 * int(codes.shape[1])
    s = scales.float()
    return Packed(_pack_codes(codes, _codes_4bit), _scales_zeros(s, mins.float() + 8 * s), k // groups, False)


def pack_int8(codes: Tensor, scales: Tensor) -> Packed:
    """An 8-bit weight: int8 (N, K) with float scales per row (N,) or per row and group (N, G)."""
    n, k = (int(s) for s in codes.shape)
    if scales.dim() == 1:  # the halves side by side, a (scale, zero) each
        group = row_group(k)
        assert group is not None
        s = scales.float()[:, None].expand(n, k // group)
        scale = torch.cat((16 * s, s), dim=1)
        zero = torch.cat((torch.zeros_like(s), 8 * s), dim=1)
        return Packed(_pack_codes(codes, partial(_codes_8bit, group=k)), _scales_zeros(scale, zero), group, True)
    s = scales.float()
    group = k // int(s.shape[1])
    assert group in GROUPS_8BIT, group
    s = s.to(torch.bfloat16).float()  # the zero from the scale the kernel will use
    return Packed(_pack_codes(codes, partial(_codes_8bit, group=group)), _scales_zeros(s, s * (8 / 17)),
                  2 * group, True, True)


FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}  # one product each


@dataclass(frozen=True)
class Fused:
    """Several projections of one input as one packed product (an attention's q, k and v; an MLP's
    gate and up): one kernel call and one bfloat16 rounding of the row instead of one per
    projection, the outputs split after. A decode step of SmolLM2 is mostly such small calls."""

    packed: Packed
    sizes: tuple[int, ...]
    bias: Tensor | None

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:  # (1, K) -> one (1, N_i) per projection
        return self.whole(x).split(self.sizes, dim=-1)

    def whole(self, x: Tensor) -> Tensor:
        """``(1, K) -> (1, sum N_i)``: the projections' outputs side by side, unsplit."""
        y = self.packed.matmul(x)
        return y if self.bias is None else y.add_(self.bias)


def _shape(module: nn.Module) -> tuple[int, int, int | None, bool] | None:
    """(N, K, group, 8-bit) of a quantised linear layer, or None for any other module."""
    from mesh.weights.modules import GroupLinear, Int8Linear

    if isinstance(module, Int8Linear):
        return module.out_features, module.in_features, row_group(module.in_features), True
    if isinstance(module, GroupLinear):
        group = module.in_features // int(module.scales.shape[1])
        eight = module.bits == 8
        return module.out_features, module.in_features, group if group in (GROUPS_8BIT if eight else GROUPS) else None, eight
    return None


def _kind(module: nn.Module) -> tuple[type, int, int | None, bool]:
    n, k, group, eight = _shape(module)  # type: ignore[misc]
    return type(module), k, group, eight


def _plan(model: nn.Module) -> list[tuple[nn.Module, str | None, list[nn.Module]]]:
    """What to pack: (owner, attribute, layers): layers fused into ``owner.<attribute>`` where a
    module holds all of one :data:`FUSED` set, of one kind (type, inputs, group); else each layer
    alone (attribute None). Only what the kernel can take."""
    out: list[tuple[nn.Module, str | None, list[nn.Module]]] = []
    taken: set[int] = set()
    for owner in model.modules():
        for attr, names in FUSED.items():
            parts = [getattr(owner, n, None) for n in names]
            if any(p is None or _shape(p) is None for p in parts) or not hasattr(owner, attr):
                continue
            kinds = {_kind(p) for p in parts}
            biases = {getattr(p, "bias", None) is None for p in parts}
            if len(kinds) != 1 or len(biases) != 1:
                continue
            _, k, group, _ = next(iter(kinds))
            if packable(sum(_shape(p)[0] for p in parts), k, group):  # type: ignore[index]
                out.append((owner, attr, parts))
                taken.update(id(p) for p in parts)
    for module in model.modules():
        shape = _shape(module)
        if shape is not None and id(module) not in taken and packable(shape[0], shape[1], shape[2]):
            out.append((module, None, [module]))
    return out


def _nbytes(layers: list[nn.Module]) -> int:
    from mesh.weights.modules import Int8Linear

    n = sum(_shape(m)[0] for m in layers)  # type: ignore[index]
    _, k, group, eight = _shape(layers[0])  # type: ignore[misc]
    kk = 2 * k if eight else k
    shared = eight and not isinstance(layers[0], Int8Linear)  # grouped 8-bit: one (scale, zero) for both halves
    return n * kk // 2 + ((k if shared else kk) // int(group or 1)) * n * 2 * 2


def packed_bytes(model: nn.Module) -> int:
    """What :func:`pack_model` would add, in bytes, without packing anything."""
    return sum(_nbytes(layers) for _, _, layers in _plan(model))


def _pack(layers: list[nn.Module]) -> Packed:
    from mesh.weights.modules import GroupLinear

    def cat(name: str) -> Tensor:  # one layer's own tensor (no copy of a 160 MiB head), or the set's
        parts = [getattr(m, name) for m in layers]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    first = layers[0]
    if isinstance(first, GroupLinear) and first.bits == 4:
        return pack_q4(cat("qweight"), cat("scales"), cat("mins"))
    return pack_int8(cat("qweight"), cat("scales"))


def pack_model(model: nn.Module) -> int:
    """Give ``model`` the packed copy of every quantised linear layer the kernel can take: fused
    sets as a :class:`Fused` on their owner (``Attention.qkv``, ``MLP.gate_up``), the others as
    their own ``packed`` attribute; the forward uses them at decode. Returns the bytes added."""
    total = 0
    for owner, attr, layers in _plan(model):
        p = _pack(layers)
        if attr is None:
            owner.packed = p
        else:
            biases = [m.bias for m in layers]
            bias = None if biases[0] is None else torch.cat(biases)
            setattr(owner, attr, Fused(p, tuple(int(m.out_features) for m in layers), bias))
        total += p.nbytes
    return total


def unpack_model(model: nn.Module) -> None:
    """Drop every packed copy (decode goes back to the mapped kernels)."""
    for module in model.modules():
        if getattr(module, "packed", None) is not None:
            module.packed = None
        for attr in FUSED:
            if getattr(module, attr, None) is not None:
                setattr(module, attr, None)
