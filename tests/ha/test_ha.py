"""Home Assistant discovery payloads (pure) and the node extension on an in-memory bus."""

from __future__ import annotations

import argparse
import json
import threading
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mesh import topics
from mesh.ha import discovery as ha
from mesh.config import NodeConfig
from mesh.errors import ConfigError
from mesh.ha.extension import HomeAssistantExtension
from nodes.ha_cli import add_ha_arguments, ha_extension_from_args

# Home Assistant renders value templates with Jinja in a sandbox; strict undefined makes any
# access to a missing figure fail loudly here, where Home Assistant would log and keep old state.
JINJA = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)

FULL_STATE = {  # what a node's state topic carries once the cache and HALO issues land
    "seq": 7, "model": "smollm2-135m", "queue": 1, "load": 0.25, "served": 12, "last_ttft_s": 0.2345,
    "rtt_ms": 0.42, "cache": {"chunks": 10, "bytes": 2_250_000, "hits": 3, "misses": 1, "hit_rate": 0.75},
    "halo": {"groups": 6}, "link": {"loss_fraction": 0.05, "rtt_ewma_ms": 3.0},
}
TODAY_STATE = {  # what NodeAgent.heartbeat_body() publishes today: no cache, halo or link
    "seq": 1, "model": "smollm2-135m", "queue": 0, "load": 0.0, "served": 0, "last_ttft_s": None,
}


def render(template: str, value_json: Any) -> str:
    return JINJA.from_string(template).render(value_json=value_json)


def test_node_device_carries_required_keys() -> None:
    cfg = ha.node_discovery("pi1", sw_version="0.1.0", model="smollm2-135m")
    assert cfg["device"]["identifiers"] == ["mesh_node_pi1"]
    assert cfg["origin"]["name"] == "mesh" and cfg["origin"]["sw_version"] == "0.1.0"
    assert cfg["availability"] == [{"topic": "mesh/v1/node/pi1/status", "payload_available": "online",
                                    "payload_not_available": "offline"}]
    assert cfg["state_topic"] == topics.node_state("pi1")
    comps = cfg["components"]
    assert {"state", "model", "last_ttft", "served", "cache_hit_rate", "cache_size", "link_rtt", "link_loss",
            "halo_groups"} <= set(comps)
    uids = [c["unique_id"] for c in comps.values()]
    assert len(set(uids)) == len(uids) and all(u.startswith("mesh_node_pi1_") for u in uids)
    assert all(c["platform"] == "sensor" and c["value_template"] for c in comps.values())
    # a second node gets disjoint ids
    other = ha.node_discovery("pi2", sw_version="0.1.0")["components"]
    assert not set(uids) & {c["unique_id"] for c in other.values()}


def test_assistant_device_asks_and_answers_on_the_mesh_contract() -> None:
    cfg = ha.assistant_discovery(sw_version="0.1.0", nodes=["pi1"])
    assert cfg["device"]["identifiers"] == [ha.ASSISTANT_ID] and cfg["origin"]["name"] == "mesh"
    q, a = cfg["components"]["question"], cfg["components"]["answer"]
    assert q["platform"] == "text" and q["command_topic"] == topics.ASK_TEXT and q["max"] <= 255
    assert a["platform"] == "sensor" and a["state_topic"] == topics.ANSWER
    assert a["json_attributes_topic"] == topics.ANSWER
    assert q["unique_id"] != a["unique_id"]


def test_assistant_device_is_available_while_any_node_is_online() -> None:
    """M8: the shared device had no availability; it now follows every node's status topic and
    is available while any one says online (HA's availability_mode "any", a shared option of
    device-based discovery)."""
    cfg = ha.assistant_discovery(sw_version="0.1.0", nodes=["pi2", "pi1", "pi2"])
    assert cfg["availability_mode"] == "any"
    assert cfg["availability"] == [
        {"topic": topics.node_status(n), "payload_available": "online", "payload_not_available": "offline"}
        for n in ("pi1", "pi2")]
    assert cfg["availability"][0] == ha.node_discovery("pi1", sw_version="x")["availability"][0]
    # the same bytes whatever the order the node list came in
    assert ha.encode(cfg) == ha.encode(ha.assistant_discovery(sw_version="0.1.0", nodes=["pi1", "pi2"]))
    with pytest.raises(ConfigError):
        ha.assistant_discovery(sw_version="0.1.0", nodes=[])
    with pytest.raises(ConfigError):
        ha.assistant_discovery(sw_version="0.1.0", nodes=["pi1", "bad/name"])
    (msg,) = ha.assistant_messages("ha2", ["pi1"], sw_version="0.1.0")
    assert msg.topic == "ha2/device/mesh_assistant/config" and msg.retain and json.loads(msg.payload) == \
        ha.assistant_discovery(sw_version="0.1.0", nodes=["pi1"])
    (gone,) = ha.assistant_messages("ha2", [], sw_version="0.1.0", remove=True)
    assert gone.topic == msg.topic and gone.payload == b"" and gone.retain


def test_a_node_publishes_and_removes_only_its_own_device() -> None:
    """M8: every node published (so could rewrite) the shared device; now a node's messages name
    its own device and its own subtree only."""
    assert [m.topic for m in ha.discovery_messages("pi1", "homeassistant", sw_version="x")] == [
        "homeassistant/device/mesh_node_pi1/config"]
    removal = {m.topic for m in ha.removal_messages("pi1", "homeassistant")}
    assert ha.assistant_discovery_topic("homeassistant") not in removal
    assert all(t == ha.node_discovery_topic("homeassistant", "pi1") or t.startswith("mesh/v1/node/pi1/")
               for t in removal)


def test_topics_and_prefix() -> None:
    assert ha.node_discovery_topic("homeassistant", "pi1") == "homeassistant/device/mesh_node_pi1/config"
    assert ha.assistant_discovery_topic("ha2") == "ha2/device/mesh_assistant/config"
    assert ha.birth_topic("ha2") == "ha2/status"
    for bad in ("", "a/b", "a+", "#", "é"):
        with pytest.raises(ConfigError):
            ha.check_prefix(bad)
    with pytest.raises(ConfigError):
        ha.node_object_id("bad/name")


def test_sensor_templates_read_full_figures() -> None:
    comps = ha.node_discovery("pi1", sw_version="x")["components"]
    got = {k: render(c["value_template"], FULL_STATE) for k, c in comps.items()}
    assert got["state"] == "busy" and got["model"] == "smollm2-135m"
    assert float(got["last_ttft"]) == pytest.approx(0.234, abs=1e-3)
    assert got["served"] == "12" and float(got["load"]) == 25
    assert float(got["cache_hit_rate"]) == 75.0 and got["cache_size"] == "2250000"
    assert float(got["link_rtt"]) == pytest.approx(0.4) and float(got["link_loss"]) == 5.0
    assert got["halo_groups"] == "6"
    assert render(comps["halo_groups"]["value_template"], {"halo": {"groups": [1, 4, 5]}}) == "3"


@pytest.mark.parametrize("state", [TODAY_STATE, {}, {"cache": None, "halo": {}, "link": None, "rtt_ms": None}])
def test_sensor_templates_tolerate_missing_figures(state: dict[str, Any]) -> None:
    comps = ha.node_discovery("pi1", sw_version="x")["components"]
    got = {k: render(c["value_template"], state) for k, c in comps.items()}
    # Home Assistant turns a rendered "None" into the state "unknown"
    for key in ("cache_hit_rate", "cache_size", "link_loss", "halo_groups"):
        assert got[key] == "None", key
    if state is TODAY_STATE:
        assert got["state"] == "idle" and got["served"] == "0" and got["last_ttft"] == "None"


def test_answer_templates() -> None:
    a = ha.assistant_discovery(sw_version="x", nodes=["pi1"])["components"]["answer"]
    long = {"text": "Paris " * 100, "node": "pi1", "ttft_s": 0.1, "token_ids": list(range(50)), "id": "q1"}
    state = render(a["value_template"], long)
    assert state.startswith("Paris") and len(state) == ha.MAX_STATE_CHARS
    attrs = json.loads(render(a["json_attributes_template"], long))
    assert attrs["text"] == long["text"] and attrs["node"] == "pi1" and "token_ids" not in attrs
    err = {"error": "busy", "message": "node pi1 is busy", "id": "q2"}
    assert render(a["value_template"], err) == "error: node pi1 is busy"
    assert render(a["value_template"], {}) == "None"


def test_removal_covers_config_and_retained_node_topics() -> None:
    msgs = ha.removal_messages("pi1", "homeassistant", retained_topics=("mesh/v1/node/pi1/catalog",))
    assert all(m.payload == b"" and m.retain for m in msgs)
    assert [m.topic for m in msgs] == ["homeassistant/device/mesh_node_pi1/config", "mesh/v1/node/pi1/status",
                                       "mesh/v1/node/pi1/heartbeat", "mesh/v1/node/pi1/state",
                                       "mesh/v1/node/pi1/catalog"]
    with pytest.raises(ConfigError):  # never clears another node's topics
        ha.removal_messages("pi1", "homeassistant", retained_topics=("mesh/v1/node/pi2/status",))


def test_topics_read_by_lists_state_attribute_and_availability_topics() -> None:
    node = set(ha.topics_read_by(ha.node_discovery("pi1", sw_version="x")))
    assert {t for _, t in node} == {topics.node_state("pi1"), topics.node_status("pi1")}
    shared = {t for _, t in ha.topics_read_by(ha.assistant_discovery(sw_version="x", nodes=["pi1", "pi2"]))}
    assert shared == {topics.ANSWER, topics.node_status("pi1"), topics.node_status("pi2")}


class FakeBus:
    """Records publishes; delivers what a test injects to the subscribed handlers."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.handlers: dict[str, Any] = {}
        self.connect_callbacks: list[Any] = []
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        with self.lock:
            self.published.append((topic, payload, qos, retain))

    def subscribe(self, topic: str, handler: Any, qos: int = 1) -> None:
        self.handlers[topic] = handler

    def on_connected(self, callback: Any) -> None:
        self.connect_callbacks.append(callback)

    def configs(self) -> list[str]:
        with self.lock:
            return [t for t, *_ in self.published]


def test_extension_publishes_on_start_and_debounces_ha_restarts() -> None:
    bus = FakeBus()
    ext = HomeAssistantExtension("homeassistant", debounce_s=0.2, sw_version="0.1.0")
    ext.attach(bus, "pi1", "smollm2-135m")
    try:
        assert ext.published == 1
        assert bus.configs() == [ha.node_discovery_topic("homeassistant", "pi1")]  # its own device only
        topic, payload, qos, retain = bus.published[0]
        assert retain and qos == 1 and json.loads(payload)["device"]["model"] == "smollm2-135m"
        birth = bus.handlers["homeassistant/status"]
        birth("homeassistant/status", b"online", True)  # retained history: ignored
        birth("homeassistant/status", b"offline", False)  # HA going away: nothing to do
        for _ in range(5):  # a burst of births (and a reconnect) -> one republish
            birth("homeassistant/status", b"online", False)
        bus.connect_callbacks[0]()
        assert ext.wait_published(2, timeout=5)
        assert not ext.wait_published(3, timeout=0.5)
        assert bus.configs() == [ha.node_discovery_topic("homeassistant", "pi1")] * 2
    finally:
        ext.stop()


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_ha_arguments(parser)
    config = NodeConfig(name="pi1")
    ext = ha_extension_from_args(parser.parse_args([]), config, env={})
    assert isinstance(ext, HomeAssistantExtension) and ext.prefix == "homeassistant"
    assert ha_extension_from_args(parser.parse_args(["--ha-prefix", "ha2"]), config, env={}).prefix == "ha2"
    assert ha_extension_from_args(parser.parse_args([]), config, env={"MESH_HA_PREFIX": "ha3"}).prefix == "ha3"
    assert ha_extension_from_args(parser.parse_args(["--no-ha"]), config, env={}) is None
    assert parser.parse_args(["--decommission"]).decommission
    with pytest.raises(ConfigError):
        ha_extension_from_args(parser.parse_args(["--ha-prefix", "a/b"]), config, env={})
