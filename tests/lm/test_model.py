"""The node's own forward (mesh.lm) against transformers' model classes on the real models, and
its cache: the same logits (bitwise on one thread: the same operations in the same order), the
same greedy tokens, past a Gemma-3 sliding window, through a prompt cache restored from chunks,
and a node process that never imports transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mesh.cache import kv
from mesh.lm.cache import KVCache, KVLayer
from mesh.lm.config import LmConfig
from mesh.lm.model import CausalLM
from mesh.model import Decoder, LoadedModel, load_model
from tests.conftest import CACHE_ROOT, ENV, REPO, require_model

PROMPT = ("The following are multiple choice questions (with answers) about geography.\n\n"
          "What is the capital city of France?\nA. Lyon\nB. Paris\nC. Nice\nD. Lille\nAnswer:")
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
# A Gemma-3 local layer sees 512 positions: this prompt is longer, so the window matters.
LONG = " ".join(f"Item {i} of the inventory is a {('red', 'green', 'blue')[i % 3]} box." for i in range(70))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: bitwise comparisons need one thread


def _pair(key: str, weights: str) -> tuple[LoadedModel, LoadedModel]:
    require_model(key)
    return (load_model(CACHE_ROOT, key, weights=weights, kv_dtype="float32"),  # transformers' caches are float32
            load_model(CACHE_ROOT, key, weights=weights, engine="hf"))


@pytest.fixture(scope="module")
def smol() -> tuple[LoadedModel, LoadedModel]:
    return _pair("smollm2-135m", "fp32")


@pytest.fixture(scope="module")
def gemma() -> tuple[LoadedModel, LoadedModel]:
    return _pair("gemma3-270m", "int8")


@pytest.fixture(scope="module")
def smol16() -> tuple[LoadedModel, None]:
    require_model("smollm2-135m")
    return load_model(CACHE_ROOT, "smollm2-135m", weights="q4"), None  # a node's default: float16 KV


def test_a_node_keeps_its_kv_in_float16_and_answers_as_with_float32(
        smol16: tuple[LoadedModel, None], smol: tuple[LoadedModel, LoadedModel]) -> None:
    node = smol16[0]
    assert node.model.config.kv_dtype == "float16"
    exact = load_model(CACHE_ROOT, "smollm2-135m", weights="q4", kv_dtype="float32")
    ids = node.tokenizer(LONG + " " + PROMPT)["input_ids"]  # several prefill chunks
    a, cache = Decoder(node).prefill(ids)
    b, _ = Decoder(exact).prefill(ids)
    assert all(layer.keys.dtype == torch.float16 for layer in cache.layers)
    assert int(a.argmax()) == int(b.argmax()) and torch.allclose(a, b, atol=0.05, rtol=0)
    for text in (STORY, PROMPT):
        t = node.tokenizer(text)["input_ids"]
        assert Decoder(node).generate(t, 12).token_ids == Decoder(exact).generate(t, 12).token_ids


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_the_forward_is_transformers_arithmetic(which: str, request: pytest.FixtureRequest) -> None:
    ours, ref = request.getfixturevalue(which)
    assert isinstance(ours.model, CausalLM) and isinstance(ours.model.config, LmConfig)
    assert ours.model_key == ref.model_key and ours.eos_ids == ref.eos_ids
    ids = ours.tokenizer(PROMPT)["input_ids"]
    mine, theirs = Decoder(ours), Decoder(ref)
    a, _ = mine.prefill(ids)
    b, _ = theirs.prefill(ids)
    assert torch.equal(a, b)
    ids = ours.tokenizer(STORY)["input_ids"]
    ga, gb = mine.generate(ids, 12), theirs.generate(ids, 12)
    assert ga.token_ids == gb.token_ids and len(ga.token_ids) > 0


def test_past_the_sliding_window_prefill_and_decode_match(gemma: tuple[LoadedModel, LoadedModel]) -> None:
    ours, ref = gemma
    ids = ours.tokenizer(LONG)["input_ids"]
    window = ours.model.config.sliding_window
    assert window is not None and len(ids) > window + 20
    mine, theirs = Decoder(ours), Decoder(ref)
    a, cache = mine.prefill(ids)
    b, _ = theirs.prefill(ids)
    assert torch.allclose(a, b, atol=1e-4, rtol=0) and int(a.argmax()) == int(b.argmax())
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert sliding and all(layer.held == window - 1 for layer in sliding)  # only the window kept
    assert all(layer.held == len(ids) for layer in cache.layers if not layer.is_sliding)
    assert mine.generate(ids, 10).token_ids == theirs.generate(ids, 10).token_ids


@pytest.mark.parametrize("which", ["smol", "gemma", "smol16"])
def test_a_restored_prompt_cache_continues_as_a_recompute(which: str, request: pytest.FixtureRequest) -> None:
    """Chunks cut from a recording prefill, restored and continued with the suffix, give the
    full prefill's logits and greedy tokens (the prompt cache's promise)."""
    ours, _ = request.getfixturevalue(which)
    model, dec = ours.model, Decoder(ours)
    ids = ours.tokenizer(LONG + " " + PROMPT)["input_ids"]
    chunk, n = 32, 0
    source = kv.capture_cache(model.config)
    model.forward(ids, source)
    n = (len(ids) - 40) // chunk
    chunks = kv.cut_chunks(source, 0, n, chunk)
    kv.end_capture(source)
    full, _ = dec.prefill(ids)
    restored = kv.restore_cache(model.config, chunks)
    assert isinstance(restored, KVCache) and restored.get_seq_length() == n * chunk
    part, cache = dec.prefill(ids, restored, start=n * chunk)
    assert torch.allclose(full, part, atol=1e-4, rtol=0)
    want = dec.generate(ids, 8).token_ids
    got = dec.generate(ids, 8, prepare=lambda: dec.prefill(ids, kv.restore_cache(model.config, chunks),
                                                         start=n * chunk)).token_ids
    assert got == want


def test_a_layer_grows_in_place_and_a_sliding_one_keeps_its_window() -> None:
    full, sliding = KVLayer(), KVLayer(sliding_window=8)
    states = torch.arange(2 * 100 * 3, dtype=torch.float32).view(1, 2, 100, 3)
    for at in range(0, 100, 7):  # prefill-sized and one-position updates alike
        part = states[:, :, at:at + 7]
        k, _ = full.update(part, part)
        assert torch.equal(k, states[:, :, :at + part.shape[2]])
        k, _ = sliding.update(part, part)
        seen = at + part.shape[2]
        assert torch.equal(k, states[:, :, max(0, at - 7):seen])  # the window before, plus the new
        assert sliding.held == min(7, seen) and sliding.get_seq_length() == seen
        assert torch.equal(sliding.keys, states[:, :, seen - sliding.held:seen])
    assert full.nbytes() <= 2 * states.numel() * 4 * 1.25 + 2 * 64 * 2 * 3 * 4  # slack of a quarter, not double
    rec = KVLayer(sliding_window=8)
    rec.activate_past_recording()
    rec.update(states[:, :, :30], states[:, :, :30])
    assert rec.held == 30
    rec.crop(0)
    assert rec.held == 7 and rec.first_position() == 23


def test_a_node_process_never_imports_transformers() -> None:
    """Nor torch's compiler stack (dynamo, inductor, sympy: ~800 modules, 71 MiB resident), which
    nn.Embedding's own initialisation on the meta device pulled in."""
    require_model("smollm2-135m")
    code = (
        "import sys\n"
        "from mesh.model import Decoder, load_model\n"
        "from tests.conftest import CACHE_ROOT\n"
        "for w in ('fp32', 'int8', 'q4'):\n"
        "    loaded = load_model(CACHE_ROOT, 'smollm2-135m', weights=w)\n"
        "    ids = loaded.tokenizer('The capital of France is')['input_ids']\n"
        "    assert Decoder(loaded).generate(ids, 4).token_ids\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'tokenizers', 'sympy')\n"
        "             or m.startswith(('torch._dynamo', 'torch._inductor'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
