"""Per-ask work bounds (mesh.budget) and the guard that stops abandoned work (mesh.askers)."""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

import pytest

from mesh import budget, topics
from mesh.askers import AskGuard, Cancelled

# SmolLM2-135M's shape (its config.json)
SMOLLM2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                          intermediate_size=1536, max_position_embeddings=8192)


def test_a_token_costs_its_kv_in_every_layer_and_one_layer_of_activations() -> None:
    kv = 30 * 2 * 3 * 64 * 4  # fp32 K and V, 3 KV heads of 64
    assert budget.kv_bytes_per_token(SMOLLM2) == kv
    assert budget.bytes_per_token(SMOLLM2) == kv + (12 * 576 + 6 * 1536) * 4  # one pass: activations per token


def test_a_nodes_context_costs_its_float16_kv_and_a_prefill_bounded_by_its_chunk() -> None:
    half = SimpleNamespace(**{**vars(SMOLLM2), "kv_dtype": "float16"})
    kv = 30 * 2 * 3 * 64 * 2
    assert budget.kv_bytes_per_token(half) == kv
    # the KV with its buffer's growth, and as a key: the last chunk's scores and its float32 K and V per query head
    assert budget.context_bytes_per_token(half) == kv * 5 // 4 + (budget.PREFILL_CHUNK * 9 + 2 * 9 * 64) * 4
    # the prefill's activations do not grow with the prompt: one chunk's, and the dequantisation block
    assert budget.prefill_bytes(half) == budget.PREFILL_CHUNK * (12 * 576 + 6 * 1536) * 4 + budget.PREFILL_SCRATCH


def test_the_default_context_is_the_models_unless_memory_is_short() -> None:
    per = budget.bytes_per_token(SMOLLM2)
    assert budget.default_max_context(SMOLLM2, 64 << 30) == 8192  # a big machine: the model's positions
    assert budget.default_max_context(SMOLLM2, 512 << 20) == (512 << 20) // 4 // per  # a Pi Zero 2 W
    assert budget.default_max_context(SMOLLM2, 1 << 20) == budget.MIN_CONTEXT


def test_prompt_and_answer_must_fit_the_context() -> None:
    assert budget.context_problem(200, 56, 256) is None
    assert budget.context_problem(200, 57, 256) == budget.TOO_LONG
    assert budget.context_problem(32_001, 1, 8192) == budget.TOO_LONG  # 32,000 digits: 32,000 tokens


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, True, "10", budget.MAX_DEADLINE_S + 1])
def test_a_bad_deadline_is_named(value: object) -> None:
    assert budget.deadline_problem({"deadline_s": value}) == budget.BAD_DEADLINE


def test_a_deadline_is_relative_to_the_receivers_clock() -> None:
    assert budget.deadline_problem({}) is None and budget.deadline_problem({"deadline_s": 2.5}) is None
    assert budget.deadline_at(100.0, {"deadline_s": 2.5}, 300.0) == 102.5
    assert budget.deadline_at(100.0, {}, 300.0) == 400.0  # none given: the node's default
    assert budget.deadline_at(100.0, {"deadline_s": -4}, 300.0) == 400.0


def test_the_guard_stops_work_past_its_deadline_or_for_an_asker_gone() -> None:
    stop = threading.Event()
    guard = AskGuard(stop, "node n1", ignore=("json-client",))
    far = time.monotonic() + 60
    guard.checkpoint(far, "cli-a")  # nothing to stop
    with pytest.raises(budget.Abandoned) as late:
        guard.checkpoint(time.monotonic() - 0.001, "cli-a")
    assert late.value.reason == budget.DEADLINE
    guard.on_asker_status(topics.asker_status("cli-a"), topics.OFFLINE, False)
    guard.on_asker_status(topics.asker_status("json-client"), topics.OFFLINE, False)  # no asker of its own
    assert guard.must_stop(far, "cli-a") and not guard.must_stop(far, "json-client")
    with pytest.raises(budget.Abandoned) as gone:
        guard.checkpoint(far, "cli-a")
    assert gone.value.reason == budget.ASKER_GONE
    guard.on_asker_status(topics.asker_status("cli-a"), topics.ONLINE, False)  # reconnected
    assert not guard.must_stop(far, "cli-a")
    stop.set()
    with pytest.raises(Cancelled):
        guard.checkpoint(far, "cli-a")


def test_max_context_comes_from_the_flag_the_environment_or_the_model() -> None:
    import argparse

    from nodes.settings import node_config

    args = argparse.Namespace(name="n1", max_context=512)
    assert node_config(args, env={}).limits.max_context == 512
    assert node_config(argparse.Namespace(name="n1"), env={"MESH_MAX_CONTEXT": "300"}).limits.max_context == 300
    assert node_config(argparse.Namespace(name="n1"), env={}).limits.max_context == 0  # 0: mesh.budget's default
