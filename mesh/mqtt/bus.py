"""The MQTT transport: a thin wrapper over paho-mqtt 2.x, and request/response over MQTT 3.1.1.

Components take a bus object instead of a paho client, so the pure logic stays testable and the
transport stays in one place. Handlers run on paho's network thread: they must be quick (decode,
enqueue) and any exception they raise is logged and counted, never allowed to kill the loop.

Request/response: MQTT 3.1.1 (amqtt) has no response topic or correlation data, so both travel
in the envelope (``mesh.wire``). A :class:`ReplyInbox` owns one reply topic per client and routes
replies to per-request queues by correlation id.

:class:`DirectLink` is a second connection without a network thread, for one thread's hot
request/response loop (the HALO coordinator's layer steps): its owner writes and reads the socket.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics, wire
from mesh.config import BrokerAddress
from mesh.errors import ProtocolError, TransportError
from mesh.mqtt.lite import LiteClient

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, bool], None]  # (topic, payload, retained)
ROUTES_MAX = 1024  # topics whose matching handlers are remembered (then forgotten at once)


def _paho_client(client_id: str, broker: BrokerAddress) -> mqtt.Client:
    """A paho client for ``broker``: MQTT 3.1.1, clean session, its credentials and TLS."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=True)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls_ca is not None:
        client.tls_set(ca_certs=str(broker.tls_ca),
                       certfile=str(broker.tls_cert) if broker.tls_cert else None,
                       keyfile=str(broker.tls_key) if broker.tls_key else None,
                       cert_reqs=ssl.CERT_REQUIRED)
    client.on_socket_open = _no_delay
    return client


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    # Without TCP_NODELAY small QoS 1 round trips wait on Nagle + delayed ACK (~40 ms).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


class MqttBus:
    """One paho client: connect with a last will, subscribe with handlers, publish."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerAddress,
        *,
        will: tuple[str, bytes, int, bool] | None = None,
        keepalive: int = 10,
        reconnect_max_s: int = 10,
    ) -> None:
        self.client_id = client_id
        self.broker = broker
        self.connected = threading.Event()
        # Successful CONNACKs so far: a change tells a waiter that the session was rebuilt (a
        # clean session loses whatever the broker held for us in between).
        self.connects = 0
        self.disconnects = 0
        self.handler_errors = 0
        self._handlers: dict[str, tuple[Handler, int]] = {}
        # topic -> its handlers: matching every filter against every message cost ~35 us per
        # message with a node's ~10 subscriptions (paho builds a matcher per call), on the HALO
        # hot path 30 times a token per worker. Cleared when a subscription changes; bounded.
        self._routes: dict[str, list[Handler]] = {}
        self._on_connect: list[Callable[[], None]] = []
        self._subacks = threading.Condition()
        self._acked: set[int] = set()
        self._lock = threading.Lock()
        self._client = _paho_client(client_id, broker)
        # paho doubles the wait after each failed attempt (1, 2, 4 ... s) and resets it on success.
        self._client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        self._keepalive = keepalive
        if will is not None:
            self._client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self.connect_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Connect (retrying in the background) and wait up to ``timeout`` for the CONNACK."""
        try:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=self._keepalive)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to broker {self.broker}: {exc}") from exc
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self._client.loop_stop()
            detail = f" ({self.connect_error})" if self.connect_error else ""
            raise TransportError(f"no connection to the MQTT broker at {self.broker} within {timeout:g} s{detail}")

    def stop(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self.connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or ``timeout`` passed (False)."""
        return self.connected.wait(max(timeout, 0.0))

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on every (re)connect, after subscriptions are restored."""
        self._on_connect.append(callback)

    # -- pub/sub ----------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout: float = 10.0) -> None:
        """Register a handler and subscribe; waits for the SUBACK when connected."""
        with self._lock:
            self._handlers[topic_filter] = (handler, qos)
            self._routes = {}
        if self.connected.is_set():
            result, mid = self._client.subscribe(topic_filter, qos)
            if result != mqtt.MQTT_ERR_SUCCESS:
                raise TransportError(f"subscribe {topic_filter} failed: {mqtt.error_string(result)}")
            with self._subacks:
                if not self._subacks.wait_for(lambda: mid in self._acked, timeout):
                    raise TransportError(f"no SUBACK for {topic_filter} within {timeout:g} s")
                self._acked.discard(mid)

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget the handler at once and unsubscribe (not waiting for the UNSUBACK: a message
        still in flight finds no handler and is dropped)."""
        with self._lock:
            if self._handlers.pop(topic_filter, None) is None:
                return
            self._routes = {}
        if self.connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                     timeout: float = 10.0) -> None:
        """Publish and wait until the broker acknowledged it (QoS 1) or it was sent (QoS 0)."""
        info = self.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {topic} not delivered: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"publish to {topic} not acknowledged within {timeout:g} s")

    def input_pending(self) -> bool:
        """Whether more bytes from the broker are already waiting to be read (network thread: in
        a handler, another message is right behind the one being handled)."""
        sock = self._client.socket()
        if sock is None:
            return False
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
        try:
            return bool((pending is not None and pending()) or select.select([sock], [], [], 0.0)[0])
        except (OSError, ValueError):
            return False

    # -- paho callbacks (network thread) ------------------------------------------------------
    def _handle_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._subacks:
            self._acked.add(mid)
            if len(self._acked) > 1024:  # acks nobody waited for (resubscribes after reconnect)
                self._acked.clear()
            self._subacks.notify_all()

    def _handle_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.connect_error = str(reason)
            log.warning("broker %s refused the connection: %s", self.broker, reason)
            return
        with self._lock:
            subs = list(self._handlers.items())
        for topic_filter, (_, qos) in subs:
            client.subscribe(topic_filter, qos)
        if self.connects:
            log.info("reconnected to broker %s (connection %d)", self.broker, self.connects + 1)
        self.connects += 1  # only the network thread writes these two
        self.connected.set()
        for callback in list(self._on_connect):
            try:
                callback()
            except Exception:
                log.exception("on-connect callback failed")

    def _handle_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.connected.is_set():
            self.disconnects += 1
        self.connected.clear()
        if reason.is_failure:
            log.warning("disconnected from broker %s: %s (reconnecting)", self.broker, reason)

    def _handle_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = self._routes.get(msg.topic)
            if handlers is None:
                handlers = [h for f, (h, _) in self._handlers.items() if mqtt.topic_matches_sub(f, msg.topic)]
                if len(self._routes) >= ROUTES_MAX:  # per-ask reply topics are one-off
                    self._routes = {}
                self._routes[msg.topic] = handlers
        for handler in handlers:
            try:
                handler(msg.topic, msg.payload, bool(msg.retain))
            except Exception:
                self.handler_errors += 1
                log.exception("handler for %s failed", msg.topic)


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


class ReplyInbox:
    """A client's reply topic, with replies routed to per-request queues by correlation id."""

    def __init__(self, bus: MqttBus, name: str, rejects: wire.RejectCounter | None = None,
                 max_bytes: int = wire.DEFAULT_MAX_BYTES) -> None:
        self.bus = bus
        self.name = name
        self.topic = topics.reply(name)
        self.rejects = rejects or wire.RejectCounter()
        self._max_bytes = max_bytes
        self._pending: dict[str, queue.Queue[wire.Envelope]] = {}
        self._lock = threading.Lock()
        # Pings nobody waits for (a link prober's): return True when consumed.
        self.ping_handler: Callable[[wire.Envelope], bool] | None = None

    def start(self) -> None:
        self.bus.subscribe(self.topic, self._handle, qos=topics.REPLY.qos)

    def open(self, corr: str | None = None) -> tuple[str, queue.Queue[wire.Envelope]]:
        corr = corr or uuid.uuid4().hex
        q: queue.Queue[wire.Envelope] = queue.Queue()
        with self._lock:
            self._pending[corr] = q
        return corr, q

    def close(self, corr: str) -> None:
        with self._lock:
            self._pending.pop(corr, None)

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            env = wire.decode(payload, self._max_bytes)
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
        q.put(env)

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
            payload = wire.encode(wire.Envelope(wire.Kind.PING, self.name, body, corr=corr))
            self.bus.publish(self.topic, payload, qos=topics.REPLY.qos)
            try:
                q.get(timeout=timeout)
            except queue.Empty:
                raise TransportError(f"no ping echo from the broker within {timeout:g} s") from None
            return clock() - t0
        finally:
            self.close(corr)
