"""The relaxed-sync rules (mesh.halo.sync): deadlines, stalled workers, the wait decision."""

from __future__ import annotations

import pytest

from mesh.halo import sync as s


def test_layer_deadline_from_latency_samples() -> None:
    policy = s.SyncPolicy(quantile=0.9, margin=1.5, min_deadline_s=0.002, max_deadline_s=0.1)
    samples = [0.004] * 9 + [0.014]  # 90th percentile 0.005
    assert s.layer_deadline(samples, policy) == pytest.approx(1.5 * 0.005)
    assert s.layer_deadline([], policy) == policy.default_deadline_s
    assert s.layer_deadline([0.0001], policy) == 0.002
    assert s.layer_deadline([5.0, float("nan")], policy) == 0.1


def test_stalled_workers_owe_an_overdue_step_and_were_silent_since_it_was_sent() -> None:
    outstanding = {"a": {}, "b": {41: 1.0}, "c": {42: 1.0}, "d": {41: 1.015}, "e": {41: 1.0}}
    heard = {"b": 0.5, "d": 0.5, "e": 1.015}
    # "b" owes step 41, sent 20 ms ago (over the 10 ms deadline), and was silent since: stalled.
    # "d" owes it too, but sent only 5 ms ago (the coordinator did not wait for it): one round
    # trip, not a stall. "e" owes an overdue step but answered after it was sent: behind, not stuck.
    assert s.stalled_workers(outstanding, 42, 1.02, 0.01, heard) == frozenset({"b"})
    assert s.stalled_workers(outstanding, 42, 1.03, 0.01, heard) == frozenset({"b", "d"})
    assert s.stalled_workers(outstanding, 42, 1.03, 0.01) == frozenset({"b", "d", "e"})  # never heard


def test_wait_decision() -> None:
    must = frozenset({0, 1})
    kw = dict(must_wait=must, stalled=frozenset(), deadline_s=0.01)
    assert not s.wait_decision(pending={"a": []}, elapsed_s=0.001, **kw).wait
    early = s.wait_decision(pending={"a": [7]}, elapsed_s=0.001, **kw)
    assert early.wait and early.until_s == 0.01
    # Past the deadline: unimportant stragglers are dropped, important ones get a grace.
    assert s.wait_decision(pending={"a": [7]}, elapsed_s=0.011, **kw).reason == "deadline-passed"
    grace = s.wait_decision(pending={"a": [1, 7]}, elapsed_s=0.011, **kw)
    assert grace.wait and grace.until_s == pytest.approx(0.02)
    assert not s.wait_decision(pending={"a": [1]}, elapsed_s=0.021, **kw).wait
    # A stalled worker is never waited for: not for important groups, not before the deadline.
    stalled = s.wait_decision(pending={"b": [0, 1]}, must_wait=must, stalled=frozenset({"b"}),
                              elapsed_s=0.0, deadline_s=0.01)
    assert not stalled.wait and stalled.reason == "stalled-only"


def test_stragglers_get_a_share_of_the_deadline_after_the_first_partials() -> None:
    pol = s.SyncPolicy(straggler_share=0.25)
    kw = dict(pending={"lossy": [5]}, stalled=frozenset(), deadline_s=0.02, policy=pol)
    # Nothing arrived yet: the whole deadline.
    assert s.wait_decision(must_wait=frozenset(), elapsed_s=0.004, **kw).until_s == 0.02
    # The others arrived at 2 ms: the straggler gets 5 ms more, not 18.
    d = s.wait_decision(must_wait=frozenset(), elapsed_s=0.004, last_arrival_s=0.002, **kw)
    assert d.wait and d.until_s == 0.002 + 0.005 and d.reason == "straggler"
    d = s.wait_decision(must_wait=frozenset(), elapsed_s=0.0071, last_arrival_s=0.002, **kw)
    assert not d.wait and d.reason == "straggler-cut"
    # An important group keeps the important wait; straggler_share 1 turns the rule off.
    assert s.wait_decision(must_wait=frozenset({5}), elapsed_s=0.0071, last_arrival_s=0.002, **kw).wait
    off = dict(kw, policy=s.SyncPolicy(straggler_share=1.0))
    assert s.wait_decision(must_wait=frozenset(), elapsed_s=0.0071, last_arrival_s=0.002, **off).until_s == 0.02
