"""Weight formats a node can run, and the per-row int8 quantisation they are built with.

- ``fp32``: the GGUF dequantised to float32, saved by transformers (``model.safetensors``).
- ``int8``: every 2-D weight (each linear layer, the embedding and so a tied LM head) as int8
  with one float32 scale per output row (symmetric: ``w ~= q * scale``, ``q`` in -127..127);
  1-D tensors (norms) stay float32. One safetensors file, ``weights-int8.safetensors``, that the
  node memory-maps: ``<name>.qweight`` (int8, (N, K)) and ``<name>.scales`` (float32, (N,)) for
  each quantised weight ``<name>.weight``, plain names for the rest.

- ``q4``: every 2-D weight as 4-bit codes in groups of :data:`Q4_GROUP` consecutive inputs of a
  row, each group with a float16 scale and minimum (asymmetric: ``w ~= q * scale + min``, ``q``
  in 0..15; GGUF's Q4_1 layout). ``<name>.qweight`` (uint8, (N, K/2): the code of column ``j``
  in the low nibble, of column ``j + K/2`` in the high one, so unpacking writes two contiguous
  halves), ``<name>.scales`` and ``<name>.mins`` (float16,
  (N, K/32)). A model shipped as Q4_1 (SmolLM2) keeps its own blocks exactly: its groups are
  GGUF's blocks, the scale and minimum re-derived from a block's extremes are the block's own
  float16 values, and ``q * scale + min`` is the dequantiser's own arithmetic, so the weights
  equal the fp32 copy's bit for bit. A tensor the GGUF holds in 8 bits or more (Q8_0, as both
  models' embeddings are; F16, F32) stays 8-bit: int8 codes with one float16 scale per group of 32
  (GGUF's Q8_0 layout, symmetric: ``w ~= q * scale``; ``<name>.qweight`` int8 (N, K) and
  ``<name>.scales`` float16 (N, K/32), no minimums), which keeps a Q8_0 block bit for bit too. So
  SmolLM2 in q4 *is* its GGUF: the same weights as fp32. A type of more than 4 bits (Gemma-3's
  Q5_0 and Q6_K layers) stays 8-bit the same way; a Q4_K tensor (Gemma-3's o and half of its down
  projections, most of a user's Q4_K_M file) keeps its codes, each 32-input sub-block's scale and
  minimum rounded to float16 (:func:`quantize_groups_on`): Gemma-3 in q4 is fp32 within that
  rounding (wiki perplexity x0.995; re-quantised to 4 bits it was x1.14). Other types (Q4_0, Q2_K,
  Q3_K...) are re-quantised to 4 bits.

Per output row fits both uses of the embedding: a row of the embedding is a row (an output
channel) of the tied LM head, so one scale per row (int8) or per row and group (q4) serves the
lookup and the matmul alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mesh.errors import ConfigError

WEIGHT_FORMATS = ("fp32", "int8", "q4")
DEFAULT_WEIGHTS = "fp32"  # what a node runs unless told otherwise (this machine: exact answers)
SETUP_WEIGHTS = ("fp32", "int8", "q4")  # what `mesh setup` builds unless told otherwise
# The format that fits each testbed device profile: fp32 where it fits (exact answers), else a
# smaller one. The Pi Zero 2W's 400 MiB hold SmolLM2 in q4 (its GGUF's own weights), not in int8
# (results/2026-12-07/bench-memory-pi-zero-smollm2.json).
PROFILE_WEIGHTS = {"native": "fp32", "pi5": "fp32", "pi4-2gb": "int8", "pi-zero-2w": "q4"}
QUANT_FORMAT = 4  # bump when the layout of a quantised file changes (old files are rebuilt); 3: ``mesh_exact``; 4: q4 keeps Q4_K codes, >4-bit types at 8 bits

QWEIGHT, SCALES, MINS = "qweight", "scales", "mins"  # suffixes of a quantised weight's tensors
Q4_GROUP = 32  # inputs per q4 group (GGUF's Q4_0/Q4_1/Q8_0 block)
# GGUF tensor types that q4 keeps at 8 bits (grouped int8): more than 4 bits (Gemma-3's Q5_0 and
# Q6_K layers re-quantised to 4 bits cost it 14 % of perplexity over fp32).
KEEP_8BIT = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K", "F16", "BF16", "F32", "F64"})
# GGUF tensor types q4 keeps bit for bit (its groups are their blocks). A q4 file all of whose
# weights are of these types holds the GGUF's own weights; its header says so (``mesh_exact``
# "1"), and a node keeps the kernels that compute with them exactly (mesh.weights.packed).
EXACT_IN_Q4 = frozenset({"Q4_1", "Q8_0"})
# GGUF tensor types whose 4-bit codes q4 takes as they are, with each 32-input sub-block's scale
# and minimum rounded to float16 (mesh.weights.convert reads them from the blocks)
GRID_IN_Q4 = frozenset({"Q4_K"})
EXACT = "mesh_exact"  # the header field


def check_format(name: str) -> str:
    """``name`` if it is a known weight format, else a ConfigError naming the choices."""
    if name not in WEIGHT_FORMATS:
        raise ConfigError(f"unknown weight format {name!r}; use --weights {' or '.join(WEIGHT_FORMATS)}")
    return name


def parse_formats(text: str) -> tuple[str, ...]:
    """``"fp32,int8"`` -> ``("fp32", "int8")``, each checked, in order, without repeats."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"no weight format in {text!r}; use --weights {','.join(WEIGHT_FORMATS)}")
    return tuple(check_format(n) for n in names)


def weights_file(model_dir: Path, fmt: str) -> Path:
    """Where the weights of format ``fmt`` live inside a converted model directory."""
    check_format(fmt)
    return Path(model_dir) / ("model.safetensors" if fmt == "fp32" else f"weights-{fmt}.safetensors")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a float (N, K) matrix: ``(q int8 (N, K), scales float32 (N,))``.

    The scale is the row's largest magnitude over 127, so the largest weight is exact in
    magnitude and every other is off by at most half a step; an all-zero row gets scale 1
    (its q is all zero, any scale restores it)."""
    w = w.to(torch.float32)
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 matrix an int8 weight stands for (reference arithmetic for tests)."""
    return q.to(torch.float32) * scales[:, None]


def quantize_groups(w: torch.Tensor, group: int = Q4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit of a float (N, K) matrix in groups of ``group`` inputs:
    ``(packed uint8 (N, K/2), scales float16 (N, K/group), mins float16 (N, K/group))``.

    A group's minimum maps to code 0 and its maximum to 15; the codes are computed against the
    float16 scale and minimum that are stored, so the error is at most half a step of what the
    node computes with."""
    w = w.to(torch.float32)
    n, k = w.shape
    if k % group or group % 2:
        raise ValueError(f"q4 needs rows of a multiple of {group} inputs, got {k}")
    g = w.view(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    mins = lo.to(torch.float16)
    scales = ((hi - lo) / 15.0).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.full_like(scales, 2.0 ** -24))  # a flat group: all code 0
    q = torch.round((g - mins.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.view(n, k)
    return q[:, :k // 2] | (q[:, k // 2:] << 4), scales, mins


def quantize_groups_on(w: torch.Tensor, scales: torch.Tensor,
                       mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_groups` on a grid the weight already lies on: ``w = q * scale + min`` with
    integer ``q`` in 0..15 for the given float32 ``scales`` and ``mins`` (N, K/group), as a GGUF
    Q4_K sub-block's values do. The codes are the GGUF's own; what is lost is the rounding of the
    scale and minimum to float16 (relative 2**-11), not re-quantising to a new grid."""
    w = w.to(torch.float32)
    n, k = w.shape
    group = k // scales.shape[1]
    g = w.view(n, k // group, group)
    flat = scales <= 0
    safe = torch.where(flat, torch.ones_like(scales), scales)
    q = torch.round((g - mins[..., None]) / safe[..., None]).clamp_(0, 15)
    q = torch.where(flat[..., None], torch.zeros_like(q), q).to(torch.uint8).view(n, k)
    stored = torch.where(flat, torch.full_like(scales, 2.0 ** -24), scales).to(torch.float16)
    return q[:, :k // 2] | (q[:, k // 2:] << 4), stored, mins.to(torch.float16)


def dequantize_groups(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The float32 matrix a q4 weight stands for (reference arithmetic for tests)."""
    n, half = packed.shape
    q = torch.cat((packed & 15, packed >> 4), dim=1).float()
    groups = scales.shape[1]
    q = q.view(n, groups, -1)
    return (q * scales.float()[..., None] + mins.float()[..., None]).view(n, 2 * half)


def quantize_groups8(w: torch.Tensor, group: int = Q4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a float (N, K) matrix in groups of ``group`` inputs:
    ``(codes int8 (N, K), scales float16 (N, K/group))``, the scale a group's largest magnitude
    over 127 (GGUF's Q8_0); codes are computed against the stored float16 scale."""
    w = w.to(torch.float32)
    n, k = w.shape
    if k % group:
        raise ValueError(f"grouped int8 needs rows of a multiple of {group} inputs, got {k}")
    g = w.view(n, k // group, group)
    scales = (g.abs().amax(dim=2) / 127.0).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.full_like(scales, 2.0 ** -24))
    q = torch.round(g / scales.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(n, k), scales


def dequantize_groups8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    return (codes.float().view(n, scales.shape[1], -1) * scales.float()[..., None]).view(n, k)
