"""A minimal MQTT 3.1.1 client for one thread's hot path: QoS 0 publish and subscribe only.

The HALO hot path is one small publish and a few small messages back per layer step, 30 steps a
token. Through paho each message costs its generic machinery in Python: a ``recv`` per header
byte, an :class:`MQTTMessage` object, topic matching over every subscription and the callback
dispatch, and per publish a wake-up byte on its socket pair. Here a packet is built with one
``bytes`` join and written with one ``sendall``; a read takes whatever the socket holds in one
``recv`` and cuts every complete packet out of it. The caller owns the socket (no thread).

Everything else (connection-level QoS 1, retained state, wills, reconnect policy) stays with paho
in :class:`mesh.mqtt.bus.MqttBus`; :class:`mesh.mqtt.direct.DirectLink` wraps this with its reconnect policy.

Spec: MQTT Version 3.1.1 (OASIS Standard, 29 October 2014), sections 2 (fixed header, remaining
length) and 3 (CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT).
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from collections.abc import Sequence

from mesh.config import BrokerAddress
from mesh.errors import ProtocolError, TransportError

CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK = 0x10, 0x20, 0x30, 0x80, 0x90
PINGREQ, PINGRESP, DISCONNECT = 0xC0, 0xD0, 0xE0
MAX_REMAINING = 268_435_455  # four length bytes
READ_CHUNK = 1 << 16
SEND_TIMEOUT_S = 5.0  # a write the broker does not take within this breaks the link
_CONNACK_CODES = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                  4: "bad user name or password", 5: "not authorized"}


def remaining_length(n: int) -> bytes:
    """The variable-length encoding of a packet's remaining length (spec 2.2.3)."""
    if not 0 <= n <= MAX_REMAINING:
        raise ProtocolError("oversized", f"MQTT remaining length {n}")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    if len(data) > 0xFFFF:
        raise ProtocolError("oversized", "MQTT string longer than 65535 bytes")
    return struct.pack(">H", len(data)) + data


def connect_packet(client_id: str, keepalive: int, username: str | None = None,
                   password: str | None = None) -> bytes:
    """CONNECT with a clean session (spec 3.1)."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string("MQTT") + bytes((4, flags)) + struct.pack(">H", keepalive) + _string(client_id)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _string(password)
    return bytes((CONNECT,)) + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    """PUBLISH at QoS 0 (spec 3.3): no packet identifier, no acknowledgement."""
    name = topic.encode()
    return b"".join((bytes((PUBLISH | int(retain),)), remaining_length(2 + len(name) + len(payload)),
                     struct.pack(">H", len(name)), name, payload))


def subscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    """SUBSCRIBE at QoS 0 for every filter (spec 3.8; the fixed header's flags are 0b0010)."""
    if not filters or not 0 < packet_id <= 0xFFFF:
        raise ValueError("SUBSCRIBE needs filters and a packet id 1..65535")
    body = struct.pack(">H", packet_id) + b"".join(_string(f) + b"\x00" for f in filters)
    return bytes((SUBSCRIBE | 0x02,)) + remaining_length(len(body)) + body


PINGREQ_PACKET = bytes((PINGREQ, 0))
DISCONNECT_PACKET = bytes((DISCONNECT, 0))


class PacketReader:
    """Cuts complete packets out of a byte stream fed in arbitrary pieces.

    Untrusted input: a length field over ``max_packet`` or longer than four bytes, or a malformed
    PUBLISH, raises :class:`ProtocolError` (the connection is then unusable: the stream has lost
    its framing)."""

    def __init__(self, max_packet: int) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return (first header byte, body) of each complete packet now held."""
        buf = self._buf
        buf += data
        packets: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2:
                n = shift = 0
                i = pos + 1
                while True:
                    if i >= end:
                        return packets
                    byte = buf[i]
                    n |= (byte & 0x7F) << shift
                    i += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("malformed", "MQTT remaining length over four bytes")
                if n > self.max_packet:
                    raise ProtocolError("oversized", f"MQTT packet of {n} bytes > {self.max_packet}")
                if end - i < n:
                    return packets
                packets.append((buf[pos], bytes(buf[i:i + n])))
                pos = i + n
            return packets
        finally:
            del buf[:pos]


def parse_publish(first: int, body: bytes) -> tuple[str, bytes, bool]:
    """(topic, payload, retained) of a PUBLISH body (spec 3.3); QoS 1/2 carry a packet id."""
    if len(body) < 2:
        raise ProtocolError("malformed", "PUBLISH shorter than its topic length")
    n = (body[0] << 8) | body[1]
    qos = (first >> 1) & 0x03
    start = 2 + n + (2 if qos else 0)
    if qos == 3 or len(body) < start:
        raise ProtocolError("malformed", "PUBLISH topic, QoS or packet id")
    try:
        topic = body[2:2 + n].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("malformed", "PUBLISH topic is not UTF-8") from exc
    return topic, body[start:], bool(first & 0x01)


class LiteClient:
    """One MQTT 3.1.1 connection owned by its caller's thread: connect, subscribe, publish and
    read at QoS 0, with the keep-alive. Errors raise :class:`TransportError`; after one the
    connection is closed and a new client must connect."""

    def __init__(self, client_id: str, broker: BrokerAddress, keepalive: int = 10,
                 max_packet: int = 16 * 1024 * 1024) -> None:
        self.client_id, self.broker, self.keepalive = client_id, broker, keepalive
        self._reader = PacketReader(max_packet)
        self._sock: socket.socket | None = None
        self._last_sent = self._last_heard = 0.0
        self._ping_out = False
        self._packet_id = 0
        self._backlog: list[tuple[str, bytes, bool]] = []  # PUBLISHes read while awaiting a SUBACK

    def connect(self, timeout: float) -> None:
        """Open the TCP (and TLS) connection and wait for CONNACK."""
        deadline = time.monotonic() + timeout
        b = self.broker
        try:
            sock = socket.create_connection((b.host, b.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if b.tls_ca is not None:
                ctx = ssl.create_default_context(cafile=str(b.tls_ca))
                if b.tls_cert is not None:
                    ctx.load_cert_chain(str(b.tls_cert), str(b.tls_key) if b.tls_key else None)
                sock = ctx.wrap_socket(sock, server_hostname=b.host)
            sock.settimeout(SEND_TIMEOUT_S)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"lite link to {b}: {exc}") from exc
        self._sock = sock
        self._send(connect_packet(self.client_id, self.keepalive, b.username, b.password))
        first, body = self._await(CONNACK, deadline)
        if len(body) != 2 or body[1] != 0:
            code = body[1] if len(body) == 2 else -1
            self.close()
            raise TransportError(f"lite link to {b} refused: {_CONNACK_CODES.get(code, code)}")

    def subscribe(self, filters: Sequence[str], timeout: float) -> None:
        """Subscribe at QoS 0 and wait for SUBACK; a refused filter raises."""
        self._packet_id = self._packet_id % 0xFFFF + 1
        self._send(subscribe_packet(self._packet_id, filters))
        _, body = self._await(SUBACK, time.monotonic() + timeout)
        if len(body) != 2 + len(filters) or (body[0] << 8 | body[1]) != self._packet_id or 0x80 in body[2:]:
            self.close()
            raise TransportError(f"lite link to {self.broker}: subscription to {list(filters)} refused")

    def publish(self, topic: str, payload: bytes) -> None:
        self._send(publish_packet(topic, payload))

    def read(self, timeout: float) -> list[tuple[str, bytes, bool]]:
        """Wait up to ``timeout`` for input, then return every PUBLISH received (topic, payload,
        retained); answers the keep-alive. Raises TransportError when the connection ended."""
        sock = self._sock
        if sock is None:
            raise TransportError(f"lite link to {self.broker} is closed")
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted count as readable
        messages, self._backlog = self._backlog, []
        try:
            if (pending is not None and pending()) or select.select([sock], [], [], max(timeout, 0.0))[0]:
                while True:
                    data = sock.recv(READ_CHUNK)
                    if not data:
                        raise TransportError(f"lite link to {self.broker}: the broker closed the connection")
                    self._take(data, messages)
                    if not (pending is not None and pending()) and not select.select([sock], [], [], 0.0)[0]:
                        break
        except (OSError, ProtocolError) as exc:
            self.close()
            raise TransportError(f"lite link to {self.broker}: {exc}") from exc
        self._keep_alive()
        return messages

    def close(self, polite: bool = False) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if polite:
            try:
                sock.sendall(DISCONNECT_PACKET)
            except OSError:
                pass
        sock.close()

    # -- internals

    def _take(self, data: bytes, messages: list[tuple[str, bytes, bool]],
              awaiting: int = 0) -> tuple[int, bytes] | None:
        """Feed ``data``: PUBLISHes go to ``messages``, a PINGRESP ends the ping; returns the
        first packet of kind ``awaiting`` (connection set-up), if any."""
        self._last_heard = time.monotonic()
        found: tuple[int, bytes] | None = None
        for first, body in self._reader.feed(data):
            kind = first & 0xF0
            if found is None and awaiting and kind == awaiting:
                found = (first, body)
            elif kind == PUBLISH:
                messages.append(parse_publish(first, body))
            elif kind == PINGRESP:
                self._ping_out = False
            # anything else (a late SUBACK) carries nothing this link needs
        return found

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if self._ping_out and now - self._last_heard > self.keepalive:
            self.close()
            raise TransportError(f"lite link to {self.broker}: no answer to a keep-alive ping")
        if not self._ping_out and now - self._last_sent >= self.keepalive / 2:
            self._send(PINGREQ_PACKET)
            self._ping_out = True

    def _send(self, packet: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise TransportError(f"lite link to {self.broker} is closed")
        try:
            sock.sendall(packet)
        except OSError as exc:
            self.close()
            raise TransportError(f"lite link to {self.broker}: {exc}") from exc
        self._last_sent = time.monotonic()

    def _await(self, kind: int, deadline: float) -> tuple[int, bytes]:
        """The next packet of ``kind`` (connection set-up); PUBLISHes meanwhile wait for read()."""
        sock = self._sock
        found: tuple[int, bytes] | None = None
        try:
            while sock is not None and found is None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    break
                data = sock.recv(READ_CHUNK)
                if not data:
                    break
                found = self._take(data, self._backlog, kind)
        except (OSError, ProtocolError) as exc:
            self.close()
            raise TransportError(f"lite link to {self.broker}: {exc}") from exc
        if found is None:
            self.close()
            raise TransportError(f"lite link to {self.broker}: no {kind >> 4:#x} packet in time")
        return found
