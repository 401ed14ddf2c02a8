"""Request/response over MQTT 3.1.1: a client's reply topic, replies routed by correlation id.

MQTT 3.1.1 (amqtt) has no response topic or correlation data, so both travel in the envelope
(``mesh.wire``). With a keyring, every reply must be sealed (``mesh.auth.senders``): the inbox
refuses and counts anything else; which sender may answer which ask is the asker's to judge
(``mesh.auth.senders.ReplyGate``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from mesh import topics, wire
from mesh.auth import senders
from mesh.auth.keyring import Keyring
from mesh.errors import ProtocolError, TransportError
from mesh.mqtt.bus import MqttBus

log = logging.getLogger(__name__)


MAX_QUEUED = 2048  # replies held per request: a full answer's token pieces (1,024 at most) and more
MAX_QUEUED_BYTES = 64 << 20  # their payload bytes: some 60 KV parts of 1 MiB, waiting to be checked


class Replies(queue.Queue):  # type: ignore[type-arg]
    """One request's replies, bounded: at most ``max_items`` of them and ``max_bytes`` of their
    payloads (one reply always fits an empty queue). :meth:`offer` refuses what does not fit;
    ``get`` returns envelopes, as a plain ``queue.Queue`` of them would.

    Anyone allowed to write a reply topic (every node, under the shipped ACL) can send a request's
    correlation id replies faster than the requester reads them (review L3); unbounded, they grew
    the requester's memory until it ended the request.
    """

    def __init__(self, max_items: int = MAX_QUEUED, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        super().__init__()
        self.max_items, self.max_bytes = max_items, max_bytes

    def _init(self, maxsize: int) -> None:
        self.queue: deque[tuple[wire.Envelope, int]] = deque()
        self.nbytes = 0

    def _put(self, item: tuple[wire.Envelope, int] | wire.Envelope) -> None:
        if isinstance(item, wire.Envelope):  # a plain put (a test's, a local hand-off): unbounded
            item = (item, 0)
        self.queue.append(item)
        self.nbytes += item[1]

    def _get(self) -> wire.Envelope:
        env, n = self.queue.popleft()
        self.nbytes -= n
        return env

    def offer(self, env: wire.Envelope, nbytes: int) -> bool:
        """Queue ``env`` (``nbytes`` on the wire) if it fits; False (dropped) if not."""
        with self.mutex:
            if self.queue and (len(self.queue) >= self.max_items or self.nbytes + nbytes > self.max_bytes):
                return False
            self._put((env, nbytes))
            self.unfinished_tasks += 1
            self.not_empty.notify()
        return True


class ReplyInbox:
    """A client's reply topic, with replies routed to per-request queues by correlation id.

    Each request's queue is bounded (:class:`Replies`: ``max_queued`` replies, ``max_queued_bytes``
    of payload); a reply beyond it is dropped and counted (``reply-overflow``).
    """

    def __init__(self, bus: MqttBus, name: str, rejects: wire.RejectCounter | None = None,
                 max_bytes: int = wire.DEFAULT_MAX_BYTES, keyring: Keyring | None = None,
                 max_queued: int = MAX_QUEUED, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.bus = bus
        self.keys = keyring
        self.name = name
        self.topic = topics.reply(name)
        self.rejects = rejects or wire.RejectCounter()
        self._max_bytes = max_bytes
        self.max_queued, self.max_queued_bytes = max_queued, max_queued_bytes
        self._pending: dict[str, Replies] = {}
        self._lock = threading.Lock()
        # Pings nobody waits for (a link prober's): return True when consumed.
        self.ping_handler: Callable[[wire.Envelope], bool] | None = None

    def start(self) -> None:
        self.bus.subscribe(self.topic, self._handle, qos=topics.REPLY.qos)

    def open(self, corr: str | None = None) -> tuple[str, queue.Queue[wire.Envelope]]:
        corr = corr or uuid.uuid4().hex
        q = Replies(self.max_queued, self.max_queued_bytes)
        with self._lock:
            self._pending[corr] = q
        return corr, q

    def close(self, corr: str) -> None:
        with self._lock:
            self._pending.pop(corr, None)

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            _, env = senders.decode(self.keys, payload, topic, self._max_bytes)
        except ProtocolError as exc:
            self.rejects.add(exc.reason)
            log.info("dropped reply on %s: %s", topic, exc)
            return
        with self._lock:
            q = self._pending.get(env.corr or "")
        if q is None:
            if env.kind is wire.Kind.PING and self.ping_handler is not None and self.ping_handler(env):
                return
            self.rejects.add("unexpected-reply")
            return
        if not q.offer(env, len(payload)):
            self.rejects.add("reply-overflow")

    def ping(self, timeout: float = 5.0, clock: Callable[[], float] = time.monotonic, pad: int = 0) -> float:
        """Round trip through the broker to our own reply topic, in seconds.

        It doubles as a barrier: once our ping is back, every retained message queued for our
        earlier subscriptions has been delivered (the broker keeps per-client order).
        """
        corr, q = self.open()
        try:
            t0 = clock()
            body: dict[str, Any] = {"t": t0}
            if pad:  # a large ping measures bandwidth: it crosses our link twice
                body["pad"] = bytes(pad)
            sender = self.keys.name if self.keys is not None else self.name
            payload = senders.encode(self.keys, wire.Envelope(wire.Kind.PING, sender, body, corr=corr), self.topic)
            self.bus.publish(self.topic, payload, qos=topics.REPLY.qos)
            try:
                q.get(timeout=timeout)
            except queue.Empty:
                raise TransportError(f"no ping echo from the broker within {timeout:g} s") from None
            return clock() - t0
        finally:
            self.close(corr)
