"""The gateway: a real Mosquitto started from deploy/mosquitto/ (users from make-users.sh,
certificates from make-certs.sh, the shipped mosquitto.conf with only paths and ports rewritten
to a temp dir and free loopback ports), real clients, and real node processes on smollm2-135m.

node1 runs with the Home Assistant extension through a tiny ``python -c`` wrapper (the CLI flags
are not wired into `mesh node` yet): it builds the config with the real `mesh node` argument
parser and ``nodes.settings``, adds ``mesh.ha.extension`` from its own flags and runs ``NodeAgent``.
node2 is a plain `mesh node` process connecting over TLS. Both authenticate with the password
files make-users.sh wrote.

One test-only user, ``probe`` (read/write ``#``), is appended to the rendered ACL so tests can
see everything the broker retains or delivers; the shipped ACL has no such user.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics
from mesh.ha import discovery as ha
from mesh.mqtt.bus import MqttBus
from mesh.mqtt.direct import DirectLink
from mesh.mqtt.inbox import ReplyInbox
from mesh.config import BrokerAddress, Limits
from mesh.errors import TransportError
from nodes.client import MeshClient
from mesh.ha.extension import decommission
from nodes.up import free_port, spawn, wait_port
from tests.conftest import CACHE_ROOT, ENV, asker_keys, mesh_argv, require_model

REPO = Path(__file__).resolve().parents[2]
MOSQ = REPO / "deploy" / "mosquitto"
MODEL = "smollm2-135m"
NODES = ("node1", "node2")

# node1: the node agent with the Home Assistant extension, until `mesh node` has the flags.
WRAPPER = r"""
import argparse, logging, signal, sys, threading
from nodes.cli import _quiet_libraries, build_parser
from nodes.settings import node_config
from nodes.agent import NodeAgent
from nodes.ha_cli import add_ha_arguments, ha_extension_from_args
ha_parser = argparse.ArgumentParser(add_help=False)
add_ha_arguments(ha_parser)
ha_args, rest = ha_parser.parse_known_args(sys.argv[1:])
args = build_parser().parse_args(["node", *rest])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
_quiet_libraries()
config = node_config(args)
ext = ha_extension_from_args(ha_args, config)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
from mesh.auth.store import identity_dir, load_keyring
agent = NodeAgent(config, extensions=[ext] if ext else [], keyring=load_keyring(identity_dir(config.home), config.name))
agent.start()
stop.wait()
agent.stop()
"""


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    tls_port: int
    etc: Path
    log: Path

    def password(self, user: str) -> str:
        return (self.etc / "secrets" / f"{user}.password").read_text().strip()

    def address(self, user: str | None, *, tls: bool = False, password: str | None = None) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.tls_port if tls else self.port, username=user,
                             password=password if password is not None else (self.password(user) if user else None),
                             tls_ca=self.etc / "certs" / "ca.crt" if tls else None)


def _render_conf(etc: Path, data: Path, port: int, tls_port: int) -> str:
    """The shipped config with paths and ports swapped. The plain listener keeps its shipped bind
    address (loopback: refused here otherwise, so a broken config never opens a port to the LAN);
    the TLS listener, on every interface as shipped, is narrowed to loopback for the test."""
    text = (MOSQ / "mosquitto.conf").read_text()
    plain = re.search(r"^listener 1883(?: (\S+))?$", text, re.M)
    assert plain is not None, "mosquitto.conf no longer has a listener on 1883"
    if plain.group(1) is None or not ipaddress.ip_address(plain.group(1)).is_loopback:
        pytest.fail(f"the shipped plain MQTT listener binds {plain.group(1) or 'every interface'}, not loopback")
    swaps = [("/etc/mesh/mosquitto", str(etc)), ("/var/lib/mesh-broker/", f"{data}/"),
             (plain.group(0), f"listener {port} {plain.group(1)}"),
             ("\nlistener 8883\n", f"\nlistener {tls_port} 127.0.0.1\n")]
    for old, new in swaps:
        assert old in text, f"mosquitto.conf no longer has {old!r}"
        text = text.replace(old, new)
    # The unit runs the broker as the mosquitto user; here it stays root to read the temp dir.
    return "user root\n" + text


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists() or shutil.which("mosquitto_passwd") is None or shutil.which("openssl") is None:
        pytest.fail("mosquitto, mosquitto_passwd and openssl are needed: run deploy/system-deps.sh")
    etc = tmp_path_factory.mktemp("gateway")
    subprocess.run([str(MOSQ / "make-users.sh"), "-d", str(etc), *NODES], check=True, capture_output=True)
    subprocess.run([str(MOSQ / "make-certs.sh"), "-d", str(etc / "certs"), "localhost", "127.0.0.1"], check=True,
                   capture_output=True)
    (etc / "secrets" / "probe.password").write_text("probe-secret\n")
    subprocess.run(["mosquitto_passwd", "-b", str(etc / "passwd"), "probe", "probe-secret"], check=True)
    with open(etc / "acl", "a") as acl:
        acl.write("\n# test only\nuser probe\ntopic readwrite #\n")
    data = etc / "data"
    data.mkdir()
    port, tls_port = free_port(), free_port()
    conf = etc / "mosquitto.conf"
    conf.write_text(_render_conf(etc, data, port, tls_port))
    log = etc / "mosquitto.log"
    proc = spawn([exe, "-c", str(conf)], open(log, "wb"))
    try:
        wait_port("127.0.0.1", port, 15, proc)
        wait_port("127.0.0.1", tls_port, 15, proc)
        yield Gateway(proc, port, tls_port, etc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Spy:
    """A raw paho client: records SUBACK codes and every message, for ACL checks."""

    def __init__(self, address: BrokerAddress, client_id: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: dict[int, list[int]] = {}
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(address.username, address.password)
        if address.tls_ca:
            self.client.tls_set(ca_certs=str(address.tls_ca))
        self.client.on_connect = lambda c, u, f, rc, p: self._connected.set() if not rc.is_failure else None
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        assert self._connected.wait(10), f"{client_id} could not connect"

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._acks[mid] = [c.value for c in codes]
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe; returns the granted QoS, or 0x80 when the broker refused it."""
        _, mid = self.client.subscribe(topic_filter, qos)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, 10)
            return self._acks.pop(mid)[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def until(self, topic: str, timeout: float = 10.0) -> tuple[list[mqtt.MQTTMessage], mqtt.MQTTMessage]:
        """Messages received before the first one on ``topic``, and that one."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"nothing on {topic} within {timeout} s; got {[m.topic for m in before]}") from None
            if msg.topic == topic:
                return before, msg
            before.append(msg)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_now(gateway: Gateway) -> dict[str, bytes]:
    """Every retained message on the broker (the probe user reads '#')."""
    bus = MqttBus("probe-retained", gateway.address("probe"))
    found: dict[str, bytes] = {}
    bus.subscribe("#", lambda t, p, r: found.__setitem__(t, p) if r else None, qos=1)
    bus.start(10)
    try:
        inbox = ReplyInbox(bus, "probe")
        inbox.start()
        inbox.ping()  # barrier: retained messages come before our own echo
        return dict(found)
    finally:
        bus.stop()


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process ``pid`` listens on, from /proc (its socket inodes in net/tcp[6])."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = cols[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))
            found.add((str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return found


def test_plain_mqtt_listens_on_loopback_only(gateway: Gateway) -> None:
    """H4: the real Mosquitto, run from the shipped config, takes plain MQTT only on 127.0.0.1."""
    assert listening(gateway.proc.pid) == {("127.0.0.1", gateway.port), ("127.0.0.1", gateway.tls_port)}


# -- authentication and ACLs (no node running yet) ---------------------------------------------------
def test_anonymous_and_bad_passwords_are_refused(gateway: Gateway) -> None:
    for address in (gateway.address(None), gateway.address(None, tls=True),
                    gateway.address("node1", password="wrong"), gateway.address("nobody", password="x")):
        bus = MqttBus("intruder", address)
        with pytest.raises(TransportError, match="within 3 s.*(Not authorized|Bad user name or password)"):
            bus.start(3)
        bus.stop()
    ok = MqttBus("mesh-node-node1", gateway.address("node1"))
    ok.start(10)
    ok.stop()


def test_a_node_cannot_publish_on_another_nodes_topics(gateway: Gateway) -> None:
    probe = Spy(gateway.address("probe"), "probe-pub")
    intruder = Spy(gateway.address("node1"), "mesh-node-node1")
    try:
        assert probe.subscribe("#") == 1
        forged = [topics.node_status("node2"), topics.node_heartbeat("node2"), topics.node_state("node2"),
                  ha.node_discovery_topic("homeassistant", "node2"), topics.ROUTE, topics.ANSWER + "/x",
                  "homeassistant/status"]
        for t in forged:
            intruder.publish(t, b"forged", retain=True)
        barrier = topics.reply("node-node1")  # node1's own inbox: allowed, and the probe sees it
        intruder.publish(barrier, b"barrier")
        before, _ = probe.until(barrier)
        assert [m.topic for m in before] == [], "the broker delivered a forged message"
        left = retained_now(gateway)
        assert not set(forged) & set(left), left
    finally:
        intruder.close()
        probe.close()


def test_the_hot_path_link_authenticates_runs_over_tls_and_obeys_the_acl(gateway: Gateway) -> None:
    """``DirectLink`` speaks MQTT through ``mesh.mqtt.lite``, not paho: it must log in, do TLS and
    meet the same ACL as the bus (the coordinator's partial inbox, a worker's MLP-input feed)."""
    got: list[bytes] = []
    inbox = topics.halo_link("coordinator")
    link = DirectLink("mesh-coordinator-link", gateway.address("coordinator", tls=True), inbox,
                      lambda t, p, r: got.append(p))
    probe = Spy(gateway.address("probe"), "probe-link")
    try:
        link.open(10)
        assert probe.subscribe(topics.node_mlp("coordinator"), qos=0) == 0
        probe.client.publish(inbox, b"partial", qos=0)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            assert link.pump(0.2)
        assert got == [b"partial"]
        assert link.publish(topics.node_mlp("coordinator"), b"mlp input")
        assert probe.messages.get(timeout=10).payload == b"mlp input"
    finally:
        link.close()
        probe.close()
    heard: list[tuple[str, bytes]] = []
    worker = DirectLink("mesh-node1-halo", gateway.address("node1"), None, lambda t, p, r: heard.append((t, p)))
    probe = Spy(gateway.address("probe"), "probe-link-2")
    try:
        worker.open(10)  # a worker's link subscribes per coordinator, after it connected
        with worker.lock:
            assert worker.add_topic(topics.node_mlp("coordinator"))
            assert worker.add_topic(topics.reply("node-node2"))  # granted, but the ACL withholds it
        probe.client.publish(topics.reply("node-node2"), b"node2's chunk", qos=0)
        probe.client.publish(topics.node_mlp("coordinator"), b"mlp input", qos=0)  # after it, in order
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            assert worker.pump(0.2)
        assert heard == [(topics.node_mlp("coordinator"), b"mlp input")]
    finally:
        worker.close()
        probe.close()
    for bad in (gateway.address("coordinator", tls=True, password="wrong"), gateway.address(None)):
        with pytest.raises(TransportError, match="refused"):
            DirectLink("intruder-link", bad, inbox, lambda t, p, r: None).open(5)


def test_a_node_cannot_read_another_nodes_replies(gateway: Gateway) -> None:
    node1 = Spy(gateway.address("node1"), "mesh-node-node1")
    node2 = Spy(gateway.address("node2"), "mesh-node-node2")
    home = Spy(gateway.address("homeassistant"), "ha-spy")
    asker = Spy(gateway.address("asker"), "cli-0123456789ab")
    try:
        assert node1.subscribe(topics.reply("node-node1")) == 1
        # Mosquitto 2.0 may grant a SUBACK for a filter the ACL does not allow (0x80 on newer
        # versions) but checks read access on every delivery: what matters is that nothing arrives.
        for denied in (topics.reply("node-node1"), "mesh/v1/reply/#", "mesh/v1/reply/+", "#"):
            node2.subscribe(denied)
            home.subscribe(denied)
        assert node2.subscribe(topics.reply("node-node2")) == 1
        assert home.subscribe(topics.ANSWER) == 1
        asker.publish(topics.reply("node-node1"), b"secret for node1")
        asker.publish(topics.reply("node-node2"), b"for node2")
        assert node1.until(topics.reply("node-node1"))[1].payload == b"secret for node1"
        node1.publish(topics.ANSWER, b"{}")  # causally after the secret went through the broker
        # the asker published node1's secret first: had it been delivered, it would come first
        before, mine = node2.until(topics.reply("node-node2"))
        assert mine.payload == b"for node2"
        before_home, _ = home.until(topics.ANSWER)
        leaked = [m for m in before + before_home if m.payload == b"secret for node1"]
        leaked += [m for spy in (node2, home) for m in list(spy.messages.queue) if m.payload == b"secret for node1"]
        assert leaked == [], [(m.topic, m.payload) for m in leaked]
        assert all(m.topic.startswith("homeassistant/") for m in before_home)  # HA reads only its own
    finally:
        for spy in (node1, node2, home, asker):
            spy.close()


def test_an_oversize_payload_drops_the_sender_which_recovers(gateway: Gateway) -> None:
    topic = topics.reply("cli-oversize")
    probe = Spy(gateway.address("probe"), "probe-size")
    connects: queue.Queue[float] = queue.Queue()
    sender = MqttBus("cli-oversize", gateway.address("asker"))
    sender.on_connected(lambda: connects.put(time.monotonic()))
    sender.start(10)
    try:
        assert probe.subscribe(topic) == 1
        connects.get(timeout=5)
        cap = Limits().max_message_bytes
        # over message_size_limit but within max_packet_size: dropped, the sender stays connected
        sender.publish_wait(topic, b"m" * (cap + 8 * 1024), qos=1)
        sender.publish_wait(topic, b"still here", qos=1)
        before, msg = probe.until(topic)
        assert before == [] and msg.payload == b"still here" and connects.empty()
        # over max_packet_size: the broker disconnects the sender (paho still calls it sent)
        sender.publish(topic, b"x" * (cap + 256 * 1024), qos=0)
        reconnected = connects.get(timeout=15)  # paho reconnects on its own (1 s back-off)
        assert sender.connected.is_set() and reconnected
        sender.publish_wait(topic, b"after", qos=1)
        before, msg = probe.until(topic, timeout=10)
        assert before == [] and msg.payload == b"after"
        assert "cli-oversize disconnected due to oversize packet" in gateway.log.read_text()
    finally:
        sender.stop()
        probe.close()


# -- real nodes -------------------------------------------------------------------------------------
@dataclass
class Nodes:
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def nodes(gateway: Gateway) -> Iterator[Nodes]:
    require_model(MODEL)
    etc = gateway.etc
    common = ["--model", MODEL, "--heartbeat", "0.5", "--home", str(CACHE_ROOT), "--threads", "1"]
    argv = {
        "node1": [sys.executable, "-c", WRAPPER, "--name", "node1", "--broker", f"127.0.0.1:{gateway.port}",
                  "--username", "node1", "--password-file", str(etc / "secrets" / "node1.password"), *common],
        "node2": mesh_argv("node", "--name", "node2", "--broker", f"127.0.0.1:{gateway.tls_port}",
                           "--username", "node2", "--password-file", str(etc / "secrets" / "node2.password"),
                           "--tls-ca", str(etc / "certs" / "ca.crt"), *common),
    }
    logs = {n: etc / f"{n}.log" for n in argv}
    running = Nodes({n: spawn(a, open(logs[n], "wb"), env=ENV) for n, a in argv.items()}, logs)
    try:
        with MeshClient(gateway.address("asker"), keyring=asker_keys()) as client:
            deadline = time.monotonic() + 240
            while True:
                for n, p in running.procs.items():
                    if p.poll() is not None:
                        raise AssertionError(f"{n} exited ({p.returncode}): {logs[n].read_text()[-3000:]}")
                try:
                    client.wait_online(list(NODES), 1.0, ready=lambda v: v.model == MODEL)
                    break
                except TransportError:
                    if time.monotonic() > deadline:
                        raise
        yield running
    finally:
        for n in running.procs:
            running.stop(n)


def test_nodes_answer_with_auth_and_over_tls(gateway: Gateway, nodes: Nodes) -> None:
    for tls in (False, True):
        with MeshClient(gateway.address("asker", tls=tls), keyring=asker_keys()) as client:
            for node in NODES:
                result = client.ask("The capital of France is", node=node, max_new_tokens=4, timeout=60)
                assert result.node == node and result.new_tokens >= 1 and result.answer


def test_home_assistant_can_ask_and_read_answers(gateway: Gateway, nodes: Nodes) -> None:
    home = Spy(gateway.address("homeassistant"), "ha-asker")
    try:
        assert home.subscribe(topics.ANSWER) == 1
        assert home.subscribe(ha.AUTOMATION_REPLY_PREFIX + "#") == 1
        home.publish(topics.ASK, json.dumps({"text": "The capital of France is", "max_new_tokens": 3,
                                             "id": "ha-1"}).encode())
        answer = json.loads(home.until(topics.ANSWER, timeout=60)[1].payload)
        assert answer["id"] == "ha-1" and answer["node"] in NODES and answer["text"]
        reply_to = ha.AUTOMATION_REPLY_PREFIX + "briefing"
        home.publish(topics.ASK, json.dumps({"text": "Good morning! Today is", "max_new_tokens": 3,
                                             "reply_to": reply_to, "id": "ha-2"}).encode())
        answer = json.loads(home.until(reply_to, timeout=60)[1].payload)
        assert answer["id"] == "ha-2" and answer["text"]
        home.publish(topics.ASK_TEXT, b"Turn on the kitchen light.")  # the text entity's command
        answer = json.loads(home.until(topics.ANSWER, timeout=120)[1].payload)
        assert answer["node"] in NODES and "text" in answer
    finally:
        home.close()


# -- discovery against the running node1 ------------------------------------------------------------
def _configs(home: Spy, count: int, timeout: float = 20.0) -> dict[str, Any]:
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        msg = home.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
        if msg.topic.endswith("/config") and msg.payload:
            got[msg.topic] = (json.loads(msg.payload), msg.retain)
    return got


@pytest.fixture(scope="module")
def assistant(gateway: Gateway) -> dict[str, Any]:
    """The shared Home Assistant device, published as install.sh --gateway does: the real
    ``nodes.ha_cli assistant`` command with the asker's credentials (here over TLS, as from a LAN)."""
    etc = gateway.etc
    result = subprocess.run([sys.executable, "-m", "nodes.ha_cli", "assistant", "--nodes", *NODES,
                             "--broker", f"127.0.0.1:{gateway.tls_port}", "--tls-ca", str(etc / "certs" / "ca.crt"),
                             "--username", ha.ASSISTANT_OWNER,
                             "--password-file", str(etc / "secrets" / f"{ha.ASSISTANT_OWNER}.password")],
                            capture_output=True, text=True, timeout=120, env=ENV)
    topic = ha.assistant_discovery_topic("homeassistant")
    assert result.returncode == 0 and result.stdout.startswith(f"published {topic}"), result.stderr
    return json.loads(retained_now(gateway)[topic])


def test_the_shared_device_is_the_operators_and_available_while_any_node_is(
        gateway: Gateway, nodes: Nodes, assistant: dict[str, Any]) -> None:
    """M8: every node published the shared device with no availability, so any node could rewrite
    it. Now the asker account publishes it with the nodes' status topics (mode any), and a node's
    forged config or removal never reaches Home Assistant nor replaces the retained one."""
    assert assistant["availability_mode"] == "any"
    assert [a["topic"] for a in assistant["availability"]] == [topics.node_status(n) for n in sorted(NODES)]
    statuses = retained_now(gateway)
    assert all(statuses[a["topic"]] == a["payload_available"].encode() for a in assistant["availability"])
    topic = ha.assistant_discovery_topic("homeassistant")
    home = Spy(gateway.address("homeassistant"), "ha-m8")
    node1 = Spy(gateway.address("node1"), "mesh-node-node1-m8")
    try:
        barrier = ha.AUTOMATION_REPLY_PREFIX + "m8-barrier"  # node1 writes it, Home Assistant reads it
        assert home.subscribe(topic) == 1 and home.subscribe(barrier) == 1
        assert json.loads(home.until(topic)[1].payload) == assistant  # the retained config
        forged = dict(assistant, components={"answer": {"platform": "sensor", "unique_id": "x",
                                                        "state_topic": "homeassistant-mesh/x"}})
        node1.publish(topic, json.dumps(forged).encode(), retain=True)
        node1.publish(topic, b"", retain=True)  # or remove it
        node1.publish(barrier, b"after")  # had either gone through, it would arrive first
        before, _ = home.until(barrier)
        assert [(m.topic, m.payload) for m in before] == []
        assert json.loads(retained_now(gateway)[topic]) == assistant
    finally:
        node1.close()
        home.close()


def test_discovery_payloads_name_topics_the_node_really_publishes(gateway: Gateway, nodes: Nodes,
                                                                  assistant: dict[str, Any]) -> None:
    home = Spy(gateway.address("homeassistant"), "ha-discovery")
    watcher = Spy(gateway.address("homeassistant"), "ha-watch")
    try:
        assert home.subscribe("homeassistant/device/+/config") == 1
        configs = _configs(home, 3)  # node1, node2 (the real `mesh node` CLI) and the assistant
        node_cfg, retained = configs[ha.node_discovery_topic("homeassistant", "node1")]
        assert retained
        shared_cfg, _ = configs[ha.assistant_discovery_topic("homeassistant")]
        assert shared_cfg == assistant
        # required keys (device-based discovery)
        for cfg in (node_cfg, shared_cfg):
            assert cfg["device"]["identifiers"] and cfg["origin"]["name"] == "mesh"
            assert all(c["platform"] and c["unique_id"] for c in cfg["components"].values())
        assert node_cfg["device"]["model"] == MODEL
        assert node_cfg["availability"][0] == {"topic": topics.node_status("node1"), "payload_available": "online",
                                               "payload_not_available": "offline"}
        # every topic Home Assistant would read gets messages from the running mesh
        wanted = {t for cfg in (node_cfg, shared_cfg) for _, t in ha.topics_read_by(cfg)}
        assert wanted == {topics.node_state("node1"), topics.node_status("node1"), topics.node_status("node2"),
                          topics.ANSWER}
        for t in sorted(wanted):
            assert watcher.subscribe(t) == 1
        watcher.publish(topics.ASK, json.dumps(
            {"text": "Hello", "max_new_tokens": 2}).encode())
        seen: dict[str, bytes] = {}
        deadline = time.monotonic() + 60
        while set(seen) != wanted:
            msg = watcher.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            seen.setdefault(msg.topic, msg.payload)
        assert seen[topics.node_status("node1")] == topics.ONLINE
        state = json.loads(seen[topics.node_state("node1")])
        assert state["model"] == MODEL and "queue" in state
        assert "text" in json.loads(seen[topics.ANSWER])
    finally:
        watcher.close()
        home.close()


def test_a_home_assistant_restart_triggers_rediscovery(gateway: Gateway, nodes: Nodes,
                                                      assistant: dict[str, Any]) -> None:
    home = Spy(gateway.address("homeassistant"), "ha-restart")
    try:
        assert home.subscribe("homeassistant/device/+/config") == 1
        first = _configs(home, 3)  # the two nodes' devices and the assistant, retained
        assert all(retained for _, retained in first.values())
        t0 = time.monotonic()
        home.publish("homeassistant/status", b"online")  # Home Assistant's birth message
        again = _configs(home, 2, timeout=15)  # each node republishes its own device, no more
        mine = {ha.node_discovery_topic("homeassistant", n) for n in NODES}
        assert {t: cfg for t, (cfg, _) in again.items()} == {t: cfg for t, (cfg, _) in first.items() if t in mine}
        assert not any(retained for _, retained in again.values())  # live republish, not a replay
        assert time.monotonic() - t0 < 10
    finally:
        home.close()


def test_decommission_leaves_nothing_retained_for_the_node(gateway: Gateway, nodes: Nodes,
                                                           assistant: dict[str, Any]) -> None:
    before = retained_now(gateway)
    assert {topics.node_status("node1"), topics.node_state("node1"), topics.node_heartbeat("node1"),
            ha.node_discovery_topic("homeassistant", "node1")} <= set(before)
    nodes.stop("node1")  # decommissioning is for a stopped node
    assert retained_now(gateway)[topics.node_status("node1")] == topics.OFFLINE
    bus = MqttBus("mesh-decommission-node1", gateway.address("node1"))
    bus.start(10)
    try:
        cleared = decommission(bus, "node1", "homeassistant")
    finally:
        bus.stop()
    assert ha.node_discovery_topic("homeassistant", "node1") in cleared
    after = retained_now(gateway)
    left = [t for t in after if "node1" in t]
    assert left == [], left
    # the rest of the mesh is untouched
    assert after[topics.node_status("node2")] == topics.ONLINE
    assert ha.assistant_discovery_topic("homeassistant") in after
    # the node's account could not have removed the shared device anyway; its owner does, when the
    # mesh goes
    etc = gateway.etc
    result = subprocess.run([sys.executable, "-m", "nodes.ha_cli", "assistant", "--remove",
                             "--broker", f"127.0.0.1:{gateway.port}", "--username", ha.ASSISTANT_OWNER,
                             "--password-file", str(etc / "secrets" / f"{ha.ASSISTANT_OWNER}.password")],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    assert ha.assistant_discovery_topic("homeassistant") not in retained_now(gateway)
