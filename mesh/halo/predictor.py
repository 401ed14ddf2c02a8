"""The semantic-aware importance predictor: MLP input -> each neuron group's importance.

A group's measured importance at a position is the norm of its contribution to the MLP output
(:func:`group_importance`, from the group's down-projection Gram matrix): what the predictor is
trained on, and what the coordinator measures as the true share it summed as zero.

Per layer the model is low-rank and quadratic. The MLP input ``x`` (the hidden state after the
pre-MLP norm, (H,)) is centred and projected onto ``r`` whitened principal directions of the
recorded inputs, ``z = (x - mean) @ proj`` (r,); the features are ``[1, z, z_i * z_j for i <= j]``
and a ridge regression maps them to each group's log-importance. Quadratic because a group's
output is a sum of ``act(gate . x) * (up . x)`` terms, i.e. close to a quadratic form of ``x``;
log because importances span orders of magnitude and only their ranking per token matters.
Training is closed form (one ``F x F`` solve per layer, ``F = 1 + r + r(r+1)/2``): seconds on a
CPU, no epochs, deterministic.

Stored as safetensors (no pickle) with string metadata: the format version, the model key
(a predictor is only valid for the model it was recorded from) and the group layout. Format 2 may
hold a neuron order per layer (``mesh.halo.groups``): the groups it predicts are cut in that order, so
the coordinator permutes its model to it and ships it to the workers with every plan.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mesh.halo import groups as split
from mesh.errors import ConfigError, ProtocolError

FORMAT_VERSION = 2  # 2: optional neuron order per layer
_READABLE = ("1", "2")
DEFAULT_RANK = 32
PREDICTOR_NAME = "halo-predictor-v2-g{group_size}.safetensors"  # v2: with the neuron order
_LOG_EPS = 1e-6  # floor (relative to the mean importance) before taking logs


def predictor_path(home: Path, model: str, group_size: int) -> Path:
    """The trained predictor, stored with the converted model (``<home>/models/<key>/``)."""
    return Path(home) / "models" / model / PREDICTOR_NAME.format(group_size=group_size)


# -- measured importance: the norm of each group's contribution -----------------------------------


def _padded_slots(sizes: Sequence[int], width: int) -> Tensor:
    """Where each neuron of a group set lands when every group is padded to ``width``: (n,)."""
    return torch.cat([g * width + torch.arange(size) for g, size in enumerate(sizes)])


def importance_gram(weights: split.GroupWeights) -> Tensor:
    """Each group's down-projection Gram matrix ``down_g.T @ down_g``, zero-padded: (G, s, s)."""
    n_groups, s = len(weights.groups), max(weights.sizes, default=0)
    d_pad = weights.down.new_zeros((weights.down.shape[0], n_groups * s))  # (H, G*s)
    d_pad[:, _padded_slots(weights.sizes, s)] = weights.down
    d_pad = d_pad.view(-1, n_groups, s)  # (H, G, s)
    return torch.einsum("hgs,hgt->gst", d_pad, d_pad)  # (G, s, s)


def group_importance(weights: split.GroupWeights, x: Tensor, gram: Tensor | None = None) -> Tensor:
    """Norm of each group's contribution to the down-projection: (..., H) -> (..., len(groups)).

    Group ``g``'s contribution is ``c_g = h_g @ down_g.T`` (a vector of size H), so
    ``|c_g|^2 = h_g @ (down_g.T @ down_g) @ h_g``: computed with each group's Gram matrix (s x s),
    which is cheaper than materialising every ``c_g`` when ``s`` is much smaller than ``H``.
    Groups are zero-padded to the largest size so the whole layer is one batched product.
    Pass ``gram`` (:func:`importance_gram`) when calling repeatedly with the same weights.
    """
    with torch.no_grad():
        h = weights.activations(x)  # (..., n)
        if not weights.groups:
            return h.new_zeros((*h.shape[:-1], 0))
        return importance_of(h, weights.sizes, importance_gram(weights) if gram is None else gram)


def importance_of(h: Tensor, sizes: Sequence[int], gram: Tensor) -> Tensor:
    """:func:`group_importance` from the groups' activations ``h`` (..., n) (their neurons in
    order, ``sizes[g]`` of group ``g``) and their Gram matrices (G, s, s): (..., G)."""
    n_groups, s = len(sizes), max(sizes, default=0)
    h_pad = h.new_zeros((*h.shape[:-1], n_groups * s))
    h_pad[..., _padded_slots(sizes, s)] = h
    hg = h_pad.view(*h.shape[:-1], n_groups, s)  # (..., G, s)
    sq = torch.einsum("...gs,gst,...gt->...g", hg, gram, hg)  # (..., G)
    return sq.clamp_min(0).sqrt()


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Recorded pairs per layer: ``inputs[l]`` (N, H) MLP inputs, ``targets[l]`` (N, G) truths."""

    inputs: tuple[Tensor, ...]
    targets: tuple[Tensor, ...]

    @property
    def n_pairs(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0


@dataclass(frozen=True, eq=False)
class LayerPredictor:
    """One layer's low-rank quadratic model (see the module docstring)."""

    mean: Tensor  # (H,)
    proj: Tensor  # (H, r) whitened principal directions
    coef: Tensor  # (F, G) ridge weights over [1, z, z_i z_j]

    def predict_log(self, x: Tensor) -> Tensor:
        """Predicted log-importance: (..., H) -> (..., G)."""
        z = (x.to(self.proj.dtype) - self.mean) @ self.proj  # (..., r)
        return _features(z) @ self.coef  # (..., G)


@functools.lru_cache(maxsize=8)
def _triu(r: int) -> tuple[Tensor, Tensor]:
    iu, ju = torch.triu_indices(r, r)
    return iu, ju


def _features(z: Tensor) -> Tensor:
    """``[1, z, z_i z_j (i <= j)]``: (..., r) -> (..., 1 + r + r(r+1)/2)."""
    r = z.shape[-1]
    iu, ju = _triu(r)
    quad = z[..., iu] * z[..., ju]  # (..., r(r+1)/2)
    return torch.cat([torch.ones_like(z[..., :1]), z, quad], dim=-1)


@dataclass(frozen=True, eq=False)
class ImportancePredictor:
    """Per-layer predictors for one model (identified by ``model_key``) and group layout."""

    model_key: str
    layout: split.GroupLayout
    rank: int
    layers: tuple[LayerPredictor, ...]
    order: tuple[Tensor, ...] | None = None  # per layer: original neuron id at each position

    def predict(self, layer: int, x: Tensor) -> Tensor:
        """Predicted importance (positive) of every group: (..., H) -> (..., G)."""
        return self.layers[layer].predict_log(x).exp()

    def save(self, path: str | Path) -> None:
        tensors: dict[str, Tensor] = {}
        for i, lp in enumerate(self.layers):
            tensors[f"{i}.mean"], tensors[f"{i}.proj"] = lp.mean, lp.proj
            tensors[f"{i}.coef"] = lp.coef
        for i, o in enumerate(self.order or ()):
            tensors[f"{i}.order"] = o.to(torch.int64)
        meta = {
            "format_version": str(FORMAT_VERSION), "model_key": self.model_key,
            "intermediate_size": str(self.layout.intermediate_size),
            "group_size": str(self.layout.group_size), "rank": str(self.rank),
            "n_layers": str(len(self.layers)), "neuron_order": str(int(self.order is not None)),
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def same_weights(trained: str, model_key: str) -> bool:
    """Whether a predictor trained on the model ``trained`` serves the model ``model_key``: the
    same model and GGUF in any weight format (``smollm2-135m@b179c9523d0e6a0f/fp32`` serves
    ``.../int8`` and ``.../q4``). It reads the MLP inputs, float32 in every format, and int8 or q4
    moves them as little as it moves the answers; it is trained where fp32 is built (``mesh setup``)."""
    return (trained.rpartition("/")[0] or trained) == (model_key.rpartition("/")[0] or model_key)


def load_predictor(path: str | Path, model_key: str) -> ImportancePredictor:
    """Load a saved predictor; ProtocolError if its version does not match or it was trained on
    another model (:func:`same_weights`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ProtocolError("bad-predictor", f"{path}: {exc}") from exc
    if meta.get("format_version") not in _READABLE:
        raise ProtocolError("bad-version", f"predictor format {meta.get('format_version')!r}")
    if not same_weights(str(meta.get("model_key")), model_key):
        raise ProtocolError("wrong-model", f"predictor is for {meta.get('model_key')!r}")
    try:
        layout = split.GroupLayout(int(meta["intermediate_size"]), int(meta["group_size"]))
        n_layers = int(meta["n_layers"])
        layers = tuple(
            LayerPredictor(tensors[f"{i}.mean"], tensors[f"{i}.proj"], tensors[f"{i}.coef"])
            for i in range(n_layers)
        )
        rank = int(meta["rank"])
        order = None
        if meta.get("neuron_order") == "1":
            order = tuple(split.check_order(tensors[f"{i}.order"], layout.intermediate_size)
                          for i in range(n_layers))
    except (KeyError, ValueError, ConfigError) as exc:
        raise ProtocolError("bad-predictor", f"{path}: {exc}") from exc
    for lp in layers:
        r = lp.proj.shape[-1]
        if (lp.coef.shape != (1 + r * (r + 3) // 2, layout.n_groups)
                or lp.mean.shape != (lp.proj.shape[0],)):
            raise ProtocolError("bad-predictor", f"{path}: inconsistent shapes")
    return ImportancePredictor(model_key, layout, rank, layers, order)


def fit_layer(
    x: Tensor, y: Tensor, rank: int = DEFAULT_RANK, ridge: float = 1e-2,
    reads: Tensor | None = None,
) -> LayerPredictor:
    """Fit one layer from inputs ``x`` (N, H) and importances ``y`` (N, G), in closed form.

    The projection keeps the ``rank`` directions of the whitened input along which the layer's
    pre-activations vary most: with ``reads`` (the stacked gate and up rows, (2I, H)) the top
    eigenvectors of ``C^1/2 W^T W C^1/2`` (C = input covariance), else plain PCA. ``ridge`` is
    relative to the mean diagonal of the feature Gram matrix, so it is scale-free.
    """
    x, y = x.double(), y.double()
    n, h = x.shape
    mean = x.mean(0)  # (H,)
    xc = x - mean  # (N, H)
    cov = xc.T @ xc / max(n - 1, 1)  # (H, H)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals = evals.clamp_min(float(evals[-1]) * 1e-8)
    r = max(1, min(rank, h, n - 1))
    if reads is None:
        proj = evecs[:, -r:].flip(1) / evals[-r:].flip(0).sqrt()  # whitened PCA (H, r)
    else:
        half = evecs @ torch.diag(evals.sqrt()) @ evecs.T  # C^1/2 (H, H)
        w = reads.detach().double()  # (2I, H)
        _, dirs = torch.linalg.eigh(half @ (w.T @ w) @ half)  # in whitened coordinates
        inv_half = evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # C^-1/2 (H, H)
        proj = inv_half @ dirs[:, -r:].flip(1)  # (H, r)
    feats = _features(xc @ proj)  # (N, F)
    target = (y + _LOG_EPS * y.mean().clamp_min(1e-30)).log()  # (N, G)
    gram = feats.T @ feats  # (F, F)
    lam = ridge * gram.diagonal().mean()
    coef = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                              feats.T @ target)  # (F, G)
    # Contiguous copies: a saved and reloaded predictor then gives bit-identical predictions.
    return LayerPredictor(*(t.float().contiguous() for t in (mean, proj, coef)))


def train_predictor(
    data: TrainingSet, layout: split.GroupLayout, model_key: str,
    rank: int = DEFAULT_RANK, ridge: float = 1e-2, model: nn.Module | None = None,
    order: Sequence[Tensor] | None = None,
) -> ImportancePredictor:
    """Fit every layer's predictor from recorded pairs; with ``model`` the projection is
    weight-aware (see :func:`fit_layer`), which recalls a little better than plain PCA.
    ``order`` is the neuron order the pairs were recorded in (the model permuted to it).
    """
    if data.n_pairs < 2:
        raise ConfigError("need at least 2 training pairs")
    mlps = [layer.mlp for layer in split.decoder_layers(model)] if model is not None else None
    layers = []
    for i, (x, y) in enumerate(zip(data.inputs, data.targets)):
        reads = None
        if mlps is not None:
            reads = torch.cat([mlps[i].gate_proj.weight, mlps[i].up_proj.weight])  # (2I, H)
        layers.append(fit_layer(x, y, rank, ridge, reads))
    return ImportancePredictor(model_key, layout, rank, tuple(layers),
                               None if order is None else tuple(torch.as_tensor(o) for o in order))


def topk_recall(pred: Tensor, true: Tensor, k: int) -> float:
    """Mean over rows of |top-k(pred) & top-k(true)| / k; ``pred``, ``true`` (N, G).

    Choosing ``k`` groups at random scores ``k / G`` on average.
    """
    top_p = pred.topk(k, dim=-1).indices  # (N, k)
    top_t = true.topk(k, dim=-1).indices  # (N, k)
    hits = (top_p.unsqueeze(-1) == top_t.unsqueeze(-2)).any(-1).sum(-1)  # (N,)
    return float(hits.double().mean() / k)


def evaluate(predictor: ImportancePredictor, data: TrainingSet, k: int) -> dict[str, float]:
    """Top-k recall on held-out pairs, averaged over layers, next to the random baseline.

    ``captured`` is the true importance held by the predicted top-k as a share of the best
    possible top-k (1.0 = perfect), the quantity relaxed sync actually cares about.
    """
    recalls, captured = [], []
    for layer, (x, y) in enumerate(zip(data.inputs, data.targets)):
        pred = predictor.layers[layer].predict_log(x)  # (N, G)
        recalls.append(topk_recall(pred, y, k))
        got = y.gather(-1, pred.topk(k, dim=-1).indices).sum(-1)  # (N,)
        best = y.topk(k, dim=-1).values.sum(-1)  # (N,)
        captured.append(float((got / best.clamp_min(1e-30)).mean()))
    return {
        "recall": sum(recalls) / len(recalls),
        "random_recall": k / predictor.layout.n_groups,
        "captured": sum(captured) / len(captured),
        "per_layer_recall_min": min(recalls),
    }


def cold_share(train: TrainingSet, held_out: TrainingSet, fraction: float = 0.2) -> dict[str, float]:
    """The share of each held-out token's importance that the groups least important on the
    training pairs (the coldest ``fraction`` of a layer's groups, what a lossy worker is given)
    hold; mean and worst over layers. Uniform importance would give ``fraction``."""
    shares = []
    for y_train, y_held in zip(train.targets, held_out.targets):
        k = max(1, round(fraction * y_train.shape[1]))
        coldest = y_train.mean(0).topk(k, largest=False).indices  # (k,)
        shares.append(float((y_held[:, coldest].sum(1) / y_held.sum(1).clamp_min(1e-30)).mean()))
    return {"cold_fraction": fraction, "cold_share": sum(shares) / len(shares),
            "cold_share_max": max(shares)}


def neuron_importance(model: nn.Module, batches: Iterable[Tensor], max_tokens: int | None = None) -> tuple[Tensor, ...]:
    """Mean size of every intermediate neuron's contribution, per layer: over the tokens of
    ``batches`` ((B, T) ids each, up to ``max_tokens``), ``mean |h_i| * |down[:, i]|``; (I,) each.
    Sorting neurons by it (``mesh.halo.groups.neuron_order``) makes groups of similar importance."""
    act = split.mlp_act_name(model.config)
    mlps = [layer.mlp for layer in split.decoder_layers(model)]
    fulls = [split.full_weights(m, split.model_layout(model.config, 1), act, i) for i, m in enumerate(mlps)]
    sums = [torch.zeros(w.n_neurons, dtype=torch.float64) for w in fulls]
    seen = 0

    def record(layer: int, x: Tensor) -> Tensor:  # x (B, T, H)
        sums[layer] += fulls[layer].activations(x.reshape(-1, x.shape[-1])).abs().double().sum(0)
        return mlps[layer](x)

    with torch.no_grad(), split.routed_mlps(model, record):
        for ids in batches:
            if max_tokens is not None and seen >= max_tokens:
                break
            split.feed(model, ids)
            seen += ids.numel()
    if not seen:
        raise ConfigError("no tokens to measure neuron importance on")
    return tuple(s / seen * w.down.double().norm(dim=0) for s, w in zip(sums, fulls))


def groups_to_wait(importance: Sequence[float] | Tensor, target_share: float) -> tuple[int, ...]:
    """The most important groups whose predicted importance first reaches ``target_share`` of the
    total, most important first (ties: lower group id first). 0 -> (); >= 1 -> every group.
    """
    raw = importance.tolist() if isinstance(importance, Tensor) else importance
    imp = [float(v) for v in raw]
    if any(not math.isfinite(v) or v < 0 for v in imp):
        raise ConfigError("importances must be finite and non-negative")
    total = sum(imp)
    if target_share <= 0 or not imp:
        return ()
    if target_share >= 1 or total <= 0:
        return tuple(sorted(range(len(imp)), key=lambda g: (-imp[g], g)))
    chosen, acc = [], 0.0
    for g in sorted(range(len(imp)), key=lambda g: (-imp[g], g)):
        if acc >= target_share * total:
            break
        chosen.append(g)
        acc += imp[g]
    return tuple(chosen)


def record_pairs(
    model: nn.Module, batches: Iterable[Tensor], layout: split.GroupLayout,
    max_pairs: int | None = None,
) -> TrainingSet:
    """Run ``model`` over token batches ((B, T) ids each) and record, for every layer, the MLP
    input of every token and its true per-group importance. Stops after ``max_pairs`` tokens.

    Memory is ``pairs * layers * (H + G) * 4`` bytes: 8k pairs of SmolLM2-135M take ~570 MB.
    """
    act = split.mlp_act_name(model.config)
    mlps = [layer.mlp for layer in split.decoder_layers(model)]
    fulls = [split.full_weights(m, layout, act, i) for i, m in enumerate(mlps)]
    grams = [importance_gram(w) for w in fulls]  # each (G, s, s)
    xs: list[list[Tensor]] = [[] for _ in mlps]
    ys: list[list[Tensor]] = [[] for _ in mlps]

    def record(layer: int, x: Tensor) -> Tensor:  # x (B, T, H)
        flat = x.detach().reshape(-1, x.shape[-1])  # (B*T, H)
        xs[layer].append(flat.float().clone())
        imp = group_importance(fulls[layer], flat, grams[layer])  # (B*T, G)
        ys[layer].append(imp.float())
        return mlps[layer](x)

    seen = 0
    with torch.no_grad(), split.routed_mlps(model, record):
        for ids in batches:
            if max_pairs is not None and seen >= max_pairs:
                break
            split.feed(model, ids)  # no vocab-wide logits
            seen += ids.numel()
    keep = max_pairs if max_pairs is not None else seen
    return TrainingSet(
        tuple(torch.cat(x)[:keep] for x in xs), tuple(torch.cat(y)[:keep] for y in ys)
    )
