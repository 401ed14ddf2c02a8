"""Importance predictor: beats random top-k choice on held-out tokens; save/load; wait sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from mesh.halo import predictor
from mesh.halo import groups as split
from mesh.errors import ConfigError, ProtocolError

GROUP, K = 16, 4  # 256 neurons -> 16 groups; random top-4 recall is 0.25


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  max_position_embeddings=256)
    if kind == "llama":
        cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
    else:
        cfg = Gemma3TextConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                               sliding_window=16, **common)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _tokens(n_batches: int, seed: int) -> list[torch.Tensor]:
    """Synthetic "text": a Zipf-like unigram stream, so some tokens recur as in real text."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, 513, dtype=torch.float64)
    return [torch.multinomial(weights, 4 * 64, replacement=True, generator=gen).view(4, 64)
            for _ in range(n_batches)]


@pytest.fixture(scope="module", params=["llama", "gemma"])
def trained(request: pytest.FixtureRequest):
    model = _model(request.param)
    layout = split.model_layout(model.config, GROUP)
    train = predictor.record_pairs(model, _tokens(12, seed=1), layout)
    held_out = predictor.record_pairs(model, _tokens(4, seed=2), layout)
    pred = predictor.train_predictor(train, layout, f"tiny-{request.param}", rank=32, model=model)
    return model, layout, pred, held_out


def test_record_pairs_shapes_and_targets(trained) -> None:
    model, layout, _, held_out = trained
    assert len(held_out.inputs) == 3 and held_out.n_pairs == 4 * 4 * 64
    assert held_out.inputs[0].shape == (1024, 64)
    assert held_out.targets[0].shape == (1024, layout.n_groups)
    assert bool((held_out.targets[0] >= 0).all())
    # The model is left unpatched.
    assert all(isinstance(b.mlp, torch.nn.Module) and hasattr(b.mlp, "gate_proj")
               for b in split.decoder_layers(model))


def test_predictor_beats_random_topk_recall_on_held_out_tokens(trained) -> None:
    _, _, pred, held_out = trained
    scores = predictor.evaluate(pred, held_out, K)
    assert scores["random_recall"] == pytest.approx(0.25)
    # Measured: recall llama 0.69, gemma 0.55 (random 0.25); captured importance 0.93 / 0.87.
    assert scores["recall"] >= 0.45, scores
    assert scores["per_layer_recall_min"] >= 0.40, scores
    assert scores["captured"] >= 0.80, scores


def test_importance_sorted_neurons_make_cold_groups_colder(trained) -> None:
    """Groups cut from neurons sorted by mean importance on training tokens hold less of the
    held-out importance in their coldest fifth than groups in the model's own order; the
    predictor trained in that order saves and loads with it."""
    import copy

    model, layout, _, _ = trained
    base = predictor.cold_share(predictor.record_pairs(model, _tokens(4, seed=1), layout),
                                predictor.record_pairs(model, _tokens(4, seed=2), layout))
    sorted_model = copy.deepcopy(model)
    means = predictor.neuron_importance(sorted_model, _tokens(4, seed=1))
    assert len(means) == 3 and means[0].shape == (256,) and bool((means[0] > 0).all())
    orders = [split.neuron_order(m) for m in means]
    split.permute_neurons(sorted_model, orders)
    train = predictor.record_pairs(sorted_model, _tokens(4, seed=1), layout)
    held = predictor.record_pairs(sorted_model, _tokens(4, seed=2), layout)
    ordered = predictor.cold_share(train, held)
    # Measured: 0.170 -> 0.126 (llama), 0.173 -> 0.132 (gemma); uniform 0.1875 (3 of 16 groups).
    assert ordered["cold_share"] < 0.85 * base["cold_share"], (base, ordered)
    pred = predictor.train_predictor(train, layout, "tiny", rank=8, model=sorted_model, order=orders)
    assert predictor.evaluate(pred, held, K)["recall"] > 0.25
    assert pred.order is not None


def test_predictor_with_a_neuron_order_saves_and_loads_it(trained, tmp_path: Path) -> None:
    _, layout, pred, _ = trained
    gen = torch.Generator().manual_seed(5)
    orders = tuple(torch.randperm(256, generator=gen) for _ in pred.layers)
    from dataclasses import replace
    path = tmp_path / "ordered.safetensors"
    replace(pred, order=orders).save(path)
    back = predictor.load_predictor(path, pred.model_key)
    assert back.order is not None and all(torch.equal(a, b) for a, b in zip(back.order, orders))
    pred.save(tmp_path / "plain.safetensors")
    assert predictor.load_predictor(tmp_path / "plain.safetensors", pred.model_key).order is None


def test_save_load_round_trip_checks_version_and_model_key(trained, tmp_path: Path) -> None:
    _, layout, pred, held_out = trained
    path = tmp_path / "pred.safetensors"
    pred.save(path)
    back = predictor.load_predictor(path, pred.model_key)
    assert back.layout == layout and back.rank == pred.rank
    x = held_out.inputs[1][:5]
    assert torch.equal(back.predict(1, x), pred.predict(1, x))
    with pytest.raises(ProtocolError) as err:
        predictor.load_predictor(path, "another-model")
    assert err.value.reason == "wrong-model"
    (tmp_path / "junk").write_bytes(b"not a predictor")
    with pytest.raises(ProtocolError):
        predictor.load_predictor(tmp_path / "junk", pred.model_key)


def test_topk_recall_metric() -> None:
    true = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert predictor.topk_recall(true, true, 2) == 1.0
    assert predictor.topk_recall(-true, true, 2) == 0.0
    assert predictor.topk_recall(torch.tensor([[4.0, 0, 3, 0], [0, 0, 0, 1.0]]), true, 2) == 0.75


def test_groups_to_wait_reach_the_target_share() -> None:
    imp = [1.0, 5.0, 0.5, 3.0, 0.5]  # total 10
    assert predictor.groups_to_wait(imp, 0.5) == (1,)
    assert predictor.groups_to_wait(imp, 0.51) == (1, 3)
    assert predictor.groups_to_wait(imp, 0.8) == (1, 3)
    assert predictor.groups_to_wait(imp, 0.9) == (1, 3, 0)
    assert predictor.groups_to_wait(imp, 0.0) == ()
    assert predictor.groups_to_wait(torch.tensor(imp), 1.0) == (1, 3, 0, 2, 4)
    with pytest.raises(ConfigError):
        predictor.groups_to_wait([1.0, float("nan")], 0.5)


def test_a_predictor_trained_on_fp32_serves_every_format_of_its_model_only() -> None:
    """Trained where fp32 is built (`mesh setup`), it reads MLP inputs, float32 in any format: a
    coordinator on int8 or q4 of the same GGUF loads it; another model or GGUF does not."""
    fp32 = "smollm2-135m@b179c9523d0e6a0f/fp32"
    for key in (fp32, "smollm2-135m@b179c9523d0e6a0f/int8", "smollm2-135m@b179c9523d0e6a0f/q4"):
        assert predictor.same_weights(fp32, key)
    for key in ("smollm2-135m@0000000000000000/q4", "gemma3-270m@b179c9523d0e6a0f/fp32", "smollm2-135m"):
        assert not predictor.same_weights(fp32, key)
    assert predictor.same_weights("tiny", "tiny") and not predictor.same_weights("tiny", "tiny2")
