"""In-process references for the HALO tests: what the distributed path must match."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mesh.halo import groups as split


def local_mlp_fn(
    model: nn.Module, assignments: Sequence[Sequence[Sequence[int]]], layout: split.GroupLayout
) -> split.MlpFn:
    """A routing callable that computes each layer as a sum of per-holder partials, in-process.

    ``assignments[layer]`` lists one group set per holder; groups in no set count as missing.
    This is the reference the distributed path must match, and the test of split + reduce.
    """
    shards = [
        [split.extract_groups(model, layer, groups, layout) for groups in holders]
        for layer, holders in enumerate(assignments)
    ]
    biases = [split.down_bias(model, layer) for layer in range(len(shards))]

    def fn(layer: int, x: Tensor) -> Tensor:
        return split.reduce_partials((w.partial(x) for w in shards[layer]), x, biases[layer])

    return fn
