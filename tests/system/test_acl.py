"""The deployed Mosquitto ACL (deploy/mosquitto/acl.template, rendered by make-users.sh) lets every
message flow the mesh uses through, and keeps a node out of what is not its business: a real
Mosquitto with the rendered password file and ACL on loopback, one paho client per user."""

from __future__ import annotations

import queue
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mesh import topics
from mesh.ha import discovery as ha
from tests.conftest import free_port, spawn, wait_port

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NODES = ("pi1", "pi2")
COORD = "coordinator"

# (publisher, subscriber, topic): every flow the mesh's processes use (topic names from mesh.topics).
FLOWS = [
    # HALO hot path and control: MLP inputs, plans; partials and acks back.
    (COORD, "pi1", topics.node_mlp(COORD)),
    (COORD, "pi1", topics.HALO_PLAN),
    ("pi1", COORD, topics.halo_reply(COORD)),
    ("pi1", COORD, topics.halo_link(COORD)),
    ("pi1", COORD, topics.reply(COORD)),
    # the coordinator as a node: presence, asks routed to it, its answers
    (COORD, "pi1", topics.node_status(COORD)),
    (COORD, "asker", topics.node_heartbeat(COORD)),
    ("pi1", COORD, topics.node_heartbeat("pi1")),
    ("pi1", COORD, topics.node_status("pi1")),
    ("asker", COORD, topics.node_ask(COORD)),
    ("asker", COORD, topics.ROUTE),
    ("homeassistant", COORD, topics.ASK),
    ("homeassistant", COORD, topics.ASK_TEXT),
    (COORD, "asker", topics.reply("cli-0a1b")),
    (COORD, "homeassistant", topics.ANSWER),
    (COORD, "pi1", topics.node_ask("pi1")),
    # an asker's last will reaches the node and the coordinator working on its ask (mesh/askers.py)
    ("asker", "pi1", topics.asker_status("cli-0a1b")),
    ("asker", COORD, topics.asker_status("cli-0a1b")),
    # nodes among themselves: KV fetches and their replies, catalogs, forwarded asks
    ("pi1", "pi2", topics.node_kv("pi2")),
    ("pi2", "pi1", topics.reply("node-pi1")),
    ("pi1", "pi2", topics.node_catalog("pi1")),
    ("pi1", "pi2", topics.node_ask("pi2")),
    # the evidence of a lie an audit caught (mesh.cache.evidence): every node and the coordinator read it
    ("pi1", "pi2", topics.node_kv_evidence("pi1")),
    ("pi1", COORD, topics.node_kv_evidence("pi1")),
    # Home Assistant discovery: a node's own device; the shared device from the operator's account
    ("pi1", "homeassistant", ha.node_discovery_topic("homeassistant", "pi1")),
    (ha.ASSISTANT_OWNER, "homeassistant", ha.assistant_discovery_topic("homeassistant")),
]
# (publisher, subscriber, topic) that must NOT arrive: a node reads no one else's partials or
# replies and cannot overwrite the plan, nor any Home Assistant device but its own.
DENIED = [
    ("pi1", "pi2", topics.halo_reply(COORD)),
    ("pi1", "pi2", topics.halo_link(COORD)),
    ("pi1", "pi2", topics.reply(COORD)),
    ("pi1", COORD, topics.HALO_PLAN),
    ("pi1", "pi2", topics.reply("node-pi1")),
    # a node cannot fake an asker's will to stop its asks
    ("pi1", "pi2", topics.asker_status("cli-0a1b")),
    # evidence is published under the auditor's own name only
    ("pi1", "pi2", topics.node_kv_evidence("pi2")),
    # M8: a node rewrites no device but its own, the shared assistant device included
    ("pi1", "homeassistant", ha.assistant_discovery_topic("homeassistant")),
    ("pi1", "homeassistant", ha.node_discovery_topic("homeassistant", "pi2")),
]


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists() or shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto is not installed: `make test` installs it (deploy/system-deps.sh)")
    d = tmp_path_factory.mktemp("acl")
    subprocess.run([str(DEPLOY / "mosquitto" / "make-users.sh"), "-d", str(d), *NODES], check=True,
                   capture_output=True)
    port = free_port()
    conf = d / "mosquitto.conf"
    # user root: mosquitto started as root would switch to the mosquitto user, which cannot read
    # pytest's private temporary directory.
    conf.write_text(f"user root\nper_listener_settings false\nallow_anonymous false\npassword_file {d / 'passwd'}\n"
                    f"acl_file {d / 'acl'}\nlistener {port} 127.0.0.1\nlog_dest stderr\n")
    proc = spawn([exe, "-c", str(conf)], open(d / "mosquitto.log", "wb"))
    try:
        wait_port("127.0.0.1", port, 15, proc)
        yield port, d
    finally:
        proc.terminate()
        proc.wait(10)


class User:
    def __init__(self, name: str, port: int, secrets: Path) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.granted: dict[int, list[int]] = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{name}", protocol=mqtt.MQTTv311)
        self.c.username_pw_set(name, (secrets / f"{name}.password").read_text().strip())
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.granted.__setitem__(mid, [int(x.value) for x in codes])
        self.c.connect("127.0.0.1", port, 10)
        self.c.loop_start()
        deadline = time.monotonic() + 10
        while not self.c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.c.is_connected(), f"{name} could not log in"

    def subscribe(self, topic: str) -> int:
        """The granted QoS, or 128 when the broker refused the subscription."""
        _, mid = self.c.subscribe(topic, 1)
        deadline = time.monotonic() + 5
        while mid not in self.granted and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.granted[mid][0]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _delivered(pub: User, sub: User, topic: str, wait_s: float) -> bool:
    while not sub.got.empty():
        sub.got.get_nowait()
    token = f"{topic}@{time.monotonic_ns()}".encode()
    pub.c.publish(topic, token, qos=1).wait_for_publish(5)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if sub.got.get(timeout=0.05) == (topic, token):
                return True
        except queue.Empty:
            pass
    return False


def test_acl_lets_every_mesh_flow_through_and_nothing_else(acl_broker: tuple[int, Path]) -> None:
    port, d = acl_broker
    users = {n: User(n, port, d / "secrets") for n in (COORD, "asker", "homeassistant", *NODES)}
    try:
        missing = []
        for pub, sub, topic in FLOWS:
            if users[sub].subscribe(topic) >= 128 or not _delivered(users[pub], users[sub], topic, 2.0):
                missing.append(f"{pub} -> {sub} on {topic}")
        assert not missing, "the ACL blocks: " + "; ".join(missing)
        leaked = [f"{pub} -> {sub} on {topic}" for pub, sub, topic in DENIED
                  if users[sub].subscribe(topic) < 128 and _delivered(users[pub], users[sub], topic, 0.5)]
        assert not leaked, "the ACL lets through: " + "; ".join(leaked)
    finally:
        for u in users.values():
            u.close()
