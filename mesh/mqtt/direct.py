"""The hot path's own connection: no network thread, its owner writes and reads the socket."""

from __future__ import annotations

import logging
import threading
import time

from mesh.config import BrokerAddress
from mesh.errors import TransportError
from mesh.mqtt.bus import Handler
from mesh.mqtt.lite import LiteClient

log = logging.getLogger(__name__)


class DirectLink:
    """A second connection for one thread's request/response hot path, with no network thread.

    The HALO coordinator publishes each layer step's MLP input and waits for the workers' partials
    on its generation thread. Through :class:`MqttBus` that costs two thread hand-offs per step:
    paho's network thread, woken through its socket pair, writes the publish, and it reads the
    partials and hands them back; on a busy 2-core device each is a wake-up that waits for a core
    and the GIL. Here the caller writes its publish itself and reads the answers itself
    (:meth:`pump`), and ``handler`` runs on the caller's thread, so a step is the network round
    trip alone. The connection is :class:`mesh.mqtt.lite.LiteClient` (QoS 0, one ``recv`` for
    every packet already there) rather than paho, whose per-message Python is the rest of a
    step's cost. One thread at a time (hold :attr:`lock`): the owner while it works, anyone else
    while it is idle, to answer the broker's keep-alive (:meth:`service`). A broken connection
    makes :attr:`usable` false; :meth:`service` reconnects it (never the hot path).
    """

    def __init__(self, client_id: str, broker: BrokerAddress, topic: str | None, handler: Handler, *,
                 keepalive: int = 10, retry_s: float = 5.0, max_packet: int = 16 * 1024 * 1024) -> None:
        self.client_id, self.broker, self.topic, self.handler = client_id, broker, topic, handler
        self.topics: list[str] = [topic] if topic else []  # subscribed at every (re)connect
        self.lock = threading.Lock()
        self.connects = self.failures = 0
        self._keepalive, self._retry_s, self._max_packet = keepalive, retry_s, max_packet
        self._conn: LiteClient | None = None
        self._state = "closed"  # closed -> ready; broken on error
        self._next_try = 0.0

    @property
    def usable(self) -> bool:
        return self._state == "ready"

    def open(self, timeout: float = 10.0) -> None:
        """Connect and subscribe (caller's thread, holding :attr:`lock` or before sharing it)."""
        if self._conn is not None:
            self._conn.close()
        conn = LiteClient(self.client_id, self.broker, self._keepalive, self._max_packet)
        try:
            conn.connect(timeout)
            if self.topics:
                conn.subscribe(self.topics, timeout)
        except TransportError:
            self._state = "broken"
            raise
        self._conn, self._state = conn, "ready"
        self.connects += 1

    def close(self, timeout: float = 2.0) -> None:
        held = self.lock.acquire(timeout=timeout)
        try:
            self._state = "closed"
            if self._conn is not None:
                self._conn.close(polite=True)
        finally:
            if held:
                self.lock.release()

    def add_topic(self, topic: str, timeout: float = 10.0) -> bool:
        """Subscribe ``topic`` too, now if the link is up (holding :attr:`lock`) and at every
        reconnect; False if the link is not usable now."""
        if topic not in self.topics:
            self.topics.append(topic)
        if self._state != "ready" or self._conn is None:
            return False
        try:
            self._conn.subscribe([topic], timeout)
        except TransportError as exc:
            self._broken(str(exc))
            return False
        return True

    def publish(self, topic: str, payload: bytes) -> bool:
        """Write ``payload`` now (QoS 0), on the caller's thread; False if the link is not usable."""
        if self._state != "ready" or self._conn is None:
            return False
        try:
            self._conn.publish(topic, payload)
        except TransportError as exc:
            self._broken(str(exc))
            return False
        return True

    def pump(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for input, then read every packet already there (the handler
        runs here) and answer the keep-alive. False if the link broke."""
        if self._state != "ready" or self._conn is None:
            return False
        try:
            messages = self._conn.read(timeout)
        except TransportError as exc:
            self._broken(str(exc))
            return False
        for topic, payload, retained in messages:
            try:
                self.handler(topic, payload, retained)
            except Exception:
                log.exception("direct-link handler for %s failed", topic)
        return True

    def service(self) -> None:
        """From an idle thread: keep the connection alive and reconnect it when it broke (at most
        every ``retry_s``). Skips while another thread holds the link."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self._state == "ready":
                self.pump(0.0)
            elif self._state == "broken" and time.monotonic() >= self._next_try:
                self._next_try = time.monotonic() + self._retry_s
                try:
                    self.open()
                    log.info("direct link to %s reconnected", self.broker)
                except TransportError as exc:
                    log.warning("%s (retrying in %g s)", exc, self._retry_s)
        finally:
            self.lock.release()

    def _broken(self, why: str) -> None:
        if self._state != "broken":
            self.failures += 1
            log.warning("direct link to %s broke: %s", self.broker, why)
        self._state = "broken"
