"""HALO relaxed-sync rules (pure functions): how long a layer step waits for its partials.

The step (``mesh.halo.step``) asks these rules, through the state they need kept in
``mesh.halo.ledger`` (latency samples, outstanding steps, arrival gaps): the decode and prefill
deadlines (:func:`layer_deadline`, :func:`step_deadline`), the straggler wait after the first
arrival (:func:`straggler_wait`), which workers are stuck behind a lost partial
(:func:`stalled_workers`), whether to keep waiting (:func:`wait_decision`) and, once it stops,
which missing groups the coordinator computes itself (:func:`fallback_groups`).

Times are seconds; deadlines are per layer step, measured from sending the MLP input.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SyncPolicy:
    """Relaxed-sync knobs. Deadlines are per layer step, measured from sending the MLP input."""

    # Of predicted importance that is worth waiting for (or computing here); with groups cut in
    # importance order 0.99 zeroes almost nothing for no measurable time (results/2026-12-06).
    target_share: float = 0.99
    quantile: float = 0.8  # of latency samples (a CPU-contention tail must not set the deadline)
    margin: float = 1.5  # deadline = margin * quantile
    min_deadline_s: float = 0.002
    max_deadline_s: float = 0.1
    default_deadline_s: float = 0.02  # before any sample exists
    important_grace: float = 2.0  # important groups may hold up to grace * deadline
    # Once a step's first partials arrived, the rest get this share of the deadline more (unless
    # important): healthy workers answer within a millisecond or two of each other, while a
    # partial lost on a lossy link waits for a TCP retransmission (>= 200 ms), so waiting the whole
    # deadline for it at every stall onset bought nothing. 1 or more: off.
    straggler_share: float = 0.25
    # The straggler wait adapts to the measured spread of arrivals: ``straggler_margin`` times the
    # ``straggler_quantile`` of the largest gap between consecutive arrivals of recent decode steps
    # (all partials of a step, late ones included), at least ``min_straggler_s``, at most the
    # ``straggler_share`` of the deadline above; fewer than ``min_gap_samples`` steps: that share.
    straggler_quantile: float = 0.9
    straggler_margin: float = 2.0
    min_straggler_s: float = 0.0005
    min_gap_samples: int = 16
    # A multi-token step (a prefill) carries T positions: its deadline is T times the measured
    # per-position latency of earlier multi-token steps (margin and quantile as above; before any,
    # T decode deadlines), at least the decode deadline, at most ``max_multi_deadline_s``. Its
    # missing groups are computed by the coordinator (``exact_multi``): one prefill's KV cache
    # feeds every later token, and T positions make a lost partial cost as much as one group's
    # local rows, not a fraction of a decode step.
    max_multi_deadline_s: float = 1.0
    exact_multi: bool = True
    # A step closed without a worker's partial makes it stalled (not waited for) once the step is
    # this many times the worker's median decode latency old with nothing heard from it since.
    cut_overdue_factor: float = 2.0


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted ``xs`` (non-empty)."""
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def layer_deadline(samples: Sequence[float], policy: SyncPolicy = SyncPolicy()) -> float:
    """The deadline for a layer step from recent latency samples (seconds), clamped."""
    xs = sorted(s for s in samples if math.isfinite(s) and s >= 0)
    if not xs:
        return policy.default_deadline_s
    return min(policy.max_deadline_s, max(policy.min_deadline_s, policy.margin * _quantile(xs, policy.quantile)))


def step_deadline(decode_deadline_s: float, tokens: int, per_token: Sequence[float],
                  policy: SyncPolicy = SyncPolicy()) -> float:
    """The deadline of a step carrying ``tokens`` positions.

    ``decode_deadline_s`` is the one-position deadline (:func:`layer_deadline`); ``per_token`` are
    latencies of earlier multi-token steps divided by their position count. A one-position step
    keeps the decode deadline. A longer one gets ``tokens`` times the margin times the quantile of
    ``per_token`` (T decode deadlines before any sample), clamped to [decode deadline,
    ``max_multi_deadline_s``]: a prefill of 300 positions moves and computes 300 times the data
    of a decode step, and holding it to the decode deadline cut its partials on a loss-free link.
    """
    if tokens <= 1:
        return decode_deadline_s
    xs = sorted(s for s in per_token if math.isfinite(s) and s >= 0)
    est = tokens * (policy.margin * _quantile(xs, policy.quantile) if xs else decode_deadline_s)
    return max(decode_deadline_s, min(policy.max_multi_deadline_s, est))


def straggler_wait(gaps: Sequence[float], deadline_s: float, policy: SyncPolicy = SyncPolicy()) -> float:
    """How long stragglers without important groups are waited for after the newest arrival.

    ``gaps`` are, per recent decode step whose partials all arrived (late ones included, so a cut
    cannot shrink its own evidence), the largest gap between consecutive arrivals. Healthy workers
    answer within a fraction of a millisecond of each other, while a partial lost on a lossy link
    waits for a TCP retransmission, so a fixed share of the deadline cost time at every loss.
    """
    cap = policy.straggler_share * deadline_s
    xs = sorted(g for g in gaps if math.isfinite(g) and g >= 0)
    if len(xs) < max(1, policy.min_gap_samples):
        return cap
    return min(cap, max(policy.min_straggler_s, policy.straggler_margin * _quantile(xs, policy.straggler_quantile)))


def fallback_groups(missing: Sequence[int], must_wait: frozenset[int] | set[int], tokens: int,
                    fallback: str, policy: SyncPolicy = SyncPolicy()) -> tuple[int, ...]:
    """Of a relaxed step's ``missing`` groups, those the coordinator computes itself (the rest count
    as zero): every one of a multi-token step (``exact_multi``), else the predicted-important
    ones with ``fallback="important"``, else none."""
    if tokens > 1 and policy.exact_multi:
        return tuple(missing)
    if fallback == "important":
        return tuple(g for g in missing if g in must_wait)
    return ()


def stalled_workers(outstanding: Mapping[str, Mapping[int, float]], step: int, now: float,
                    overdue_s: float, last_heard: Mapping[str, float] | None = None,
                    cut: Mapping[str, Collection[int]] | None = None,
                    cut_overdue_s: Mapping[str, float] | None = None) -> frozenset[str]:
    """Workers stuck behind an overdue partial: not waited for at all at ``step``.

    ``outstanding`` maps each worker to its unanswered steps and their send times; ``last_heard``
    to when its newest partial (of any step) arrived. A worker stuck in TCP retransmission answers
    in order, so its current partial is queued behind the late one; waiting for it only adds the
    stall to every layer. Stuck means: it owes an earlier step sent at least ``overdue_s`` (the
    layer deadline) ago, and nothing at all arrived from it since that step was sent. A worker
    whose answers keep coming is only behind: counting it stalled because it owes the step the
    coordinator did not wait for kept a worker that fell behind once behind for good, since the
    coordinator, no longer waiting, ran ahead of its answers at every step and summed its groups
    as zero.

    ``cut`` maps a worker to the steps that closed without its partial: such a step is overdue
    after ``cut_overdue_s`` of that worker (its own typical answer time, see
    ``SyncPolicy.cut_overdue_factor``), not a whole deadline. Its partial already missed the wait
    sized to healthy arrivals, and nothing at all came from the worker for longer than it usually
    takes to answer: it waits for a retransmission. Waiting for it again, until that step was a
    deadline old, cost every loss two or three more cut waits. A worker merely slow (CPU
    contention) answers within its own typical time, which grows with the contention, so it is
    not skipped at every other step.
    """
    heard = last_heard or {}
    missed = cut or {}
    cut_after = cut_overdue_s or {}
    return frozenset(node for node, steps in outstanding.items()
                     if any(s < step and heard.get(node, -math.inf) < t
                            and (now - t >= overdue_s
                                 or (s in missed.get(node, ()) and now - t >= cut_after.get(node, overdue_s)))
                            for s, t in steps.items()))


@dataclass(frozen=True)
class WaitDecision:
    wait: bool
    until_s: float  # elapsed time to wake up at (meaningful when ``wait``)
    reason: str


def wait_decision(
    *, pending: Mapping[str, Sequence[int]], must_wait: frozenset[int] | set[int],
    stalled: frozenset[str], elapsed_s: float, deadline_s: float,
    policy: SyncPolicy = SyncPolicy(), last_arrival_s: float | None = None,
    straggler_s: float | None = None,
) -> WaitDecision:
    """Whether to keep waiting for the partials of one layer step.

    ``pending`` maps each worker to its groups not yet arrived; ``must_wait`` are the groups
    predicted important (``predictor.groups_to_wait(pred, policy.target_share)``). Stalled
    workers are never waited for; the rest until the deadline; an important group up to
    ``important_grace`` deadlines (capped at ``max_deadline_s``). Once some partial of the step
    arrived (``last_arrival_s``, elapsed time of the newest), stragglers without important groups
    get ``straggler_s`` after it (:func:`straggler_wait`; None: ``straggler_share`` of the
    deadline), not the whole deadline. Called on every
    arrival and on every wake-up; whatever is still missing when it says stop counts as zero.
    """
    missing = {n: gs for n, gs in pending.items() if gs}
    live = {n: gs for n, gs in missing.items() if n not in stalled}
    if not live:
        return WaitDecision(False, elapsed_s, "stalled-only" if missing else "complete")
    important = any(g in must_wait for gs in live.values() for g in gs)
    if last_arrival_s is not None and not important and policy.straggler_share < 1:
        wait = policy.straggler_share * deadline_s if straggler_s is None else straggler_s
        cut = min(deadline_s, last_arrival_s + wait)
        if elapsed_s < cut:
            return WaitDecision(True, cut, "straggler")
        return WaitDecision(False, elapsed_s, "straggler-cut" if elapsed_s < deadline_s else "deadline-passed")
    if elapsed_s < deadline_s:
        return WaitDecision(True, deadline_s, "deadline")
    if important:
        hard = min(policy.important_grace * deadline_s, max(policy.max_deadline_s, deadline_s))
        if elapsed_s < hard:
            return WaitDecision(True, hard, "important")
        return WaitDecision(False, elapsed_s, "important-timeout")
    return WaitDecision(False, elapsed_s, "deadline-passed")
