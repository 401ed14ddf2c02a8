"""Neuron groups: the HALO split of every MLP layer, its partial down-projection and reduce.

A gated MLP (LLaMA's SiLU, Gemma-3's gelu_pytorch_tanh) computes, for an input ``x`` (the hidden
state after the pre-MLP norm)::

    h    = act(x @ gate.T) * (x @ up.T)      # (..., I)
    out  = h @ down.T                        # (..., H)

Because ``out = sum_g h[..., g] @ down[:, g].T`` over any partition of the ``I`` intermediate
neurons, the split is pure slicing: a group set takes the *rows* of gate and up and the *columns* of
down, its partial is the down-projection of just those neurons, and the one reduce point is a sum.
A partial that never arrived counts as zero (relaxed sync): the sum is then the MLP output with
those groups' contributions dropped. A down-projection bias (LLaMA ``mlp_bias``) is not part of
any partial; it is added once, at the reduce.

Neuron groups are contiguous *positions*: group ``g`` holds positions ``[g * size, min((g + 1) *
size, I))``, so the last group may be smaller. Group ids are the same in every layer. Which neuron
sits at a position is a *neuron order*: by default the model's own, else a permutation per layer
(``order[i]`` = the model's original neuron id at position ``i``). Because the sum runs over any
partition, reordering is exact; it matters because contiguous neurons of the original order
average importance out, while neurons sorted by measured importance make genuinely cold groups
that a lossy worker can hold at little cost. :func:`permute_neurons` reorders an fp32 model in place
(``mesh halo train-predictor``, which records the order with the predictor) and records the order;
:func:`extract_groups` with an ``order`` slices the right neurons out of a model in any order (a
worker, or the coordinator, whose model is in the original order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NewType

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mesh.errors import ConfigError
from mesh.lm.model import ACT_FNS

GroupId = NewType("GroupId", int)

#: ``fn(layer, x) -> mlp_out``: what a routed forward calls instead of a layer's MLP.
MlpFn = Callable[[int, Tensor], Tensor]

DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class GroupLayout:
    """How one MLP layer's ``intermediate_size`` neurons are cut into groups."""

    intermediate_size: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.intermediate_size <= 0 or self.group_size <= 0:
            raise ConfigError(f"bad group layout {self.intermediate_size}/{self.group_size}")

    @property
    def n_groups(self) -> int:
        return -(-self.intermediate_size // self.group_size)

    def bounds(self, group: int) -> tuple[int, int]:
        """Neuron range ``[start, stop)`` of ``group``."""
        if not 0 <= group < self.n_groups:
            raise ConfigError(f"group {group} out of range 0..{self.n_groups - 1}")
        start = group * self.group_size
        return start, min(start + self.group_size, self.intermediate_size)

    def sizes(self, groups: Sequence[int]) -> tuple[int, ...]:
        return tuple(b - a for a, b in (self.bounds(g) for g in groups))

    def neuron_index(self, groups: Sequence[int]) -> Tensor:
        """Neuron ids of ``groups`` in the order given: a long tensor of shape (n,)."""
        if len(set(groups)) != len(groups):
            raise ConfigError("duplicate group ids")
        parts = [torch.arange(*self.bounds(g)) for g in groups]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def text_config(config: object) -> object:
    """The text part of a (possibly multimodal) HF config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def mlp_act_name(config: object) -> str:
    """The MLP activation of a config (Gemma-3: ``hidden_activation``, LLaMA: ``hidden_act``)."""
    cfg = text_config(config)
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if not isinstance(name, str) or name not in ACT_FNS:
        raise ConfigError(f"unknown MLP activation {name!r}")
    return name


def model_layout(config: object, group_size: int = DEFAULT_GROUP_SIZE) -> GroupLayout:
    """The group layout shared by every MLP layer of a model."""
    size = getattr(text_config(config), "intermediate_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"need one int intermediate_size for every layer, got {size!r}")
    return GroupLayout(size, group_size)


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The decoder layers (each with an ``.mlp``) of an HF causal LM."""
    get = getattr(model, "get_decoder", None)
    base = get() if callable(get) else model
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ConfigError(f"{type(model).__name__} has no decoder layers with an .mlp")
    return layers


@dataclass(frozen=True, eq=False)
class GroupWeights:
    """The weights of a set of neuron groups of one layer: all a worker needs for its partial.

    ``gate``/``up`` hold the groups' rows and ``down`` their columns, concatenated in the order of
    ``groups``; ``sizes[i]`` is the neuron count of ``groups[i]``.
    """

    layer: int
    groups: tuple[int, ...]
    sizes: tuple[int, ...]
    act: str
    gate: Tensor  # (n, H)
    up: Tensor  # (n, H)
    down: Tensor  # (H, n)
    gate_bias: Tensor | None = None  # (n,)
    up_bias: Tensor | None = None  # (n,)

    @property
    def n_neurons(self) -> int:
        return int(self.gate.shape[0])

    @property
    def nbytes(self) -> int:
        tensors = [self.gate, self.up, self.down, self.gate_bias, self.up_bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def activations(self, x: Tensor) -> Tensor:
        """``act(x @ gate.T) * (x @ up.T)``: (..., H) -> (..., n)."""
        act = ACT_FNS[self.act]
        return act(F.linear(x, self.gate, self.gate_bias)) * F.linear(x, self.up, self.up_bias)

    def partial(self, x: Tensor) -> Tensor:
        """This group set's share of the down-projection (no down bias): (..., H) -> (..., H)."""
        return F.linear(self.activations(x), self.down)


def extract_from_tensors(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    groups: Sequence[int],
    layout: GroupLayout,
    act: str,
    layer: int = 0,
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    rows: Tensor | None = None,
) -> GroupWeights:
    """Slice ``groups`` out of full MLP weights (gate/up (I, H), down (H, I)) into owned copies.

    The copies are contiguous and detached, so the full matrices can be freed afterwards.
    ``rows`` (n,) are the neurons to take (default: the groups' positions as they are).
    """
    if gate.shape[0] != layout.intermediate_size or down.shape[1] != layout.intermediate_size:
        raise ConfigError(f"weights do not match layout {layout}")
    idx = layout.neuron_index(groups) if rows is None else rows  # (n,)

    def take(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().index_select(0, idx).contiguous()

    return GroupWeights(
        layer=layer,
        groups=tuple(int(g) for g in groups),
        sizes=layout.sizes(groups),
        act=act,
        gate=take(gate),
        up=take(up),
        down=down.detach().index_select(1, idx).contiguous(),  # (H, n)
        gate_bias=take(gate_bias),
        up_bias=take(up_bias),
    )


def group_runs(groups: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted group ids as maximal runs of consecutive ids ``[first, last + 1)``."""
    runs: list[tuple[int, int]] = []
    for g in sorted({int(g) for g in groups}):
        if runs and runs[-1][1] == g:
            runs[-1] = (runs[-1][0], g + 1)
        else:
            runs.append((g, g + 1))
    return runs


def partial_of_groups(full: GroupWeights, layout: GroupLayout, groups: Iterable[int], x: Tensor) -> Tensor:
    """The partial of ``groups`` straight from a layer's full weights (views, no copies): one
    matmul per run of consecutive groups. Same value as ``extract_from_tensors(...).partial(x)``
    up to summation order, without copying the rows first (what a coordinator computing a late
    worker's groups itself needs: the group set changes every step). (..., H) -> (..., H)."""
    act = ACT_FNS[full.act]
    out: Tensor | None = None
    for a, b in group_runs(groups):
        lo, hi = layout.bounds(a)[0], layout.bounds(b - 1)[1]
        gb = full.gate_bias[lo:hi] if full.gate_bias is not None else None
        ub = full.up_bias[lo:hi] if full.up_bias is not None else None
        h = act(F.linear(x, full.gate[lo:hi], gb)) * F.linear(x, full.up[lo:hi], ub)  # (..., n)
        y = F.linear(h, full.down[:, lo:hi])  # (..., H)
        out = y if out is None else out + y
    return out if out is not None else torch.zeros_like(x)


#: Attribute on a model holding the neuron order :func:`permute_neurons` applied (per layer).
_APPLIED = "_mesh_neuron_order"


def neuron_order(importance: Tensor) -> Tensor:
    """A layer's neuron order from per-neuron importance (I,): most important first, ties by id."""
    return torch.argsort(importance.detach().double(), descending=True, stable=True)


def check_order(order: Tensor | Sequence[int], intermediate_size: int) -> Tensor:
    """``order`` as a long tensor (I,), or ConfigError if it is not a permutation of ``range(I)``."""
    t = torch.as_tensor(order, dtype=torch.long).reshape(-1)
    if t.numel() != intermediate_size or not torch.equal(t.sort().values, torch.arange(intermediate_size)):
        raise ConfigError(f"neuron order is not a permutation of {intermediate_size} neurons")
    return t


def applied_order(model: nn.Module, layer: int) -> Tensor | None:
    """The neuron order :func:`permute_neurons` gave ``layer`` of ``model`` (None: the original)."""
    orders = getattr(model, _APPLIED, None)
    return None if orders is None else orders[layer]


def permute_neurons(model: nn.Module, orders: Sequence[Tensor | Sequence[int]]) -> None:
    """Reorder every MLP layer's intermediate neurons in place, so that position ``i`` of layer
    ``l`` holds the model's original neuron ``orders[l][i]`` (gate/up rows and biases, down
    columns). The model computes the same function (up to float summation order). Orders are in
    original ids even if the model was permuted before; the applied order is recorded.
    """
    layers = decoder_layers(model)
    if len(orders) != len(layers):
        raise ConfigError(f"{len(orders)} neuron orders for {len(layers)} layers")
    applied: list[Tensor] = []
    with torch.no_grad():
        for i, (layer, order) in enumerate(zip(layers, orders)):
            mlp = layer.mlp
            want = check_order(order, int(mlp.down_proj.weight.shape[1]))
            pos = _positions(applied_order(model, i), want)  # where each wanted neuron sits now
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.data = lin.weight.data.index_select(0, pos).contiguous()
                if _bias(lin) is not None:
                    lin.bias.data = lin.bias.data.index_select(0, pos).contiguous()
            mlp.down_proj.weight.data = mlp.down_proj.weight.data.index_select(1, pos).contiguous()
            applied.append(want)
    setattr(model, _APPLIED, applied)


def _positions(applied: Tensor | None, original_ids: Tensor) -> Tensor:
    """Current positions of ``original_ids`` in a layer whose applied order is ``applied``."""
    if applied is None:
        return original_ids
    inverse = torch.empty_like(applied)
    inverse[applied] = torch.arange(applied.numel())
    return inverse[original_ids]


def _bias(linear: nn.Module) -> Tensor | None:
    return getattr(linear, "bias", None)


def extract_groups(
    model: nn.Module, layer: int, groups: Sequence[int], layout: GroupLayout,
    order: Tensor | Sequence[int] | None = None, mlp: nn.Module | None = None,
) -> GroupWeights:
    """Owned copies of ``groups``' weights from ``model``'s MLP at ``layer``, the groups cut in
    neuron ``order`` (original neuron ids per position; None: the original order), whatever
    order ``model`` itself was permuted to. ``mlp``: that layer's MLP module (default: the one the
    model holds now; while its MLPs are routed, :func:`routed_mlps`, pass the original)."""
    mlp = decoder_layers(model)[layer].mlp if mlp is None else mlp
    want = layout.neuron_index(groups)  # positions in ``order``
    original = want if order is None else check_order(order, layout.intermediate_size)[want]
    return extract_from_tensors(
        mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, groups, layout,
        mlp_act_name(model.config), layer, _bias(mlp.gate_proj), _bias(mlp.up_proj),
        rows=_positions(applied_order(model, layer), original),
    )


def full_weights(mlp: nn.Module, layout: GroupLayout, act: str, layer: int = 0) -> GroupWeights:
    """A zero-copy :class:`GroupWeights` over all groups of ``mlp`` (views of its parameters)."""
    groups = tuple(range(layout.n_groups))
    return GroupWeights(
        layer=layer, groups=groups, sizes=layout.sizes(groups), act=act,
        gate=mlp.gate_proj.weight.detach(), up=mlp.up_proj.weight.detach(),
        down=mlp.down_proj.weight.detach(),
        gate_bias=_detached(_bias(mlp.gate_proj)), up_bias=_detached(_bias(mlp.up_proj)),
    )


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def down_bias(model: nn.Module, layer: int) -> Tensor | None:
    """The down-projection bias of ``layer`` (added once at the reduce), or None."""
    return _detached(_bias(decoder_layers(model)[layer].mlp.down_proj))


def reduce_partials(
    partials: Iterable[Tensor | None], like: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Sum partial down-projections; ``None`` (a missing/late partial) counts as zero.

    ``like`` is the MLP input (..., H): it gives the output shape, dtype and device. Partials may
    arrive in a narrower dtype (fp16 on the wire); they are accumulated in ``like``'s dtype.
    """
    out = torch.zeros_like(like)  # (..., H)
    for p in partials:
        if p is not None:
            out += p.to(dtype=out.dtype, device=out.device).reshape(out.shape)
    if bias is not None:
        out += bias.to(out.dtype)
    return out


class _RoutedMLP(nn.Module):
    """Stands in for one layer's MLP and hands its input to the routing callable."""

    def __init__(self, layer: int, fn: MlpFn) -> None:
        super().__init__()
        self.layer = layer
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H) -> (B, T, H)
        return self.fn(self.layer, x)


class MlpPatch:
    """Every layer's ``.mlp`` replaced by a routed stand-in; :meth:`restore` puts them back.

    ``originals[i]`` is layer ``i``'s real MLP module, so a routing callable can still run it
    (or slice it) while the patch is active.
    """

    def __init__(self, model: nn.Module, fn: MlpFn) -> None:
        self._layers = list(decoder_layers(model))
        if any(isinstance(layer.mlp, _RoutedMLP) for layer in self._layers):
            raise ConfigError("model MLPs are already routed")
        self.originals: tuple[nn.Module, ...] = tuple(layer.mlp for layer in self._layers)
        for i, layer in enumerate(self._layers):
            layer.mlp = _RoutedMLP(i, fn)
        self._active = True

    def restore(self) -> None:
        if self._active:
            for layer, mlp in zip(self._layers, self.originals):
                layer.mlp = mlp
            self._active = False


@contextmanager
def routed_mlps(model: nn.Module, fn: MlpFn) -> Iterator[MlpPatch]:
    """Run ``model`` with every MLP routed through ``fn(layer, x)``; restored on exit."""
    patch = MlpPatch(model, fn)
    try:
        yield patch
    finally:
        patch.restore()


def feed(model: nn.Module, ids: Tensor) -> None:
    """One forward of ``ids`` ((1, T)) from an empty cache, only the last position's logits made:
    what recording MLP inputs needs, for :mod:`mesh.lm` and for a transformers model alike."""
    from mesh.lm.model import is_mesh_lm

    if is_mesh_lm(model):
        if ids.dim() > 1 and ids.shape[0] != 1:
            raise ConfigError("mesh.lm runs one sequence at a time")
        model.forward(ids.reshape(-1), model.new_cache(), logits_to_keep=1)
    else:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
