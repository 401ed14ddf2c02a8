"""Home Assistant MQTT discovery: payloads and topic names, as pure functions.

Device-based discovery (Home Assistant 2024.11+): one retained JSON config per device on
``<prefix>/device/<object id>/config`` carrying the shared ``device`` and ``origin`` mappings,
shared ``state_topic``/``availability``/``qos``, and one entry per entity under ``components``
(each with its ``platform`` and a ``unique_id``). An empty retained payload on the same topic
removes the device and its entities.

Two kinds of device:

- one per node, ``mesh_node_<name>``: sensors read the node's retained JSON state topic
  (``mesh.topics.node_state``, a copy of the heartbeat figures); availability follows the
  node's retained status topic, which its last will sets to ``offline``;
- one shared "assistant" device, ``mesh_assistant``: a ``text`` entity whose value is sent as a
  plain-text ask (``mesh/v1/ask/text``) and an answer sensor on ``mesh/v1/answer``. It is
  available while *any* node of the mesh is online (``availability_mode: any`` over the nodes'
  status topics), since any online node can be routed an ask.

Ownership: a node publishes only its own device. The shared device is published once, retained,
by the operator's account (:data:`ASSISTANT_OWNER`, ``nodes/ha_cli.py assistant``, which
``deploy/install.sh --gateway`` runs with the node list), because a device every node may write
is one any node may rewrite: drop the assistant's entities, point its answer sensor at a topic it
writes, or add components. The gateway's ACL says the same: a node may write
``<prefix>/device/mesh_node_<its name>/config`` and no other discovery topic; only the asker
account writes ``<prefix>/device/mesh_assistant/config``.

Value templates must tolerate figures that a node does not report (older nodes; the prompt cache
under ``cache``, HALO under ``halo``, link statistics under ``link`` land later): they render
``None``, which Home Assistant shows as "unknown", instead of raising on a missing key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh import topics
from mesh.config import check_name
from mesh.errors import ConfigError

DEFAULT_PREFIX = "homeassistant"
ASSISTANT_ID = "mesh_assistant"
ORIGIN_NAME = "mesh"
MANUFACTURER = "the mesh"
# Home Assistant keeps at most 255 characters in a sensor state (and a text entity's value).
MAX_STATE_CHARS = 255
# Answers to JSON asks that name a reply_to must go under this prefix (the gateway ACL lets nodes
# publish there and Home Assistant read it).
AUTOMATION_REPLY_PREFIX = "homeassistant-mesh/"
# The broker account that owns the shared assistant device (deploy/mosquitto/acl.template).
ASSISTANT_OWNER = "asker"


def check_prefix(prefix: str) -> str:
    """The discovery prefix: one topic level of ``[A-Za-z0-9_-]``."""
    if not isinstance(prefix, str) or not prefix or any(
            not (c.isascii() and (c.isalnum() or c in "_-")) for c in prefix):
        raise ConfigError(f"invalid Home Assistant discovery prefix {prefix!r}")
    return prefix


def node_object_id(node: str) -> str:
    """The device's object id (and device identifier) for node ``node``."""
    return f"mesh_node_{check_name(node)}"


def discovery_topic(prefix: str, object_id: str) -> str:
    return f"{check_prefix(prefix)}/device/{object_id}/config"


def node_discovery_topic(prefix: str, node: str) -> str:
    return discovery_topic(prefix, node_object_id(node))


def assistant_discovery_topic(prefix: str) -> str:
    return discovery_topic(prefix, ASSISTANT_ID)


def birth_topic(prefix: str) -> str:
    """Where Home Assistant announces itself (``online``) and its last will (``offline``)."""
    return f"{check_prefix(prefix)}/status"


BIRTH_ONLINE = b"online"
BIRTH_OFFLINE = b"offline"  # Home Assistant's last will on its status topic


def _num(path: str, scale: float = 1.0, digits: int | None = None) -> str:
    """A value template for a numeric figure, scaled and rounded, ``None`` when absent."""
    expr = f"value_json.{path}"
    if scale != 1.0:
        expr = f"({expr} * {scale:g})"
    if digits is not None:
        expr = f"({expr} | round({digits}))"
    checks = " and ".join(f"value_json.{'.'.join(path.split('.')[:i + 1])} is defined"
                          for i in range(path.count(".")))
    cond = f"{checks} and value_json.{path} is number" if checks else f"value_json.{path} is number"
    return "{{ " + f"{expr} if {cond} else none" + " }}"


@dataclass(frozen=True)
class Sensor:
    """One sensor of a node's device, read from the node's state topic."""

    key: str
    name: str
    value_template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    icon: str | None = None
    diagnostic: bool = False
    extra: tuple[tuple[str, Any], ...] = ()

    def config(self, node: str) -> dict[str, Any]:
        c: dict[str, Any] = {"platform": "sensor", "name": self.name,
                             "unique_id": f"{node_object_id(node)}_{self.key}",
                             "value_template": self.value_template}
        for k, v in (("unit_of_measurement", self.unit), ("device_class", self.device_class),
                     ("state_class", self.state_class), ("icon", self.icon)):
            if v is not None:
                c[k] = v
        if self.diagnostic:
            c["entity_category"] = "diagnostic"
        c.update(dict(self.extra))
        return c


_GROUPS = ("value_json.halo.groups if value_json.halo is defined and value_json.halo.groups is defined "
           "else none")
NODE_SENSORS: tuple[Sensor, ...] = (
    Sensor("state", "State",
           "{{ ('busy' if value_json.queue > 0 else 'idle') if value_json.queue is number else none }}",
           icon="mdi:state-machine"),
    Sensor("model", "Model", "{{ value_json.model if value_json.model is string else none }}",
           icon="mdi:brain", diagnostic=True),
    Sensor("last_ttft", "Last time to first token", _num("last_ttft_s", digits=3), unit="s",
           device_class="duration", state_class="measurement", icon="mdi:timer-outline"),
    Sensor("served", "Answers served", _num("served"), state_class="total_increasing",
           icon="mdi:counter"),
    Sensor("load", "Load", _num("load", scale=100, digits=0), unit="%", state_class="measurement",
           icon="mdi:gauge"),
    Sensor("cache_hit_rate", "Cache hit rate", _num("cache.hit_rate", scale=100, digits=1), unit="%",
           state_class="measurement", icon="mdi:cached"),
    Sensor("cache_size", "Cache size", _num("cache.bytes"), unit="B", device_class="data_size",
           state_class="measurement", extra=(("suggested_unit_of_measurement", "MB"),)),
    # rtt_ms is the heartbeat's own figure; link.rtt_ewma_ms (mesh.uplink_stats) replaces it later.
    Sensor("link_rtt", "Link round trip",
           "{{ value_json.rtt_ms | round(1) if value_json.rtt_ms is number else "
           "(value_json.link.rtt_ewma_ms | round(1) if value_json.link is defined and "
           "value_json.link.rtt_ewma_ms is number else none) }}",
           unit="ms", device_class="duration", state_class="measurement", icon="mdi:timer-sync-outline",
           diagnostic=True),
    Sensor("link_loss", "Link loss", _num("link.loss_fraction", scale=100, digits=2), unit="%",
           state_class="measurement", icon="mdi:lan-disconnect", diagnostic=True),
    # groups may be a count or the list of group ids a node holds
    Sensor("halo_groups", "Neuron groups held",
           "{% set g = " + _GROUPS + " %}{{ none if g is none else (g if g is number else "
           "(g | count if g is iterable and g is not string else none)) }}",
           state_class="measurement", icon="mdi:graph-outline"),
)


def origin(sw_version: str) -> dict[str, str]:
    return {"name": ORIGIN_NAME, "sw_version": sw_version}


def availability(node: str) -> dict[str, str]:
    """One availability entry: node ``node``'s retained status (its last will says offline)."""
    return {"topic": topics.node_status(node), "payload_available": topics.ONLINE.decode(),
            "payload_not_available": topics.OFFLINE.decode()}


def node_discovery(node: str, *, sw_version: str, model: str | None = None) -> dict[str, Any]:
    """The device discovery config of node ``node`` (a JSON-ready dict)."""
    device: dict[str, Any] = {"identifiers": [node_object_id(node)], "name": f"mesh {node}",
                              "manufacturer": MANUFACTURER, "sw_version": sw_version,
                              "via_device": ASSISTANT_ID}
    if model:
        device["model"] = model
    return {
        "device": device,
        "origin": origin(sw_version),
        "availability": [availability(node)],
        "state_topic": topics.node_state(node),
        "qos": 0,
        "components": {s.key: s.config(node) for s in NODE_SENSORS},
    }


# The answer sensor: the text (or the error), cut to what a state may hold; the rest of the
# answer (node, timings, the full text) become attributes.
_ANSWER_TEMPLATE = (
    "{{ value_json.text[:" + str(MAX_STATE_CHARS) + "] if value_json.text is string else "
    "(('error: ' ~ (value_json.message if value_json.message is string else value_json.error))[:"
    + str(MAX_STATE_CHARS) + "] if value_json.error is defined else none) }}")
_ANSWER_ATTRIBUTES = (
    "{% set keep = ['text', 'node', 'model', 'id', 'ttft_s', 'ttlt_s', 'prompt_tokens', 'new_tokens', "
    "'stop_reason', 'error', 'message'] %}"
    "{{ dict(value_json | dictsort | selectattr(0, 'in', keep)) | tojson }}")


def assistant_discovery(*, sw_version: str, nodes: Sequence[str]) -> dict[str, Any]:
    """The shared assistant device: type a question, read the answer. Available while any of
    ``nodes`` (the mesh's nodes, at least one) is online."""
    names = sorted({check_name(n) for n in nodes})
    if not names:
        raise ConfigError("the assistant device needs the mesh's node names for its availability")
    return {
        "device": {"identifiers": [ASSISTANT_ID], "name": "mesh assistant", "manufacturer": MANUFACTURER,
                   "model": "edge LLM mesh", "sw_version": sw_version},
        "origin": origin(sw_version),
        "availability": [availability(n) for n in names],
        "availability_mode": "any",
        "qos": 1,
        "components": {
            "question": {"platform": "text", "name": "Question", "unique_id": f"{ASSISTANT_ID}_question",
                         "command_topic": topics.ASK_TEXT, "min": 1, "max": MAX_STATE_CHARS,
                         "mode": "text", "icon": "mdi:chat-question"},
            "answer": {"platform": "sensor", "name": "Answer", "unique_id": f"{ASSISTANT_ID}_answer",
                       "state_topic": topics.ANSWER, "value_template": _ANSWER_TEMPLATE,
                       "json_attributes_topic": topics.ANSWER,
                       "json_attributes_template": _ANSWER_ATTRIBUTES, "icon": "mdi:chat-processing"},
        },
    }


def encode(config: Mapping[str, Any]) -> bytes:
    """A config as the bytes published: canonical JSON, so every node sends identical bytes."""
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


REMOVE = b""  # an empty retained payload removes a discovered device


@dataclass(frozen=True)
class Publication:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def discovery_messages(node: str, prefix: str, *, sw_version: str, model: str | None = None) -> list[Publication]:
    """What node ``node`` publishes to be discovered: its own device, nothing else."""
    node_config = node_discovery(node, sw_version=sw_version, model=model)
    return [Publication(node_discovery_topic(prefix, node), encode(node_config))]


def assistant_messages(prefix: str, nodes: Sequence[str], *, sw_version: str,
                       remove: bool = False) -> list[Publication]:
    """What the owner of the shared device publishes: its config (retained) for these ``nodes``,
    or its removal (``remove=True``, when the mesh goes)."""
    payload = REMOVE if remove else encode(assistant_discovery(sw_version=sw_version, nodes=nodes))
    return [Publication(assistant_discovery_topic(prefix), payload)]


def removal_messages(node: str, prefix: str, *, retained_topics: tuple[str, ...] = ()) -> list[Publication]:
    """Empty retained payloads that forget node ``node``: its discovery config, its retained
    status, heartbeat and state, and any other retained topic found under its subtree
    (``retained_topics``, e.g. a catalog). Never the shared device, which the node does not own."""
    wanted = [node_discovery_topic(prefix, node)]
    wanted += [topics.node_status(node), topics.node_heartbeat(node), topics.node_state(node)]
    subtree = f"{topics.ROOT}/node/{check_name(node)}/"
    for t in retained_topics:
        if not t.startswith(subtree):
            raise ConfigError(f"{t} is not under node {node}'s topics")
        if t not in wanted:
            wanted.append(t)
    return [Publication(t, REMOVE) for t in wanted]


def topics_read_by(config: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Every (component, topic) a discovery config makes Home Assistant subscribe to: state,
    attribute and availability topics (shared ones included). Tests check the node publishes them."""
    shared_state = config.get("state_topic")
    avail = [a["topic"] for a in config.get("availability", ())]
    for key, comp in config.get("components", {}).items():
        state = comp.get("state_topic", shared_state if comp.get("platform") != "text" else None)
        if state:
            yield key, state
        if comp.get("json_attributes_topic"):
            yield key, comp["json_attributes_topic"]
        for t in avail:
            yield key, t
