"""The HALO plans as the coordinator's step reads them (:class:`PlanHolder`).

``mesh.halo.engine`` fills it (a new plan proposed on the planner thread, acks and presence on the
network thread); ``mesh.halo.step`` reads it on the generation thread, at the start of every
forward pass (the epoch switch) and at every layer step (the active plan, the coordinator's own
groups, who is gone or reloading). The state and its rules are ``mesh.halo.ledger``'s
``EpochSwitch`` and ``Presence``; this holder adds the locks, the clock and the reloading workers:
those whose capacity cannot hold the active plan's groups beside the pending one's
(``mesh.halo.worker`` then drops the active ones before loading), so the step computes their
groups of the active plan itself until the switch instead of waiting for partials that cannot come.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.halo import groups as split
from mesh.halo.ledger import EpochSwitch, Presence
from mesh.halo.placement import Plan

log = logging.getLogger(__name__)


class WholeLayer:
    """A layer whose every group the coordinator computes itself (no worker holds one there, as in
    the plan of a coordinator alone): its loaded MLP module computes it, with no copy of its rows."""

    def __repr__(self) -> str:
        return "WHOLE_LAYER"


WHOLE_LAYER = WholeLayer()
#: Per layer, the groups the coordinator computes itself under a plan: none, all, or a share's weights.
Local = list[split.GroupWeights | WholeLayer | None]


@dataclass
class PlanHolder:
    """The plans as the step reads them: the epoch switch, the coordinator's own group weights per
    epoch, and who of the workers is reachable. The engine writes it on the planner thread and
    the network thread, the step reads it on the generation thread; ``lock`` guards ``switch``
    and ``local``, ``presence_lock`` the presence."""

    switch: EpochSwitch
    presence: Presence
    local: dict[int, Local] = field(default_factory=dict)
    reloading: frozenset[str] = frozenset()  # replaced whole (the step reads it without the lock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    presence_lock: threading.Lock = field(default_factory=threading.Lock)

    def active(self) -> tuple[Plan | None, Local | None]:
        """The active plan and this coordinator's weights of it (None, None before any)."""
        with self.lock:
            plan = self.switch.active
            return plan, (self.local.get(plan.epoch) if plan is not None else None)

    def maybe_switch(self) -> Plan | None:
        """Make the pending plan active once every worker in it acknowledged; the new plan or None."""
        with self.lock:
            plan = self.switch.maybe_switch()
            if plan is not None:
                self.reloading = frozenset()
                for e in [e for e in self.local if e < plan.epoch]:
                    del self.local[e]
        if plan is not None:
            log.info("switched to plan epoch %d", plan.epoch)
        return plan

    def workers(self) -> frozenset[str]:
        """Every worker of the active and the pending plan."""
        with self.lock:
            return frozenset(w for p in (self.switch.active, self.switch.pending) if p is not None for w in p.workers)

    def gone(self, workers: Iterable[str]) -> frozenset[str]:
        """Workers not worth waiting for: offline (last will), silent, or suspect after a strict timeout."""
        with self.presence_lock:
            return self.presence.gone(workers, time.monotonic())

    def unreachable(self, workers: Iterable[str]) -> frozenset[str]:
        """What the step does not wait for: the :meth:`gone` and the reloading of ``workers``."""
        workers = list(workers)
        return self.gone(workers) | (self.reloading & frozenset(workers))

    def heard(self, node: str, period_s: float | None = None, partial: bool = False) -> None:
        with self.presence_lock:
            self.presence.heard(node, time.monotonic(), period_s, partial)

    def timed_out(self, workers: Iterable[str]) -> None:
        with self.presence_lock:
            for w in workers:
                self.presence.timed_out(w, time.monotonic())
