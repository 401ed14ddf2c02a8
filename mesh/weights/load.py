"""Build a model around a weight file, memory-mapped, with no float32 copy of a quantised weight.

The model is constructed with its parameters on the meta device (module tree, no weight bytes):
a node's or HALO coordinator's :class:`mesh.lm.model.CausalLM` (:func:`load_lm`), or a
transformers model for the reference tests (:func:`build_model`). :func:`attach` then replaces each
quantised ``nn.Linear`` / ``nn.Embedding`` by its int8 stand-in (:mod:`mesh.weights.modules`) over
views of the mapped file and attaches the other tensors (fp32 weights, norms) by name. A tied LM
head shares the embedding's rows.

A file that is missing, truncated, damaged, of another format or built from another GGUF is
refused with a :class:`~mesh.errors.ConfigError` that says what to run; nothing is repaired in
place.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn

from mesh.errors import ConfigError
from mesh.weights.formats import EXACT, MINS, QUANT_FORMAT, QWEIGHT, SCALES, weights_file
from mesh.weights.modules import GroupEmbedding, GroupLinear, Int8Embedding, Int8Linear
from mesh.weights.writer import DATA_DIGEST


def _fix(path: Path, fmt: str) -> str:
    return f"delete {path} and run `mesh setup --weights {fmt}` (or run the node with --weights fp32)"


def _data_digest(path: Path) -> str:
    """xxh3-128 of the bytes after the header (what the writer recorded)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        (n,) = struct.unpack("<Q", m[:8])
        h = xxhash.xxh3_128()
        view, step = memoryview(m), 16 << 20
        try:
            for at in range(8 + n, len(m), step):
                h.update(view[at:at + step])  # a view of the mapping: no copy
        finally:
            view.release()
        return h.hexdigest()


def open_weights(path: Path, fmt: str, gguf_sha256: str, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a quantised weight file, memory-mapped, after checking what it claims."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise ConfigError(f"no {fmt} weights at {path}; run `mesh setup --weights {fmt}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"weight file {path} is truncated or damaged ({exc}); {_fix(path, fmt)}") from None
    check_metadata(path, fmt, meta, gguf_sha256, verify)
    return tensors


def check_metadata(path: Path, fmt: str, meta: dict[str, str], gguf_sha256: str, verify: bool = True) -> None:
    """A ConfigError unless the quantised file at ``path`` (its header's ``meta``) holds ``fmt``
    weights of the current layout built from the GGUF ``gguf_sha256``; ``verify`` also hashes its
    bytes against the digest in its header (through a mapping closed afterwards)."""
    if meta.get("mesh_weights") != fmt or meta.get("mesh_quant_format") != str(QUANT_FORMAT):
        raise ConfigError(f"{path} holds {meta.get('mesh_weights')!r} weights of layout "
                          f"{meta.get('mesh_quant_format')!r}, not {fmt!r} layout {QUANT_FORMAT}; {_fix(path, fmt)}")
    if meta.get("gguf_sha256") != gguf_sha256:
        raise ConfigError(f"{path} was built from another GGUF than the converted model; {_fix(path, fmt)}")
    if verify and meta.get(DATA_DIGEST) != _data_digest(path):
        raise ConfigError(f"weight file {path} is damaged (its bytes do not match the digest in its header); "
                          f"{_fix(path, fmt)}")


def holds_gguf_weights(path: Path) -> bool:
    """Whether the quantised file at ``path`` holds its GGUF's own weights bit for bit (its header's
    ``mesh_exact``, written at conversion: a q4 file of Q4_1 and Q8_0 tensors); False for fp32,
    int8, a re-quantised q4 or a file that cannot be read (the loader says why)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(EXACT) == "1"
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _open_plain(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an fp32 ``model.safetensors`` (as transformers saved it), memory-mapped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise ConfigError(f"no fp32 weights at {path}; run `mesh setup`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"weight file {path} is truncated or damaged ({exc}); delete it and run `mesh setup`") from None


def attach(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> nn.Module:
    """Give ``model`` (built on the meta device) the tensors of a weight file, by name: quantised
    layers become their int8 stand-ins over views of the file, the rest are attached as they are;
    a tied LM head shares the embedding's rows. Every parameter and buffer must end up real."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, module in list(model.named_modules()):
        q, s = tensors.get(f"{name}.{QWEIGHT}"), tensors.get(f"{name}.{SCALES}")
        if q is None or s is None:
            continue
        mins = tensors.get(f"{name}.{MINS}")
        q4 = q.dtype == torch.uint8
        grouped = q4 or s.dim() == 2  # q4, or grouped int8 (q4's 8-bit tensors); else int8 per row
        if q4 and mins is None:
            raise ConfigError(f"{path}: {name} has 4-bit codes but no minimums; {_fix(path, fmt)}")
        shape = (int(q.shape[0]), int(q.shape[1]) * (2 if q4 else 1))
        if shape != tuple(module.weight.shape):
            raise ConfigError(f"{path}: {name} is {shape}, the model wants "
                              f"{tuple(module.weight.shape)}; {_fix(path, fmt)}")
        if isinstance(module, nn.Embedding):
            scale = getattr(module, "embed_scale", None)
            scale = scale if isinstance(scale, torch.Tensor) else None
            new: nn.Module = (GroupEmbedding(q, s, mins, scale, module.padding_idx) if grouped else
                              Int8Embedding(q, s, scale, module.padding_idx))
        elif isinstance(module, nn.Linear):
            bias = None
            if module.bias is not None:  # Qwen2's q, k and v: a float32 bias beside the codes
                bias = tensors.get(f"{name}.bias")
                if bias is None or tuple(bias.shape) != tuple(module.bias.shape):
                    raise ConfigError(f"{path} has no usable tensor {name}.bias for this model; {_fix(path, fmt)}")
            new = GroupLinear(q, s, mins, bias) if grouped else Int8Linear(q, s, bias)
        else:
            raise ConfigError(f"{fmt} weights for {name} ({type(module).__name__}) cannot be used; "
                              f"run the node with --weights fp32")
        _set_module(model, name, new)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(head, nn.Linear) and tied and isinstance(embed, Int8Embedding):
        model.lm_head = Int8Linear(embed.qweight, embed.scales)  # the tied head: the same int8 rows
    elif isinstance(head, nn.Linear) and tied and isinstance(embed, GroupEmbedding):
        model.lm_head = GroupLinear(embed.qweight, embed.scales, embed.mins)
    for name, param in list(model.named_parameters()):
        if name == "lm_head.weight" and tied and name not in tensors:
            continue  # tied below, once the embedding is real
        t = tensors.get(name)
        if t is None or tuple(t.shape) != tuple(param.shape):
            raise ConfigError(f"{path} has no usable tensor {name} for this model; {_fix(path, fmt)}")
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding):
        head.weight = embed.weight  # the tied head: the same rows
    left = [n for n, b in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
            if b.device.type == "meta"]
    if left:
        raise ConfigError(f"{path} leaves {left[:3]} unset; {_fix(path, fmt)}")
    model.eval()
    return model


def build_model(config: Any, tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> nn.Module:
    """A transformers causal LM for ``config`` running on ``tensors`` (the reference tests; every
    process runs :func:`load_lm`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return attach(model, tensors, path, fmt)


def load_lm(model_dir: Path, fmt: str, config: Any, gguf_sha256: str, verify: bool = True) -> nn.Module:
    """The model in ``model_dir`` as :class:`mesh.lm.model.CausalLM` over its ``fmt`` weights,
    memory-mapped, no transformers."""
    from mesh.lm.model import CausalLM

    path = weights_file(model_dir, fmt)
    tensors = _open_plain(path) if fmt == "fp32" else open_weights(path, fmt, gguf_sha256, verify)
    with torch.device("meta"):
        model = CausalLM(config)
    attach(model, tensors, path, fmt)
    return model.prepare()


def load_quantized(model_dir: Path, fmt: str, config: Any, gguf_sha256: str, verify: bool = True) -> nn.Module:
    """The model in ``model_dir`` with its ``fmt`` weights (see :func:`build_model`)."""
    path = weights_file(model_dir, fmt)
    return build_model(config, open_weights(path, fmt, gguf_sha256, verify), path, fmt)
