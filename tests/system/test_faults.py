"""Faults of the transport, end to end: the broker restarts under a working mesh, a node dies.

Real amqtt and Mosquitto broker processes (killed with SIGKILL, then started again on the same
port), real node processes with SmolLM2, a real client. While the broker is away a plain TCP listener takes its
port and counts connection attempts, which shows the clients back off instead of hammering it.
"""

from __future__ import annotations

import queue
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import topics, wire
from mesh.auth import senders
from mesh.mqtt.bus import MqttBus
from mesh.cache.catalog import Catalog
from mesh.errors import TransportError
from nodes.client import AskResult, MeshClient
from nodes.up import spawn, wait_port
from tests.conftest import (ENV, Broker, NodeProcess, asker_keys, mesh_argv, mosquitto_conf, start_amqtt,
                            start_mosquitto, start_node)

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
PROMPT = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
          "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
          "Which planet has the most moons?\nA. Saturn\nB. Mars\nC. Venus\nD. Mercury\nAnswer:")
LONG = "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who"
OUTAGE_S = 6.0


class AttemptCounter:
    """Holds the broker's port while it is down: accepts each connection, notes when, closes it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.times.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def restart(broker: Broker, log_dir: Path) -> Broker:
    """The same kind of broker on the same port, with none of the old one's state."""
    log = log_dir / f"{broker.kind}-{broker.port}-restarted.log"
    if broker.kind == "amqtt":
        argv = mesh_argv("broker", "--port", str(broker.port))
    else:
        argv = [broker_exe(), "-c", str(mosquitto_conf(broker.port, log_dir))]
    proc = spawn(argv, open(log, "wb"), env=ENV)
    wait_port("127.0.0.1", broker.port, 30, proc)
    return Broker(broker.kind, proc, broker.port, log)


def broker_exe() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def retained(broker: Broker, topic_filter: str, settle: float = 1.0) -> dict[str, bytes]:
    """What a brand-new client gets as retained messages on ``topic_filter``."""
    got: dict[str, bytes] = {}
    bus = MqttBus(f"retained-probe-{time.monotonic_ns() % 10**9}", broker.address)
    bus.subscribe(topic_filter, lambda t, p, r: got.__setitem__(t, p) if r else None)
    bus.start(10)
    time.sleep(settle)
    bus.stop()
    return got


def catalog_of(messages: dict[str, bytes], node: str = "f1") -> Catalog:
    return Catalog.from_dict(dict(wire.decode(senders.unwrap(messages[topics.node_catalog(node)])).body))


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def mesh(request: pytest.FixtureRequest, log_dir: Path) -> Iterator[tuple[list[Broker], dict[str, NodeProcess]]]:
    brokers = [start_amqtt(log_dir) if request.param == "amqtt" else start_mosquitto(log_dir)]
    nodes = {n: start_node(brokers[0], n, MODEL, log_dir) for n in ("f1", "f2")}
    yield brokers, nodes
    for node in nodes.values():
        node.stop()
    for b in brokers:
        b.stop()


def test_broker_restart_loses_no_ask_and_restores_retained_state(
        mesh: tuple[list[Broker], dict[str, NodeProcess]], log_dir: Path) -> None:
    brokers, nodes = mesh
    broker = brokers[0]
    client = MeshClient(broker.address, keyring=asker_keys())
    client.start()
    try:
        reference = client.ask(PROMPT, node="f1", max_new_tokens=8, timeout=60, no_cache=True).answer
        long_ref = client.ask(LONG, node="f2", max_new_tokens=48, timeout=60, no_cache=True).answer
        assert client.ask(PROMPT, node="f1", max_new_tokens=8, timeout=60).answer == reference  # cached now
        deadline = time.monotonic() + 15
        while True:  # the catalog is published debounced
            before = retained(broker, topics.node_catalog("f1"), settle=0.3)
            if before and catalog_of(before).count > 0:
                break
            assert time.monotonic() < deadline, "f1 never published a catalog with its chunks"

        # Asks in flight when the broker dies: one mid-stream, one routed that waits for the link.
        results: queue.Queue[tuple[str, AskResult | Exception]] = queue.Queue()
        streamed: list[str] = []
        first_piece = threading.Event()

        def run(tag: str, **kw: object) -> None:
            try:
                results.put((tag, client.ask(**kw)))  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                results.put((tag, exc))

        def on_text(piece: str) -> None:
            streamed.append(piece)
            first_piece.set()

        threading.Thread(target=run, args=("streaming",), daemon=True, kwargs=dict(
            text=LONG, node="f2", max_new_tokens=48, timeout=150, no_cache=True, on_text=on_text)).start()
        assert first_piece.wait(30)
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(10)
        counter = AttemptCounter(broker.port)
        down_at = time.monotonic()
        threading.Thread(target=run, args=("routed",), daemon=True, kwargs=dict(
            text=PROMPT, max_new_tokens=8, timeout=150)).start()
        # An ask whose timeout ends before the broker is back fails, and says why.
        with pytest.raises(TransportError, match="lost the broker connection"):
            client.ask(PROMPT, node="f1", max_new_tokens=8, timeout=2.0)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        counter.close()
        attempts = list(counter.times)
        brokers.append(restart(broker, log_dir))
        broker = brokers[-1]

        # Backoff: three clients (two nodes and us) over a 6 s outage. Without backoff paho would
        # reconnect every few ms; with 1, 2, 4 s waits each client tries about three times.
        assert 3 <= len(attempts) <= 3 * 4, attempts

        got = dict(results.get(timeout=120) for _ in range(2))
        for tag, res in got.items():
            assert isinstance(res, AskResult), f"{tag}: {res!r}"
        assert got["routed"].answer == reference  # type: ignore[union-attr]
        assert got["streaming"].answer == long_ref  # type: ignore[union-attr]
        assert "".join(streamed) == long_ref  # the stream reads once, with no piece twice

        # Every node came back: retained status online and the catalog, for a brand-new client.
        deadline = time.monotonic() + 30
        while True:
            statuses = retained(broker, topics.ALL_STATUS, settle=0.5)
            catalogs = retained(broker, topics.ALL_CATALOGS, settle=0.5)
            if (all(statuses.get(topics.node_status(n)) == topics.ONLINE for n in nodes)
                    and topics.node_catalog("f1") in catalogs):
                break
            assert time.monotonic() < deadline, (statuses, list(catalogs))
        old, new = catalog_of(before), catalog_of(catalogs)
        assert new.model == old.model and new.count >= old.count > 0
        # And they answer as before, on the restarted broker.
        assert client.ask(PROMPT, node="f1", max_new_tokens=8, timeout=60).answer == reference
        assert client.bus.disconnects >= 1
    finally:
        client.stop()


@pytest.fixture(scope="module")
def crash_broker(log_dir: Path) -> Iterator[Broker]:
    broker = start_amqtt(log_dir)  # its own: the nodes of this test come and go
    yield broker
    broker.stop()


def test_node_killed_mid_answer_then_restarted_with_its_cache(crash_broker: Broker, log_dir: Path,
                                                              tmp_path: Path) -> None:
    store = tmp_path / "k2-kv"
    k1 = start_node(crash_broker, "k1", MODEL, log_dir)
    k2 = start_node(crash_broker, "k2", MODEL, log_dir, "--cache-dir", str(store))
    client = MeshClient(crash_broker.address, keyring=asker_keys())
    client.start()
    try:
        first = client.ask(LONG, node="k2", max_new_tokens=32, timeout=60)  # k2 caches the prompt
        assert any(store.glob("*.kv"))
        # Routed: the router (k1) sends it to k2, which holds the prompt; k2 dies after its first
        # piece, as a device pulled from the wall would. Its last will says offline; the ask goes
        # out again and k1 answers it from scratch.
        streamed: list[str] = []
        killed = threading.Event()

        def on_text(piece: str) -> None:
            streamed.append(piece)
            if not killed.is_set():
                killed.set()
                k2.proc.send_signal(signal.SIGKILL)

        res = client.ask(LONG, max_new_tokens=32, timeout=120, on_text=on_text)
        assert killed.is_set() and k2.proc.wait(10) == -signal.SIGKILL
        assert res.node == "k1" and res.node_figures["sends"] == 2
        assert res.answer == first.answer and "".join(streamed) == first.answer

        # Back with the same --cache-dir: the chunks and the catalog are there again, and the
        # same prompt is a full local hit with the same tokens.
        k2 = start_node(crash_broker, "k2", MODEL, log_dir, "--cache-dir", str(store))
        deadline = time.monotonic() + 15
        while True:
            cat = retained(crash_broker, topics.node_catalog("k2"), settle=0.3)
            if cat and catalog_of(cat, "k2").count >= first.prompt_tokens // 16:
                break
            assert time.monotonic() < deadline, "k2 came back without its catalog"
        again = client.ask(LONG, node="k2", max_new_tokens=32, timeout=60, cache_figures=True)
        assert again.node_figures["cache"]["decision"] == "local" and again.node_figures["cache"]["full_hit"]
        assert again.node_figures["token_ids"] == first.node_figures["token_ids"]
    finally:
        client.stop()
        k1.stop()
        k2.stop()


def test_a_home_assistant_ask_outlives_the_node_that_took_it(crash_broker: Broker, log_dir: Path) -> None:
    """Review M9: a JSON ask (Home Assistant's; nobody re-sends it) forwarded to a node that dies
    before answering is routed once more by the router, which kept it; before, the automation
    waited out its own timeout with no answer and no error."""
    import json

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    j1 = start_node(crash_broker, "j1", MODEL, log_dir)  # the router: the smallest name
    j2 = start_node(crash_broker, "j2", MODEL, log_dir)
    answers: dict[str, dict] = {}
    forwarded_to_j2 = threading.Event()

    def on_message(cl: object, u: object, m: mqtt.MQTTMessage) -> None:
        if m.topic == topics.node_ask("j2"):
            forwarded_to_j2.set()
        elif m.topic == topics.ANSWER:
            body = json.loads(m.payload)
            answers.setdefault(body.get("id"), body)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = on_message
    c.connect("127.0.0.1", crash_broker.port)
    c.loop_start()
    try:
        c.subscribe([(topics.ANSWER, 1), (topics.node_ask("j2"), 1)])
        time.sleep(0.5)
        # Two at once: the router takes the first itself, the second goes to j2 (its queue is shorter).
        for ask_id in ("ha-first", "ha-second"):
            c.publish(topics.ASK, json.dumps({"text": LONG, "max_new_tokens": 48, "id": ask_id}), qos=1)
        assert forwarded_to_j2.wait(30), "the router sent neither ask to j2"
        time.sleep(0.5)  # j2 is answering
        j2.proc.send_signal(signal.SIGKILL)
        assert j2.proc.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 120
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(answers) == {"ha-first", "ha-second"}, answers
        assert answers["ha-second"]["node"] == "j1" and answers["ha-second"]["text"]
        assert answers["ha-first"]["text"] == answers["ha-second"]["text"]  # the same ask, answered whole
    finally:
        c.loop_stop()
        c.disconnect()
        j1.stop()
        j2.stop()
