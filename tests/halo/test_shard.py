"""A worker-only node's groups, read from the weight file (mesh.halo.shard.FileGroups), are the
groups today's worker slices out of the loaded model: bitwise for the fp32 file, in any neuron
order; for int8 and q4 exactly the weights the full model loaded in that format computes with."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mesh.halo import groups as split
from mesh.halo.placement import pack_order, unpack_order
from mesh.halo.probe import SpeedProbe, probe_groups
from mesh.halo.shard import FileGroups, ModelGroups, columns_of, rows_of
from mesh.model import LoadedModel, converted_dir, load_model
from mesh.weights.formats import quantize_groups, quantize_groups8, quantize_rows
from tests.conftest import CACHE_ROOT, ENV, REPO, require_model

MODELS = ("smollm2-135m", "gemma3-270m")


@functools.cache
def _loaded(key: str, weights: str) -> LoadedModel:
    require_model(key)
    return load_model(CACHE_ROOT, key, weights=weights)


def _file(key: str, weights: str) -> FileGroups:
    return FileGroups(converted_dir(CACHE_ROOT, key), key, weights)


def _order(n: int, seed: int) -> tuple[int, ...]:
    """A non-trivial neuron order, as a plan carries it (packed and unpacked)."""
    g = torch.Generator().manual_seed(seed)
    return unpack_order(pack_order(torch.randperm(n, generator=g).tolist()))


def _third(layout: split.GroupLayout, k: int = 0) -> list[int]:
    return list(range(k, layout.n_groups, 3))


def _same(a: split.GroupWeights, b: split.GroupWeights) -> None:
    assert (a.layer, a.groups, a.sizes, a.act) == (b.layer, b.groups, b.sizes, b.act)
    for name in ("gate", "up", "down"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype == torch.float32 and ta.shape == tb.shape, name
        assert torch.equal(ta, tb), f"{name} differs"
    assert a.gate_bias is None and b.gate_bias is None and a.up_bias is None and b.up_bias is None


@pytest.mark.parametrize("key", MODELS)
def test_fp32_groups_and_partials_are_bitwise_todays_worker(key: str) -> None:
    loaded = _loaded(key, "fp32")
    today, lean = ModelGroups(loaded), _file(key, "fp32")
    assert lean.model_key == today.model_key == loaded.model_key
    assert (lean.layout, lean.n_layers, lean.hidden_size) == (today.layout, today.n_layers, today.hidden_size)
    assert lean.act == split.mlp_act_name(loaded.model.config)
    layout = lean.layout
    order = _order(layout.intermediate_size, 7)
    torch.manual_seed(0)
    x = torch.randn(1, 3, lean.hidden_size)  # (B, T, H): a prefill's frame
    for layer in (0, lean.n_layers // 2, lean.n_layers - 1):
        # a third of the groups, scrambled, in the model's own order and in a plan's neuron order
        groups = _third(layout, layer % 3)[::-1]
        for o in (None, order):
            a, b = today.read(layer, groups, o), lean.read(layer, groups, o)
            _same(a, b)
            assert torch.equal(a.partial(x), b.partial(x))
            assert torch.equal(a.partial(x[:, :1]), b.partial(x[:, :1]))
    # the speed probe's fixed workload is the same too
    pa, pb = SpeedProbe(today.read(0, probe_groups(layout))), SpeedProbe(lean.read(0, probe_groups(layout)))
    _same(pa.weights, pb.weights)


def _effective(proj: torch.nn.Module, width: int) -> torch.Tensor:
    """The weight (N, K) a full model's projection computes with, from its own forward on the
    identity: an int8 row times its scale, a q4 group's codes times scale plus minimum."""
    with torch.inference_mode():
        return proj(torch.eye(width)).T.contiguous()


@pytest.mark.parametrize("weights", ["int8", "q4"])
@pytest.mark.parametrize("key", MODELS)
def test_quantised_groups_are_the_full_models_weights(key: str, weights: str) -> None:
    loaded = _loaded(key, weights)
    lean = _file(key, weights)
    assert lean.model_key == loaded.model_key and lean.model_key.endswith(f"/{weights}")
    layout, hidden = lean.layout, lean.hidden_size
    order = _order(layout.intermediate_size, 11)
    layers = split.decoder_layers(loaded.model)
    torch.manual_seed(1)
    x = torch.randn(1, 1, hidden)
    for layer in (0, lean.n_layers - 1):
        mlp = layers[layer].mlp
        gate, up = _effective(mlp.gate_proj, hidden), _effective(mlp.up_proj, hidden)  # (I, H)
        down = _effective(mlp.down_proj, layout.intermediate_size)  # (H, I)
        thirds = [_third(layout, k) for k in range(3)]
        mine = [lean.read(layer, gs, order) for gs in thirds]
        for gs, w in zip(thirds, mine):
            rows = torch.as_tensor(order)[layout.neuron_index(gs)]
            ref = split.extract_from_tensors(gate, up, down, gs, layout, w.act, layer, rows=rows)
            _same(w, ref)
            assert torch.equal(w.partial(x), ref.partial(x))
        # the three workers' partials add up to the full model's MLP (its own kernels: another
        # summation order, so to float32 rounding)
        with torch.inference_mode():
            want = mlp(x)
        got = split.reduce_partials([w.partial(x) for w in mine], x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), \
            float((got - want).abs().max())


@pytest.mark.parametrize("weights", ["int8", "q4"])
@pytest.mark.parametrize("key", MODELS)
def test_the_coordinator_cuts_a_workers_numbers_out_of_its_loaded_model(key: str, weights: str) -> None:
    """HALO's coordinator runs its loaded int8/q4 model and computes its own groups and its
    fallback's from it (ModelGroups): bitwise the groups a worker of that format reads from the
    file, in any neuron order, with no float32 copy of the whole MLP."""
    loaded = _loaded(key, weights)
    mine, worker = ModelGroups(loaded), _file(key, weights)
    assert (mine.model_key, mine.layout, mine.n_layers, mine.hidden_size, mine.act) == \
        (worker.model_key, worker.layout, worker.n_layers, worker.hidden_size, worker.act)
    order = _order(mine.layout.intermediate_size, 5)
    torch.manual_seed(2)
    x = torch.randn(1, 2, mine.hidden_size)
    for layer in (0, mine.n_layers - 1):
        groups = _third(mine.layout, 1)[::-1]
        for o in (None, order):
            a, b = mine.read(layer, groups, o), worker.read(layer, groups, o)
            _same(a, b)
            assert torch.equal(a.partial(x), b.partial(x))


def test_columns_of_a_stored_weight_are_the_whole_matrixs_columns() -> None:
    """A down projection's columns (a group's neurons) straight from int8, q4 or grouped int8
    codes: bitwise the columns of the whole matrix dequantised (what a worker once unpacked)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 256, generator=g)
    cols = torch.randperm(256, generator=g)[:70]
    for stored in (quantize_rows(w), quantize_groups(w), quantize_groups8(w), (w,)):
        whole = rows_of(stored, torch.arange(12))  # (12, 256) float32
        assert torch.equal(columns_of(stored, cols), whole.index_select(1, cols))
        assert torch.equal(rows_of(stored, cols[:5] % 12), whole.index_select(0, cols[:5] % 12))


def test_reading_keeps_no_mapping_and_imports_no_transformers(tmp_path: Path) -> None:
    """In a fresh process: reading every layer's third maps the file only while a layer is read,
    and nothing imports transformers."""
    require_model("smollm2-135m")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from mesh.halo.shard import FileGroups
        from mesh.model import converted_dir
        import nodes.worker, mesh.halo.worker  # the worker-only node's modules
        key = "smollm2-135m"
        path = converted_dir(Path({str(CACHE_ROOT)!r}), key)
        for weights in ("fp32", "q4"):
            lean = FileGroups(path, key, weights)
            held = [lean.read(layer, list(range(0, lean.layout.n_groups, 3))) for layer in range(lean.n_layers)]
            maps = open("/proc/self/maps").read()
            assert str(lean.path) not in maps, "the weight file is still mapped"
        assert "transformers" not in sys.modules, sorted(m for m in sys.modules if m.startswith("transformers"))
        print("ok", len(held))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "30"], r.stderr[-3000:]


@pytest.mark.parametrize("weights", ["fp32", "q4"])
def test_a_node_that_answers_asks_cuts_its_groups_from_what_it_runs(weights: str) -> None:
    """A full node in int8/q4 holds codes, not float32 rows: its HALO worker reads its groups from
    the weight file (the same weights its forward computes with, above); fp32 slices the model."""
    from mesh.halo.shard import groups_of

    key = "smollm2-135m"
    loaded = _loaded(key, weights)
    source = groups_of(loaded, converted_dir(CACHE_ROOT, key))
    assert isinstance(source, ModelGroups if weights == "fp32" else FileGroups)
    assert source.model_key == loaded.model_key and source.n_layers == 30
    gs = _third(source.layout)
    _same(source.read(3, gs), _file(key, weights).read(3, gs))
