"""Where a HALO worker's neuron groups come from: a loaded model, or the weight file itself.

A worker serves partials (:meth:`mesh.halo.groups.GroupWeights.partial`) of the groups a plan
gives it, and nothing else of the model. Two sources cut those groups:

- :class:`ModelGroups`: a node that also answers asks has the model loaded; its groups are
  sliced out of the model's fp32 MLPs (:func:`mesh.halo.groups.extract_groups`).
- :class:`FileGroups`: a worker-only node (``mesh node --roles worker --no-answer``) loads no
  model: no embedding, attention, LM head or tokenizer, no transformers. Per plan and per layer it
  maps the node's weight file (``mesh.weights.mapped``), copies its groups' rows of gate and up and
  columns of down, dequantised to float32 where the file is quantised, and closes the mapping
  before the next layer, so neither the file's pages nor a whole MLP are ever resident at once.

Both cut the same neurons for the same plan: group positions in the plan's neuron order
(``order[i]``: the model's original neuron at position ``i``), taken from a file in the original
order, so an fp32 file gives bitwise the weights :func:`~mesh.halo.groups.extract_groups` gives.
Quantised slices are dequantised by :func:`rows_of` and :func:`columns_of`, from the mapped file
or from the loaded model's int8/q4 modules alike (the same codes: the same float32 numbers, bit
for bit), with the arithmetic the full model's stand-in modules use on them
(``mesh.weights.formats.dequantize_rows``, ``mesh.weights.modules.unpack_groups``). So the HALO
coordinator, which cuts its own groups and its fallback's out of its loaded model in any format
(:class:`ModelGroups`), computes with the numbers a worker of the same format would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mesh.errors import ConfigError
from mesh.halo import groups as split
from mesh.weights.formats import MINS, QWEIGHT, SCALES, check_format, dequantize_rows, weights_file

#: How the converted weight files name a decoder layer's MLP projections.
MLP_PREFIX = "model.layers.{layer}.mlp.{proj}"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class GroupSource(Protocol):
    """What a :class:`mesh.halo.worker.HaloWorker` cuts its groups from."""

    model_key: str
    layout: split.GroupLayout
    n_layers: int
    hidden_size: int

    def read(self, layer: int, groups: Sequence[int], order: Tensor | Sequence[int] | None = None
             ) -> split.GroupWeights: ...


class ModelGroups:
    """Groups cut out of a loaded model's MLP modules, in any weight format: an fp32 model's rows
    and columns (:func:`mesh.halo.groups.extract_groups`, which also follows a model permuted in
    place), an int8 or q4 model's codes dequantised to float32 (:func:`rows_of`,
    :func:`columns_of`: bitwise what :class:`FileGroups` reads from the same file). Copies only
    the groups asked for: no float32 copy of a quantised MLP is ever held."""

    def __init__(self, loaded: Any, group_size: int = split.DEFAULT_GROUP_SIZE) -> None:
        self.model = loaded.model
        self.model_key: str = loaded.model_key
        self.layout = split.model_layout(self.model.config, group_size)
        # the MLP modules as loaded: groups are read from them while the model runs routed too
        self.mlps = [layer.mlp for layer in split.decoder_layers(self.model)]
        self.n_layers = len(self.mlps)
        self.hidden_size = int(split.text_config(self.model.config).hidden_size)
        self.act = split.mlp_act_name(self.model.config)

    def read(self, layer: int, groups: Sequence[int], order: Tensor | Sequence[int] | None = None
             ) -> split.GroupWeights:
        mlp = self.mlps[layer]
        if all(isinstance(getattr(mlp, p), nn.Linear) for p in PROJECTIONS):
            return split.extract_groups(self.model, layer, groups, self.layout, order, mlp)
        want = self.layout.neuron_index(groups)  # positions in ``order``
        rows = want if order is None else split.check_order(order, self.layout.intermediate_size)[want]  # (n,)
        with torch.inference_mode():
            gate, up = (rows_of(_codes(getattr(mlp, p)), rows) for p in ("gate_proj", "up_proj"))  # (n, H)
            down = columns_of(_codes(mlp.down_proj), rows)  # (H, n)
            gate_bias, up_bias = (_bias_rows(getattr(mlp, p), rows) for p in ("gate_proj", "up_proj"))
        return split.GroupWeights(layer=layer, groups=tuple(int(g) for g in groups), sizes=self.layout.sizes(groups),
                                  act=self.act, gate=gate, up=up, down=down, gate_bias=gate_bias, up_bias=up_bias)


#: A projection's weight as stored: ``(weight,)`` float32, ``(codes, scales)`` int8 per row or
#: grouped int8, ``(codes, scales, mins)`` q4.
Stored = tuple[Tensor, ...]


def _codes(module: nn.Module) -> Stored:
    """What a projection module computes with, as stored (nn.Linear, or an int8/q4 stand-in)."""
    if isinstance(module, nn.Linear):
        return (module.weight.detach(),)
    mins = getattr(module, "mins", None)
    return (module.qweight, module.scales) if mins is None else (module.qweight, module.scales, mins)


def _bias_rows(module: nn.Module, rows: Tensor) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().index_select(0, rows).to(torch.float32)


def rows_of(stored: Stored, rows: Tensor) -> Tensor:
    """Rows ``rows`` (n,) of a stored (N, K) weight as owned float32: (n, K)."""
    if len(stored) == 1:
        return stored[0].index_select(0, rows)
    codes, scales = stored[0].index_select(0, rows), stored[1].index_select(0, rows)
    if scales.dim() == 1:  # int8, one scale per row
        return dequantize_rows(codes, scales)
    return _unpack(codes, scales, stored[2].index_select(0, rows) if len(stored) > 2 else None)


def columns_of(stored: Stored, cols: Tensor) -> Tensor:
    """Columns ``cols`` (n,) of a stored (N, K) weight as owned float32: (N, n). A grouped weight's
    groups run along its columns: each column is unpacked from its byte and nibble with its group's
    scale (and minimum), the same float32 operations :func:`mesh.weights.modules.unpack_groups`
    does on the whole row, so bitwise its columns without dequantising the whole matrix."""
    if len(stored) == 1:
        return stored[0].index_select(1, cols)
    codes, scales = stored[0], stored[1]
    if scales.dim() == 1:  # int8 per row: a column's codes with its rows' scales
        return dequantize_rows(codes.index_select(1, cols), scales)
    group = _width(codes) // int(scales.shape[1])  # inputs per group
    if codes.dtype == torch.uint8:  # two codes a byte: column j < K/2 low nibble of byte j, else high of j - K/2
        half = int(codes.shape[1])
        high = cols >= half
        picked = codes.index_select(1, cols - high.long() * half)  # (N, n)
        q = torch.where(high, picked >> 4, picked & 15).to(torch.float32)
    else:
        q = codes.index_select(1, cols).to(torch.float32)
    out = q.mul_(scales.index_select(1, cols // group))  # float16 scales: multiplied in float32
    if len(stored) > 2:
        out.add_(stored[2].index_select(1, cols // group))
    return out


def _width(codes: Tensor) -> int:
    return int(codes.shape[1]) * (2 if codes.dtype == torch.uint8 else 1)


def groups_of(loaded: Any, model_dir: Path, group_size: int = split.DEFAULT_GROUP_SIZE) -> GroupSource:
    """Where a node that answers asks cuts its HALO groups: out of its loaded model in fp32, from
    its weight file in a quantised format (the loaded int8/q4 modules hold codes, not the float32
    rows a partial multiplies; the file gives the same weights, checked when the model loaded)."""
    if loaded.weights == "fp32":
        return ModelGroups(loaded, group_size)
    return FileGroups(model_dir, loaded.key, loaded.weights, group_size, verify=False)


class FileGroups:
    """Groups read from a converted model's weight file of format ``weights`` (fp32
    ``model.safetensors``, ``weights-int8.safetensors`` or ``weights-q4.safetensors``), as float32.

    The model key is the one a full node of the same model and format computes
    (:func:`mesh.model.model_key`, from ``mesh-meta.json``); shapes and the activation come from
    ``config.json`` (:mod:`mesh.lm.config`). Opening checks that every layer's projections are
    in the file with the shapes the config says, and for a quantised file its header (format,
    layout, GGUF digest and, with ``verify``, its bytes), so a bad file fails at start, not at the
    first plan.
    """

    def __init__(self, model_dir: Path, key: str, weights: str = "fp32",
                 group_size: int = split.DEFAULT_GROUP_SIZE, verify: bool = True) -> None:
        from mesh.lm.config import load_config
        from mesh.model import model_key, read_meta
        from mesh.weights.mapped import drop_cached, read_header

        self.weights = check_format(weights)
        meta = read_meta(model_dir, key)
        self.model_key = model_key(key, meta, weights)
        config = load_config(model_dir)
        self.act = split.mlp_act_name(config)
        self.layout = split.model_layout(config, group_size)
        self.n_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.path = weights_file(model_dir, weights)
        if not self.path.exists():
            raise ConfigError(f"no {weights} weights at {self.path}; run `mesh setup --weights {weights}`")
        self.header = read_header(self.path)
        if weights != "fp32":
            from mesh.weights.load import check_metadata

            check_metadata(self.path, weights, self.header.metadata, str(meta["gguf_sha256"]), verify)
            if verify:  # the digest read the whole file: none of it is needed until the first plan
                drop_cached(self.path)
        for layer in range(self.n_layers):
            for proj in PROJECTIONS:
                self._check(layer, proj)

    def _name(self, layer: int, proj: str, part: str) -> str:
        return f"{MLP_PREFIX.format(layer=layer, proj=proj)}.{part}"

    def _check(self, layer: int, proj: str) -> None:
        i, h = self.layout.intermediate_size, self.hidden_size
        want = (h, i) if proj == "down_proj" else (i, h)
        entries = self.header.entries
        plain = entries.get(self._name(layer, proj, "weight"))
        codes = entries.get(self._name(layer, proj, QWEIGHT))
        if plain is not None:
            shape = plain.shape
            ok = plain.dtype == torch.float32
        elif codes is not None and self._name(layer, proj, SCALES) in entries:
            q4 = codes.dtype == torch.uint8
            shape = (codes.shape[0], codes.shape[1] * (2 if q4 else 1))
            ok = codes.dtype in (torch.uint8, torch.int8) and (not q4 or self._name(layer, proj, MINS) in entries)
        else:
            raise ConfigError(f"{self.path} has no {proj} of layer {layer}; run `mesh setup --weights {self.weights}`")
        if not ok or tuple(shape) != want:
            raise ConfigError(f"{self.path}: {proj} of layer {layer} is {tuple(shape)}, the config wants {want}")

    def read(self, layer: int, groups: Sequence[int], order: Tensor | Sequence[int] | None = None
             ) -> split.GroupWeights:
        """Owned float32 copies of ``groups``' weights at ``layer``, cut in neuron ``order``
        (original neuron ids per position; None: the original order)."""
        from mesh.weights.mapped import Mapping

        if not 0 <= layer < self.n_layers:
            raise ConfigError(f"layer {layer} out of range 0..{self.n_layers - 1}")
        want = self.layout.neuron_index(groups)  # positions in ``order``
        rows = want if order is None else split.check_order(order, self.layout.intermediate_size)[want]  # (n,)
        with torch.inference_mode(), Mapping(self.path, self.header) as m:
            gate = self._rows(m, layer, "gate_proj", rows)  # (n, H)
            up = self._rows(m, layer, "up_proj", rows)  # (n, H)
            down = self._columns(m, layer, rows)  # (H, n)
            gate_bias, up_bias = (self._bias(m, layer, p, rows) for p in ("gate_proj", "up_proj"))
        return split.GroupWeights(layer=layer, groups=tuple(int(g) for g in groups), sizes=self.layout.sizes(groups),
                                  act=self.act, gate=gate, up=up, down=down, gate_bias=gate_bias, up_bias=up_bias)

    # Each helper returns owned tensors only: the mapping closes when ``read`` leaves its block.
    def _stored(self, m: Any, layer: int, proj: str) -> Stored:
        name = self._name(layer, proj, "weight")
        if m.has(name):
            return (m.tensor(name),)
        mins_name = self._name(layer, proj, MINS)
        return (m.tensor(self._name(layer, proj, QWEIGHT)), m.tensor(self._name(layer, proj, SCALES)),
                *((m.tensor(mins_name),) if m.has(mins_name) else ()))

    def _rows(self, m: Any, layer: int, proj: str, rows: Tensor) -> Tensor:
        return rows_of(self._stored(m, layer, proj), rows)

    def _columns(self, m: Any, layer: int, cols: Tensor) -> Tensor:
        return columns_of(self._stored(m, layer, "down_proj"), cols)

    def _bias(self, m: Any, layer: int, proj: str, rows: Tensor) -> Tensor | None:
        name = self._name(layer, proj, "bias")
        return m.tensor(name).index_select(0, rows).to(torch.float32) if m.has(name) else None


def _unpack(codes: Tensor, scales: Tensor, mins: Tensor | None) -> Tensor:
    """Grouped rows (q4, or q4's grouped int8) to float32, as the full model's modules unpack them."""
    from mesh.weights.modules import unpack_groups

    width = int(codes.shape[1]) * (2 if codes.dtype == torch.uint8 else 1)
    return unpack_groups(codes, scales, mins, torch.empty((int(codes.shape[0]), width), dtype=torch.float32))
