"""Every topic string of the mesh, built here and nowhere else.

Each topic is paired with its payload format, QoS and retain flag in :data:`SPECS`, so a
publisher cannot pick them by accident. Layout (``<n>`` is a node name, ``<c>`` a client name)::

    mesh/v1/node/<n>/status     text "online"/"offline", retained, QoS 1, the node's last will
    mesh/v1/node/<n>/heartbeat  CBOR heartbeat, retained (last figures stay readable), QoS 0
    mesh/v1/node/<n>/ask        CBOR asks addressed to node <n>, QoS 1
    mesh/v1/node/<n>/catalog    CBOR Bloom catalog of <n>'s cached KV chunks, retained, QoS 1
    mesh/v1/node/<n>/kv         CBOR KV-chunk fetch requests to <n>, QoS 1
    mesh/v1/node/<n>/kv-evidence CBOR evidence that <n>'s audit caught a node lying about KV
                                (mesh.cache.evidence), retained, QoS 1; every node reads it
    mesh/v1/node/<c>/mlp        HALO frames (mesh.halo.frame): coordinator <c>'s MLP input of each
                                layer step, once for every worker of its plan, QoS 0
    mesh/v1/reply/<c>-halo      HALO frames: the workers' partials back to coordinator <c>, QoS 0
    mesh/v1/reply/<c>-halo-link the same, read on coordinator <c>'s direct link
    mesh/v1/plan                CBOR HALO plan of the coordinator, retained, QoS 1
    mesh/v1/reply/<c>           CBOR replies to requester <c> (tokens, answer, error, ping), QoS 1
    mesh/v1/route               CBOR asks for "any node": the router forwards each to one node
    mesh/v1/node/<n>/state      JSON copy of the heartbeat figures, retained (Home Assistant reads it)
    mesh/v1/ask                 JSON asks from any MQTT client (Home Assistant, mosquitto_pub)
    mesh/v1/ask/text            a plain-text ask (a Home Assistant ``text`` entity), answered on
                                mesh/v1/answer
    mesh/v1/answer              JSON answers to JSON asks that name no reply_to
    mesh/v1/asker/<c>/status    text "online"/"offline" of asker <c> (not retained, QoS 1, its last
                                will): a node stops working on the asks of an asker gone offline

A node writes only under ``mesh/v1/node/<its name>/`` and to reply topics; that keeps
per-node ACLs on the gateway broker simple.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mesh.config import check_name
from mesh.errors import ConfigError

ROOT = "mesh/v1"
ROUTE = f"{ROOT}/route"
ASK = f"{ROOT}/ask"
ANSWER = f"{ROOT}/answer"
ASK_TEXT = f"{ROOT}/ask/text"
ALL_STATUS = f"{ROOT}/node/+/status"
ALL_HEARTBEATS = f"{ROOT}/node/+/heartbeat"
ALL_CATALOGS = f"{ROOT}/node/+/catalog"
ALL_KV_EVIDENCE = f"{ROOT}/node/+/kv-evidence"
ALL_ASKER_STATUS = f"{ROOT}/asker/+/status"
HALO_PLAN = f"{ROOT}/plan"

ONLINE = b"online"
OFFLINE = b"offline"


class Format(StrEnum):
    CBOR = "cbor"  # a mesh.wire envelope
    JSON = "json"
    TEXT = "text"
    FRAME = "halo-frame"  # a mesh.halo.frame frame


@dataclass(frozen=True)
class TopicSpec:
    name: str
    format: Format
    qos: int
    retain: bool


STATUS = TopicSpec("status", Format.TEXT, qos=1, retain=True)
HEARTBEAT = TopicSpec("heartbeat", Format.CBOR, qos=0, retain=True)
NODE_ASK = TopicSpec("ask", Format.CBOR, qos=1, retain=False)
REPLY = TopicSpec("reply", Format.CBOR, qos=1, retain=False)
ROUTE_SPEC = TopicSpec("route", Format.CBOR, qos=1, retain=False)
JSON_ASK = TopicSpec("json-ask", Format.JSON, qos=1, retain=False)
JSON_ANSWER = TopicSpec("json-answer", Format.JSON, qos=1, retain=False)
CATALOG = TopicSpec("catalog", Format.CBOR, qos=1, retain=True)
NODE_KV = TopicSpec("kv", Format.CBOR, qos=1, retain=False)
# retained: a node that was away, or restarted, re-checks the last report of every auditor
KV_EVIDENCE = TopicSpec("kv-evidence", Format.CBOR, qos=1, retain=True)
PLAN = TopicSpec("plan", Format.CBOR, qos=1, retain=True)
NODE_MLP = TopicSpec("mlp", Format.FRAME, qos=0, retain=False)
HALO_REPLY = TopicSpec("halo-reply", Format.FRAME, qos=0, retain=False)
NODE_STATE = TopicSpec("state", Format.JSON, qos=0, retain=True)
TEXT_ASK = TopicSpec("text-ask", Format.TEXT, qos=1, retain=False)
ASKER_STATUS = TopicSpec("asker-status", Format.TEXT, qos=1, retain=False)

SPECS: dict[str, TopicSpec] = {s.name: s for s in
                               (STATUS, HEARTBEAT, NODE_ASK, REPLY, ROUTE_SPEC, JSON_ASK, JSON_ANSWER,
                                NODE_STATE, TEXT_ASK, ASKER_STATUS, CATALOG, NODE_KV, KV_EVIDENCE, PLAN,
                                NODE_MLP, HALO_REPLY)}


def node_topic(node: str, spec: TopicSpec) -> str:
    """A per-node topic: ``mesh/v1/node/<node>/<spec.name>`` (the spec says format, QoS, retain)."""
    return f"{ROOT}/node/{check_name(node)}/{spec.name}"


def asker_status(asker: str) -> str:
    """``mesh/v1/asker/<asker>/status``: where a client's last will says it is gone."""
    return f"{ROOT}/asker/{check_name(asker)}/status"


def parse_asker_status(topic: str) -> str | None:
    """The asker named by an asker status topic, or None."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT or parts[2] != "asker" or parts[4] != "status":
        return None
    try:
        return check_name(parts[3])
    except ConfigError:
        return None


def node_status(node: str) -> str:
    return node_topic(node, STATUS)


def node_heartbeat(node: str) -> str:
    return node_topic(node, HEARTBEAT)


def node_state(node: str) -> str:
    return node_topic(node, NODE_STATE)


def node_catalog(node: str) -> str:
    return node_topic(node, CATALOG)


def node_kv(node: str) -> str:
    return node_topic(node, NODE_KV)


def node_kv_evidence(node: str) -> str:
    """Where ``node`` publishes the evidence of a lie its audit caught (mesh.cache.evidence)."""
    return node_topic(node, KV_EVIDENCE)


def node_ask(node: str) -> str:
    return node_topic(node, NODE_ASK)


def node_mlp(coordinator: str) -> str:
    """Where a HALO coordinator publishes each layer step's MLP input once; every worker of its
    plan subscribes (the broker fans it out), each computing its own groups of the step."""
    return node_topic(coordinator, NODE_MLP)


def halo_reply(coordinator: str) -> str:
    """The reply topic for the workers' partial frames to ``coordinator`` (a reply topic, so a
    worker's ACL needs nothing beyond what any requester's answer needs)."""
    return reply(f"{check_name(coordinator)}-halo")


def halo_link(coordinator: str) -> str:
    """The reply topic for partial frames to ``coordinator``'s direct link (``mesh.mqtt.direct.DirectLink``:
    read on its generation thread, not through its bus)."""
    return reply(f"{check_name(coordinator)}-halo-link")


def reply(client: str) -> str:
    return f"{ROOT}/reply/{check_name(client)}"


def parse_node_topic(topic: str) -> tuple[str, str] | None:
    """``mesh/v1/node/<n>/<leaf>`` -> (n, leaf); anything else -> None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "mesh" or parts[1] != "v1" or parts[2] != "node":
        return None
    try:
        return check_name(parts[3]), parts[4]
    except Exception:
        return None


HA_REPLY_ROOT = "homeassistant-mesh"  # Home Assistant automations read their answers under it


def reply_allowed(topic: str) -> bool:
    """May a node publish an answer on ``topic`` because an ask (or KV fetch) named it?

    Only on an allow-list that matches the gateway's ACL: a requester's inbox
    (``mesh/v1/reply/<name>``, one level), the JSON answer topic ``mesh/v1/answer`` and an
    automation's topic under ``homeassistant-mesh/``. Never anything else: not the mesh's control
    topics (a forged ask must not overwrite another node's status or heartbeat), and not the
    rest of the broker either (``homeassistant/`` with a custom discovery prefix, ``zigbee2mqtt/...``,
    ``cmnd/...``): on a broker without the shipped ACL an ask could otherwise make a node publish
    onto a device or discovery topic.
    """
    if any(c in topic for c in "+#\0") or topic.startswith("$"):
        return False
    parts = topic.split("/")
    if topic == ANSWER:
        return True
    if len(parts) == 4 and topic.startswith(f"{ROOT}/reply/") and parts[3]:
        return True
    return len(parts) >= 2 and parts[0] == HA_REPLY_ROOT and all(parts[1:])
