"""llama.cpp as `mesh bench memory`'s reference (nodes.bench.llama_ref), where llama-cpp-python is
installed (the optional extra `reference`; skipped elsewhere, CI included)."""

from __future__ import annotations

import sys

import pytest

from nodes.bench.llama_ref import LlamaReference, available


def test_available_does_not_load_llama_cpp() -> None:
    available()
    assert "llama_cpp" not in sys.modules  # a bench without the reference never loads its library


@pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed (extra `reference`)")
def test_the_reference_answers_greedy_asks_on_the_models_own_gguf() -> None:
    from nodes.bench.memory import reference_gguf
    from tests.conftest import CACHE_ROOT, require_model

    require_model("smollm2-135m")
    gguf = reference_gguf("smollm2-135m", CACHE_ROOT)
    with LlamaReference(gguf, threads=1, tokens=6) as ref:
        assert ref.started["ready"] and ref.started["version"]
        short, long = ref.ask("The capital of France is"), ref.ask("The capital of France is " * 20)
        assert short["new_tokens"] == 6 and long["prompt_tokens"] > 3 * short["prompt_tokens"]
        for f in (short, long):
            assert f["decode_tps"] > 0 and f["prefill_tps"] > 0 and f["rss_peak_mib"] >= f["vmrss_mib"] > 50
    assert ref.proc.returncode == 0  # an empty line ends it
