"""`mesh bench cache`'s question groups and summary (the measured runs are in results/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodes.bench.cache import groups
from nodes.bench.cache_report import CASES, summarize
from nodes.settings import mesh_home
from nodes.setup import mmlu_dir


@pytest.fixture(scope="module")
def data() -> Path:
    path = mmlu_dir(mesh_home(None))
    if not (path / "marketing" / "test.arrow").exists():
        pytest.fail(f"MMLU data missing at {path}: run `make setup`")
    return path


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("shots", [1, 5])
def test_each_case_seed_shares_exactly_its_part_of_the_prompt(data: Path, shots: int) -> None:
    items = groups(data, 60, shots, seed=3)
    assert len({g.subject for g in items[:57]}) == 57  # every subject before any repeats
    for g in items:
        header = g.prompts["full"].split("\n\n", 1)[0] + "\n\n"
        examples_end = g.prompts["full"].rindex("\n\n") + 2  # header and the answered examples
        assert g.seeds["full"] == g.prompts["full"]
        # instruction: the header, then the first example differs (some subjects' questions share a stem)
        first_answer = g.prompts["instruction"].index("Answer: ")
        assert len(header) <= _common(g.seeds["instruction"], g.prompts["instruction"]) < first_answer
        # examples: header and every example, not the question
        shared = _common(g.seeds["examples"], g.prompts["examples"])
        assert examples_end <= shared < len(g.prompts["examples"])
        assert g.prompts["examples"][:examples_end].count("Answer: ") == shots
        assert len(set(g.prompts.values())) == 3  # three different questions, one per case


def _row(case: str, group: int, ttft: float, ttlt: float, ids: list[int], decision: str | None = None,
         wasted: str | None = None) -> dict[str, Any]:
    phases = {"mesh": 0.01, "mesh_ttft": 0.01, "tokenize": 0.001, "catalog": 0.0, "fetch": 0.0, "prefill": ttft,
              "decode": ttlt - ttft}
    cache = None if decision is None else {"decision": decision, "local_tokens": 0, "remote_tokens": 32,
                                           "wasted": wasted}
    return {"case": case, "group": group, "ttft_s": ttft, "ttlt_s": ttlt, "phases": phases, "token_ids": ids,
            "cache": cache, "prompt_tokens": 100}


def test_summary_pairs_each_case_with_its_own_miss() -> None:
    rows = []
    for g in range(4):
        for case in CASES:
            rows.append(_row(f"{case}-miss", g, 10.0, 20.0, [g, 1]))
        rows.append(_row("instruction", g, 9.0, 19.0, [g, 1], "recompute"))
        rows.append(_row("examples", g, 5.0, 15.0, [g, 1], "remote"))
        rows.append(_row("full", g, 0.5, 10.0 if g else 30.0, [g, 1] if g < 3 else [g, 2], "remote",
                         wasted="short" if g == 0 else None))
    s = summarize(rows)
    assert s["questions"] == 4 and s["cases"]["miss"]["n"] == 12
    assert s["ttft_reduction_full_hit"] == 95.0
    assert s["ttlt_reduction_full_hit"] == 50.0  # median of 50, 50, 50 and -50
    assert s["cases"]["full"]["paired_ttlt_minus_miss"]["cache_slower"] == 1
    assert s["cases"]["examples"]["ttft_reduction_median_pct"] == 50.0
    assert s["cases"]["full"]["identical"] == 3 and s["identical_outputs"] is False
    assert s["lookups"] == 12 and s["wasted_fetches"] == 1 and s["fetches"] == 8
    assert s["cases"]["instruction"]["decisions"]["recompute"] == 4
