"""Cache-aware routing with a load guard (mesh.routing.route)."""

from __future__ import annotations

import pytest

from mesh.routing import NodeLoad, route


def test_route_needs_a_candidate() -> None:
    with pytest.raises(ValueError):
        route({})


def test_route_prefers_the_longest_cached_prefix() -> None:
    r = route({("a"): NodeLoad(2, 1), ("b"): NodeLoad(7, 2), ("c"): NodeLoad(0, 0)},
              threshold=2)
    assert (r.node, r.reason, r.depth) == ("b", "cache", 7)


def test_route_falls_back_to_the_least_loaded_node() -> None:
    loads = {("a"): NodeLoad(2, 1), ("b"): NodeLoad(7, 5), ("c"): NodeLoad(0, 0)}
    r = route(loads, threshold=2)
    assert (r.node, r.reason, r.queue) == ("c", "load", 0)
    assert route(loads, threshold=5).node == "b"  # 5 - 0 is within the threshold


def test_route_ties_are_deterministic() -> None:
    loads = {("b"): NodeLoad(3, 1), ("a"): NodeLoad(3, 1), ("c"): NodeLoad(3, 0)}
    assert route(loads).node == "c"  # equal depth: shorter queue
    loads = {("b"): NodeLoad(3, 1), ("a"): NodeLoad(3, 1)}
    assert route(loads).node == "a"  # then the lower name
    # nothing cached anywhere: least loaded, then the deeper/lower name
    loads = {("z"): NodeLoad(0, 0), ("y"): NodeLoad(0, 0), ("x"): NodeLoad(0, 3)}
    assert route(loads).node == "y" and route(loads).reason == "load"


def test_a_node_is_live_only_while_it_heartbeats() -> None:
    from mesh.routing import STALE_MIN_S, PeerTable, live, stale_after

    table = PeerTable()
    table.set_status("a0", True)  # a retained "online", no heartbeat: a ghost
    table.set_status("b1", True)
    table.set_heartbeat("b1", {"seq": 0, "heartbeat_s": 0.5}, now=100.0)
    assert [v.name for v in table.online()] == ["a0", "b1"]
    assert [v.name for v in table.live(100.0)] == ["b1"]
    assert stale_after(0.5) == STALE_MIN_S and stale_after(10.0) == 50.0
    assert live(table.get("b1"), 100.0 + STALE_MIN_S)  # type: ignore[arg-type]
    assert table.live(100.0 + STALE_MIN_S + 0.01) == []  # silent too long: not trusted, whatever its status
    table.set_heartbeat("b1", {"seq": 1}, now=200.0)  # no announced period: Timing's default
    assert live(table.get("b1"), 209.0) and not live(table.get("b1"), 211.0)  # type: ignore[arg-type]
    table.set_status("b1", False)
    assert table.live(200.0) == []  # offline with a fresh heartbeat: not live either


def test_silence_counts_only_while_the_observer_listens() -> None:
    """A broker outage longer than the staleness window made every peer stale to a router that
    came back first, and the asks it held were answered "no node is online" (CI, mosquitto,
    test_broker_restart_loses_no_ask...): a node silent only while we could not hear it is not
    silent. Counted from our reconnect, it must heartbeat within the usual window again."""
    from mesh.routing import STALE_MIN_S, PeerTable

    table = PeerTable()
    table.set_status("b1", True)
    table.set_heartbeat("b1", {"seq": 0, "heartbeat_s": 1.0}, now=100.0)
    assert table.live(108.0) == []  # silent 8 s while we listened: stale
    table.listening_since = 107.0  # our connection came back at 107 after an outage
    assert [v.name for v in table.live(108.0)] == ["b1"]
    assert table.live(107.0 + STALE_MIN_S + 0.01) == []  # and no heartbeat since: stale again
    table.set_status("b1", False)
    assert table.live(108.0) == []  # an offline status still wins


def test_made_up_names_cannot_grow_the_peer_table_past_its_cap() -> None:
    """Review M10: 10,000 fake names keep at most ``max_peers`` views; live nodes are kept, the
    fakes that went silent or offline make room."""
    from mesh.routing import PeerTable

    t = PeerTable(max_peers=8)
    for n in ("real1", "real2"):
        t.set_status(n, True)
        t.set_heartbeat(n, {"seq": 1, "model": "m"}, 1e6)  # heard last: the freshest
    for i in range(10_000):
        t.set_status(f"fake{i}", True)
        t.set_heartbeat(f"fake{i}", {"seq": 1}, float(i))
        t.set_status(f"fake{i}", False)
    assert len(t.all()) == 8
    assert {"real1", "real2"} <= {v.name for v in t.all()}
