"""The routed MLP step of the HALO coordinator: one layer's MLP over the workers of the active plan.

The coordinator side of the hot path; ``mesh.halo.worker`` is its other half (the frame sent here
is served by ``HaloWorker._serve_frame``, whose partial frame is taken here).

Per layer step (:meth:`RoutedStep.mlp`, on the generation thread): encode the MLP input once (fp16,
the whole (B, T, H) input: all prompt positions in a prefill, the last one in decode) as a
``mesh.halo.frame`` frame and publish it once on the coordinator's MLP-input topic, which every
plan worker subscribes to, written on this thread over the direct link
(``mesh.mqtt.direct.DirectLink``) when it is up; partial frames come back on ``topics.halo_link``
and are read by this thread while it waits (over the bus: ``topics.halo_reply``, read by paho's
thread); compute the local groups meanwhile; predict the groups' importance (relaxed); then gather
partials until ``mesh.halo.ledger.StepGather`` (the rules in ``mesh.halo.sync``) says stop, and
sum. Strict computes what never came itself after a long timeout or when the worker went offline,
so strict is always exact; relaxed counts it as zero (``sync.fallback_groups`` says which it
computes instead). A partial of an earlier step is discarded on arrival (counted ``late``).

The step reads the plans through a ``mesh.halo.plans.PlanHolder`` (the epoch switch, the
coordinator's own group weights per epoch, who is gone), which ``mesh.halo.engine`` fills; it never
calls back into the engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from mesh import topics, wire
from mesh.errors import MeshError
from mesh.halo import frame as halo_wire
from mesh.halo import groups as split
from mesh.halo import predictor as pred_mod
from mesh.halo.keys import HaloKeys
from mesh.halo.ledger import StepGather, SyncLedger
from mesh.halo.plans import PlanHolder, WholeLayer
from mesh.halo.run import HaloRun
from mesh.halo.shard import GroupSource
from mesh.halo.sync import fallback_groups
from mesh.lm.model import ACT_FNS
from mesh.mqtt.direct import DirectLink

STEP_WINDOW = 1 << 16  # how many steps back a partial may still arrive (and be counted late)
PARTIALS_MAX = 4096  # partials waiting for the generation thread; a flood beyond is dropped, counted
WINDOW_EVERY = 8  # relaxed: the window samples the predicted importance of one forward pass in 8


class RoutedStep:
    """Every MLP of an ask's forward passes, routed over the plan (generation thread), and the
    partials that come back for it (network thread, or this one while it pumps the link)."""

    def __init__(self, model: Any, groups: GroupSource, orders: Sequence[Tensor | None],
                 bias: Sequence[Tensor | None], config: Any, bus: Any, plans: PlanHolder,
                 rejects: wire.RejectCounter, importance: Callable[[int, Tensor], Tensor], keys: HaloKeys) -> None:
        """``groups``: where this coordinator cuts the groups it computes itself (its plan's local
        groups come from the engine; the fallback's here), in the plans' neuron ``orders`` (per
        layer; None: the model's own), as a worker of its weight format would; ``bias``: each
        layer's down-projection bias, added once at the reduce; ``importance(layer, x)``: the
        groups' predicted importance at a step, (G,); ``keys`` tag each MLP input per worker."""
        self.model, self.groups, self.orders, self.bias = model, groups, list(orders), list(bias)
        self.layout = groups.layout
        # Each layer's MLP as loaded: what a step computes whole while no plan is active.
        self.mlps = [layer.mlp for layer in split.decoder_layers(model)]
        self.act = ACT_FNS[split.mlp_act_name(model.config)]
        self.config, self.bus, self.plans, self.rejects = config, bus, plans, rejects
        self.importance, self.keys = importance, keys
        self.name = config.name
        self.wire_dtype = getattr(torch, config.wire_dtype)
        self.mlp_topic = topics.node_mlp(config.name)
        self.frame_reply = topics.halo_reply(config.name)  # partial frames come back here over the bus
        self.link: DirectLink | None = None  # frames written and read on the generation thread
        self._pump: DirectLink | None = None  # the link this step's partials come back on
        self.ledger = SyncLedger()
        self._partials: queue.Queue[tuple[str, int, Tensor | None, float, float]] = queue.Queue(PARTIALS_MAX)
        # The generation thread sleeps until every partial it still waits for at this step arrived
        # (or its next decision time): one wake-up per step instead of one per partial, each of
        # which costs a thread switch (and the GIL) on a busy device.
        self._await_lock = threading.Lock()
        self._await: tuple[int, set[str], bool] | None = None
        self._arrival = threading.Event()
        self.next_step = time.time_ns() // 1000  # above any step of an earlier coordinator run
        self.run_state: HaloRun | None = None
        self._grams: dict[int, Tensor] = {}  # per layer, for the measured (true) zeroed share

    def arrived(self, sender: str, step: int, y: Tensor, t: float, compute_s: float) -> None:
        """A worker's partial of ``step`` (network thread, or this one while it pumps the link),
        received at ``t`` (perf_counter)."""
        # Only a worker of a plan we run, for a step we sent (late ones too: they are counted as
        # late and discarded by the gather); anything else would only fill the queue.
        if sender not in self.plans.workers() or not self.next_step - STEP_WINDOW <= step < self.next_step:
            self.rejects.add("unexpected-partial")
            return
        try:
            self._partials.put_nowait((sender, step, y, t, compute_s))
        except queue.Full:
            self.rejects.add("halo-busy")
            return
        with self._await_lock:
            waiting = self._await
            if waiting is not None and step == waiting[0] and sender in waiting[1]:
                waiting[1].discard(sender)
                if not waiting[1] or waiting[2]:
                    self._arrival.set()
        self.plans.heard(sender, partial=True)

    @contextmanager
    def run(self, strict: bool, measure: bool = False) -> Iterator[HaloRun]:
        """One ask's forward passes, every MLP routed through this step; over the direct link when
        there is one (held for the whole run; the bus when another thread holds it a moment too
        long)."""
        state = HaloRun(strict, measure=measure)
        state.link = bool(self.link is not None and self.link.lock.acquire(timeout=0.5))
        self.run_state = state
        try:
            with torch.inference_mode(), split.routed_mlps(self.model, self.mlp):
                yield state
        finally:
            state.ended = time.perf_counter()
            self.run_state = None
            self._pump = None
            if state.link:
                self.link.lock.release()

    def mlp(self, layer: int, x: Tensor) -> Tensor:  # x (B, T, H) -> (B, T, H)
        """One layer step: see the module docstring."""
        run = self.run_state
        assert run is not None
        if layer == 0:
            run.starts.append(time.perf_counter())
            run.incomplete_per_forward.append(0)
            self.plans.maybe_switch()  # a new plan starts with a forward pass, never inside one
        plan, local = self.plans.active()
        if plan is None or local is None:  # no plan yet: the whole MLP here, as the model computes it
            return self.mlps[layer](x)
        run.epochs.add(plan.epoch)
        step = self.next_step
        self.next_step += 1
        run.steps += 1
        tokens = x.shape[1]
        multi = tokens > 1
        run.multi_steps += int(multi)
        expected = {w: gs[layer] for w, gs in plan.workers.items() if gs[layer]}
        t = time.perf_counter()
        self._pump = None
        if expected:
            # One publish for every worker (the broker fans it out); each computes its own groups.
            # Over the direct link this thread writes it and reads the partials itself.
            link = self.link if run.link and self.link is not None and self.link.usable else None
            wx, keys = x.to(self.wire_dtype), self.keys.mlp_keys(plan.epoch, plan.workers)
            data = halo_wire.encode(halo_wire.MLP, self.name, plan.epoch, step, layer, wx,
                                    reply_to=link.topic if link is not None else self.frame_reply, keys=keys)
            t0 = t = run.spent("encode", t)
            if link is not None and not link.publish(self.mlp_topic, data):
                link = None  # it just broke: this step goes over the bus
                data = halo_wire.encode(halo_wire.MLP, self.name, plan.epoch, step, layer, wx,
                                        reply_to=self.frame_reply, keys=keys)
            if link is None:
                self.bus.publish(self.mlp_topic, data, qos=topics.NODE_MLP.qos)
            self._pump = link
            run.link_steps += int(link is not None)
            for w in expected:
                self.ledger.sent(w, step, t0, tokens)
            t = run.spent("publish", t)
        if expected and not multi:
            self.ledger.spread(step, len(expected))
        mine = local[layer]
        whole = isinstance(mine, WholeLayer)  # then no worker holds a group of it: nothing is expected
        parts: list[Tensor | None] = [self.mlps[layer](x) if whole else mine.partial(x) if mine is not None else None]
        t = run.spent("local", t)
        if expected:
            gather, must_wait, imp = self._gather(run, layer, step, x, expected, t0, data)
            t = run.spent("gather", t)
            parts.extend(gather.partials.values())
            missing = gather.missing_groups()
            run.incomplete_per_forward[-1] += int(bool(missing))
            if missing and run.strict:
                parts.append(self._partial(layer, missing, x))
                run.local_fallback_groups += len(missing)
            elif missing:
                # Relaxed: missing groups count as zero, except the ones the coordinator computes
                # itself: every one of a prefill step, and (fallback "important") the ones
                # predicted important at a decode step, a few groups' rows.
                keep = list(fallback_groups(missing, must_wait, tokens, self.config.fallback, self.config.policy))
                if keep:
                    parts.append(self._partial(layer, keep, x))
                    run.local_fallback_groups += len(keep)
                if len(keep) < len(missing):
                    run.zeroed_groups += len(missing) - len(keep)
                    run.zeroed_steps += 1
                    run.zeroed_multi_steps += int(multi)
                    zeroed = [g for g in missing if g not in keep]
                    if imp is not None and float(imp.sum()) > 0:
                        run.zeroed_share_predicted += float(imp[zeroed].sum() / imp.sum())
                    if run.measure:
                        run.zeroed_share_true += self._true_share(layer, x, zeroed)
            t = run.spent("fallback", t)
        out = split.reduce_partials(parts, x, None if whole else self.bias[layer])  # the module added its bias
        run.spent("reduce", t)
        return out

    def _gather(self, run: HaloRun, layer: int, step: int, x: Tensor,
                expected: dict[str, tuple[int, ...]], t0: float, frame: bytes
                ) -> tuple[StepGather, frozenset[int], Tensor | None]:
        must_wait: frozenset[int] = frozenset()
        imp: Tensor | None = None
        # Predicted importance is needed up front only when it decides the wait (fallback "none");
        # with the local fallback only once something is missing at the end of the step. The
        # scheduler's importance window samples one forward pass in WINDOW_EVERY.
        policy = self.config.policy
        tokens = x.shape[1]
        sample = not run.strict and (len(run.starts) - 1) % WINDOW_EVERY == 0
        if not run.strict and self.config.fallback != "important":
            imp = self._predict(run, layer, x, record=sample)
            must_wait = frozenset(pred_mod.groups_to_wait(imp, self.config.policy.target_share))
        elif sample:
            run.samples.append((layer, x.detach().clone()))  # predicted later, on the planner thread
        important = frozenset() if self.config.fallback == "important" else must_wait
        # With the local fallback nothing needs the longer "important" wait: it is computed here.
        # A prefill step's deadline scales with its positions; the decode straggler wait follows
        # the measured spread of arrivals (a prefill's, whose missing groups are computed here
        # anyway, keeps the policy's share of its own deadline).
        deadline, straggler, first_at = self._timing(run, tokens)
        gather = StepGather(step, expected, important if not run.strict else frozenset(), run.strict,
                            straggler_s=straggler)
        numel = x.numel()
        # Strict: a worker whose link broke while the input was under way never saw it (a broker
        # drops what a gone connection subscribed to); it is sent again over the bus every
        # ``strict_resend_s`` to whom has not answered, not left to the strict timeout (10 s a step).
        resend_at = self.config.strict_resend_s if run.strict else None
        wait: float | None = None  # first take what already arrived (late partials settle who is stalled)
        waiting: set[str] = set()
        while True:
            if wait is not None:
                # Relaxed: the first arrival starts the stragglers' shorter wait. Waking on it
                # costs a thread switch per step, so with a measured first-arrival time sleep for all until the earliest a cut can
                # fall due, then decide from what arrived.
                # Once that time has passed with nothing arrived, wake on the first arrival again
                # (sleeping 0 s there spun this thread until the deadline).
                first = not run.strict and gather.last_arrival_s is None
                if first and straggler is not None and first_at is not None:
                    cut_in = first_at + straggler - (time.perf_counter() - t0)
                    if cut_in > 0:
                        wait, first = min(wait, cut_in), False
                self._sleep(step, waiting, wait, first=first)
            elif self._pump is not None and not self._pump.pump(0.0):
                self._pump = None  # the first look: read what arrived on the direct link (broke: the bus)
            while True:
                try:
                    item = self._partials.get_nowait()
                except queue.Empty:
                    break
                self._take(run, gather, item, numel, t0)
            now = time.perf_counter()
            stalled = frozenset() if run.strict else self.ledger.stalled(step, now, deadline,
                                                                          policy.cut_overdue_factor)
            gone = self.plans.unreachable(expected)  # offline, silent, suspect or reloading
            elapsed = now - t0
            d = gather.decide(elapsed_s=elapsed, deadline_s=deadline, stalled=stalled,
                              policy=policy, strict_timeout_s=self.config.strict_timeout_s,
                              gone=gone)
            if not d.wait:
                run.stops[d.reason] = run.stops.get(d.reason, 0) + 1
                if d.reason == "strict-timeout":
                    self.plans.timed_out(gather.pending())
                break
            if resend_at is not None and elapsed >= resend_at:
                self._resend(run, frame)
                resend_at = elapsed + self.config.strict_resend_s
            wait = min(max(d.until_s - elapsed, 0.0), 0.25)
            waiting = set(gather.pending()) - stalled - gone
        for w in expected:
            self.ledger.closed(w, w in gather.partials, step)
        exact = tokens > 1 and policy.exact_multi  # nothing of it is zeroed: no prediction needed
        if not run.strict and imp is None and not gather.complete and not exact:
            imp = self._predict(run, layer, x, record=False)
            must_wait = frozenset(pred_mod.groups_to_wait(imp, self.config.policy.target_share))
        return gather, must_wait, imp

    def _resend(self, run: HaloRun, data: bytes) -> None:
        """The step's input frame again, over the bus (the worker answers a step again; its
        partial goes where the frame says)."""
        try:
            self.bus.publish(self.mlp_topic, data, qos=topics.NODE_MLP.qos)
        except MeshError:
            return
        run.resent += 1

    def _timing(self, run: HaloRun, tokens: int) -> tuple[float, float | None, float | None]:
        """The step's deadline, straggler wait (decode) and first-arrival time, from the ledger's
        figures as they stood at the first step of this forward pass: the quantiles move over 64
        to 128 samples, so refreshing them at each of a token's layer steps changed nothing but
        cost time on every step (results/2026-12-06)."""
        key = (len(run.starts), tokens)
        if run.timing is None or run.timing[0] != key:
            policy = self.config.policy
            deadline = self.ledger.deadline(policy, tokens)
            straggler = self.ledger.straggler_wait(policy, deadline) if tokens == 1 else None
            first_at = self.ledger.first_arrival() if straggler is not None else None
            run.timing = (key, (deadline, straggler, first_at))
        return run.timing[1]

    def _partial(self, layer: int, groups: Sequence[int], x: Tensor) -> Tensor:
        """The partial of ``groups`` computed here, from the numbers a worker holding them would use."""
        return self.groups.read(layer, sorted(groups), self.orders[layer]).partial(x)

    def _true_share(self, layer: int, x: Tensor, zeroed: Sequence[int]) -> float:
        """The share of the step's true contribution norm (summed over positions) in ``zeroed``."""
        gram = self._grams.get(layer)
        groups = range(self.layout.n_groups)
        if gram is None:  # from the layer's groups read once in float32, not kept
            gram = self._grams[layer] = pred_mod.importance_gram(self.groups.read(layer, groups, self.orders[layer]))
        mlp, order = self.mlps[layer], self.orders[layer]
        h = self.act(mlp.gate_proj(x)) * mlp.up_proj(x)  # (..., I) in the model's neuron order
        if order is not None:
            h = h.index_select(-1, order)  # in the plan's
        true = pred_mod.importance_of(h, self.layout.sizes(groups), gram).reshape(-1, self.layout.n_groups).sum(0)
        total = float(true.sum())
        return float(true[list(zeroed)].sum()) / total if total > 0 else 0.0

    def _sleep(self, step: int, waiting: set[str], timeout: float, first: bool = False) -> None:
        """Until every worker in ``waiting`` (``first``: any of them) delivered its partial of
        ``step``, or ``timeout``."""
        with self._await_lock:
            self._await = (step, set(waiting), first)
            self._arrival.clear()
        try:
            end = time.perf_counter() + timeout
            if self._pump is not None and (not waiting or self._partials.empty()):
                # Read the partials here (the handler runs on this thread) until they are in.
                while not (waiting and self._arrival.is_set()):
                    left = end - time.perf_counter()
                    if left <= 0:
                        return
                    if not self._pump.pump(left):
                        self._pump = None  # broke: wait out the rest below (the bus is read elsewhere)
                        break
            left = end - time.perf_counter()
            if self._pump is not None or left <= 0:
                return
            if waiting and self._partials.empty():  # else something came meanwhile: look at it first
                self._arrival.wait(left)
            elif not waiting:
                time.sleep(left)
        finally:
            with self._await_lock:
                self._await = None

    def _predict(self, run: HaloRun, layer: int, x: Tensor, record: bool) -> Tensor:
        """Predicted importance of every group at this step: (G,); ``record`` adds it to the run's
        sample for the scheduler's window."""
        t = time.perf_counter()
        imp = self.importance(layer, x)
        if record:
            if run.imp_sum is None:
                run.imp_sum = torch.zeros(len(self.mlps), imp.shape[-1])
            run.imp_sum[layer] += imp.float()
            run.imp_n += int(layer == 0)
        run.spent("predict", t)
        return imp

    def _take(self, run: HaloRun, gather: StepGather, item: tuple[str, int, Tensor | None, float, float],
              numel: int, t0: float) -> None:
        sender, s, y, t, compute_s = item
        if y is None or (s == gather.step and y.numel() != numel):
            self.rejects.add("bad-halo-partial")
        elif gather.add(sender, s, y, t - t0):
            latency = self.ledger.arrived(sender, s, t, on_time=True)
            run.on_time += 1
            if latency is not None:  # round trip of on-time partials, and the worker's share of it
                run.phases["rtt_on_time"] = run.phases.get("rtt_on_time", 0.0) + latency
                run.phases["worker_compute"] = run.phases.get("worker_compute", 0.0) + compute_s
        else:  # an earlier step's partial, discarded on arrival
            self.ledger.arrived(sender, s, t, on_time=False)
            run.late += 1
