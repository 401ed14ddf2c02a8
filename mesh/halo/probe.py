"""A HALO worker's compute-speed probe (``mesh.halo.worker`` reports it in heartbeats; the
coordinator's scheduler sizes the worker's share of groups by it)."""

from __future__ import annotations

import time
import torch

from mesh.halo import groups as split


def probe_groups(layout: split.GroupLayout) -> list[int]:
    """The probe's fixed workload: the first quarter of a layer's groups (at least one)."""
    return list(range(max(1, layout.n_groups // 4)))


class SpeedProbe:
    """Neuron-rows per second of a one-token partial over a quarter of a layer.

    Always this fixed workload, never the live requests: a one-token partial's time is mostly
    per-operation overhead, so rows per second measured on the worker's own share grew with the
    share, and the scheduler's feedback (a small share measures slow, gets smaller) swung a
    worker's share from nearly nothing to nearly all under CPU contention. The probe still sees
    contention, which is what it is for.
    """

    def __init__(self, weights: split.GroupWeights) -> None:
        """``weights``: :func:`probe_groups` of layer 0, cut by the worker's own source."""
        self.weights = weights
        self.x = torch.randn(1, 1, int(weights.gate.shape[1]))  # (1, 1, H)
        self.at = 0.0  # time.monotonic() of the last measurement

    def measure(self, reps: int = 20) -> float:
        best = float("inf")
        with torch.inference_mode():
            for _ in range(reps):
                t0 = time.perf_counter()
                self.weights.partial(self.x)
                best = min(best, time.perf_counter() - t0)
        self.at = time.monotonic()
        return self.weights.n_neurons / max(best, 1e-7)
