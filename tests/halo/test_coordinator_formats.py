"""The HALO coordinator's engine over the mesh's own forward (mesh.lm) in int8 and q4, with
in-process workers that read their groups from the weight file as a worker-only node does
(mesh.halo.shard.FileGroups): a strict generation is token for token the plain forward of the same
weights, every partial comes from a worker, the predictor trained on fp32 serves the format, and
with no plan the routed step is the loaded MLP itself (bitwise)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mesh import topics, wire
from mesh.halo import frame as halo_wire
from mesh.halo.engine import HaloEngine
from mesh.halo.predictor import predictor_path
from mesh.halo.shard import FileGroups
from mesh.lm.model import CausalLM
from mesh.model import Decoder, LoadedModel, converted_dir, load_model
from mesh.weights import modules
from nodes.coordinator import CoordinatorConfig
from tests.conftest import CACHE_ROOT, require_model
from tests.halo.rig import MemoryBus

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"


class FileWorker:
    """A worker-only node's arithmetic in-process: its groups read from the weight file once per
    plan and layer, partials of the fp16 MLP input sent back in fp16."""

    def __init__(self, name: str, source: FileGroups) -> None:
        self.name, self.source = name, source
        self.plans: dict[int, Any] = {}
        self._held: dict[tuple[int, int], Any] = {}

    def handle(self, data: bytes, deliver: Any) -> None:
        f = halo_wire.decode(data, wire.DEFAULT_MAX_BYTES)
        plan = self.plans[f.epoch]
        groups = plan.groups_for(self.name)[f.layer]
        if not groups:
            return
        key = (f.epoch, f.layer)
        if key not in self._held:
            self._held[key] = self.source.read(f.layer, groups, plan.neuron_order(f.layer))
        y = self._held[key].partial(f.tensor.float()).half()
        deliver(halo_wire.encode(halo_wire.PARTIAL, self.name, f.epoch, f.step, f.layer, y))


def _heartbeat(model_key: str) -> dict[str, Any]:
    return {"roles": ["worker"], "model_key": model_key,
            "halo": {"compute_rows_per_s": 1e6, "group_size": 64}, "link": {"late_fraction": 0.0}}


@pytest.fixture
def float32_decode() -> Iterator[None]:
    """int8's decode kernel on x86 rounds a row to bfloat16 (mesh.weights.modules), a worker's
    partial is float32 arithmetic: compare the two paths with the same kernel arithmetic."""
    before = modules.decode_kernel()
    modules.set_kernel(decode="dequant")
    yield
    modules.set_kernel(decode=before)


def _engine(loaded: LoadedModel, tmp_path: Path, workers: tuple[str, ...]) -> tuple[HaloEngine, MemoryBus]:
    trained = predictor_path(CACHE_ROOT, MODEL, 64)
    cfg = CoordinatorConfig(home=tmp_path, model=MODEL, weights=loaded.weights, strict_timeout_s=60.0,
                            predictor=trained if trained.exists() else None)
    bus = MemoryBus()
    engine = HaloEngine(loaded, Decoder(loaded), cfg, bus, topics.reply("coordinator"), wire.RejectCounter())
    bus.engine = engine
    source = FileGroups(converted_dir(CACHE_ROOT, MODEL), MODEL, loaded.weights)
    for name in workers:
        bus.workers[name] = FileWorker(name, source)  # type: ignore[assignment]
    return engine, bus


@pytest.mark.parametrize("weights", ["int8", "q4"])
def test_strict_over_workers_of_the_format_is_the_plain_forward(weights: str, tmp_path: Path, one_thread: None,
                                                                float32_decode: None) -> None:
    require_model(MODEL)
    loaded = load_model(CACHE_ROOT, MODEL, weights=weights)
    assert isinstance(loaded.model, CausalLM) and loaded.model_key.endswith(f"/{weights}")
    dec = Decoder(loaded)
    ids = dec.encode(PROMPT)
    ref = dec.generate(ids, 12)
    engine, _ = _engine(loaded, tmp_path, ("w1", "w2"))
    assert (engine.predictor is not None) == predictor_path(CACHE_ROOT, MODEL, 64).exists()
    assert all(o is not None for o in engine.orders) == (engine.predictor is not None)
    engine.replan([(n, _heartbeat(loaded.model_key), True) for n in ("w1", "w2")], time.monotonic(), idle=True)
    plan = engine.switch.active
    assert plan is not None and set(plan.workers) == {"w1", "w2"} and not any(plan.local)
    assert plan.order == engine.order
    with engine.run(strict=True) as run:
        got = dec.generate(ids, 12)
    figs = run.figures()
    assert got.token_ids == ref.token_ids and len(ref.token_ids) == 12, (got.text, ref.text)
    assert figs["partials_on_time"] == 2 * figs["steps"] > 0 and figs["local_fallback_groups"] == 0


@pytest.mark.parametrize("weights", ["int8", "q4"])
def test_with_no_plan_and_a_strict_fallback_the_coordinator_computes_a_workers_numbers(
        weights: str, tmp_path: Path, one_thread: None) -> None:
    """No plan yet: each layer's MLP as loaded (bitwise the plain forward). A plan whose worker
    never answers: strict computes its groups here, from the loaded model, and stays the plain
    model's answer."""
    require_model(MODEL)
    loaded = load_model(CACHE_ROOT, MODEL, weights=weights)
    dec = Decoder(loaded)
    ids = dec.encode(PROMPT)
    engine, bus = _engine(loaded, tmp_path, ("w1",))
    plain, _ = dec.prefill(ids)
    with engine.run(strict=True) as run:
        routed, _ = dec.prefill(ids)
    assert torch.equal(routed, plain) and run.figures()["steps"] == 0
    engine.replan([("w1", _heartbeat(loaded.model_key), True)], time.monotonic(), idle=True)
    assert engine.switch.active is not None
    bus.workers.clear()  # it never answers
    engine.set_online("w1", False)  # and went offline: no timeout to wait out
    with engine.run(strict=True) as run:
        fallback, _ = dec.prefill(ids)
    figs = run.figures()
    assert figs["local_fallback_groups"] == 30 * 24 and figs["partials_on_time"] == 0
    assert int(fallback.argmax()) == int(plain.argmax())
    assert torch.allclose(fallback, plain, atol=1e-3 * float(plain.abs().max()), rtol=0)


@pytest.mark.parametrize("weights", ["int8", "q4"])
def test_a_coordinator_alone_computes_every_layer_with_its_model_and_copies_no_rows(
        weights: str, tmp_path: Path, one_thread: None) -> None:
    """No worker: the plan keeps every group here, and each layer runs its loaded MLP module
    (bitwise the plain forward) instead of a float32 copy of every group's rows."""
    from mesh.halo.plans import WHOLE_LAYER

    require_model(MODEL)
    loaded = load_model(CACHE_ROOT, MODEL, weights=weights)
    dec = Decoder(loaded)
    ids = dec.encode(PROMPT)
    engine, _ = _engine(loaded, tmp_path, ())
    engine.replan([], time.monotonic(), idle=True)
    plan = engine.switch.active
    assert plan is not None and not plan.workers and engine.snapshot()["local_groups"] == 30 * 24
    assert engine.plans.local[plan.epoch] == [WHOLE_LAYER] * 30
    plain, _ = dec.prefill(ids)
    ref = dec.generate(ids, 8)
    with engine.run(strict=True) as run:
        routed, _ = dec.prefill(ids)
        got = dec.generate(ids, 8)
    assert torch.equal(routed, plain) and got.token_ids == ref.token_ids
    assert run.figures()["steps"] > 0 and run.figures()["local_fallback_groups"] == 0


def test_the_bench_evaluation_runs_on_the_mesh_forward(tmp_path: Path, one_thread: None) -> None:
    """`mesh bench halo`'s teacher-forced evaluation (an ask with ``halo_eval``) on mesh.lm's own
    cache: a prefill then one fed token at a time, each argmax the plain model's."""
    from mesh.halo.evaluate import evaluate

    require_model(MODEL)
    loaded = load_model(CACHE_ROOT, MODEL, weights="q4")
    dec = Decoder(loaded)
    ids = dec.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    engine, _ = _engine(loaded, tmp_path, ())
    engine.replan([], time.monotonic(), idle=True)
    out = evaluate(engine, {"ids": ids, "start": 3, "score_ids": [ids[0], ids[1]]}, strict=True)
    plain = dec.all_logits(ids)  # (T, V): position p's logits predict token p + 1
    assert out["eval"]["argmax"] == [int(plain[p - 1].argmax()) for p in range(3, len(ids))]
    assert len(out["eval"]["nll"]) == len(ids) - 3 and all(v >= 0 for v in out["eval"]["nll"])
    assert out["halo"]["sync"] == "strict" and out["halo"]["local_fallback_groups"] == 0
    assert len(out["eval"]["scores"]) == 2
