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
