"""Neuron-group split: split then reduce equals the unsplit MLP; routed forward equals plain."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from mesh.halo import groups as split
from mesh.errors import ConfigError
from mesh.halo.predictor import group_importance
from tests.halo.reference import local_mlp_fn

HIDDEN, INTER, GROUP = 64, 300, 32  # 10 groups, the last one 12 neurons wide


def _llama() -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def _gemma() -> torch.nn.Module:
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        sliding_window=8,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gemma"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    return _llama() if request.param == "llama" else _gemma()


# Unequal shares, group order scrambled; union is all 10 groups.
SHARES = {
    1: [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
    2: [[9, 0, 1, 2, 3, 4, 5], [6, 7, 8]],
    3: [[4], [0, 9, 2, 7, 1], [3, 5, 6, 8]],
    5: [[0, 1, 2], [3], [9, 4], [5, 6, 7], [8]],
}


def test_layout_cuts_groups_with_a_short_last_group() -> None:
    layout = split.GroupLayout(INTER, GROUP)
    assert layout.n_groups == 10
    assert layout.bounds(9) == (288, 300)
    assert layout.sizes([0, 9]) == (32, 12)
    assert layout.neuron_index([9, 0]).tolist() == [*range(288, 300), *range(32)]
    with pytest.raises(ConfigError):
        layout.bounds(10)


def test_act_is_read_from_the_config(model: torch.nn.Module) -> None:
    expected = "silu" if isinstance(model.config, LlamaConfig) else "gelu_pytorch_tanh"
    assert split.mlp_act_name(model.config) == expected


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5])
def test_split_then_reduce_equals_unsplit_mlp(model: torch.nn.Module, n_workers: int) -> None:
    layout = split.model_layout(model.config, GROUP)
    x = torch.randn(2, 7, HIDDEN)  # (B, T, H)
    for layer, block in enumerate(split.decoder_layers(model)):
        with torch.no_grad():
            want = block.mlp(x)  # (B, T, H)
            shards = [split.extract_groups(model, layer, gs, layout) for gs in SHARES[n_workers]]
            partials = [w.partial(x) for w in shards]
            got = split.reduce_partials(partials, x, split.down_bias(model, layer))
        assert sum(w.n_neurons for w in shards) == INTER
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_shard_is_self_contained_and_small(model: torch.nn.Module) -> None:
    layout = split.model_layout(model.config, GROUP)
    w = split.extract_groups(model, 1, [9, 2], layout)
    assert w.gate.shape == w.up.shape == (44, HIDDEN) and w.down.shape == (HIDDEN, 44)
    assert w.nbytes == 3 * 44 * HIDDEN * 4
    mlp = split.decoder_layers(model)[1].mlp
    assert w.gate.untyped_storage().data_ptr() != mlp.gate_proj.weight.untyped_storage().data_ptr()


def test_missing_partial_counts_as_zero(model: torch.nn.Module) -> None:
    layout = split.model_layout(model.config, GROUP)
    x = torch.randn(3, HIDDEN)
    a = split.extract_groups(model, 0, [0, 1, 2], layout)
    b = split.extract_groups(model, 0, [3, 4, 5, 6, 7, 8, 9], layout)
    got = split.reduce_partials([a.partial(x), None], x)
    assert torch.allclose(got, a.partial(x))
    # fp16 on the wire: accumulated in the input's dtype, close to the exact sum.
    half = split.reduce_partials([a.partial(x).half(), b.partial(x).half()], x)
    assert half.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(half, split.decoder_layers(model)[0].mlp(x), atol=1e-2)


def test_group_importance_is_the_norm_of_each_contribution(model: torch.nn.Module) -> None:
    layout = split.model_layout(model.config, GROUP)
    x = torch.randn(4, 5, HIDDEN)
    mlp = split.decoder_layers(model)[0].mlp
    full = split.full_weights(mlp, layout, split.mlp_act_name(model.config))
    imp = group_importance(full, x)  # (4, 5, G)
    direct = torch.stack(
        [split.extract_groups(model, 0, [g], layout).partial(x).norm(dim=-1)
         for g in range(layout.n_groups)], dim=-1,
    )
    assert imp.shape == (4, 5, layout.n_groups)
    assert torch.allclose(imp, direct, atol=1e-5, rtol=1e-4)


def test_routed_forward_with_all_groups_local_equals_plain_forward(model: torch.nn.Module) -> None:
    layout = split.model_layout(model.config, GROUP)
    ids = torch.randint(0, 128, (2, 12))
    n_layers = len(split.decoder_layers(model))
    fn = local_mlp_fn(model, [SHARES[3]] * n_layers, layout)
    calls: list[int] = []

    def counting(layer: int, x: torch.Tensor) -> torch.Tensor:
        calls.append(layer)
        return fn(layer, x)

    with torch.no_grad():
        want = model(input_ids=ids).logits
        with split.routed_mlps(model, counting):
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert calls == list(range(n_layers))
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.equal(after, want)
    assert not any(isinstance(b.mlp, split._RoutedMLP) for b in split.decoder_layers(model))


def test_dropping_groups_changes_output_and_patch_restores_on_error(model: torch.nn.Module) -> None:
    layout = split.model_layout(model.config, GROUP)
    ids = torch.randint(0, 128, (1, 6))
    n_layers = len(split.decoder_layers(model))
    fn = local_mlp_fn(model, [[[0, 1, 2, 3, 4]]] * n_layers, layout)  # half the groups
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with split.routed_mlps(model, fn):
            dropped = model(input_ids=ids).logits
    assert not torch.allclose(dropped, want, atol=1e-3)

    def boom(layer: int, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("worker gone")

    with pytest.raises(RuntimeError), torch.no_grad(), split.routed_mlps(model, boom):
        model(input_ids=ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_partial_of_groups_from_full_weight_views_equals_extracted_copies(model: torch.nn.Module) -> None:
    layout = split.model_layout(model.config, GROUP)
    mlp = split.decoder_layers(model)[1].mlp
    full = split.full_weights(mlp, layout, split.mlp_act_name(model.config), 1)
    x = torch.randn(1, 2, HIDDEN)
    assert split.group_runs([9, 0, 1, 3, 8, 4]) == [(0, 2), (3, 5), (8, 10)]
    with torch.no_grad():
        for groups in ([9, 0, 1, 3, 8, 4], [2], [9], list(range(10))):
            want = split.extract_groups(model, 1, groups, layout).partial(x)
            got = split.partial_of_groups(full, layout, groups, x)
            assert torch.allclose(got, want, atol=1e-5), groups
        assert torch.equal(split.partial_of_groups(full, layout, [], x), torch.zeros_like(x))
        all_groups = split.partial_of_groups(full, layout, range(10), x)
        assert torch.allclose(all_groups, mlp(x), atol=1e-5)  # no down bias in these models


def _random_orders(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(INTER, generator=gen) for _ in split.decoder_layers(model)]


def test_neuron_order_is_exact_and_any_copy_cuts_the_same_neurons(model: torch.nn.Module) -> None:
    """The coordinator permutes its model to the order; a worker with the model in its original
    order (or permuted to another one) cuts the same neurons for the same group ids."""
    import copy

    layout = split.GroupLayout(INTER, GROUP)
    orders = _random_orders(model, 1)
    coordinator = copy.deepcopy(model)
    split.permute_neurons(coordinator, orders)
    assert torch.equal(split.applied_order(coordinator, 1), orders[1])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(coordinator(ids).logits, model(ids).logits, atol=1e-5)
    other = copy.deepcopy(model)
    split.permute_neurons(other, _random_orders(model, 2))  # a different order first
    groups = [9, 2, 5]
    act = split.mlp_act_name(model.config)
    for layer in (0, 1):
        # What the coordinator computes itself: its (permuted) weights' positions as they are.
        full = split.full_weights(split.decoder_layers(coordinator)[layer].mlp, layout, act, layer)
        want = split.extract_from_tensors(full.gate, full.up, full.down, groups, layout, act, layer)
        for copy_, order in ((model, orders[layer]), (other, orders[layer]), (coordinator, orders[layer])):
            got = split.extract_groups(copy_, layer, groups, layout, order)
            assert got.sizes == want.sizes == (12, 32, 32)
            for name in ("gate", "up", "down"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (layer, name)
        # No order: the model's original order, whatever the copy was permuted to.
        assert torch.equal(split.extract_groups(coordinator, layer, groups, layout).down,
                           split.extract_groups(model, layer, groups, layout).down)
        # Split then reduce in the order still equals the unsplit MLP.
        x = torch.randn(3, HIDDEN)
        shards = [split.extract_groups(model, layer, gs, layout, orders[layer]) for gs in SHARES[3]]
        with torch.no_grad():
            out = split.reduce_partials([w.partial(x) for w in shards], x)
            ref = split.decoder_layers(model)[layer].mlp(x)
        assert torch.allclose(out, ref, atol=1e-5)
    # Permuting again, in original ids, replaces the order rather than composing it.
    split.permute_neurons(other, orders)
    for name in ("gate_proj", "up_proj"):
        a = getattr(split.decoder_layers(other)[0].mlp, name).weight
        b = getattr(split.decoder_layers(coordinator)[0].mlp, name).weight
        assert torch.equal(a, b)


def test_neuron_order_must_be_a_permutation(model: torch.nn.Module) -> None:
    assert split.neuron_order(torch.tensor([0.5, 2.0, 0.5, 1.0])).tolist() == [1, 3, 0, 2]
    for bad in ([0, 0, 1], [0, 1], [1, 2, 3]):
        with pytest.raises(ConfigError):
            split.check_order(bad, 3)
    with pytest.raises(ConfigError):
        split.permute_neurons(model, [torch.arange(INTER)])  # one order for two layers
