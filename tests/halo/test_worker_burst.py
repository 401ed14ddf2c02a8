"""HaloWorker after a stalled link: the frames of every step the coordinator ran meanwhile arrive
at once; only the newest is worth a partial (the coordinator discards the others on arrival)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mesh import topics, wire
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.halo.worker import HaloWorker


class Bus:
    def __init__(self) -> None:
        self.pending = False  # whether more input is "waiting on the socket"
        self.sent: list[halo_wire.Frame] = []

    def input_pending(self) -> bool:
        return self.pending

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.sent.append(halo_wire.decode(payload, wire.DEFAULT_MAX_BYTES))


def _worker() -> tuple[HaloWorker, Bus]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    bus = Bus()
    w = HaloWorker(group_size=32)
    w.agent = SimpleNamespace(bus=bus, rejects=wire.RejectCounter(), limits=SimpleNamespace(max_message_bytes=1 << 20))
    w.name, w.model, w.model_key = "w1", model, "tiny@0/fp32"
    w.layout = split.model_layout(model.config, 32)
    w.n_layers = 2
    w._weights[1] = [split.extract_groups(model, layer, (0, 2), w.layout) for layer in range(2)]
    return w, bus


def _frame(step: int, x: torch.Tensor | None = None) -> bytes:
    x = torch.randn(1, 1, 32).half() if x is None else x
    return halo_wire.encode(halo_wire.MLP, "coordinator", 1, step, step % 2, x, reply_to=topics.halo_link("coordinator"))


def test_a_burst_of_frames_gets_one_partial_for_the_newest_step() -> None:
    w, bus = _worker()
    bus.pending = True  # the backlog: every frame but the last has more input behind it
    for step in range(100, 110):
        w._on_frame(topics.node_mlp("coordinator"), _frame(step), False)
    assert bus.sent == [] and len(w._requests) == 10  # queued for the compute thread, not served inline
    bus.pending = False
    w._on_frame(topics.node_mlp("coordinator"), _frame(110), False)
    assert [f.step for f in bus.sent] == [110]  # the newest, served inline at once
    loop = threading.Thread(target=w._compute_loop, daemon=True)
    loop.start()
    deadline = time.monotonic() + 5
    while w._requests and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    w._stop.set()
    loop.join(5)
    assert [f.step for f in bus.sent] == [110]  # nothing of the backlog was computed
    assert w.dropped == 10 and w.served == 1


def test_a_frame_alone_is_served_inline_and_a_queued_one_still_served_when_nothing_overtook_it() -> None:
    w, bus = _worker()
    w._on_frame(topics.node_mlp("coordinator"), _frame(7), False)
    assert [f.step for f in bus.sent] == [7]
    bus.pending = True  # e.g. a heartbeat right behind the frame: it is still the newest step
    x = torch.randn(1, 1, 32).half()
    w._on_frame(topics.node_mlp("coordinator"), _frame(8, x), False)
    loop = threading.Thread(target=w._compute_loop, daemon=True)
    loop.start()
    deadline = time.monotonic() + 5
    while len(bus.sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    w._stop.set()
    loop.join(5)
    assert [f.step for f in bus.sent] == [7, 8] and w.dropped == 0
    want = split.extract_groups(w.model, 0, (0, 2), w.layout).partial(x.float()).half()  # layer 8 % 2
    assert torch.equal(bus.sent[1].tensor, want)


class Link:
    """The worker's own connection as _serve_batch sees it: publish works until ``broken``."""

    def __init__(self) -> None:
        self.broken = False
        self.sent: list[halo_wire.Frame] = []

    def publish(self, topic: str, payload: bytes) -> bool:
        if self.broken:
            return False
        self.sent.append(halo_wire.decode(payload, wire.DEFAULT_MAX_BYTES))
        return True


def test_one_read_of_the_link_serves_each_coordinators_newest_frame_on_the_link() -> None:
    w, bus = _worker()
    link = Link()
    other = [halo_wire.encode(halo_wire.MLP, "coord-b", 1, s, 1, torch.randn(1, 1, 32).half(),
                              reply_to=topics.halo_link("coord-b")) for s in (5, 6)]
    prefill = _frame(99, torch.randn(1, 4, 32).half())  # four positions: the compute thread's
    for payload in [prefill] + [_frame(s) for s in range(100, 106)] + other + [b"not a frame"]:
        w._on_link_message(topics.node_mlp("coordinator"), payload, False)
    w._serve_batch(link)
    assert sorted((f.sender, f.step) for f in link.sent) == [("w1", 6), ("w1", 105)]
    assert bus.sent == [] and w.served == 2 and w.dropped == 5 + 1
    assert [f.step for f in w._requests] == [99]
    # A prefill step after a decode one of the same coordinator: the decode one is stale, once.
    before = w.dropped
    for payload in (_frame(300), _frame(301, torch.randn(1, 4, 32).half())):
        w._on_link_message(topics.node_mlp("coordinator"), payload, False)
    w._serve_batch(link)
    assert w.dropped == before + 1 and [f.step for f in w._requests] == [99, 301]
    assert sorted(f.step for f in link.sent) == [6, 105]
    assert w.agent.rejects.snapshot()  # the garbage was counted
    assert w._batch == []
    # The link broke while answering: the partial goes over the bus instead.
    link.broken = True
    w._on_link_message(topics.node_mlp("coordinator"), _frame(200), False)
    w._serve_batch(link)
    assert [f.step for f in bus.sent] == [200]
