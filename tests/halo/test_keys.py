"""HALO's authentication on the coordinator's real engine (in memory): signed plans and acks, a
pairwise tag on every frame; a forger that answers every step first in every worker's name with
NaN partials wins without keys and is refused with them (the in-memory half of E9)."""

from __future__ import annotations

import copy
import datetime
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.serialization import Encoding

from mesh import topics, wire
from mesh.auth.certs import CertificateAuthority
from mesh.auth.keyring import Keyring
from mesh.errors import ProtocolError
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.halo.engine import HaloEngine
from mesh.halo.keys import HaloKeys
from mesh.halo.placement import Plan
from nodes.coordinator import CoordinatorConfig
from tests.halo.rig import POLICY, FakeDecoder, Loaded, heartbeat, is_frame

WORKERS = ("good", "lossy")


class KeyedWorker:
    """A worker holding its identity: opens the sealed plan, seals its ack, checks each MLP input's
    tag and tags its partials (the same calls as ``mesh.halo.worker``)."""

    def __init__(self, name: str, keys: HaloKeys, model: Any, layout: split.GroupLayout) -> None:
        self.name, self.keys, self.model, self.layout = name, keys, model, layout
        self.plans: dict[int, Plan] = {}
        self.refused: list[str] = []

    def plan(self, payload: bytes) -> bytes:
        env = self.keys.open(payload, topics.HALO_PLAN, wire.DEFAULT_MAX_BYTES, retained=True)
        plan = Plan.from_dict(env.body["plan"])
        self.plans[plan.epoch] = plan
        self.keys.joined(env.sender, plan.epoch, list(plan.workers), self.name)
        ack = wire.Envelope(wire.Kind.HALO_ACK, self.name, {"epoch": plan.epoch})
        return self.keys.seal(ack, topics.reply("coordinator"))

    def handle(self, data: bytes) -> bytes | None:
        f = halo_wire.decode(data, wire.DEFAULT_MAX_BYTES)
        try:
            self.keys.check(f)
        except ProtocolError as exc:
            self.refused.append(exc.reason)
            return None
        gs = self.plans[f.epoch].groups_for(self.name)[f.layer]
        if not gs:
            return None
        y = split.extract_groups(self.model, f.layer, gs, self.layout).partial(f.tensor.float()).half()
        return halo_wire.encode(halo_wire.PARTIAL, self.name, f.epoch, f.step, f.layer, y,
                                keys=self.keys.partial_keys(f.sender))


class ForgingBus:
    """Carries plans, acks and frames between the engine and its workers; ``forge`` first answers
    every MLP input in each worker's name with NaN (tagged under ``forger_key`` if given)."""

    def __init__(self) -> None:
        self.engine: HaloEngine | None = None
        self.workers: dict[str, KeyedWorker] = {}
        self.forge = False
        self.forger_key: bytes | None = None
        self.plan_payloads: list[bytes] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        assert self.engine is not None
        if topic == topics.HALO_PLAN:
            self.plan_payloads.append(payload)
            for w in self.workers.values():
                self.engine.on_reply(topics.reply("coordinator"), w.plan(payload), False)
            return
        assert topic == topics.node_mlp("coordinator") and is_frame(payload)
        f = halo_wire.decode(payload, wire.DEFAULT_MAX_BYTES)
        if self.forge:
            nan = torch.full(tuple(f.tensor.shape), float("nan"), dtype=torch.float16)
            for w in self.workers:
                keys = [self.forger_key] if self.forger_key is not None else []
                self.engine.on_frame(self.engine.frame_reply, halo_wire.encode(
                    halo_wire.PARTIAL, w, f.epoch, f.step, f.layer, nan, keys=keys), False)
        for w in self.workers.values():
            out = w.handle(payload)
            if out is not None:
                self.engine.on_frame(self.engine.frame_reply, out, False)


def build(tmp_path: Path, keyed: bool) -> tuple[HaloEngine, ForgingBus, CertificateAuthority | None]:
    ca = CertificateAuthority.create() if keyed else None

    def ring(name: str, role: str) -> Keyring | None:
        return Keyring(ca.issue(name, role), ca.cert) if ca is not None else None

    loaded = Loaded(2)
    bus = ForgingBus()
    cfg = CoordinatorConfig(home=tmp_path, group_size=16, policy=POLICY, strict_timeout_s=2.0)
    engine = HaloEngine(loaded, FakeDecoder(), cfg, bus, topics.reply("coordinator"), wire.RejectCounter(),
                        ring("coordinator", "coordinator"))
    bus.engine = engine
    layout = split.model_layout(loaded.model.config, 16)
    for n in WORKERS:
        bus.workers[n] = KeyedWorker(n, HaloKeys(ring(n, "node")), copy.deepcopy(loaded.model), layout)
    engine.replan([(n, heartbeat(1000.0), True) for n in WORKERS], time.monotonic(), idle=True)
    assert engine.switch.active is not None and set(engine.switch.active.workers) == set(WORKERS)
    return engine, bus, ca


def strict_logits(engine: HaloEngine) -> torch.Tensor:
    with engine.run(strict=True):
        return engine.model(input_ids=torch.tensor([[3, 14, 15, 92, 6]])).logits


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_without_keys_the_forger_owns_the_answer(tmp_path: Path) -> None:
    """The control: the unauthenticated engine takes the first partial per worker, the forger's."""
    engine, bus, _ = build(tmp_path, keyed=False)
    bus.forge = True
    assert torch.isnan(strict_logits(engine)).all()


def test_with_keys_forged_partials_are_refused_and_the_answer_is_exact(tmp_path: Path) -> None:
    engine, bus, ca = build(tmp_path, keyed=True)
    honest = strict_logits(engine)
    assert torch.isfinite(honest).all() and engine.rejects.total() == 0
    bus.forge = True  # untagged NaN partials, first, in every worker's name
    assert torch.equal(strict_logits(engine), honest)
    untagged = engine.rejects.snapshot()["unauthenticated"]
    assert untagged >= len(WORKERS)
    # A forger with an identity of its own (another node of the same CA) still lacks the pair key.
    assert ca is not None
    thief = Keyring(ca.issue("thief", "node"), ca.cert)
    bus.forger_key = thief.pair_key(thief.peer(engine.keys.keyring.identity.cert_der))
    assert torch.equal(strict_logits(engine), honest)
    assert engine.rejects.snapshot()["bad-mac"] >= len(WORKERS)
    assert all(not w.refused for w in bus.workers.values())


def test_workers_refuse_forged_inputs_and_plans(tmp_path: Path) -> None:
    engine, bus, ca = build(tmp_path, keyed=True)
    w = bus.workers["good"]
    plan = engine.switch.active
    x = torch.randn(1, 1, 32).half()
    forged = halo_wire.encode(halo_wire.MLP, "coordinator", plan.epoch, 1, 0, x, reply_to="mesh/v1/reply/x")
    assert w.handle(forged) is None and w.refused == ["unauthenticated"]
    other = halo_wire.encode(halo_wire.MLP, "coordinator", plan.epoch + 1, 1, 0, x, reply_to="mesh/v1/reply/x",
                             keys=[bytes(32), bytes(32)])
    assert w.handle(other) is None and w.refused[-1] == "not-in-plan"
    assert ca is not None
    # A plan sealed by a node, or a plain one, never reaches a worker.
    node = Keyring(ca.issue("pi9", "node"), ca.cert)
    env = wire.decode(Keyring.open(w.keys.keyring, bus.plan_payloads[-1], topics.HALO_PLAN, True).inner)
    forged_plan = node.seal(wire.encode(wire.Envelope(wire.Kind.HALO_PLAN, "pi9", env.body)), topics.HALO_PLAN)
    with pytest.raises(ProtocolError, match="wrong-role"):
        w.plan(forged_plan)
    with pytest.raises(ProtocolError, match="unauthenticated"):
        w.plan(wire.encode(env))
    # An ack of a node outside the plan, or a plain one, does not count.
    before = engine.rejects.total()
    engine.on_reply(topics.reply("coordinator"), wire.encode(wire.Envelope(wire.Kind.HALO_ACK, "good",
                                                                           {"epoch": plan.epoch})), False)
    assert engine.rejects.snapshot().get("unauthenticated", 0) >= 1 and engine.rejects.total() == before + 1


def test_a_reissued_worker_gets_its_new_key_and_a_revoked_one_none(tmp_path: Path) -> None:
    engine, bus, ca = build(tmp_path, keyed=True)
    assert ca is not None
    plan = engine.switch.active
    keys = engine.keys
    before = keys.mlp_keys(plan.epoch, plan.workers)
    # "good" comes back with a new identity (its old files lost): its ack carries the new certificate.
    renewed = HaloKeys(Keyring(ca.issue("good", "node"), ca.cert))
    bus.workers["good"].keys = renewed
    bus.publish(topics.HALO_PLAN, bus.plan_payloads[-1])
    after = keys.mlp_keys(plan.epoch, plan.workers)
    assert after[0] != before[0] and after[1] == before[1]  # sorted: good, lossy
    honest = strict_logits(engine)
    assert torch.isfinite(honest).all() and "bad-mac" not in engine.rejects.snapshot()
    # "lossy" is revoked: once the coordinator holds the new CRL, its frames find no key.
    lossy = bus.workers["lossy"].keys.keyring.identity
    crl = ca.revocation_list({lossy.serial: datetime.datetime.now(datetime.timezone.utc)}, number=1)
    assert keys.keyring.update_crl(crl.public_bytes(Encoding.DER))
    assert keys.mlp_keys(plan.epoch, plan.workers)[1] is None
    y = torch.zeros(1, 1, 32).half()
    tagged = halo_wire.encode(halo_wire.PARTIAL, "lossy", plan.epoch, 1, 0, y,
                              keys=bus.workers["lossy"].keys.partial_keys("coordinator"))
    with pytest.raises(ProtocolError, match="unknown-peer"):
        keys.check(halo_wire.decode(tagged, wire.DEFAULT_MAX_BYTES))
