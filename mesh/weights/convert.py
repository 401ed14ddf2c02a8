"""GGUF -> a quantised safetensors file, one tensor (or one block of rows) at a time.

The GGUF's header is parsed by ``gguf.GGUFReader`` (over its memory map); the tensors' bytes are
read with ``pread`` a block of rows at a time and dropped from the page cache once read, so a
memory cgroup (v1 charges a file's cache to the reader) never holds more of the GGUF than one
block. Each tensor is dequantised with the ``gguf``
package (the same call transformers makes for the fp32 copy), passed through transformers' own
per-architecture fix-ups (LLaMA's q/k row permutation, Gemma's norm offset) and name map, then
quantised and appended to the output. Tensors larger than ``block_bytes`` in float32 are
dequantised a block of rows at a time (a GGUF row is a whole number of quantisation blocks), so
the converter's peak is one block, never the whole model and never Gemma's 671 MB fp32
embedding: a Pi Zero can convert its own weights.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesh.errors import ConfigError
from mesh.weights.formats import (EXACT, EXACT_IN_Q4, GRID_IN_Q4, KEEP_8BIT, MINS, Q4_GROUP, QUANT_FORMAT, QWEIGHT,
                                  SCALES, check_format, quantize_groups, quantize_groups8, quantize_groups_on,
                                  quantize_rows)
from mesh.weights.writer import StreamWriter, entry_bytes

BLOCK_BYTES = 4 << 20  # float32 bytes dequantised at once


def _tensor_reader(path: Path) -> Any:
    """A ``gguf.GGUFReader`` that does not materialise the elements of array fields.

    The stock reader makes a numpy view per array element; Gemma-3's 262,144-token vocabulary
    (tokens, scores, types) then costs ~700 MiB before a single tensor is read, more than a Pi
    Zero has. The converter needs only scalar fields and the tensor index, so arrays are
    skipped over (their length walked, nothing kept): such a field keeps its type and length,
    not its contents. Everything else is the library's own parsing."""
    from gguf import GGUFReader, GGUFValueType

    class TensorReader(GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list, list]:  # noqa: ANN001
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, count, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            width = self.gguf_scalar_to_np.get(itype)
            if width is not None:
                offs += count * np.dtype(width).itemsize
            elif itype == GGUFValueType.STRING:
                for _ in range(count):
                    offs += 8 + int(self._get(offs, np.uint64)[0])
            else:  # arrays of arrays: rare and small, parsed in full
                return super()._get_field_parts(orig_offs, raw_type)
            return offs - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]

    return TensorReader(str(path))


def _architecture(reader: Any) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ConfigError("GGUF has no general.architecture; not a model file")
    return bytes(field.parts[field.data[0]]).decode()


def _name_map(config: Any, arch: str) -> tuple[dict[str, str], Any, dict[str, tuple[int, ...]]]:
    """transformers' GGUF -> HF tensor names for ``config``, its tensor processor, and the
    shape the model wants for each HF name.

    The names and shapes are read off the mesh's own model (:mod:`mesh.lm`, built on the meta
    device: no bytes), whose modules carry transformers' names; transformers' model classes
    are not imported (their modules cost ~85 MiB resident, a fifth of a Pi Zero 2W's memory).
    The mapping is transformers' own (``get_gguf_hf_weights_map``) over that module tree;
    tests/weights/test_convert.py checks it equals the one over transformers' model."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    from mesh.lm.config import from_dict
    from mesh.lm.model import CausalLM

    raw = config.to_dict()
    with torch.device("meta"):
        model = CausalLM(from_dict(raw))
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=raw)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = get_gguf_hf_weights_map(model, processor, model_type=config.model_type,
                                    num_layers=config.num_hidden_layers)
    return names, processor, shapes


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:  # the process's own symbols: no ctypes.util.find_library, which runs ldconfig in a subprocess
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed() -> None:
    """Hand the heap's free pages back to the kernel. A block's temporaries (the raw bytes, the
    dequantised floats, torch's intermediates) are freed between small allocations that live on
    (scales, the writer's buffers); glibc keeps such a fragmented heap resident, and over
    Gemma's 80 embedding blocks the converter's anonymous memory grew by ~200 MiB without this
    (measured: results/2026-12-07/setup_peak.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _row_blocks(tensor: Any, whole: bool, block_bytes: int, fd: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_row, raw rows)`` blocks of a GGUF tensor's data (rows = HF output rows), read from
    the open GGUF ``fd``. The reader's own view (``tensor.data``) gives only the dtype and shape:
    none of its pages is touched. A GGUF quantisation block never spans two rows, so a row range
    of the raw bytes dequantises on its own."""
    view = tensor.data
    rows = int(view.shape[0]) if view.ndim > 1 else 1
    width = int(tensor.n_elements) // rows
    step = rows if whole else max(1, block_bytes // (4 * width))
    for r0 in range(0, rows, step):
        yield r0, _read_rows(tensor, fd, r0, min(step, rows - r0))


def _read_rows(tensor: Any, fd: int, r0: int, n: int) -> np.ndarray:
    """Rows ``r0 .. r0 + n`` of the tensor's raw data, read with ``pread`` and then evicted from
    the page cache (the converter reads each byte once)."""
    view = tensor.data
    rows = int(view.shape[0]) if view.ndim > 1 else 1
    row_bytes = int(tensor.n_bytes) // rows
    offset = int(tensor.data_offset) + r0 * row_bytes
    buf = bytearray(n * row_bytes)  # writable: the fix-ups may work in place
    if os.preadv(fd, [buf], offset) != len(buf):
        raise ConfigError(f"the GGUF ends inside tensor {tensor.name}; download it again")
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the whole file: pages of earlier reads the
    # kernel kept (readahead in flight, another CPU's LRU batch) go too
    return np.frombuffer(buf, dtype=view.dtype).reshape((n, *view.shape[1:]) if view.ndim > 1 else view.shape)


def _q4k_grid(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each 32-input sub-block's scale and minimum of Q4_K rows ``raw`` (N, bytes), as the
    dequantiser computes them (``w = d * sc * q - dmin * m``): float32 (N, K/32) ``scales``
    (``d * sc``) and ``mins`` (``-dmin * m``). A Q4_K block of 256 inputs is ``d``, ``dmin``
    (float16), twelve bytes of 6-bit ``sc`` and ``m`` for its eight sub-blocks (unpacked by the
    gguf package), then the codes."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import Q4_K

    _, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    scales = torch.from_numpy(d * sc.astype(np.float32)).reshape(n, -1)
    mins = torch.from_numpy(-(dmin * m.astype(np.float32))).reshape(n, -1)
    return scales, mins


def _pad_to(plan: list[tuple[str, torch.dtype, list[int]]], align: int) -> None:
    """Append a pad entry that brings the planned bytes to a multiple of ``align``."""
    size = sum(entry_bytes(dtype, shape) for _, dtype, shape in plan)
    if size % align:
        plan.append((f"__pad{len(plan)}__", torch.uint8, [-size % align]))


def convert_gguf(gguf_path: Path, out_path: Path, fmt: str, config: Any, metadata: dict[str, str],
                 block_bytes: int = BLOCK_BYTES, plain_fp32: bool = False) -> Path:
    """Write ``out_path`` in weight format ``fmt`` from the GGUF at ``gguf_path``.

    ``config`` is the model's transformers config (names and head counts); ``metadata`` goes
    into the file header (the GGUF digest, the model key) beside the format fields. Returns the
    path; on any error nothing is left under it or under a temporary name.

    ``plain_fp32`` allows ``fmt="fp32"``: every tensor dequantised to float32 under its
    transformers name, a block of rows at a time, in a ``model.safetensors`` transformers loads
    too (``"format": "pt"``); a user's GGUF is set up this way (``nodes.setup_gguf``), never as
    a whole float32 model in memory. The packaged models' fp32 copy is still transformers' own
    (``nodes.setup.convert_model``); both hold the same numbers (the same dequantiser and
    fix-ups)."""
    check_format(fmt)
    if fmt == "fp32" and not plain_fp32:
        raise ConfigError("fp32 weights are saved by transformers, not by the quantising converter")
    reader = _tensor_reader(gguf_path)
    arch = _architecture(reader)
    names, processor, shapes = _name_map(config, arch)
    elementwise = type(processor).__name__ in ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")
    mapped = [(t, names[t.name]) for t in reader.tensors if t.name in names]
    if not mapped:
        raise ConfigError(f"no tensor of {gguf_path.name} maps to a {arch} model")
    for t, hf in mapped:
        have = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if shapes.get(hf) != have:
            raise ConfigError(f"{gguf_path.name}: {t.name} is {have}, the model config wants {shapes.get(hf)} "
                              f"for {hf}; the config does not belong to this GGUF")
    exact = fmt == "q4" and all(t.tensor_type.name in EXACT_IN_Q4 for t, _ in mapped if len(t.shape) == 2)
    header = {**metadata, "mesh_weights": fmt, "mesh_quant_format": str(QUANT_FORMAT), "architecture": arch,
              EXACT: "1" if exact else "0"}
    parsed = {"config": config.to_dict(), "tensors": {}}
    fd = os.open(gguf_path, os.O_RDONLY)
    try:
        if fmt == "fp32":
            return _write_fp32(mapped, out_path, header, names, processor, parsed, elementwise, block_bytes, fd)
        return _write_quantized(mapped, out_path, fmt, header, names, processor, parsed, elementwise, block_bytes, fd)
    finally:
        os.close(fd)


def _write_quantized(mapped: list[tuple[Any, str]], out_path: Path, fmt: str, header: dict[str, str],
                     names: dict[str, str], processor: Any, parsed: dict[str, Any], elementwise: bool,
                     block_bytes: int, fd: int) -> Path:
    """The int8 or q4 file: every 2-D tensor quantised a block of rows at a time (a tensor whose
    fix-up needs all its rows, LLaMA's q/k permutation, whole), the rest as float32."""
    from gguf import dequantize

    quant = [(t, hf) for t, hf in mapped if len(t.shape) == 2]
    plain = [(t, hf) for t, hf in mapped if len(t.shape) != 2]
    q4 = fmt == "q4"
    if q4:
        odd = [hf for t, hf in quant if int(t.shape[0]) % Q4_GROUP]
        if odd:
            raise ConfigError(f"q4 needs every weight's rows to be a multiple of {Q4_GROUP} inputs; "
                              f"{odd[0]} is not: use --weights int8")
    plan: list[tuple[str, torch.dtype, list[int]]] = []
    # The 1-byte codes first, then the scales (and q4's minimums), then the float32 tensors,
    # each run padded so that every tensor starts aligned to its element size.
    eight = {hf for t, hf in quant if q4 and t.tensor_type.name in KEEP_8BIT}  # grouped int8, not 4-bit
    for t, hf in quant:
        k, n = int(t.shape[0]), int(t.shape[1])
        half = q4 and hf not in eight
        plan.append((hf.removesuffix(".weight") + f".{QWEIGHT}", torch.uint8 if half else torch.int8,
                     [n, k // 2 if half else k]))
    _pad_to(plan, 4)
    for t, hf in quant:
        k, n = int(t.shape[0]), int(t.shape[1])
        base = hf.removesuffix(".weight")
        if q4:
            plan.append((f"{base}.{SCALES}", torch.float16, [n, k // Q4_GROUP]))
            if hf not in eight:
                plan.append((f"{base}.{MINS}", torch.float16, [n, k // Q4_GROUP]))
        else:
            plan.append((f"{base}.{SCALES}", torch.float32, [n]))
    _pad_to(plan, 4)
    for t, hf in plain:
        plan.append((hf, torch.float32, [int(x) for x in reversed(t.shape.tolist())]))
    writer = StreamWriter(out_path, plan, header)
    try:
        later: dict[str, torch.Tensor] = {}  # scales and minimums, written after every code
        for t, hf in quant:
            base = hf.removesuffix(".weight")
            whole = not elementwise or ".attn_q." in t.name or ".attn_k." in t.name
            parts: list[tuple[torch.Tensor, ...]] = []
            for _, raw in _row_blocks(t, whole, block_bytes, fd):
                plain_w = dequantize(raw, t.tensor_type)
                w = processor.process(weights=plain_w, name=t.name, tensor_key_mapping=names,
                                      parsed_parameters=parsed).weights
                # a Q4_K tensor the fix-ups left as it is keeps its own codes (GRID_IN_Q4)
                grid = q4 and t.tensor_type.name in GRID_IN_Q4 and np.array_equal(w, plain_w)
                w = torch.from_numpy(np.array(w, dtype=np.float32))
                if grid:
                    codes, *rest = quantize_groups_on(w, *_q4k_grid(raw))
                elif q4:
                    codes, *rest = quantize_groups8(w) if hf in eight else quantize_groups(w)
                else:
                    codes, *rest = quantize_rows(w)
                writer.write(f"{base}.{QWEIGHT}", codes)
                parts.append(tuple(rest))
                del raw, w, plain_w, codes
                _release_freed()
            for i, suffix in enumerate((SCALES, MINS) if q4 and hf not in eight else (SCALES,)):
                later[f"{base}.{suffix}"] = torch.cat([p[i] for p in parts])
        plain_by_name = dict((hf, t) for t, hf in plain)
        for name, _, shape in plan[len(quant):]:  # in plan order: pads, scales, float32 tensors
            if name.startswith("__pad"):
                writer.write(name, torch.zeros(shape, dtype=torch.uint8))
            elif name in later:
                writer.write(name, later.pop(name))
            else:
                t = plain_by_name[name]
                _, raw = next(_row_blocks(t, True, block_bytes, fd))
                w = processor.process(weights=dequantize(raw, t.tensor_type), name=t.name,
                                      tensor_key_mapping=names, parsed_parameters=parsed).weights
                writer.write(name, torch.from_numpy(np.array(w, dtype=np.float32)))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _write_fp32(mapped: list[tuple[Any, str]], out_path: Path, header: dict[str, str], names: dict[str, str],
                processor: Any, parsed: dict[str, Any], elementwise: bool, block_bytes: int, fd: int) -> Path:
    """Every mapped tensor as float32, in GGUF order, a block of rows at a time (a tensor whose
    fix-up needs all its rows, LLaMA's q/k permutation, whole)."""
    from gguf import dequantize

    plan = [(hf, torch.float32, [int(x) for x in reversed(t.shape.tolist())]) for t, hf in mapped]
    writer = StreamWriter(out_path, plan, {**header, "format": "pt"})  # "pt": transformers loads it too
    try:
        for t, hf in mapped:
            whole = not elementwise or ".attn_q." in t.name or ".attn_k." in t.name or len(t.shape) != 2
            for _, raw in _row_blocks(t, whole, block_bytes, fd):
                w = processor.process(weights=dequantize(raw, t.tensor_type), name=t.name,
                                      tensor_key_mapping=names, parsed_parameters=parsed).weights
                writer.write(hf, torch.from_numpy(np.array(w, dtype=np.float32)))
                del raw, w
                _release_freed()
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
