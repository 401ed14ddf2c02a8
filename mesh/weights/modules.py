"""int8 and q4 stand-ins for ``nn.Linear`` and ``nn.Embedding`` whose weights stay in the mapped file.

Grouped weights (:class:`GroupLinear`, :class:`GroupEmbedding`: q4, and the grouped int8 q4 keeps
for tensors the GGUF holds in 8 bits) have one kernel, the block-dequantising one: a block of
rows is unpacked into the same small float32 buffer (low nibbles, the first half of the inputs, then
high nibbles, the second half; then each group's scale and minimum) and multiplied with ``F.linear``: float32 arithmetic on the file's own codes, exact where they are
the GGUF's blocks. On x86 a node with room decodes instead through a packed copy and torch's 4-bit
kernel (:mod:`mesh.weights.packed`; the layers' ``packed`` attribute), several times faster.

Each :class:`Int8Linear` holds ``qweight`` (int8, (N, K), a view into the memory-mapped
safetensors file: no copy, no float32 weight anywhere) and ``scales`` (float32, (N,)). Three
kernels compute ``x @ (q * scale).T``, all over the mapped int8 rows; which one decodes (one row, inside
:func:`decoding`: the forward of a generated token) is chosen per machine, once, at first use (:func:`kernels`; :func:`set_kernel` overrides it for measurements
and tests):

- ``"int8mm"`` (aarch64, decode): ``torch._weight_int8pack_mm`` on float32 activations, int8
  weights, per-row scales, in one pass over the int8 bytes. Its CPU kernel has a NEON path for
  float32 on aarch64 (plain ARMv8.0 NEON: ``vmovl_s8``, ``vcvtq_f32_s32``, ``vfmaq_f32``), while
  on x86 only bfloat16 is vectorised and float32 falls to a scalar loop
  (aten/src/ATen/native/cpu/int8mm_kernel.cpp in torch 2.13).
- ``"int8mm_bf16"`` (x86 with AVX2 or AVX-512, decode): the same op on the input row rounded to
  bfloat16, the path its x86 kernel vectorises (int8 -> float32 in registers, float32 FMA); the
  scales passed to it are ones and the float32 scales multiply its output, so the rounding is the
  input's and the output's (8 significant bits each), not the scales'.
- ``"dequant"`` (prefill everywhere; decode where neither runs): the rows are converted to float32
  a block at a time into a small reused buffer (it stays in the CPU cache) and multiplied with
  ``F.linear`` (the BLAS the fp32 model uses); the per-row scales are applied to the (M, N)
  output, not to the weights.

``int8mm`` and ``dequant`` are float32 arithmetic on the same int8 weights and differ only in
summation order. fbgemm's dynamic int8 linear (``quantized::linear_dynamic``) was measured too and
not taken: its input is quantised to 8 bits per token (an outlier channel coarsens every other),
greedy tokens left ``dequant``'s sooner and fewer teacher-forced positions kept fp32's argmax, and
its weights are a packed anonymous copy (results/2026-12-07/decode_kernel_choice.py,
kernel_decode.py).
"""

from __future__ import annotations

import contextlib
import platform
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from mesh.weights.packed import Packed

KERNELS = ("int8mm", "int8mm_bf16", "dequant")
_BLOCK_FLOATS = 256 * 1024  # float32 elements per dequantised block at one row (1 MiB)
_PREFILL_BLOCK_FLOATS = 1 << 20  # and at several rows (4 MiB)
_kernel: dict[str, str | None] = {"decode": None, "prefill": "dequant"}  # None: chosen at first use
_buffers = threading.local()
_phase = threading.local()  # .decode: inside decoding()
_ones: dict[int, Tensor] = {}  # bfloat16 ones per row count: int8mm_bf16's scales (applied after, in float32)


def _auto_decode() -> str:
    """int8mm on aarch64 (NEON float32, the Pis); int8mm on bfloat16 inputs where torch's x86
    kernel for it is vectorised (AVX2, AVX-512); else the BLAS path."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "int8mm"
    capability = str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")())
    return "int8mm_bf16" if capability.startswith(("AVX2", "AVX512")) else "dequant"


def set_kernel(decode: str | None = None, prefill: str | None = None) -> None:
    """Choose the kernel for one-row inputs (decode) and for more rows (prefill)."""
    for phase, name in (("decode", decode), ("prefill", prefill)):
        if name is not None:
            if name not in KERNELS:
                raise ValueError(f"unknown int8 kernel {name!r}; known: {', '.join(KERNELS)}")
            _kernel[phase] = name


@contextlib.contextmanager
def decoding() -> Iterator[None]:
    """The forward of one generated token: its one-row products use the decode kernel. Everything
    else (a prompt, also a one-position prompt or the last row a prefill's chunking leaves) uses
    the prefill kernel, so a prompt's logits and KV do not depend on how it was cut, and a restored
    prefix plus a suffix sees the numbers a recompute does."""
    before = getattr(_phase, "decode", False)
    _phase.decode = True
    try:
        yield
    finally:
        _phase.decode = before


def in_decoding() -> bool:
    """Whether this thread is inside :func:`decoding` (a helper thread computing part of the
    caller's product enters it too, so both parts use one kernel)."""
    return bool(getattr(_phase, "decode", False))


def decode_kernel() -> str:
    name = _kernel["decode"]
    if name is None:
        name = _kernel["decode"] = _auto_decode()
    return name


def kernels() -> dict[str, str]:
    return {"decode": decode_kernel(), "prefill": str(_kernel["prefill"])}


def _buffer(width: int, floats: int) -> Tensor:
    """This thread's float32 scratch rows of ``width`` columns, about ``floats`` elements (reused)."""
    rows = max(1, floats // width)
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.numel() < rows * width:
        with torch.inference_mode(False):  # a normal tensor: writable inside inference mode and out
            buf = torch.empty(rows * width, dtype=torch.float32)
        _buffers.buf = buf
    return buf[:rows * width].view(rows, width)


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, kernel: str | None = None) -> Tensor:
    """``x (M, K) float32 @ (qweight * scales[:, None]).T -> (M, N) float32``."""
    m = x.shape[0]
    name = kernel or (decode_kernel() if m == 1 and getattr(_phase, "decode", False) else str(_kernel["prefill"]))
    if name == "int8mm":
        return torch._weight_int8pack_mm(x.contiguous(), qweight, scales)
    if name == "int8mm_bf16":
        n = int(qweight.shape[0])
        if n not in _ones:
            with torch.inference_mode(False):
                _ones[n] = torch.ones(n, dtype=torch.bfloat16)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, _ones[n]).float().mul_(scales)
    n, k = qweight.shape
    # One row: blocks small enough to stay in cache. More rows: blocks big enough for BLAS.
    buf = _buffer(k, _BLOCK_FLOATS if m == 1 else _PREFILL_BLOCK_FLOATS)
    step = buf.shape[0]
    if n <= step:
        return F.linear(x, buf[:n].copy_(qweight)).mul_(scales)
    out = torch.empty((m, n), dtype=torch.float32)
    for r0 in range(0, n, step):
        rows = min(step, n - r0)
        w = buf[:rows].copy_(qweight[r0:r0 + rows])
        if m == 1:  # a (1, N) output's column slice is contiguous: write in place
            torch.mm(x, w.t(), out=out[:, r0:r0 + rows])
        else:
            out[:, r0:r0 + rows] = F.linear(x, w)
    return out.mul_(scales)


class Int8Linear(nn.Module):
    """``nn.Linear`` over an int8 weight with one scale per output row; the bias, when the layer
    has one (Qwen2's q, k and v), stays float32."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.packed: Packed | None = None  # the decode's packed copy (mesh.weights.packed), when made

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        packed = self.packed
        if packed is not None and x2.shape[0] == 1 and getattr(_phase, "decode", False):
            y = packed.matmul(x2)
        else:
            y = int8_matmul(x2, self.qweight, self.scales)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


class Int8Embedding(nn.Module):
    """``nn.Embedding`` over int8 rows; ``embed_scale`` (Gemma's sqrt(hidden)) multiplies the
    looked-up rows as ``Gemma3TextScaledWordEmbedding`` does (None: no scaling)."""

    def __init__(self, qweight: Tensor, scales: Tensor, embed_scale: Tensor | None = None,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = (int(s) for s in qweight.shape)
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.embed_scale = embed_scale

    def forward(self, ids: Tensor) -> Tensor:  # (...,) -> (..., K)
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).to(torch.float32) * self.scales.index_select(0, flat)[:, None]
        rows = rows.view(*ids.shape, self.embedding_dim)
        return rows * self.embed_scale if self.embed_scale is not None else rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


def unpack_groups(codes: Tensor, scales: Tensor, mins: Tensor | None, out: Tensor) -> Tensor:
    """Rows of a grouped weight into float32 ``out`` ((R, K), written in place and returned):
    q4 (uint8 codes, two to a byte, with minimums) or grouped int8 (int8 codes, no minimums)."""
    r = codes.shape[0]
    if codes.dtype == torch.uint8:
        half = codes.shape[1]
        out[:, :half].copy_(codes & 15)
        out[:, half:].copy_(codes >> 4)
    else:
        out.copy_(codes)
    g = out.view(r, scales.shape[1], -1).mul_(scales[..., None])
    if mins is not None:
        g.add_(mins[..., None])
    return out


def group_matmul(x: Tensor, codes: Tensor, scales: Tensor, mins: Tensor | None) -> Tensor:
    """``x (M, K) float32 @ dequant(codes, scales, mins).T -> (M, N) float32``."""
    m = x.shape[0]
    n, k = codes.shape[0], x.shape[1]
    buf = _buffer(k, _BLOCK_FLOATS if m == 1 else _PREFILL_BLOCK_FLOATS)
    step = buf.shape[0]
    if n <= step:
        return F.linear(x, unpack_groups(codes, scales, mins, buf[:n]))
    out = torch.empty((m, n), dtype=torch.float32)
    for r0 in range(0, n, step):
        rows = min(step, n - r0)
        w = unpack_groups(codes[r0:r0 + rows], scales[r0:r0 + rows],
                           None if mins is None else mins[r0:r0 + rows], buf[:rows])
        if m == 1:
            torch.mm(x, w.t(), out=out[:, r0:r0 + rows])
        else:
            out[:, r0:r0 + rows] = F.linear(x, w)
    return out


def _width(codes: Tensor) -> int:
    return int(codes.shape[1]) * (2 if codes.dtype == torch.uint8 else 1)


class GroupLinear(nn.Module):
    """``nn.Linear`` over a grouped weight (:mod:`mesh.weights.formats`): q4 codes with
    minimums, or grouped int8 codes without; a bias, if any, stays float32."""

    def __init__(self, codes: Tensor, scales: Tensor, mins: Tensor | None = None, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(codes.shape[0]), _width(codes)
        self.bits = 4 if codes.dtype == torch.uint8 else 8
        # float16 views of the mapped file (a float32 copy of Gemma's embedding scales alone
        # would be 42 MB of anonymous memory): the unpacking multiplies float32 rows by them
        self.register_buffer("qweight", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.mins = mins
        self.register_buffer("bias", bias, persistent=False)
        self.packed: Packed | None = None  # the decode's packed copy (mesh.weights.packed), when made

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        packed = self.packed
        if packed is not None and x2.shape[0] == 1 and getattr(_phase, "decode", False):
            y = packed.matmul(x2)
        else:
            y = group_matmul(x2, self.qweight, self.scales, self.mins)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit groups"


class GroupEmbedding(nn.Module):
    """``nn.Embedding`` over grouped rows; ``embed_scale`` as :class:`Int8Embedding`'s."""

    def __init__(self, codes: Tensor, scales: Tensor, mins: Tensor | None = None, embed_scale: Tensor | None = None,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(codes.shape[0]), _width(codes)
        self.bits = 4 if codes.dtype == torch.uint8 else 8
        self.padding_idx = padding_idx
        self.register_buffer("qweight", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.mins = mins
        self.embed_scale = embed_scale

    def forward(self, ids: Tensor) -> Tensor:  # (...,) -> (..., K)
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), self.embedding_dim), dtype=torch.float32)
        mins = None if self.mins is None else self.mins.index_select(0, flat)
        rows = unpack_groups(self.qweight.index_select(0, flat), self.scales.index_select(0, flat), mins, out)
        rows = rows.view(*ids.shape, self.embedding_dim)
        return rows * self.embed_scale if self.embed_scale is not None else rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits}-bit groups"
