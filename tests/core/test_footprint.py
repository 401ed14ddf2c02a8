"""mesh.footprint: a node works out its context and cache budget within its memory limit before
it loads, and refuses, naming the setting to change, when it cannot fit."""

from __future__ import annotations

import pytest

from mesh.footprint import MIN_AUTO_CACHE, SLACK_SHARE, DoesNotFit, Footprint, MiB, plan

# Figures of the size a Pi Zero 2W node sees: a 400 MiB cgroup, torch's runtime, SmolLM2 in int8.
LIMIT, RUNTIME, TOKENIZER, PER_TOKEN = 400 * MiB, 150 * MiB, 2 * MiB, 73_728
INT8, FP32 = 165 * MiB, 540 * MiB


def fits(**kw: object) -> object:
    args = dict(limit_bytes=LIMIT, limit_source="cgroup v1", runtime=RUNTIME, weights=INT8, tokenizer=TOKENIZER,
                per_token=PER_TOKEN, positions=8192, weights_format="int8")
    return plan(**{**args, **kw})  # type: ignore[arg-type]


def test_the_parts_and_their_slack_add_up() -> None:
    fp = Footprint(runtime=100, weights=200, tokenizer=10, context=40, cache=50)
    assert fp.slack == int(SLACK_SHARE * 400) and fp.total == 400 + fp.slack
    assert set(fp.mib()) == {"runtime", "weights", "tokenizer", "context", "cache", "slack", "total"}


def test_chosen_context_and_cache_fill_the_limit_without_passing_it() -> None:
    p = fits()
    room = int(LIMIT / (1 + SLACK_SHARE)) - RUNTIME - INT8 - TOKENIZER
    assert p.max_context == room // 2 // PER_TOKEN  # half of the room, less than a quarter of the limit
    assert 0 < p.cache_bytes < 256 * MiB  # what is left, less than the 256 MiB default
    assert p.footprint.total <= LIMIT
    assert LIMIT - p.footprint.total < 0.1 * LIMIT  # and little is wasted
    roomy = fits(limit_bytes=3072 * MiB)
    assert roomy.cache_bytes == 256 * MiB and roomy.max_context == 8192  # the defaults, the model's positions
    pi4 = fits(limit_bytes=1536 * MiB, positions=1 << 20)
    assert pi4.max_context == int(0.25 * 1536 * MiB) // PER_TOKEN  # a quarter of the limit (mesh.budget)


def test_explicit_settings_are_kept_or_refused_with_the_flag_to_change() -> None:
    p = fits(max_context=256, cache_bytes=16 * MiB)
    assert (p.max_context, p.cache_bytes) == (256, 16 * MiB)
    with pytest.raises(DoesNotFit, match=r"--cache-mb, now 300") as no:
        fits(cache_bytes=300 * MiB)
    assert "400 MiB (cgroup v1)" in str(no.value) and "MiB more than" in str(no.value)
    with pytest.raises(DoesNotFit, match=r"--max-context, now 4000 tokens"):
        fits(max_context=4000, cache_bytes=0)


def test_fp32_weights_that_cannot_fit_name_the_smaller_format() -> None:
    with pytest.raises(DoesNotFit, match=r"--weights int8 or --weights q4") as no:
        fits(weights=FP32, weights_format="fp32")
    assert "weights 540" in str(no.value)  # the message shows where the memory goes
    with pytest.raises(DoesNotFit, match=r"smaller weights \(--weights q4\)"):
        fits(weights=FP32, weights_format="int8")
    with pytest.raises(DoesNotFit) as no:
        fits(weights=FP32, weights_format="q4")
    assert "--weights" not in str(no.value)  # nothing smaller to offer


def test_too_little_room_for_a_cache_means_none_not_a_crumb() -> None:
    room = 3 * MIN_AUTO_CACHE // 2  # half for the context, less than MIN_AUTO_CACHE left
    p = fits(runtime=int(LIMIT / (1 + SLACK_SHARE)) - INT8 - TOKENIZER - room)
    assert p.cache_bytes == 0 and p.max_context == room // 2 // PER_TOKEN and p.footprint.total <= LIMIT


# SmolLM2-135M's MLP: 30 layers, hidden 576, intermediate 1,536: 24 groups of 64 a layer, 720 in all.
SMOL = dict(layers=30, hidden=576, intermediate=1536, group_size=64, probe_groups=6)
WORKER_RUNTIME = 239 * MiB  # a worker-only node's measured runtime (results/2026-12-07/halo-worker-memory.json)


def test_a_worker_only_node_holds_what_its_memory_leaves_not_the_whole_mlp() -> None:
    """Issue 16: the old check budgeted the whole MLP in float32 (597 MiB for SmolLM2) and refused
    a Pi Zero's 400 MiB, although a third of the groups peaked at 301 MiB there."""
    from mesh.footprint import mlp_bytes, plan_worker, worker_group_bytes

    group = worker_group_bytes(576, 64)
    assert group == 3 * 576 * 64 * 4 and 720 * group == mlp_bytes(30, 576, 1536)
    fit = plan_worker(LIMIT, "cgroup v1", WORKER_RUNTIME, **SMOL)
    assert fit.total_groups == 720 and fit.min_groups == 30 and fit.group_bytes == group
    assert fit.transient == 576 * 1536 * 4 + 6 * group  # one projection dequantised whole + the probe's groups
    assert 240 <= fit.capacity < 720  # at least the third that ran under the cap, not all of it
    room = int(LIMIT / (1 + SLACK_SHARE)) - WORKER_RUNTIME - fit.transient
    assert fit.capacity == room // group  # as many as fit, not one more
    assert fit.footprint.total <= LIMIT < fit.footprint.total + int((1 + SLACK_SHARE) * group) + 1
    assert f"capacity {fit.capacity} of 720 neuron groups" in fit.describe()
    # with room for everything, everything
    big = plan_worker(1536 * MiB, "cgroup v1", WORKER_RUNTIME, **SMOL)
    assert big.capacity == 720 and big.footprint.weights == big.transient + 720 * group


def test_a_worker_that_cannot_hold_one_group_per_layer_refuses_in_one_line_naming_the_flag() -> None:
    from mesh.footprint import plan_worker

    with pytest.raises(DoesNotFit) as no:
        plan_worker(100 * MiB, "cgroup v1", WORKER_RUNTIME, **SMOL)
    message = str(no.value)
    assert "\n" not in message and "100 MiB (cgroup v1)" in message and "--model" in message
    assert "can hold 0 of the model's 720 neuron groups" in message and "fewer than one per layer (30)" in message
    # the edge: 30 groups (one a layer) start, 29 do not
    from mesh.footprint import worker_group_bytes

    group, transient = worker_group_bytes(576, 64), 576 * 1536 * 4 + 6 * worker_group_bytes(576, 64)
    edge = int((WORKER_RUNTIME + transient + 30 * group) * (1 + SLACK_SHARE)) + 2
    assert plan_worker(edge, "board", WORKER_RUNTIME, **SMOL).capacity == 30
    with pytest.raises(DoesNotFit, match="can hold 29 "):
        plan_worker(edge - group, "board", WORKER_RUNTIME, **SMOL)
