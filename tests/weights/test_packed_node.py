"""Which node holds the packed decode copy (nodes.memory.decode_copy_fits), and what it answers with.

A node packs a quantised file only on x86 with the 4-bit kernel, and only when its memory limit
holds the copy beside the context and cache it planned;
with the copy its greedy answers stay those of the same weights (the copy changes only the
rounding of a generated token's row, so a clear-margin prompt keeps its tokens)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mesh import sysmem
from mesh.config import NodeConfig
from mesh.model import Decoder, converted_dir, load_model
from mesh.weights import packed
from mesh.weights.formats import weights_file
from mesh.weights.load import holds_gguf_weights
from nodes.memory import PACKED_MIN_CONTEXT, decode_copy_fits, fit_for_packed_copy, fit_node

HOME = Path.home() / ".cache" / "mesh"
GIB = 1 << 30
NODE_RUNTIME = 240 << 20  # `mesh node`'s RSS after its imports, before weights (232 MiB measured)


def _have(model: str, fmt: str) -> bool:
    return weights_file(converted_dir(HOME, model), fmt).exists()


def _limit(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    """A node under ``nbytes`` whose runtime (what it holds before its weights) is a fresh node's:
    the plan measures its own process, and a long test session's grows past 900 MiB (CI)."""
    monkeypatch.setattr(sysmem, "memory_limit", lambda *a, **k: sysmem.MemoryLimit(nbytes, "cgroup v1", 24 * GIB))
    fresh = dataclasses.replace(sysmem.process_memory(), rss_bytes=NODE_RUNTIME)
    monkeypatch.setattr(sysmem, "process_memory", lambda *a, **k: fresh)


def test_the_header_says_which_q4_file_is_its_gguf() -> None:
    if not (_have("smollm2-135m", "q4") and _have("gemma3-270m", "q4")):
        pytest.skip("run `mesh setup` first")
    assert holds_gguf_weights(weights_file(converted_dir(HOME, "smollm2-135m"), "q4"))  # Q4_1 and Q8_0 only
    assert not holds_gguf_weights(weights_file(converted_dir(HOME, "gemma3-270m"), "q4"))  # Q5_0, Q6_K re-quantised
    assert not holds_gguf_weights(weights_file(converted_dir(HOME, "smollm2-135m"), "int8"))
    assert not holds_gguf_weights(weights_file(converted_dir(HOME, "smollm2-135m"), "fp32"))


@pytest.mark.skipif(not packed.available(), reason="the 4-bit kernel is vectorised on x86 only")
def test_a_node_packs_only_a_requantised_file_with_room_for_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (_have("smollm2-135m", "q4") and _have("gemma3-270m", "q4")):
        pytest.skip("run `mesh setup` first")
    _limit(monkeypatch, 3 * GIB)  # a pi5-sized node: room for the copy
    gemma = fit_node(NodeConfig(name="pi1", model="gemma3-270m", home=HOME), "q4", False)
    assert decode_copy_fits(gemma, "q4") and decode_copy_fits(gemma, "int8")
    assert not decode_copy_fits(gemma, "fp32")
    smol = fit_node(NodeConfig(name="pi1", model="smollm2-135m", home=HOME), "q4", False)
    assert decode_copy_fits(smol, "q4") and decode_copy_fits(smol, "int8")
    # a tighter limit: the node's cache takes what is left, so the copy would cost the cache its room
    _limit(monkeypatch, 1 * GIB)
    tight = fit_node(NodeConfig(name="pi1", model="gemma3-270m", home=HOME), "q4", False)
    assert tight.cache.enabled and not decode_copy_fits(tight, "q4")
    monkeypatch.setattr(packed, "available", lambda: False)  # aarch64: the mapped kernels
    assert not decode_copy_fits(gemma, "q4")


@pytest.mark.skipif(not packed.available(), reason="the 4-bit kernel is vectorised on x86 only")
def test_a_chosen_context_gives_way_to_the_packed_copy_but_not_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """pi4-2gb (1.5 GiB): Gemma-3 q4 decoded at 0.11x llama.cpp unpacked (bench memory, 2026-12-08),
    its ~11k-position context and 256 MiB cache leaving no room for the copy. The context the node
    chose shrinks for it, never below PACKED_MIN_CONTEXT, never one the user gave; the cache stays."""
    import dataclasses

    if not _have("gemma3-270m", "q4"):
        pytest.skip("run `mesh setup` first")
    _limit(monkeypatch, 1536 << 20)
    chosen = NodeConfig(name="pi1", model="gemma3-270m", home=HOME)
    fitted = fit_node(chosen, "q4", False)
    assert not decode_copy_fits(fitted, "q4")  # as measured on the profile
    shorter = fit_for_packed_copy(chosen, fitted, "q4")
    assert shorter is not None and decode_copy_fits(shorter, "q4")
    assert PACKED_MIN_CONTEXT <= shorter.limits.max_context < fitted.limits.max_context
    assert shorter.cache == fitted.cache and shorter.cache.enabled
    given = dataclasses.replace(chosen, limits=dataclasses.replace(chosen.limits, max_context=fitted.limits.max_context))
    assert fit_for_packed_copy(given, fit_node(given, "q4", False), "q4") is None  # the user's context stays
    _limit(monkeypatch, 1 * GIB)  # no room for the copy unless the cache gave way: it does not
    tight = fit_node(chosen, "q4", False)
    assert tight.cache.enabled and fit_for_packed_copy(chosen, tight, "q4") is None


@pytest.mark.skipif(not packed.available(), reason="the 4-bit kernel is vectorised on x86 only")
def test_packed_greedy_answers_are_the_mapped_ones() -> None:
    """Each step's argmax (teacher-forced on the mapped kernels' tokens) is the mapped one wherever
    the mapped logits do not tie within the packed kernel's rounding: its output is bfloat16, one
    step of which is 0.125 at Gemma's logits of 16-32 (this prompt's sixth token is won by 0.034:
    the old layout of the copy rounded the two to equal, the current one to 0.125 apart)."""
    if not _have("gemma3-270m", "int8"):
        pytest.skip("run `mesh setup` first")
    loaded = load_model(HOME, "gemma3-270m", 2, weights="int8", verify=False)
    dec = Decoder(loaded)
    ids = dec.encode("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is")
    mapped = dec.generate(ids, max_new_tokens=8)
    assert len(mapped.token_ids) == 8

    def steps() -> list:  # noqa: ANN202
        logits, cache = dec.prefill(ids)
        out = [logits]
        for t in mapped.token_ids[:-1]:
            out.append(dec.next_logits(t, cache))
        return out

    reference = steps()
    assert packed.pack_model(loaded.model) > 100 << 20  # the tied head alone is 160 MiB of codes
    fast = steps()[1:]  # the first is the prefill's: the mapped kernels, packed or not
    clear = 0
    for ref, got in zip(reference[1:], fast):
        top = ref.topk(2)
        if float(top.values[0] - top.values[1]) >= 0.25:  # two bfloat16 steps
            clear += 1
            assert int(got.argmax()) == int(top.indices[0])
    assert clear >= 5
