"""Topic registry and the pure routing state."""

from __future__ import annotations

import pytest

from mesh import topics
from mesh.errors import ConfigError
from mesh.routing import NodeView, PeerTable, choose_node, router_of


def test_every_topic_lives_under_mesh_v1() -> None:
    built = [topics.node_status("a"), topics.node_heartbeat("a"), topics.node_ask("a"), topics.reply("c"),
             topics.ROUTE, topics.ASK, topics.ANSWER, topics.ALL_STATUS, topics.ALL_HEARTBEATS]
    assert all(t.startswith("mesh/v1/") for t in built)
    assert topics.node_status("pi1") == "mesh/v1/node/pi1/status"
    assert topics.STATUS.retain and topics.STATUS.qos == 1 and topics.HEARTBEAT.retain


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "a b", "w1\n"])
def test_names_cannot_break_topic_levels(bad: str) -> None:
    with pytest.raises(ConfigError):
        topics.node_ask(bad)


def test_parse_node_topic() -> None:
    assert topics.parse_node_topic("mesh/v1/node/pi1/status") == ("pi1", "status")
    assert topics.parse_node_topic("mesh/v1/node/pi1/status/extra") is None
    assert topics.parse_node_topic("other/v1/node/pi1/status") is None
    assert topics.parse_node_topic("mesh/v1/node/a+b/status") is None


@pytest.mark.parametrize(("topic", "ok"), [
    ("mesh/v1/reply/cli-1", True), ("mesh/v1/answer", True), ("homeassistant-mesh/briefing", True),
    ("homeassistant-mesh/kitchen/answer", True),
    ("mesh/v1/node/pi1/status", False), ("mesh/v1/route", False), ("homeassistant/status", False),
    # the allow-list matches the gateway's ACL: nothing else on the broker (review M5)
    ("home/kitchen/answer", False), ("zigbee2mqtt/lamp/set", False), ("cmnd/plug/POWER", False),
    ("mesh/v1/reply/a/b", False), ("mesh/v1/reply/", False), ("homeassistant-mesh/", False),
    ("homeassistant-mesh/+", False), ("$SYS/x", False),
])
def test_reply_allowed(topic: str, ok: bool) -> None:
    assert topics.reply_allowed(topic) is ok


def _table(**queues: int) -> PeerTable:
    t = PeerTable()
    for i, (name, q) in enumerate(queues.items()):
        t.set_status(name, True)
        t.set_heartbeat(name, {"seq": 0, "model": "m", "queue": q, "load": 0.0}, now=float(i))
    return t


def test_router_is_smallest_online_name() -> None:
    assert router_of(["node2", "node1", "node3"]) == "node1"
    assert router_of([]) is None


def test_choose_least_queued_then_rotate() -> None:
    t = _table(a=2, b=0, c=0)
    assert choose_node(t.online(), {}, {}) == "b"
    # b was just assigned: c is next among equals, and pending asks count as queue.
    assert choose_node(t.online(), {"b": 1}, {"b": 1}) == "c"
    assert choose_node(t.online(), {"b": 1, "c": 1}, {"b": 1, "c": 2}) == "b"


def test_choose_skips_offline_and_other_models() -> None:
    t = _table(a=0, b=5)
    t.set_status("a", False)
    assert choose_node(t.online(), {}, {}) == "b"
    assert choose_node(t.online(), {}, {}, model="other") is None
    assert choose_node([], {}, {}) is None


def test_heartbeats_out_of_order_are_ignored() -> None:
    t = PeerTable()
    assert t.set_heartbeat("a", {"seq": 5, "model": "m", "queue": 1, "load": 0}, now=10.0)
    assert not t.set_heartbeat("a", {"seq": 4, "model": "m", "queue": 9, "load": 0}, now=11.0)
    assert t.get("a").queue == 1  # type: ignore[union-attr]
    # a restarted node counts from 0 again: accepted once the old figures are stale
    assert t.set_heartbeat("a", {"seq": 0, "model": "m", "queue": 0, "load": 0}, now=100.0)
    assert isinstance(t.get("a"), NodeView)
