"""mesh.mqtt.lite's packets and framing, checked against the MQTT 3.1.1 spec's examples and against
paho's own encoder (the reference client of the rest of the mesh)."""

from __future__ import annotations

import random
import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mesh.mqtt import lite as mqtt_lite
from mesh.errors import ProtocolError


@pytest.mark.parametrize("n, encoded", [  # spec 2.2.3, table 2.4
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"), (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_remaining_length_is_the_specs_encoding(n: int, encoded: bytes) -> None:
    assert mqtt_lite.remaining_length(n) == encoded
    with pytest.raises(ProtocolError):
        mqtt_lite.remaining_length(268_435_456)


def _paho_wire(port_box: list[int], act) -> bytes:  # type: ignore[no-untyped-def]
    """Every byte paho writes to a loopback listener that accepts its CONNECT, while ``act(client)``."""
    srv = socket.create_server(("127.0.0.1", 0))
    port_box.append(srv.getsockname()[1])
    captured = bytearray()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                if not captured:
                    conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
                captured.extend(data)

    t = threading.Thread(target=serve)
    t.start()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="same-id", protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", port_box[0], keepalive=10)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not c.is_connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    act(c)
    c.disconnect()
    c.loop_stop()
    t.join(5)
    srv.close()
    return bytes(captured)


def test_connect_publish_and_subscribe_bytes_equal_pahos() -> None:
    payload = bytes(range(256)) * 5
    filters = ["mesh/v1/node/+/halo", "a/#"]
    wire = _paho_wire([], lambda c: (c.publish("mesh/v1/halo/mlp/coordinator", payload, qos=0),
                                     c.subscribe([(f, 0) for f in filters])))
    connect = mqtt_lite.connect_packet("same-id", 10)
    publish = mqtt_lite.publish_packet("mesh/v1/halo/mlp/coordinator", payload)
    assert wire.startswith(connect + publish)
    rest = wire[len(connect + publish):]
    pid = int.from_bytes(rest[2:4], "big")  # paho numbers its packets itself
    assert rest == mqtt_lite.subscribe_packet(pid, filters) + mqtt_lite.DISCONNECT_PACKET


def test_connect_packet_layout() -> None:
    pkt = mqtt_lite.connect_packet("cid", 10, "user", "pw")
    assert pkt[0] == mqtt_lite.CONNECT
    body = pkt[2:]
    assert pkt[1] == len(body)
    assert body[:6] == b"\x00\x04MQTT" and body[6] == 4  # protocol name and level 4 (3.1.1)
    assert body[7] == 0x80 | 0x40 | 0x02  # user name, password, clean session
    assert body[8:10] == b"\x00\x0a"
    assert body[10:] == b"\x00\x03cid\x00\x04user\x00\x02pw"
    assert mqtt_lite.connect_packet("cid", 10)[9] == 0x02  # anonymous: clean session only


def test_reader_cuts_packets_out_of_any_split_of_the_stream() -> None:
    rng = random.Random(7)
    sent = [(f"t/{i}", bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 127, 128, 1200, 20_000]))))
            for i in range(40)]
    stream = b"".join(mqtt_lite.publish_packet(t, p) for t, p in sent) + mqtt_lite.PINGREQ_PACKET
    for _ in range(20):
        reader = mqtt_lite.PacketReader(1 << 20)
        got: list[tuple[int, bytes]] = []
        pos = 0
        while pos < len(stream):
            step = rng.choice([1, 2, 3, 50, 1000, 70_000])
            got += reader.feed(stream[pos:pos + step])
            pos += step
        assert [mqtt_lite.parse_publish(f, b)[:2] for f, b in got[:-1]] == sent
        assert got[-1] == (mqtt_lite.PINGREQ, b"")


def test_reader_refuses_oversized_and_overlong_lengths() -> None:
    with pytest.raises(ProtocolError, match="over four bytes"):
        mqtt_lite.PacketReader(1 << 30).feed(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(ProtocolError) as exc:
        mqtt_lite.PacketReader(1000).feed(mqtt_lite.publish_packet("t", b"x" * 1000))
    assert exc.value.reason == "oversized"


def test_parse_publish_qos1_retained_and_malformed() -> None:
    body = b"\x00\x03a/b" + b"\x00\x07" + b"data"  # QoS 1: a packet id before the payload
    assert mqtt_lite.parse_publish(mqtt_lite.PUBLISH | 0x02 | 0x01, body) == ("a/b", b"data", True)
    for first, bad in ((mqtt_lite.PUBLISH, b"\x00"), (mqtt_lite.PUBLISH, b"\x00\x09abc"),
                       (mqtt_lite.PUBLISH | 0x06, b"\x00\x01a"), (mqtt_lite.PUBLISH, b"\x00\x02\xff\xfe")):
        with pytest.raises(ProtocolError):
            mqtt_lite.parse_publish(first, bad)


def test_random_bytes_raise_only_protocol_errors() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        reader = mqtt_lite.PacketReader(1 << 16)
        try:
            for first, body in reader.feed(data):
                if first & 0xF0 == mqtt_lite.PUBLISH:
                    mqtt_lite.parse_publish(first, body)
        except ProtocolError:
            pass
