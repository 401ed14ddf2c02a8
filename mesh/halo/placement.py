"""HALO placement: which holder computes which neuron group, and when to re-plan (pure functions).

Placement: every (layer, group) goes to exactly one holder: an online worker or the coordinator
itself. Shares are sized by measured compute speed, each worker's capped at its capacity (the
groups its memory holds, from its heartbeat) by water-filling: what a capped worker cannot take
goes to the others by speed, and what no worker can hold stays with the coordinator. Within each
layer the groups are sorted by
predicted importance and dealt out in holder rank order, so the most important groups land on
the most reliable (then fastest, then closest) holders and the least important ones on the
lossy, slow ones, whose late partials relaxed sync can then drop at little cost. The coordinator
is a holder with no network, ranked first, with speed ``local_speed``; 0 means it keeps nothing
unless no worker is online (then it keeps everything).

Units: ``speed`` is neuron-rows per second (one intermediate neuron = one gate row, one up row
and one down column for one token); rates are fractions in [0, 1]; times are seconds.
"""

from __future__ import annotations

import math
import random
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.errors import ConfigError, ProtocolError

PLAN_VERSION = 2  # 2: the optional neuron order (a v1 worker would cut the wrong neurons)
LOCAL = ""  # the coordinator's holder name inside the planner (never a worker name)
_MAX_LAYERS, _MAX_GROUPS, _MAX_WORKERS, _MAX_NAME = 1024, 1 << 16, 1024, 128


@dataclass(frozen=True)
class WorkerFigures:
    """A worker's measured figures, as its heartbeats report them."""

    node: str
    speed: float  # neuron-rows/s
    rtt_s: float = 0.0
    loss_rate: float = 0.0
    late_rate: float = 0.0
    online: bool = True
    capacity: int | None = None  # groups of every layer together it can hold at once; None: no bound

    @property
    def reliability(self) -> float:
        """Probability that a partial arrives and is on time."""
        return (1.0 - _unit(self.loss_rate)) * (1.0 - _unit(self.late_rate))


def _unit(v: float) -> float:
    return min(1.0, max(0.0, float(v))) if math.isfinite(v) else 1.0


@dataclass(frozen=True)
class Plan:
    """Who computes which groups, per layer, for one epoch.

    ``workers[node][layer]`` and ``local[layer]`` are sorted group ids; together they cover every
    group of every layer exactly once (checked by :meth:`from_dict`). ``order`` is empty (groups
    cut in the model's own neuron order) or one neuron order per layer (``mesh.halo.groups``: original
    neuron id per position), packed by :func:`pack_order`.
    """

    epoch: int
    model_key: str
    group_size: int
    n_groups: int
    workers: Mapping[str, tuple[tuple[int, ...], ...]]
    local: tuple[tuple[int, ...], ...]
    mode: str = "importance"
    order: tuple[bytes, ...] = ()

    @property
    def n_layers(self) -> int:
        return len(self.local)

    def neuron_order(self, layer: int) -> tuple[int, ...] | None:
        """Layer ``layer``'s neuron order, or None for the model's own."""
        return unpack_order(self.order[layer]) if self.order else None

    def groups_for(self, node: str) -> tuple[tuple[int, ...], ...]:
        """``node``'s groups per layer (empty tuples if it has none)."""
        return self.workers.get(node, tuple(() for _ in self.local))

    def to_dict(self) -> dict[str, Any]:
        """A CBOR-able dict (ints, strings, lists only)."""
        return {
            "v": PLAN_VERSION, "epoch": self.epoch, "model_key": self.model_key,
            "group_size": self.group_size, "n_groups": self.n_groups, "mode": self.mode,
            "workers": {n: [list(gs) for gs in self.workers[n]] for n in sorted(self.workers)},
            "local": [list(gs) for gs in self.local],
            "order": list(self.order),
        }

    @classmethod
    def from_dict(cls, d: object) -> Plan:
        """Validate an untrusted dict; ProtocolError (reason ``bad-plan``/``bad-version``)."""
        if not isinstance(d, Mapping):
            raise ProtocolError("bad-plan", "not a map")
        if d.get("v") != PLAN_VERSION:
            raise ProtocolError("bad-version", f"plan version {d.get('v')!r}")
        epoch, gsize, n_groups = (_int(d, k, 0, 1 << 62)
                                  for k in ("epoch", "group_size", "n_groups"))
        if gsize < 1 or n_groups < 1 or n_groups > _MAX_GROUPS:
            raise ProtocolError("bad-plan", "group_size/n_groups out of range")
        key, mode = d.get("model_key"), d.get("mode")
        if not isinstance(key, str) or mode not in ("importance", "random"):
            raise ProtocolError("bad-plan", "model_key/mode")
        local = _layers(d.get("local"), n_groups, None)
        workers_raw = d.get("workers")
        if not isinstance(workers_raw, Mapping) or len(workers_raw) > _MAX_WORKERS:
            raise ProtocolError("bad-plan", "workers")
        workers = {}
        for node, layers in workers_raw.items():
            if not isinstance(node, str) or not 0 < len(node) <= _MAX_NAME:
                raise ProtocolError("bad-plan", f"worker name {node!r}")
            workers[node] = _layers(layers, n_groups, len(local))
        for layer in range(len(local)):
            seen = sorted([*local[layer], *(g for w in workers.values() for g in w[layer])])
            if seen != list(range(n_groups)):
                raise ProtocolError("bad-plan", f"layer {layer} is not covered exactly once")
        return cls(epoch, key, gsize, n_groups, workers, local, mode,
                   _orders(d.get("order"), len(local), n_groups, gsize))


def _int(d: Mapping, key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError("bad-plan", f"{key}={v!r}")
    return v


def _layers(raw: object, n_groups: int, n_layers: int | None) -> tuple[tuple[int, ...], ...]:
    if not isinstance(raw, list) or not 0 < len(raw) <= _MAX_LAYERS:
        raise ProtocolError("bad-plan", "layer list")
    if n_layers is not None and len(raw) != n_layers:
        raise ProtocolError("bad-plan", "layer count mismatch")
    out = []
    for gs in raw:
        if not isinstance(gs, list) or any(type(g) is not int or not 0 <= g < n_groups for g in gs):
            raise ProtocolError("bad-plan", "group ids")
        out.append(tuple(sorted(gs)))
    return tuple(out)


def pack_order(order: Sequence[int]) -> bytes:
    """A neuron order as little-endian uint32s (what a plan carries)."""
    packed = array("I", order)
    if packed.itemsize != 4:
        raise ConfigError("no 4-byte unsigned array type on this platform")
    return (packed if _LITTLE else _swapped(packed)).tobytes()


def unpack_order(data: bytes) -> tuple[int, ...]:
    packed = array("I")
    packed.frombytes(data)
    return tuple(packed if _LITTLE else _swapped(packed))


_LITTLE = sys.byteorder == "little"


def _swapped(a: array) -> array:
    b = array("I", a)
    b.byteswap()
    return b


def _orders(raw: object, n_layers: int, n_groups: int, group_size: int) -> tuple[bytes, ...]:
    """Validate a plan's neuron orders: absent/empty, or one permutation of ``range(I)`` per layer
    with the same ``I`` everywhere and ``I`` groups of ``group_size`` making ``n_groups``."""
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list) or len(raw) != n_layers or any(not isinstance(b, bytes) for b in raw):
        raise ProtocolError("bad-plan", "neuron order list")
    size = len(raw[0]) // 4
    if (any(len(b) != 4 * size for b in raw) or size > n_groups * group_size
            or size <= (n_groups - 1) * group_size):
        raise ProtocolError("bad-plan", "neuron order length")
    ids = list(range(size))
    for b in raw:
        if sorted(unpack_order(b)) != ids:
            raise ProtocolError("bad-plan", "neuron order is not a permutation")
    return tuple(raw)


def _apportion(weights: Sequence[float], total: int, bounds: Sequence[int] | None = None) -> list[int]:
    """Largest-remainder split of ``total`` in proportion to ``weights`` (ties: lower index), no
    count above its ``bounds`` entry: what a bounded one cannot take is split again among the
    others (by weight; evenly where none is left). Less than ``total`` if the bounds sum to less."""
    n = len(weights)
    caps = list(bounds) if bounds is not None else [total] * n
    counts = [0] * n
    while True:
        left = total - sum(counts)
        open_ = [i for i in range(n) if counts[i] < caps[i]]
        if left <= 0 or not open_:
            return counts
        w = [max(0.0, float(weights[i])) for i in open_]
        if sum(w) <= 0:
            w = [1.0] * len(open_)
        s = sum(w)
        quotas = [left * x / s for x in w]
        add = [math.floor(q) for q in quotas]
        order = sorted(range(len(open_)), key=lambda j: (-(quotas[j] - add[j]), open_[j]))
        for j in order[: left - sum(add)]:
            add[j] += 1
        for j, i in enumerate(open_):
            counts[i] += min(add[j], caps[i] - counts[i])


def water_fill(speeds: Sequence[float], caps: Sequence[float | None], total: float) -> tuple[list[float], float]:
    """Split ``total`` in proportion to ``speeds``, none above its cap (None: no cap): a capped
    holder gets its cap and the rest is split again among the others. Returns the shares and what
    is left when every holder with speed is full (0.0 otherwise)."""
    share = [0.0] * len(speeds)
    free = [i for i, v in enumerate(speeds) if v > 0]
    left = float(total)
    while free and left > 0:
        s = sum(speeds[i] for i in free)
        full = [i for i in free if caps[i] is not None and left * speeds[i] / s >= caps[i]]
        if not full:
            for i in free:
                share[i] = left * speeds[i] / s
            return share, 0.0
        for i in full:
            share[i] = float(caps[i])
            left -= float(caps[i])
        free = [i for i in free if i not in full]
    return share, max(0.0, left)


def _holders(workers: Sequence[WorkerFigures], local_speed: float) -> list[WorkerFigures]:
    """Online holders with positive speed and room for a group, best first: the coordinator (no
    network at all, so more certain than any measured figure), then reliability, speed, round
    trip, name. The coordinator is one when it computes (``local_speed``), when no worker is
    online (it keeps everything), and when a worker's capacity is bounded (with ``local_speed``
    0 it then keeps only what no worker can hold)."""
    ok = [w for w in workers if w.online and math.isfinite(w.speed) and w.speed > 0
          and (w.capacity is None or w.capacity > 0)]
    if len({w.node for w in ok}) != len(ok) or any(w.node == LOCAL for w in ok):
        raise ConfigError("worker names must be unique and non-empty")
    if local_speed > 0 or not ok:
        ok.append(WorkerFigures(LOCAL, local_speed if local_speed > 0 else 1.0))
    elif any(w.capacity is not None for w in ok):
        ok.append(WorkerFigures(LOCAL, 0.0))  # speed 0: no share of its own, the rest only
    return sorted(
        ok, key=lambda w: (w.node != LOCAL, -round(w.reliability, 3), -w.speed, w.rtt_s, w.node)
    )


def plan_groups(
    workers: Sequence[WorkerFigures],
    importance: Sequence[Sequence[float]],
    *,
    epoch: int,
    model_key: str,
    group_size: int,
    local_speed: float = 0.0,
    mode: str = "importance",
    seed: int = 0,
) -> Plan:
    """Place every group of every layer (``importance`` is (L, G), larger = more important).

    Deterministic: the same figures and importances give the same plan in any input order.
    A holder's share of all ``L x G`` groups follows its speed, capped at its capacity
    (:func:`water_fill`; the rest of all the capped shares stays with the coordinator); per layer
    it is a ``1/L`` of that, the rounding error carried over to the next layer, so a holder's total
    over all layers is within one group of its exact share and never above its capacity.
    ``mode="random"`` is the ablation: same shares, groups shuffled by a generator seeded with
    (seed, layer).
    """
    if mode not in ("importance", "random"):
        raise ConfigError(f"unknown plan mode {mode!r}")
    n_layers = len(importance)
    n_groups = len(importance[0]) if n_layers else 0
    if n_layers == 0 or n_groups == 0 or any(len(row) != n_groups for row in importance):
        raise ConfigError("importance must be a non-empty (layers, groups) table")
    holders = _holders(workers, local_speed)
    caps = [None if h.node == LOCAL or h.capacity is None else min(h.capacity, n_layers * n_groups)
            for h in holders]
    shares, rest = water_fill([h.speed for h in holders], caps, n_layers * n_groups)
    shares = [s + (rest if h.node == LOCAL else 0.0) for s, h in zip(shares, holders)]
    ideal = [s / n_layers for s in shares]  # groups per layer
    room = [n_layers * n_groups if c is None else c for c in caps]  # groups a holder may still take
    carry = [0.0] * len(holders)
    placed: list[list[tuple[int, ...]]] = [[] for _ in holders]
    for layer, row in enumerate(importance):
        want = [max(0.0, q + c) for q, c in zip(ideal, carry)]
        counts = _apportion(want, n_groups, [min(n_groups, r) for r in room])
        carry = [c + q - k for c, q, k in zip(carry, ideal, counts)]
        room = [r - k for r, k in zip(room, counts)]
        if mode == "importance":
            order = sorted(range(n_groups), key=lambda g: (-float(row[g]), g))
        else:
            order = list(range(n_groups))
            random.Random(seed * 1_000_003 + layer).shuffle(order)
        start = 0
        for i, k in enumerate(counts):
            placed[i].append(tuple(sorted(order[start:start + k])))
            start += k
    local = tuple(() for _ in range(n_layers))
    assigned: dict[str, tuple[tuple[int, ...], ...]] = {}
    for h, layers in zip(holders, placed):
        if h.node == LOCAL:
            local = tuple(layers)
        elif any(layers):
            assigned[h.node] = tuple(layers)
    return Plan(epoch, model_key, group_size, n_groups, assigned, local, mode)


def reloading_workers(active: Plan | None, pending: Plan, figures: Sequence[WorkerFigures]) -> frozenset[str]:
    """Workers of ``pending`` whose capacity cannot hold their groups of ``active`` beside those of
    ``pending``: ``mesh.halo.worker`` drops the active ones before it loads, so until the switch
    the coordinator computes their groups of ``active`` itself rather than wait for them."""
    if active is None:
        return frozenset()
    cap = {f.node: f.capacity for f in figures if f.capacity is not None}
    return frozenset(w for w in pending.workers if w in cap and w in active.workers
                     and sum(map(len, active.groups_for(w))) + sum(map(len, pending.groups_for(w))) > cap[w])


@dataclass(frozen=True)
class ReplanPolicy:
    """Hysteresis thresholds: a re-plan needs a change at least this large since the last plan."""

    speed_rel: float = 0.25  # relative change of a worker's speed share
    reliability_abs: float = 0.12  # absolute change of a worker's reliability (CPU contention alone moves it ~0.1)
    min_interval_s: float = 10.0  # between re-plans for figure drift (membership bypasses it)
    top_overlap: float = 0.7  # re-plan when the top quarter of groups overlaps less than this
    persist_s: float = 3.0  # a drift must hold this long (noise from CPU contention does not)
    # A pending plan whose workers have not all acknowledged it after this long: those that have not
    # are suspect (planned out until they serve again), so one lost ack or a stuck loader cannot hold
    # the mesh on an old plan forever (review L2). A Pi Zero slices its groups in well under this.
    pending_timeout_s: float = 120.0


def drift_persisted(reason: str | None, since: float | None, now_s: float,
                    policy: ReplanPolicy = ReplanPolicy()) -> tuple[bool, float | None]:
    """Whether to act on ``reason`` now, and the new start of the drift.

    Membership and capacity changes (and the first plan) act at once (a plan beyond a worker's
    capacity is one it refuses); a figure drift only once some drift
    reason held on every check for ``persist_s``: one noisy heartbeat never re-plans, and every
    re-plan costs each worker a reload of its weights.
    """
    if reason is None:
        return False, None
    if reason.startswith(("membership", "initial", "capacity")):
        return True, None
    if since is None:
        return policy.persist_s <= 0, None if policy.persist_s <= 0 else now_s
    if now_s - since >= policy.persist_s:
        return True, None
    return False, since


def replan_reason(
    basis: Sequence[WorkerFigures], now: Sequence[WorkerFigures], *,
    now_s: float, planned_s: float, policy: ReplanPolicy = ReplanPolicy(),
    basis_importance: Sequence[Sequence[float]] | None = None,
    importance: Sequence[Sequence[float]] | None = None,
) -> str | None:
    """Why to re-plan, comparing figures (and optionally the importance window) now with those the
    current plan was built from, or None.

    Comparing with the plan's basis (not the last heartbeat) is the hysteresis: small
    oscillations never trigger, a slow drift eventually does. A worker joining or leaving,
    or announcing another capacity, re-plans at once; drift only after ``min_interval_s``.
    """
    def online(figs: Sequence[WorkerFigures]) -> dict[str, WorkerFigures]:
        return {w.node: w for w in figs if w.online and w.speed > 0}

    old, new = online(basis), online(now)
    if old.keys() != new.keys():
        gone, came = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        return f"membership: -{gone} +{came}"
    for node in sorted(new):
        if new[node].capacity != old[node].capacity:
            return f"capacity of {node}: {old[node].capacity} -> {new[node].capacity} groups"
    if now_s - planned_s < policy.min_interval_s or not new:
        return None
    old_sum, new_sum = sum(w.speed for w in old.values()), sum(w.speed for w in new.values())
    for node in sorted(new):
        a, b = old[node].speed / old_sum, new[node].speed / new_sum
        if abs(b - a) > policy.speed_rel * a:
            return f"speed share of {node}: {a:.3f} -> {b:.3f}"
        if abs(new[node].reliability - old[node].reliability) > policy.reliability_abs:
            a, b = old[node].reliability, new[node].reliability
            return f"reliability of {node}: {a:.3f} -> {b:.3f}"
    if basis_importance is not None and importance is not None:
        overlap = _top_overlap(basis_importance, importance)
        if overlap < policy.top_overlap:
            return f"importance ranking drift: top-group overlap {overlap:.2f}"
    return None


def _top_overlap(old: Sequence[Sequence[float]], new: Sequence[Sequence[float]]) -> float:
    """Mean over layers of |top(old) & top(new)| / |top|, top = the most important quarter."""
    shares = []
    for a, b in zip(old, new):
        k = max(1, len(a) // 4)
        top_a = set(sorted(range(len(a)), key=lambda g: (-float(a[g]), g))[:k])
        top_b = set(sorted(range(len(b)), key=lambda g: (-float(b[g]), g))[:k])
        shares.append(len(top_a & top_b) / k)
    return sum(shares) / len(shares) if shares else 1.0
