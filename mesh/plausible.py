"""What a heartbeat may claim: its figures checked against physics before anyone routes on them.

A heartbeat is a node's own word about itself, and the router, the fetch-or-recompute decision and
the HALO scheduler all act on it: a queue of ``-10**9`` would win every routed ask, a negative
round trip would make every fetch from the liar look free, a compute speed of ``1e308`` overflows
the scheduler's arithmetic. So every figure has a range that no honest device can leave, and a
heartbeat with one figure outside it is refused whole (counted ``implausible-heartbeat`` by
:class:`mesh.presence.Presence`) and never reaches the peer table.

The ranges are wide on purpose: they bound what the fastest device profile the mesh runs on (the
``native`` testbed profile, an x86 desktop on loopback) could ever report, with orders of
magnitude of headroom, so a fast honest node is never refused. They stop the impossible (negative,
non-finite, beyond any hardware), not a liar who stays plausible: that needs the heartbeat to be
authenticated to its sender and checked against what the node really does.

Pure: no clock, no socket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_QUEUE = 65_536  # asks a node may say it holds; Limits.max_queue defaults to 32
MAX_TOKENS_PER_S = 1e8  # prefill or decode: beyond any CPU for any model the mesh runs
MAX_RTT_MS = 600_000.0  # ten minutes: a round trip longer than that is a dead link, not a figure
MAX_LINK_BPS = 1e10  # 80 Gbit/s: beyond any NIC, and beyond loopback through a broker
MAX_ROWS_PER_S = 1e11  # HALO neuron rows per second: ~1e14 FLOP/s or more, beyond any device's CPU
MIN_PERIOD_S, MAX_PERIOD_S = 0.01, 600.0  # the heartbeat period a node announces
MAX_CAPACITY_GROUPS = 1 << 26  # HALO groups a worker may say it holds: a plan's most (1,024 layers x 65,536)

# field -> (low, high) for top-level figures; None: no upper bound beyond finiteness
_TOP: dict[str, tuple[float, float]] = {
    "seq": (0, 2**63 - 1),
    "queue": (0, MAX_QUEUE),
    "queue_max": (0, MAX_QUEUE),
    "load": (0.0, 1.0),
    "prefill_tps": (0.0, MAX_TOKENS_PER_S),
    "decode_tps": (0.0, MAX_TOKENS_PER_S),
    "rtt_ms": (0.0, MAX_RTT_MS),
    "link_bw_Bps": (0.0, MAX_LINK_BPS),
    "heartbeat_s": (MIN_PERIOD_S, MAX_PERIOD_S),
}
_LINK: dict[str, tuple[float, float]] = {
    "rtt_ewma_ms": (0.0, MAX_RTT_MS),
    "late_fraction": (0.0, 1.0),
    "loss_fraction": (0.0, 1.0),
}
_HALO: dict[str, tuple[float, float]] = {
    "compute_rows_per_s": (0.0, MAX_ROWS_PER_S),
    "heartbeat_s": (MIN_PERIOD_S, MAX_PERIOD_S),
    "capacity_groups": (0, MAX_CAPACITY_GROUPS),
}


def _out_of_range(value: Any, low: float, high: float) -> bool:
    """Not a number (bools are not numbers here), not finite, or outside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return not low <= value <= high


def _check(table: Mapping[str, Any], bounds: Mapping[str, tuple[float, float]], prefix: str) -> str | None:
    for key, (low, high) in bounds.items():
        if key in table and table[key] is not None and _out_of_range(table[key], low, high):
            return prefix + key
    return None


def heartbeat_problem(body: Mapping[str, Any]) -> str | None:
    """The first figure of a (schema-valid) heartbeat body that no honest node can report, named
    by its path (``"queue"``, ``"halo.compute_rows_per_s"``), or None when every figure is
    plausible. Figures a heartbeat leaves out are not required here (the wire schema says which
    are); sub-tables that are not maps are a problem of their own."""
    problem = _check(body, _TOP, "")
    if problem is not None:
        return problem
    for name, bounds in (("link", _LINK), ("halo", _HALO)):
        sub = body.get(name)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            return name
        problem = _check(sub, bounds, name + ".")
        if problem is not None:
            return problem
    return None
