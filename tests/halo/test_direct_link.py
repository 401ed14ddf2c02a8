"""mesh.mqtt.direct.DirectLink against a real Mosquitto: the owner's thread writes and reads (the handler
runs on it), a broken connection is reported and `service` reconnects it once the broker is back."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics
from mesh.mqtt.direct import DirectLink
from mesh.config import BrokerAddress
from tests.conftest import free_port, mosquitto_conf, spawn, wait_port

pytestmark = pytest.mark.e2e


def _broker(port: int, log_dir: Path):
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = spawn([exe, "-c", str(mosquitto_conf(port, log_dir))], open(log_dir / f"link-{port}.log", "ab"))
    wait_port("127.0.0.1", port, 15, proc)
    return proc


def _peer(port: int, got: queue.Queue) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{time.monotonic_ns()}", protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, m: got.put((m.topic, m.payload))
    c.connect("127.0.0.1", port, 10)
    c.loop_start()
    _, mid = c.subscribe("test/mlp", 0)
    time.sleep(0.3)
    return c


def test_direct_link_round_trip_break_and_reconnect(log_dir: Path) -> None:
    port = free_port()
    proc = _broker(port, log_dir)
    seen: list[tuple[str, bytes, str]] = []
    topic = topics.halo_link("coordinator")
    link = DirectLink("mesh-coordinator-link-test", BrokerAddress("127.0.0.1", port), topic,
                      lambda t, p, r: seen.append((t, p, threading.current_thread().name)), retry_s=0.2)
    got: queue.Queue = queue.Queue()
    peer = None
    try:
        link.open(5)
        assert link.usable and link.connects == 1
        peer = _peer(port, got)
        # Written on this thread at once: the peer gets it without anyone pumping the link.
        assert link.publish("test/mlp", b"x1")
        assert got.get(timeout=5) == ("test/mlp", b"x1")
        # Answers are read by pump on the caller's thread, every packet that is there.
        for i in range(3):
            peer.publish(topic, f"p{i}".encode(), qos=0)
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            assert link.pump(0.5)
        assert [p for _, p, _ in seen] == [b"p0", b"p1", b"p2"]
        assert {name for _, _, name in seen} == {threading.current_thread().name}
        # Idle: service() from another thread keeps it alive (and skips while someone holds it).
        with link.lock:
            link.service()
        t = threading.Thread(target=link.service)
        t.start()
        t.join(5)
        assert link.usable
        # The broker goes away: the link says so instead of hanging, and publish refuses.
        proc.terminate()
        proc.wait(10)
        deadline = time.monotonic() + 5
        while link.usable and time.monotonic() < deadline:
            link.pump(0.1)
        assert not link.usable and link.failures == 1
        assert not link.publish("test/mlp", b"lost")
        link.service()  # broker still down: a failed attempt, no exception
        assert not link.usable
        # Back on the same port: service() reconnects and resubscribes.
        proc = _broker(port, log_dir)
        deadline = time.monotonic() + 10
        while not link.usable and time.monotonic() < deadline:
            time.sleep(0.25)
            link.service()
        assert link.usable and link.connects == 2
        peer.loop_stop()
        peer = _peer(port, got)
        seen.clear()
        peer.publish(topic, b"again", qos=0)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            link.pump(0.2)
        assert seen and seen[0][1] == b"again"
    finally:
        link.close()
        if peer is not None:
            peer.loop_stop()
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_lite_link_keeps_alive_and_carries_big_and_many_messages(kind: str, log_dir: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    """The link's own MQTT client on both brokers the mesh runs with: idle past its keep-alive it
    is still connected (PINGREQ answered), a burst of small frames arrives whole and in order, and
    a message of several TCP segments arrives whole."""
    broker = request.getfixturevalue(f"{kind}_broker")
    seen: list[bytes] = []
    topic = topics.halo_link(f"lite-{kind}")
    link = DirectLink(f"lite-{kind}-{time.monotonic_ns()}", broker.address, topic,
                      lambda t, p, r: seen.append(p), keepalive=2)
    got: queue.Queue = queue.Queue()
    peer = None
    try:
        link.open(10)
        peer = _peer(broker.port, got)
        deadline = time.monotonic() + 5  # longer than the keep-alive: the broker would drop a silent client
        while time.monotonic() < deadline:
            assert link.pump(0.2)
        assert link.usable and link.failures == 0
        big = bytes(range(256)) * 4096  # 1 MiB
        burst = [f"f{i}".encode() * 300 for i in range(200)]
        for p in burst:
            peer.publish(topic, p, qos=0)
        peer.publish(topic, big, qos=0)
        deadline = time.monotonic() + 20
        while len(seen) < len(burst) + 1 and time.monotonic() < deadline:
            assert link.pump(0.5)
        assert seen[:-1] == burst and seen[-1] == big
        assert link.publish("test/mlp", big)
        assert got.get(timeout=10) == ("test/mlp", big)
    finally:
        link.close()
        if peer is not None:
            peer.loop_stop()
