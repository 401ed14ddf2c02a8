"""The figures of one ask's routed forward passes on the HALO coordinator (:class:`HaloRun`):
what ``mesh.halo.step.RoutedStep`` counts per layer step and an answer's ``halo`` block reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class HaloRun:
    """Figures of one ask (one or many forward passes)."""

    strict: bool
    link: bool = False  # this run holds the coordinator's direct link (frames written and read here)
    link_steps: int = 0  # steps whose frames went over the direct link
    starts: list[float] = field(default_factory=list)  # perf_counter at layer 0 of each forward
    ended: float = 0.0
    steps: int = 0
    on_time: int = 0
    late: int = 0  # partials discarded on arrival
    zeroed_groups: int = 0  # (layer step, group) pairs summed as zero (relaxed)
    zeroed_steps: int = 0
    multi_steps: int = 0  # steps of a multi-token forward (prefill: T > 1)
    zeroed_multi_steps: int = 0  # of them, closed with some group summed as zero
    incomplete_per_forward: list[int] = field(default_factory=list)  # steps closed without every partial
    local_fallback_groups: int = 0  # strict: computed here because the worker was gone/timed out
    # Share of the layer step's importance summed as zero, added up over steps (complete steps add
    # 0): predicted (from the predictor) always, true (each group's contribution norm, computed
    # here from the full weights) only when ``measure`` is set, since that costs a whole MLP.
    zeroed_share_predicted: float = 0.0
    zeroed_share_true: float = 0.0
    measure: bool = False
    epochs: set[int] = field(default_factory=set)
    stops: dict[str, int] = field(default_factory=dict)  # why each step stopped waiting
    resent: int = 0  # strict: step inputs sent again over the bus (a worker's link lost one)
    imp_sum: Tensor | None = None
    imp_n: int = 0
    # MLP inputs (layer, x) of the forward passes sampled for the scheduler's window, predicted on
    # the planner thread afterwards (with the local fallback nothing else needs them predicted).
    samples: list[tuple[int, Tensor]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the MLP steps
    # (forward pass, positions) -> (deadline, straggler wait, first arrival): see RoutedStep._timing
    timing: tuple[tuple[int, int], tuple[float, float | None, float | None]] | None = None

    def spent(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now

    def figures(self) -> dict[str, Any]:
        times = [b - a for a, b in zip(self.starts, [*self.starts[1:], self.ended])]
        return {"sync": "strict" if self.strict else "relaxed",
                "steps": self.steps, "link_steps": self.link_steps,
                "partials_on_time": self.on_time, "partials_late": self.late,
                "zeroed_groups": self.zeroed_groups, "zeroed_steps": self.zeroed_steps,
                "multi_steps": self.multi_steps, "zeroed_multi_steps": self.zeroed_multi_steps,
                "incomplete_per_forward": list(self.incomplete_per_forward),
                "local_fallback_groups": self.local_fallback_groups, "epochs": sorted(self.epochs),
                "zeroed_share_predicted": round(self.zeroed_share_predicted / max(1, self.steps), 6),
                **({"zeroed_share_true": round(self.zeroed_share_true / max(1, self.steps), 6)}
                   if self.measure else {}),
                "stops": dict(self.stops), "resent_frames": self.resent,
                "phases_s": {k: round(v, 6) for k, v in sorted(self.phases.items())},
                "token_times_s": times}
