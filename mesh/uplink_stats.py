"""Link statistics a node keeps about its path to the broker.

Pure bookkeeping: the node's shell sends a small ping at a steady pace, tells :class:`LinkStats`
when each ping left and when its reply came back (monotonic seconds, passed in), calls
:meth:`LinkStats.expire` now and then, and reports every large message it moved with
:meth:`LinkStats.record_transfer`. :meth:`LinkStats.snapshot` is what the heartbeat publishes.

Outcome of one ping, decided once and never revised:

* ``ok``   - the reply came back within ``late_s``;
* ``late`` - the reply came back after ``late_s`` but within ``timeout_s``;
* ``lost`` - no reply within ``timeout_s`` (a reply that arrives later still counts as lost and
  is only counted as ``stale``).

Fractions and percentiles are over the last ``window`` resolved pings, so they follow a link that
gets better or worse; the counters (``pings_sent``, ``replies``...) are totals since start.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from mesh.errors import ConfigError


class Outcome(str, Enum):
    """How one ping ended."""

    OK = "ok"
    LATE = "late"
    LOST = "lost"


@dataclass(frozen=True)
class LinkStatsConfig:
    """Thresholds and window sizes; times in seconds."""

    timeout_s: float = 2.0
    late_s: float = 0.1
    window: int = 200
    ewma_alpha: float = 0.125  # TCP's SRTT gain (RFC 6298)
    bw_alpha: float = 0.25
    bw_window: int = 16
    max_outstanding: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.late_s <= self.timeout_s:
            raise ConfigError(f"linkstats: need 0 < late_s <= timeout_s, got {self.late_s}, {self.timeout_s}")
        if self.window < 1 or self.bw_window < 1 or self.max_outstanding < 1:
            raise ConfigError("linkstats: window, bw_window and max_outstanding must be >= 1")
        if not (0 < self.ewma_alpha <= 1 and 0 < self.bw_alpha <= 1):
            raise ConfigError("linkstats: ewma gains must be in (0, 1]")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile out of range: {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class LinkStats:
    """RTT, loss, lateness and bandwidth of one link, fed with times the caller measured."""

    def __init__(self, config: LinkStatsConfig | None = None) -> None:
        self.config = config or LinkStatsConfig()
        self._outstanding: dict[int, float] = {}  # seq -> sent at; insertion order = send order
        self._outcomes: deque[Outcome] = deque(maxlen=self.config.window)
        self._rtts: deque[float] = deque(maxlen=self.config.window)
        self._rtt_ewma: float | None = None
        self._bw: deque[float] = deque(maxlen=self.config.bw_window)  # bytes per second
        self._bw_ewma: float | None = None
        self.pings_sent = 0
        self.replies = 0
        self.lost = 0
        self.late = 0
        self.stale = 0
        self.transfers = 0

    def ping_sent(self, seq: int, at: float) -> None:
        """Record that ping ``seq`` left at ``at``; ``seq`` must not be outstanding."""
        if seq in self._outstanding:
            raise ValueError(f"ping {seq} is already outstanding")
        while len(self._outstanding) >= self.config.max_outstanding:
            oldest = next(iter(self._outstanding))
            del self._outstanding[oldest]
            self._resolve_lost()
        self._outstanding[seq] = at
        self.pings_sent += 1

    def reply_received(self, seq: int, at: float) -> Outcome | None:
        """Record the reply to ``seq`` arriving at ``at``; returns its outcome.

        None for a reply nobody waits for (unknown seq, a duplicate, or one already counted lost):
        those only bump ``stale``.
        """
        sent = self._outstanding.pop(seq, None)
        if sent is None:
            self.stale += 1
            return None
        rtt = max(0.0, at - sent)
        if rtt > self.config.timeout_s:
            self._resolve_lost()
            self.stale += 1
            return None
        self.replies += 1
        self._rtts.append(rtt)
        a = self.config.ewma_alpha
        self._rtt_ewma = rtt if self._rtt_ewma is None else (1 - a) * self._rtt_ewma + a * rtt
        outcome = Outcome.LATE if rtt > self.config.late_s else Outcome.OK
        if outcome is Outcome.LATE:
            self.late += 1
        self._outcomes.append(outcome)
        return outcome

    def expire(self, now: float) -> int:
        """Count every ping older than ``timeout_s`` at ``now`` as lost; returns how many."""
        expired = [s for s, sent in self._outstanding.items() if now - sent > self.config.timeout_s]
        for seq in expired:
            del self._outstanding[seq]
            self._resolve_lost()
        return len(expired)

    def _resolve_lost(self) -> None:
        self.lost += 1
        self._outcomes.append(Outcome.LOST)

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        """Record a large message of ``nbytes`` that took ``seconds`` end to end."""
        if nbytes <= 0 or seconds <= 0:
            raise ValueError(f"transfer needs positive bytes and seconds, got {nbytes}, {seconds}")
        rate = nbytes / seconds
        self._bw.append(rate)
        a = self.config.bw_alpha
        self._bw_ewma = rate if self._bw_ewma is None else (1 - a) * self._bw_ewma + a * rate
        self.transfers += 1

    def snapshot(self) -> dict[str, float | int | None]:
        """The heartbeat's link figures: a flat JSON-ready dict.

        Keys: ``rtt_ewma_ms``, ``rtt_p50_ms``, ``rtt_p90_ms``, ``rtt_p99_ms``, ``rtt_samples``;
        ``loss_fraction`` and ``late_fraction`` over ``resolved`` (the last ``window`` resolved
        pings); totals ``pings_sent``, ``replies``, ``lost``, ``late``, ``stale``, ``outstanding``;
        ``bw_ewma_mbit``, ``bw_last_mbit``, ``bw_max_mbit`` (decimal Mbit/s over the last
        ``bw_window`` transfers) and ``transfers``; the thresholds ``late_ms`` and ``timeout_ms``.
        Figures with no data yet are None.
        """
        rtts = list(self._rtts)
        resolved = len(self._outcomes)
        lost = sum(1 for o in self._outcomes if o is Outcome.LOST)
        late = sum(1 for o in self._outcomes if o is Outcome.LATE)

        def mbit(rate: float | None) -> float | None:
            return None if rate is None else round(rate * 8 / 1e6, 3)

        return {
            "rtt_ewma_ms": _ms(self._rtt_ewma),
            "rtt_p50_ms": _ms(percentile(rtts, 50)),
            "rtt_p90_ms": _ms(percentile(rtts, 90)),
            "rtt_p99_ms": _ms(percentile(rtts, 99)),
            "rtt_samples": len(rtts),
            "resolved": resolved,
            "loss_fraction": round(lost / resolved, 4) if resolved else None,
            "late_fraction": round(late / resolved, 4) if resolved else None,
            "pings_sent": self.pings_sent,
            "replies": self.replies,
            "lost": self.lost,
            "late": self.late,
            "stale": self.stale,
            "outstanding": len(self._outstanding),
            "bw_ewma_mbit": mbit(self._bw_ewma),
            "bw_last_mbit": mbit(self._bw[-1] if self._bw else None),
            "bw_max_mbit": mbit(max(self._bw) if self._bw else None),
            "transfers": self.transfers,
            "late_ms": _ms(self.config.late_s),
            "timeout_ms": _ms(self.config.timeout_s),
        }
