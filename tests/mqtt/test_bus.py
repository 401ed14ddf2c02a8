"""The MQTT transport against real brokers (amqtt and Mosquitto on loopback, free ports)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from mesh import topics, wire
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.inbox import ReplyInbox
from mesh.config import BrokerAddress
from mesh.errors import TransportError
from nodes.up import free_port
from tests.conftest import ENV, Broker, start_amqtt, start_mosquitto


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest, log_dir) -> Iterator[Broker]:  # type: ignore[no-untyped-def]
    b = start_amqtt(log_dir) if request.param == "amqtt" else start_mosquitto(log_dir)
    yield b
    b.stop()


def _bus(broker: Broker, name: str, **kw: object) -> MqttBus:
    bus = MqttBus(name, broker.address, **kw)  # type: ignore[arg-type]
    bus.start(10)
    return bus


def test_request_response_routes_replies_by_correlation_id(broker: Broker) -> None:
    server = _bus(broker, "srv")
    client = _bus(broker, "cli")
    try:
        def answer(topic: str, payload: bytes, retained: bool) -> None:
            env = wire.decode(payload)
            reply = wire.Envelope(wire.Kind.ANSWER, "srv", {"text": env.body["text"].upper(), "node": "srv",
                                                            "prompt_tokens": 1, "new_tokens": 1, "ttft_s": 0.0,
                                                            "ttlt_s": 0.0}, corr=env.corr)
            server.publish(env.reply_to, wire.encode(reply), qos=1)
        server.subscribe(topics.node_ask("srv"), answer)
        inbox = ReplyInbox(client, "cli")
        inbox.start()
        pending = []
        for text in ("one", "two", "three"):
            corr, q = inbox.open()
            env = wire.Envelope(wire.Kind.ASK, "cli", {"text": text, "max_new_tokens": 1}, corr=corr,
                                reply_to=inbox.topic)
            client.publish(topics.node_ask("srv"), wire.encode(env), qos=1)
            pending.append((text, corr, q))
        for text, corr, q in pending:
            got = q.get(timeout=5)
            assert got.corr == corr and got.body["text"] == text.upper()
        # a reply nobody waits for is counted, not crashing anything
        stray = wire.Envelope(wire.Kind.PING, "x", {"t": 0.0}, corr="nobody")
        client.publish(inbox.topic, wire.encode(stray), qos=1)
        client.publish(inbox.topic, b"\x00garbage", qos=1)
        inbox.ping()
        assert inbox.rejects.snapshot() == {"unexpected-reply": 1, "malformed": 1}
    finally:
        client.stop()
        server.stop()


def test_a_request_queues_a_bounded_number_of_replies_and_counts_the_rest(broker: Broker) -> None:
    """L3: whoever may write a reply topic cannot grow a waiting request's queue without bound."""
    bus = _bus(broker, "flooded")
    try:
        inbox = ReplyInbox(bus, "flooded", max_queued=8, max_queued_bytes=1 << 20)
        inbox.start()
        corr, q = inbox.open()
        for i in range(40):  # a peer's flood for one request nobody reads yet
            part = wire.Envelope(wire.Kind.KV_CHUNKS, "rogue", {"chunks": [], "part": i, "last": False}, corr=corr)
            bus.publish(inbox.topic, wire.encode(part), qos=1)
        big = bytes(300_000)
        big_corr, big_q = inbox.open()
        for i in range(6):  # under the item cap, over the byte cap
            part = wire.Envelope(wire.Kind.KV_CHUNKS, "rogue", {"chunks": [big], "part": i, "last": False},
                                 corr=big_corr)
            bus.publish(inbox.topic, wire.encode(part), qos=1)
        inbox.ping()  # our own messages come back in order: every one above was handled
        assert q.qsize() == 8 and [q.get_nowait().body["part"] for _ in range(8)] == list(range(8))
        assert big_q.qsize() == 3  # 3 x 300 kB fit in 1 MiB, a fourth does not
        assert inbox.rejects.snapshot() == {"reply-overflow": 32 + 3}
    finally:
        bus.stop()


def test_ping_is_a_barrier_for_retained_messages(broker: Broker) -> None:
    pub = _bus(broker, "pub")
    names = [f"r{i}" for i in range(20)]
    for n in names:
        pub.publish_wait(topics.node_status(n), topics.ONLINE, qos=1, retain=True)
    sub = MqttBus("sub", broker.address)
    seen: list[str] = []
    sub.subscribe(topics.ALL_STATUS, lambda t, p, r: seen.append(t))
    sub.start(10)
    inbox = ReplyInbox(sub, "sub")
    inbox.start()
    rtt = inbox.ping()
    try:
        assert {topics.node_status(n) for n in names} <= set(seen)
        assert 0 < rtt < 1.0
    finally:
        for n in names:  # an empty retained payload clears the topic
            pub.publish_wait(topics.node_status(n), b"", qos=1, retain=True)
        sub.stop()
        pub.stop()


CRASHER = """
import sys, time
from mesh.mqtt.bus import MqttBus
from mesh.config import BrokerAddress
from mesh import topics
bus = MqttBus("crasher", BrokerAddress("127.0.0.1", int(sys.argv[1])),
              will=(topics.node_status("crasher"), topics.OFFLINE, 1, True), keepalive=2)
bus.start(10)
bus.publish_wait(topics.node_status("crasher"), topics.ONLINE, qos=1, retain=True)
print("up", flush=True)
time.sleep(60)
"""


def test_last_will_marks_a_killed_client_offline(broker: Broker) -> None:
    states: queue.Queue[bytes] = queue.Queue()
    watcher = MqttBus("watcher", broker.address)
    watcher.subscribe(topics.node_status("crasher"), lambda t, p, r: states.put(p))
    watcher.start(10)
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(broker.port)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        deadline = time.monotonic() + 10
        while states.get(timeout=max(0.1, deadline - time.monotonic())) != topics.ONLINE:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        t0 = time.monotonic()
        while states.get(timeout=max(0.1, t0 + 10 - time.monotonic())) != topics.OFFLINE:
            pass
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        watcher.publish_wait(topics.node_status("crasher"), b"", qos=1, retain=True)
        watcher.stop()


def test_no_broker_is_a_clear_transport_error() -> None:
    bus = MqttBus("lonely", BrokerAddress("127.0.0.1", free_port()))
    with pytest.raises(TransportError, match="no connection to the MQTT broker"):
        bus.start(timeout=1.0)


def test_handlers_that_raise_do_not_kill_the_loop(broker: Broker) -> None:
    bus = _bus(broker, "raiser")
    got = threading.Event()

    def bad(topic: str, payload: bytes, retained: bool) -> None:
        raise RuntimeError("boom")
    bus.subscribe("test/raise", bad)
    bus.subscribe("test/ok", lambda t, p, r: got.set())
    try:
        bus.publish_wait("test/raise", b"x", qos=1)
        bus.publish_wait("test/ok", b"x", qos=1)
        assert got.wait(5)
        assert bus.handler_errors == 1
    finally:
        bus.stop()


def test_a_new_client_gets_only_the_retained_messages_it_subscribed_to(broker: Broker) -> None:
    """amqtt 0.12.1 replays every retained message to each new client; broker/runner.py fixes it."""
    pub = _bus(broker, "ret-pub")
    holder = MqttBus("ret-holder", broker.address)
    holder.subscribe("ret/a/#", lambda t, p, r: None)
    holder.start(10)
    pub.publish_wait("ret/a/1", b"retained", qos=1, retain=True)
    got: list[str] = []
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    raw.on_message = lambda c, u, m: got.append(m.topic)
    raw.connect("127.0.0.1", broker.port)
    raw.loop_start()
    try:
        raw.subscribe("ret/b", 1)
        raw.subscribe("ret/a/1", 1)  # the one retained message it may see
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert got == ["ret/a/1"]
    finally:
        raw.loop_stop()
        raw.disconnect()
        pub.publish_wait("ret/a/1", b"", qos=1, retain=True)
        holder.stop()
        pub.stop()


def test_a_subscription_added_later_also_gets_a_topic_already_routed(broker: Broker) -> None:
    """The bus remembers which handlers a topic goes to; a new subscription must reset that."""
    bus = _bus(broker, "router")
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    bus.subscribe("test/route/+", lambda t, p, r: got.put(("wild", p)))
    try:
        bus.publish_wait("test/route/a", b"1", qos=1)
        assert got.get(timeout=5) == ("wild", b"1")
        bus.subscribe("test/route/a", lambda t, p, r: got.put(("exact", p)))
        bus.publish_wait("test/route/a", b"2", qos=1)
        # (amqtt delivers a message once per matching subscription: duplicates, hence sets)
        assert _drain(got, 2) == {("wild", b"2"), ("exact", b"2")}
        bus.publish_wait("test/route/b", b"3", qos=1)  # another topic of the wildcard only
        assert _drain(got, 1) == {("wild", b"3")}
    finally:
        bus.stop()


def _drain(q: queue.Queue, at_least: int, settle: float = 0.3) -> set:
    seen = {q.get(timeout=5) for _ in range(at_least)}
    end = time.monotonic() + settle
    while time.monotonic() < end:
        try:
            seen.add(q.get(timeout=max(end - time.monotonic(), 0.01)))
        except queue.Empty:
            break
    return seen
