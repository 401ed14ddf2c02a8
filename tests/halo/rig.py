"""An in-memory HALO rig for the coordinator's engine: a tiny random-weight LLaMA, fake in-process
workers answering the MLP-input frames from their own copy of the weights, and a bus that carries
frames, plans and acks between them (no broker, no threads but the workers' delay timers)."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mesh import topics, wire
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.halo.engine import HaloEngine
from mesh.halo.placement import Plan
from mesh.halo.sync import SyncPolicy
from nodes.coordinator import CoordinatorConfig

DEEP = 48  # layers of the deep rig
# The straggler cut is off here: these tests time the deadline and stall rules themselves
# (tests/halo/test_sync.py covers the cut).
POLICY = SyncPolicy(target_share=0.5, min_deadline_s=0.01, max_deadline_s=0.03, default_deadline_s=0.02,
                    straggler_share=1.0)


def is_frame(payload: bytes) -> bool:
    """A HALO frame (a CBOR envelope never starts with these bytes: it is a map)."""
    return payload[:4] == halo_wire.MAGIC


def tiny_model(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class Loaded:
    key = "tiny"
    model_key = "tiny@0/fp32"

    def __init__(self, layers: int = 2) -> None:
        self.model = tiny_model(layers)


class FakeDecoder:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 97 for c in text[:24]]


class FakeWorker:
    """Answers the coordinator's MLP-input frames from the same weights, as a frame (only for a
    layer it holds groups of); ``delay`` per layer (None: never answers)."""

    def __init__(self, name: str, model: Any, layout: split.GroupLayout) -> None:
        self.name, self.model, self.layout = name, model, layout
        self.plans: dict[int, Plan] = {}
        self.delay: dict[int, float | None] = {}  # by layer; default 0
        self.served: list[int] = []

    def handle(self, data: bytes, deliver: Any) -> None:
        f = halo_wire.decode(data, wire.DEFAULT_MAX_BYTES)
        epoch, step, layer, x = f.epoch, f.step, f.layer, f.tensor
        delay = self.delay.get(layer, 0.0)
        if delay is None:
            return
        gs = self.plans[epoch].groups_for(self.name)[layer]
        if not gs:
            return
        y = split.extract_groups(self.model, layer, gs, self.layout).partial(x.float()).half()
        out = halo_wire.encode(halo_wire.PARTIAL, self.name, epoch, step, layer, y)
        self.served.append(step)
        threading.Timer(delay, deliver, args=(out,)).start() if delay else deliver(out)


class MemoryBus:
    def __init__(self) -> None:
        self.workers: dict[str, FakeWorker] = {}
        self.engine: HaloEngine | None = None
        self.plans: list[Plan] = []
        self.auto_ack = True

    def deliver(self, data: bytes) -> None:
        """A worker's partial frame to the coordinator's frame topic, a CBOR ack to its reply topic."""
        assert self.engine is not None
        if is_frame(data):
            self.engine.on_frame(self.engine.frame_reply, data, False)
        else:
            self.engine.on_reply("reply", data, False)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        if topic == topics.HALO_PLAN:
            plan = Plan.from_dict(wire.decode(payload).body["plan"])
            self.plans.append(plan)
            for w in self.workers.values():
                w.plans[plan.epoch] = plan
                if self.auto_ack:
                    self.ack(w.name, plan.epoch)
            return
        for name, w in self.workers.items():
            if topic == topics.node_mlp("coordinator"):
                w.handle(payload, self.deliver)

    def ack(self, worker: str, epoch: int) -> None:
        self.deliver(wire.encode(wire.Envelope(wire.Kind.HALO_ACK, worker, {"epoch": epoch})))


def heartbeat(speed: float, late: float = 0.0) -> dict[str, Any]:
    return {"roles": ["answer", "worker"], "model_key": Loaded.model_key,
            "halo": {"compute_rows_per_s": speed, "group_size": 16}, "link": {"late_fraction": late}}


def make_rig(tmp_path: Path, layers: int = 2, policy: SyncPolicy = POLICY) -> Iterator[tuple[HaloEngine, MemoryBus]]:
    loaded = Loaded(layers)
    cfg = CoordinatorConfig(home=tmp_path, group_size=16, policy=policy, strict_timeout_s=2.0)
    bus = MemoryBus()
    engine = HaloEngine(loaded, FakeDecoder(), cfg, bus, topics.reply("coordinator"), wire.RejectCounter())
    bus.engine = engine
    layout = split.model_layout(loaded.model.config, 16)
    for n in ("good", "lossy"):  # each worker has its own copy of the weights, as a node does
        bus.workers[n] = FakeWorker(n, copy.deepcopy(loaded.model), layout)
    # "lossy" reports a poor link: it gets the least important groups.
    views = [("good", heartbeat(1000.0), True), ("lossy", heartbeat(1000.0, late=0.3), True)]
    engine.replan(views, time.monotonic(), idle=True)
    assert engine.switch.active is not None and set(engine.switch.active.workers) == {"good", "lossy"}
    # One torch thread: on a loaded 2-core machine two spinning OpenMP threads make a tiny forward
    # take longer than the deadlines these tests time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield engine, bus
    torch.set_num_threads(threads)


def forward(engine: HaloEngine, strict: bool, ids: list[int]) -> tuple[torch.Tensor, Any, float]:
    """One routed forward pass of ``ids``: (logits, the run's figures, seconds)."""
    t0 = time.perf_counter()
    with engine.run(strict) as run:
        logits = engine.model(input_ids=torch.tensor([ids])).logits
    return logits, run, time.perf_counter() - t0
