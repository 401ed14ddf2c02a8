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


def test_a_worker_only_node_budgets_runtime_and_the_whole_mlp_in_float32() -> None:
    from mesh.footprint import mlp_bytes, plan_worker

    mlp = mlp_bytes(30, 576, 1536)  # SmolLM2-135M: 30 layers of gate, up and down, float32
    assert mlp == 3 * 30 * 576 * 1536 * 4
    fp = plan_worker(1536 * MiB, "cgroup v1", RUNTIME, mlp)
    assert (fp.weights, fp.tokenizer, fp.context, fp.cache) == (mlp, 0, 0, 0)
    assert fp.total == RUNTIME + mlp + int(SLACK_SHARE * (RUNTIME + mlp))
    with pytest.raises(DoesNotFit, match="whole MLP in float32") as e:
        plan_worker(LIMIT, "cgroup v1", 250 * MiB, mlp)
    assert "400 MiB (cgroup v1)" in str(e.value)
