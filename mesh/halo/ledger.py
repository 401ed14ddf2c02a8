"""The coordinator's synchronisation state for HALO (pure: no sockets, clocks or threads).

Vocabulary. A *step* is one layer of one forward pass: the coordinator numbers them with one
increasing counter, sends the layer's MLP input to every worker of the active plan (one message
each) and gathers their partial down-projections. Times are seconds on the caller's monotonic
clock, passed in.

- :class:`SyncLedger` remembers, per worker, which steps were sent and which answered, the
  latency of partials (the deadline is derived from them: one-position steps apart, multi-token
  steps per position), the largest gap between the arrivals of each decode step (the straggler
  wait is derived from them) and a late rate (fed to the scheduler as ``late_rate``). A worker
  *owes* a step when it was sent and nothing at or after it came back; a worker owing an earlier
  step than the current one, sent at least one deadline ago or closed without its partial, with
  nothing heard from it since that step was sent, is *stalled* and not waited for
  (``mesh.halo.sync.stalled_workers``): its answers come in order, behind the late one.
- :class:`StepGather` collects one step's partials and decides whether to keep waiting: strict
  waits for every expected worker (up to a long safety timeout, after which the caller computes
  the missing groups itself, so strict stays exact); relaxed follows
  ``mesh.halo.sync.wait_decision`` and whatever is missing then counts as zero.
- :class:`EpochSwitch` holds the active plan and a pending one; the pending plan becomes active
  only once every worker named in it acknowledged its epoch (it holds the weights), checked
  between forward passes so generation never pauses.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.halo import sync as rules
from mesh.halo.placement import Plan, WorkerFigures
from mesh.halo.sync import SyncPolicy, WaitDecision

MAX_OUTSTANDING = 4096  # sent-but-unanswered steps remembered per worker
MAX_OPEN_STEPS = 256  # decode steps whose arrival spread is still being collected
LATE_ALPHA = 0.01  # EWMA weight of one step's outcome in a worker's late rate (~100 steps, 3 tokens)


@dataclass
class WorkerRecord:
    """One worker's partial traffic as the coordinator saw it."""

    sent_at: dict[int, float] = field(default_factory=dict)  # outstanding step -> send time
    last_reply: int = -1
    last_heard: float = float("-inf")  # arrival time of its newest partial (any step)
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # one-position steps
    per_token: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # multi: latency / T
    tokens: dict[int, int] = field(default_factory=dict)  # outstanding multi-token step -> T
    cut: set[int] = field(default_factory=set)  # outstanding steps closed without its partial
    on_time: int = 0
    late: int = 0  # arrived after its step was closed (discarded)
    zeroed: int = 0  # steps closed without this worker's partial
    late_rate: float = 0.0


class SyncLedger:
    """Per-worker outstanding steps, latencies and late rates."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerRecord] = {}
        # Decode steps sent to several workers: how many partials, and their latencies so far.
        self._open: dict[int, tuple[int, list[float]]] = {}
        self.gaps: deque[float] = deque(maxlen=128)  # largest arrival gap per complete decode step
        self.firsts: deque[float] = deque(maxlen=128)  # latency of the first partial, same steps

    def _rec(self, worker: str) -> WorkerRecord:
        return self.workers.setdefault(worker, WorkerRecord())

    def sent(self, worker: str, step: int, now: float, tokens: int = 1) -> None:
        rec = self._rec(worker)
        rec.sent_at[step] = now
        if tokens > 1:
            rec.tokens[step] = tokens
        if len(rec.sent_at) > MAX_OUTSTANDING:
            old = min(rec.sent_at)
            del rec.sent_at[old]
            rec.tokens.pop(old, None)
            rec.cut.discard(old)

    def spread(self, step: int, n_workers: int) -> None:
        """Collect the arrival spread of a one-position step sent to ``n_workers`` (>= 2)."""
        if n_workers >= 2:
            self._open[step] = (n_workers, [])
            if len(self._open) > MAX_OPEN_STEPS:
                del self._open[min(self._open)]

    def arrived(self, worker: str, step: int, now: float, on_time: bool) -> float | None:
        """Record a partial; returns its latency (None if the step was never sent to it).

        Answers come in order, so everything sent up to ``step`` is settled: answered or
        skipped by the worker because a newer request was already waiting.
        """
        rec = self._rec(worker)
        t0 = rec.sent_at.get(step)
        tokens = rec.tokens.get(step, 1)
        rec.last_reply = max(rec.last_reply, step)
        rec.last_heard = max(rec.last_heard, now)
        for s in [s for s in rec.sent_at if s <= step]:
            del rec.sent_at[s]
            rec.tokens.pop(s, None)
            rec.cut.discard(s)
        if on_time:
            rec.on_time += 1
        else:
            rec.late += 1
        if t0 is None:
            return None
        latency = max(0.0, now - t0)
        # Late ones count too: a deadline learnt only from on-time partials could only shrink.
        # A prefill's latencies go per position to their own samples: in the decode samples
        # they stretched the deadline of the next decode steps.
        if tokens > 1:
            rec.per_token.append(latency / tokens)
        else:
            rec.samples.append(latency)
        opened = self._open.get(step)
        if opened is not None:
            opened[1].append(latency)
            if len(opened[1]) >= opened[0]:
                del self._open[step]
                times = sorted(opened[1])
                self.gaps.append(max(b - a for a, b in zip(times, times[1:])))
                self.firsts.append(times[0])
        return latency

    def closed(self, worker: str, got: bool, step: int | None = None) -> None:
        """A step closed with (``got``) or without this worker's partial: updates its late rate
        and remembers the ``step`` it was cut from (see ``mesh.halo.sync.stalled_workers``)."""
        rec = self._rec(worker)
        if not got:
            rec.zeroed += 1
            if step is not None and step in rec.sent_at:
                rec.cut.add(step)
        rec.late_rate = (1 - LATE_ALPHA) * rec.late_rate + LATE_ALPHA * (0.0 if got else 1.0)

    def outstanding(self) -> dict[str, list[int]]:
        return {w: sorted(r.sent_at) for w, r in self.workers.items() if r.sent_at}

    def stalled(self, step: int, now: float, overdue_s: float, cut_factor: float = 0.0) -> frozenset[str]:
        """Workers owing a step before ``step`` sent at least ``overdue_s`` before ``now`` (or,
        closed without their partial, ``cut_factor`` times their median decode latency), with
        nothing heard from them since it was sent."""
        cut = {w: r.cut for w, r in self.workers.items() if r.cut}
        after = {w: cut_factor * statistics.median(self.workers[w].samples) if self.workers[w].samples else overdue_s
                 for w in cut}
        return rules.stalled_workers({w: r.sent_at for w, r in self.workers.items() if r.sent_at},
                                         step, now, overdue_s,
                                         {w: r.last_heard for w, r in self.workers.items()}, cut, after)

    def deadline(self, policy: SyncPolicy, tokens: int = 1) -> float:
        """Each worker's deadline for a step of ``tokens`` positions from its own recent latencies
        (late ones included; ``mesh.halo.sync.step_deadline``), then the lower median over
        workers: one lossy worker's retransmission stalls cannot stretch the deadline everybody
        else is held to, and no survivorship bias shrinks it."""
        per = sorted(rules.step_deadline(rules.layer_deadline(list(r.samples), policy),
                                             tokens, list(r.per_token), policy)
                     for r in self.workers.values() if r.samples or r.per_token)
        if per:
            return per[(len(per) - 1) // 2]
        return rules.step_deadline(policy.default_deadline_s, tokens, (), policy)

    def first_arrival(self) -> float | None:
        """Lower quartile of the first partial's latency over recent decode steps (None: none
        yet). Until then no straggler cut can fall due, so the gather need not wake earlier."""
        if not self.firsts:
            return None
        return sorted(self.firsts)[(len(self.firsts) - 1) // 4]

    def straggler_wait(self, policy: SyncPolicy, deadline_s: float) -> float:
        """The wait for stragglers after the newest arrival of a decode step
        (``mesh.halo.sync.straggler_wait`` over the measured arrival gaps)."""
        return rules.straggler_wait(list(self.gaps), deadline_s, policy)

    def late_rate(self, worker: str) -> float:
        rec = self.workers.get(worker)
        return rec.late_rate if rec is not None else 0.0

    def forget(self, worker: str) -> None:
        self.workers.pop(worker, None)

    def counts(self) -> dict[str, dict[str, int]]:
        return {w: {"on_time": r.on_time, "late": r.late, "zeroed": r.zeroed}
                for w, r in sorted(self.workers.items())}


class StepGather:
    """The partials of one step: who owes which groups, what arrived, whether to keep waiting.

    ``expected`` maps each worker asked at this step to its groups; ``must_wait`` are the groups
    predicted important (relaxed sync only).
    """

    def __init__(self, step: int, expected: Mapping[str, tuple[int, ...]],
                 must_wait: frozenset[int] = frozenset(), strict: bool = True,
                 straggler_s: float | None = None) -> None:
        self.step = step
        self.straggler_s = straggler_s  # the wait after the newest arrival (None: policy share)
        self.expected = dict(expected)
        self.must_wait = must_wait
        self.strict = strict
        self.partials: dict[str, Any] = {}
        self.last_arrival_s: float | None = None  # elapsed time of the newest accepted partial

    def add(self, worker: str, step: int, partial: Any, at_s: float | None = None) -> bool:
        """Accept a partial of this step from a worker that owes one (arrived ``at_s`` into the
        step); False otherwise."""
        if step != self.step or worker not in self.expected or worker in self.partials:
            return False
        self.partials[worker] = partial
        if at_s is not None:
            self.last_arrival_s = max(at_s, self.last_arrival_s or at_s)
        return True

    @property
    def complete(self) -> bool:
        return len(self.partials) == len(self.expected)

    def pending(self) -> dict[str, tuple[int, ...]]:
        return {w: gs for w, gs in self.expected.items() if w not in self.partials}

    def decide(self, *, elapsed_s: float, deadline_s: float, stalled: frozenset[str],
               policy: SyncPolicy, strict_timeout_s: float,
               gone: frozenset[str] = frozenset()) -> WaitDecision:
        """Keep waiting or not; called on every arrival and every wake-up.

        ``gone`` are workers known offline: nobody waits for them (strict then computes their
        groups itself, relaxed counts them as zero).
        """
        if self.complete:
            return WaitDecision(False, elapsed_s, "complete")
        if gone and all(w in gone for w in self.pending()):
            return WaitDecision(False, elapsed_s, "gone")
        if self.strict:
            if elapsed_s < strict_timeout_s:
                return WaitDecision(True, strict_timeout_s, "strict")
            return WaitDecision(False, elapsed_s, "strict-timeout")
        return rules.wait_decision(
            pending=self.pending(), must_wait=self.must_wait, stalled=stalled | gone,
            elapsed_s=elapsed_s, deadline_s=deadline_s, policy=policy, last_arrival_s=self.last_arrival_s,
            straggler_s=self.straggler_s,
        )

    def missing_groups(self) -> tuple[int, ...]:
        return tuple(sorted(g for gs in self.pending().values() for g in gs))


class EpochSwitch:
    """The active plan and at most one pending plan waiting for its workers' acks."""

    def __init__(self, active: Plan | None = None) -> None:
        self.active = active
        self.pending: Plan | None = None
        self.acks: dict[int, set[str]] = {}
        self.pending_since = 0.0

    def propose(self, plan: Plan, now: float) -> None:
        """A new plan: it replaces any pending one (its epoch must be newer than both)."""
        newest = max((p.epoch for p in (self.active, self.pending) if p is not None), default=-1)
        if plan.epoch <= newest:
            raise ValueError(f"plan epoch {plan.epoch} is not newer than {newest}")
        self.pending = plan
        self.pending_since = now
        self.acks.setdefault(plan.epoch, set())

    def ack(self, worker: str, epoch: int) -> None:
        if self.pending is not None and epoch == self.pending.epoch:
            self.acks[epoch].add(worker)

    def waiting_for(self) -> frozenset[str]:
        if self.pending is None:
            return frozenset()
        return frozenset(self.pending.workers) - self.acks.get(self.pending.epoch, set())

    def maybe_switch(self) -> Plan | None:
        """Between forward passes: activate the pending plan once fully acknowledged."""
        if self.pending is None or self.waiting_for():
            return None
        self.active, self.pending = self.pending, None
        self.acks = {e: a for e, a in self.acks.items() if e > self.active.epoch}
        return self.active

    @property
    def newest(self) -> Plan | None:
        return self.pending or self.active


@dataclass(frozen=True)
class Liveness:
    """When a worker counts as gone although no ``offline`` status (last will) came: a frozen or
    cut-off process keeps its TCP connection open until the broker's keepalive expires.

    Silent: nothing (heartbeat or partial) heard for ``max(min_silence_s, factor * heartbeat_s)``,
    ``heartbeat_s`` being the period the worker announces. Suspect: a strict step timed out on it;
    it stays suspect until a partial comes from it again, so only one step pays the timeout, or
    until ``suspect_s`` passed (a re-plan leaves a suspect worker out, so it sends no partials;
    after the pause it is planned in and tried again). A heartbeat does not lift it: a worker
    whose heartbeat thread lives but whose compute or link thread died (or that withholds on
    purpose) would otherwise cost a strict timeout per heartbeat period (review M4).
    """

    factor: float = 6.0
    min_silence_s: float = 3.0
    suspect_s: float = 60.0


class Presence:
    """Who of the workers is reachable, from status, heartbeats, partials and strict timeouts."""

    def __init__(self, policy: Liveness = Liveness()) -> None:
        self.policy = policy
        self.online: dict[str, bool] = {}
        self.seen: dict[str, float] = {}
        self.period: dict[str, float] = {}
        self.suspect: dict[str, float] = {}  # worker -> until (monotonic)

    def status(self, worker: str, online: bool, now: float) -> None:
        self.online[worker] = online
        if online:
            self.seen[worker] = now

    def heard(self, worker: str, now: float, period_s: float | None = None, partial: bool = False) -> None:
        """A heartbeat (with its announced period) or, ``partial``, a partial from ``worker``:
        both prove it alive, only a partial proves it serves."""
        self.seen[worker] = max(now, self.seen.get(worker, now))
        if period_s is not None and period_s > 0:
            self.period[worker] = float(period_s)
        if partial:
            self.suspect.pop(worker, None)

    def timed_out(self, worker: str, now: float) -> None:
        self.suspect[worker] = now + self.policy.suspect_s

    def silence_s(self, worker: str) -> float:
        p = self.period.get(worker)
        return max(self.policy.min_silence_s, self.policy.factor * p) if p else float("inf")

    def gone(self, workers: Iterable[str], now: float) -> frozenset[str]:
        """Of ``workers``: those offline, silent for too long, or suspect. A worker never heard
        from is not silent (no evidence either way) unless its status says offline."""
        out = set()
        for w in workers:
            seen = self.seen.get(w)
            if (not self.online.get(w, True) or self.suspect.get(w, -math.inf) > now
                    or (seen is not None and now - seen > self.silence_s(w))):
                out.add(w)
        return frozenset(out)


def worker_figures(node: str, heartbeat: Mapping[str, Any], online: bool, model_key: str,
                   group_size: int, late_rate: float = 0.0) -> WorkerFigures | None:
    """A worker's :class:`~mesh.halo.placement.WorkerFigures` from its heartbeat, or None when the
    node is no HALO worker for this model and group size.

    The heartbeat carries ``roles`` (with ``"worker"``), ``model_key``, ``halo`` {``groups``,
    ``epoch``, ``served``, ``compute_rows_per_s``, ``group_size``, optionally ``capacity_groups``:
    the most groups it can hold, bounded by ``mesh.plausible``} and ``link`` {``rtt_ewma_ms``,
    ``late_fraction``, ``loss_fraction``}. The late rate is the larger of the link probe's and
    the coordinator's own (``late_rate``, from partials that missed their step).
    """
    roles = heartbeat.get("roles")
    halo = heartbeat.get("halo")
    if (not isinstance(roles, list) or "worker" not in roles or not isinstance(halo, Mapping)
            or heartbeat.get("model_key") != model_key or halo.get("group_size", group_size) != group_size):
        return None
    link = heartbeat.get("link") if isinstance(heartbeat.get("link"), Mapping) else {}

    def num(table: Mapping[str, Any], key: str) -> float:
        v = table.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0

    cap = halo.get("capacity_groups")
    capacity = int(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap >= 0 else None
    return WorkerFigures(
        node=node, speed=num(halo, "compute_rows_per_s"), rtt_s=num(link, "rtt_ewma_ms") / 1000.0,
        loss_rate=num(link, "loss_fraction"),
        late_rate=max(num(link, "late_fraction"), float(late_rate)), online=online, capacity=capacity,
    )
