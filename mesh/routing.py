"""Who is online, who routes, and which node gets an ask: pure state and decisions.

Every node keeps a :class:`PeerTable` fed from the retained status and heartbeat topics. Exactly
one node (the *router*: the smallest name among the live nodes) forwards the asks that name no
node, so each ask is answered once. *Live* (:func:`live`) means a retained ``online`` status and a
heartbeat heard within a few of the node's announced periods: a retained ``online`` alone is no
evidence of life (a node that died while the broker was down, or one forged ``online`` for a
small name, would otherwise swallow every routed ask for ever), so a node is trusted for routing
only while it heartbeats, whatever its status says. Silence counts only while the observer
listens: after its own reconnect (:attr:`PeerTable.listening_since`) a peer has the usual window
to heartbeat again, so a broker outage longer than the window does not leave a router that came
back first with no one to route to. Why this is safe while nodes join and leave: a node publishes
its ``online`` status (and waits for the broker's ack) and then its first heartbeat before it
subscribes to the routed topics, and the broker delivers to each client in the order it accepted
messages, so any ask a new router sees was accepted after its status and heartbeat, and the old
router has seen both first and stepped down. Targets also drop a repeated ask id, which covers a crashed router's short overlap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PERIOD_S = 2.0  # a heartbeat that announces no period (``heartbeat_s``): Timing's default
STALE_PERIODS = 5  # heartbeat periods of silence after which a node is no longer live
STALE_MIN_S = 5.0  # ... and never sooner: a loaded Pi's heartbeat thread may lag a short period
MAX_PEERS = 512  # names one observer keeps (review M10: made-up names by the thousand must not grow it)


@dataclass
class NodeView:
    name: str
    online: bool = False
    model: str = ""
    queue: int = 0
    load: float = 0.0
    seq: int = -1
    heartbeat: dict[str, Any] = field(default_factory=dict)
    seen_at: float | None = None  # monotonic time of the last heartbeat, on the observer's clock
    period_s: float = DEFAULT_PERIOD_S  # the heartbeat period the node announces


def stale_after(period_s: float) -> float:
    """Seconds of heartbeat silence after which a node with this announced period is not live."""
    return max(STALE_MIN_S, STALE_PERIODS * period_s)


def live(view: NodeView, now: float, listening_since: float = float("-inf")) -> bool:
    """Online and heartbeating: a retained ``online`` with no recent heartbeat is a ghost. Silence
    is counted from ``listening_since`` (the observer's last connect) when the heartbeat is older."""
    return (view.online and view.seen_at is not None
            and now - max(view.seen_at, listening_since) <= stale_after(view.period_s))


class PeerTable:
    """The observer's view of every node it has heard of, at most ``max_peers``: a new name beyond
    that replaces the view least worth keeping (offline first, then the longest silent)."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self._nodes: dict[str, NodeView] = {}
        self.max_peers = max_peers
        self.listening_since = float("-inf")  # monotonic time the observer's connection last came up

    def _view(self, name: str) -> NodeView:
        if name not in self._nodes:
            if len(self._nodes) >= self.max_peers:
                worst = min(self._nodes.values(),
                            key=lambda v: (v.online, v.seen_at if v.seen_at is not None else -1.0))
                del self._nodes[worst.name]
            self._nodes[name] = NodeView(name)
        return self._nodes[name]

    def set_status(self, name: str, online: bool) -> None:
        self._view(name).online = online

    def forget(self, name: str) -> None:
        """A decommissioned node (its retained status was cleared)."""
        self._nodes.pop(name, None)

    def set_heartbeat(self, name: str, body: Mapping[str, Any], now: float) -> bool:
        """Record a heartbeat; returns False for one older than what we hold (out of order)."""
        view = self._view(name)
        seq = int(body.get("seq", -1))
        # A restarted node counts from 0 again; accept a lower seq once the old one is stale.
        if seq <= view.seq and view.seen_at is not None and now - view.seen_at < 30.0:
            return False
        view.seq = seq
        view.model = str(body.get("model", ""))
        view.queue = int(body.get("queue", 0))
        view.load = float(body.get("load", 0.0))
        view.heartbeat = dict(body)
        view.seen_at = now
        period = body.get("heartbeat_s")
        view.period_s = float(period) if isinstance(period, (int, float)) and period > 0 else DEFAULT_PERIOD_S
        return True

    def get(self, name: str) -> NodeView | None:
        return self._nodes.get(name)

    def online(self) -> list[NodeView]:
        return sorted((v for v in self._nodes.values() if v.online), key=lambda v: v.name)

    def live(self, now: float) -> list[NodeView]:
        """The nodes routing may trust at ``now`` (monotonic): see :func:`live`."""
        return [v for v in self.online() if live(v, now, self.listening_since)]

    def all(self) -> list[NodeView]:
        return sorted(self._nodes.values(), key=lambda v: v.name)


ASK_ROLES = ("answer", "coordinator")  # heartbeat roles of a process that answers asks


def answers_asks(heartbeat: Mapping[str, Any], answer_role: bool = False) -> bool:
    """Whether a router may send a node asks, by its heartbeat's ``roles``: with ``answer_role``
    (the coordinator's rule) only a node listing ``answer``; else any node listing an asking role
    (:data:`ASK_ROLES`) or no roles at all (a heartbeat from before roles). A worker-only node
    (``mesh node --roles worker --no-answer``) lists ``worker`` alone and is never picked."""
    roles = heartbeat.get("roles")
    if answer_role:
        return isinstance(roles, list) and "answer" in roles
    return not isinstance(roles, list) or any(r in roles for r in ASK_ROLES)


def router_of(online_names: Iterable[str]) -> str | None:
    """The node that forwards asks naming no node: the smallest of the names given (the live ones)."""
    return min(online_names, default=None)


def choose_node(
    views: Iterable[NodeView],
    pending: Mapping[str, int],
    last_assigned: Mapping[str, int],
    model: str | None = None,
) -> str | None:
    """The online node with the least work; ties go to the node assigned longest ago.

    ``pending`` counts asks the router sent a node since that node's last heartbeat (heartbeats
    lag a burst of asks); ``last_assigned`` holds a router-side sequence of the last assignment,
    so equal nodes take turns.
    """
    best: tuple[int, float, int, str] | None = None
    for v in views:
        if not v.online or (model is not None and v.model and v.model != model):
            continue
        key = (v.queue + pending.get(v.name, 0), round(v.load, 1), last_assigned.get(v.name, -1), v.name)
        if best is None or key < best:
            best = key
    return None if best is None else best[3]


@dataclass(frozen=True)
class NodeLoad:
    """One candidate node for an ask: cached-prefix depth (chunks) and queued asks."""

    depth: int
    queue: int


@dataclass(frozen=True)
class Route:
    """Where an ask goes and why: ``reason`` is ``"cache"`` or ``"load"``."""

    node: str
    reason: str
    depth: int
    queue: int


def route(nodes: Mapping[str, NodeLoad], threshold: int = 2) -> Route:
    """Cache-aware routing with a load guard (``mesh.cache.lookup``: the deepest cached prefix wins unless its queue is longer than the shortest one by more than ``threshold``); raises ValueError if empty."""
    if not nodes:
        raise ValueError("no candidate nodes")
    if threshold < 0:
        raise ValueError("threshold must be >= 0")
    cached = min(nodes, key=lambda n: (-nodes[n].depth, nodes[n].queue, n))
    idle = min(nodes, key=lambda n: (nodes[n].queue, -nodes[n].depth, n))
    if nodes[cached].depth > 0 and nodes[cached].queue - nodes[idle].queue <= threshold:
        pick, reason = cached, "cache"
    else:
        pick, reason = idle, "load"
    return Route(pick, reason, nodes[pick].depth, nodes[pick].queue)


def pick(candidates: list[NodeView], depths: dict[str, int], pending: dict[str, int],
         last_assigned: dict[str, int], model: str | None, threshold: int) -> tuple[str | None, str]:
    """Where a routed ask goes and why: the deepest cached prefix unless its queue is too long
    (``"cache"``, :func:`mesh.routing.route`), else the least-loaded node (``"load"``)."""
    if depths and max(depths.values()) > 0:
        loads = {v.name: NodeLoad(depths.get(v.name, 0), v.queue + pending.get(v.name, 0)) for v in candidates}
        picked = route(loads, threshold)
        return picked.node, picked.reason
    return choose_node(candidates, pending, last_assigned, model), "load"
