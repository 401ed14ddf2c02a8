"""nodes.bench.floor: what a node must keep resident to decode, part by part, measured in a fresh
process on the real model (SmolLM2 q4: every token reads every weight)."""

from __future__ import annotations

from nodes.bench.floor import floor_row, measure, upper_bound
from tests.conftest import CACHE_ROOT, require_model

MiB = 1 << 20
PARTS = {"model": "m", "weights": "q4", "tokens": 8, "anon": 100 * MiB, "libraries_hot": 20 * MiB,
         "weights_hot": 90 * MiB, "tokenizer_hot": 1 * MiB, "context_per_token": 30_000, "runtime_anon": 90 * MiB,
         "runtime_file": 100 * MiB, "libraries_rss": 110 * MiB, "weights_file": 92 * MiB, "tokenizer_file": 2 * MiB,
         "kv_per_token": 23_040, "major_faults_per_token": 0.0, "decode_tps": 10.0}


def test_a_floor_row_adds_the_parts_and_says_what_the_cap_leaves() -> None:
    assert upper_bound(PARTS, 0) == 211 * MiB and upper_bound(PARTS, 256) == 211 * MiB + 256 * 30_000
    row = floor_row(PARTS, 400, 256)
    must = (100 + 90) * MiB + 256 * 30_000  # anonymous, every weight, the context: nothing the kernel can drop
    assert row["anon_weights_context_mib"] == round(must / MiB, 1) and row["left_mib"] == round(400 - must / MiB, 1)
    assert row["upper_bound_mib"] == round(upper_bound(PARTS, 256) / MiB, 1) and row["libraries_hot_mib"] == 20.0
    assert floor_row({"model": "m", "weights": "q4", "error": ["no file"]}, 400, 256)["started"] is False


def test_a_node_decoding_smollm2_q4_touches_all_its_weights() -> None:
    require_model("smollm2-135m")
    parts = measure(CACHE_ROOT, "smollm2-135m", "q4", tokens=8)
    print({k: (round(v / MiB, 1) if isinstance(v, int) and v > MiB else v) for k, v in parts.items()})
    assert "error" not in parts, parts
    assert parts["kv_per_token"] == 30 * 2 * 3 * 64 * 2  # float16 K and V, every layer
    assert parts["weights_hot"] >= 0.9 * parts["weights_file"]  # every token reads every weight
    assert parts["runtime_file"] > 30 * MiB and parts["libraries_rss"] >= parts["libraries_hot"]
    assert parts["tokenizer_hot"] <= parts["tokenizer_file"]
    assert parts["anon"] >= parts["runtime_anon"] > 50 * MiB
