"""The MQTT transport: a thin wrapper over paho-mqtt 2.x, and request/response over MQTT 3.1.1.

Components take a bus object instead of a paho client, so the pure logic stays testable and the
transport stays in one place. Handlers run on paho's network thread: they must be quick (decode,
enqueue) and any exception they raise is logged and counted, never allowed to kill the loop.

Request/response over it is :class:`mesh.mqtt.inbox.ReplyInbox`; the hot path's own connection,
with no network thread, is :class:`mesh.mqtt.direct.DirectLink`.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mesh.config import BrokerAddress
from mesh.errors import TransportError

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
