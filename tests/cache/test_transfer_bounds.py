"""Review finding L3 against a real broker: a KV fetch ends at its deadline, whatever a peer
queued, and a peer numbering empty parts cannot keep it open or grow the asker's memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from mesh import topics, wire
from mesh.cache.transfer import KVCheck, PeerTransfer, Reading
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.inbox import ReplyInbox
from tests.conftest import Broker

MODEL = b"m" * 16
CHECK = KVCheck(layout=((1, 4),), chunk_size=16, model=MODEL, vocab=32)


class Rogue:
    """A peer ``z`` that answers every KV fetch with ``parts`` empty parts numbered from 0, never
    the last one (or, with ``parts`` None, one every ``every_s`` until the test ends)."""

    def __init__(self, broker: Broker, parts: int | None, every_s: float = 0.01) -> None:
        self.parts, self.every_s = parts, every_s
        self.done = threading.Event()
        self.sent = 0
        self.threads: list[threading.Thread] = []
        self.bus = MqttBus(f"rogue-{time.monotonic_ns() % 10**9}", broker.address)
        self.bus.start(10)
        self.bus.subscribe(topics.node_kv("z"), self._on_fetch)  # connected: returns after the SUBACK

    def _on_fetch(self, topic: str, payload: bytes, retained: bool) -> None:
        env = wire.decode(payload)
        t = threading.Thread(target=self._answer, args=(env,), daemon=True)
        t.start()
        self.threads.append(t)

    def _answer(self, env: wire.Envelope) -> None:
        i = 0
        while not self.done.is_set() and (self.parts is None or i < self.parts):
            part = wire.Envelope(wire.Kind.KV_CHUNKS, "z", {"chunks": [], "part": i, "last": False}, corr=env.corr)
            self.bus.publish(env.reply_to, wire.encode(part), qos=1)
            self.sent, i = i + 1, i + 1
            if self.parts is None:
                self.done.wait(self.every_s)

    def close(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(5)
        self.bus.stop()


@pytest.fixture()
def asker(amqtt_broker: Broker) -> Iterator[tuple[PeerTransfer, ReplyInbox]]:
    bus = MqttBus(f"asker-{time.monotonic_ns() % 10**9}", amqtt_broker.address)
    bus.start(10)
    inbox = ReplyInbox(bus, "node-a", max_queued=64)
    inbox.start()
    transfer = PeerTransfer(bus, inbox, "a", lambda *_: [], MODEL, kv_wire="fp16", online=lambda _: True,
                            stop=threading.Event(), rejects=inbox.rejects, max_message_bytes=1 << 20)
    yield transfer, inbox
    bus.stop()


def test_a_fetch_returns_nothing_past_its_deadline(amqtt_broker: Broker, asker: tuple[PeerTransfer, ReplyInbox]) -> None:
    transfer, inbox = asker
    rogue = Rogue(amqtt_broker, parts=20)
    try:
        replies = transfer.fetch("z", [b"k" * 16], None, timeout=0.0)  # its deadline: now
        deadline = time.monotonic() + 10
        while replies.replies.qsize() < 20:  # every part is in before anything is read
            assert time.monotonic() < deadline, replies.replies.qsize()
            time.sleep(0.01)
        assert list(replies) == []
        assert replies.corr not in inbox._pending  # the reply slot is released
    finally:
        rogue.close()


def test_empty_numbered_parts_neither_keep_a_fetch_open_nor_grow_memory(
        amqtt_broker: Broker, asker: tuple[PeerTransfer, ReplyInbox]) -> None:
    transfer, inbox = asker
    rogue = Rogue(amqtt_broker, parts=None)
    try:
        t0 = time.perf_counter()
        want = [bytes([i]) * 16 for i in range(4)]
        replies = transfer.fetch("z", want, None, timeout=5.0)
        reading = Reading(CHECK, "z", want, b"p" * 16, False, replies, t0, 0.001, 0)
        reading.finish()
        took = time.perf_counter() - t0
        assert reading.bad is not None and "empty part" in reading.bad, (reading.bad, reading.ended, took)
        assert not reading.complete and reading.next_part == 0 and took < 2.0, took
        # the slot is released: what the rogue goes on sending joins no queue (counted, dropped)
        assert replies.corr not in inbox._pending
    finally:
        rogue.close()
