"""The real models on int8 weights (built by `mesh setup`): memory-mapped with no float32 copy,
the same greedy answer as fp32 on a clear prompt, cache hits token-identical to a recompute
under the same weights, a KV identity apart from fp32's, and `mesh node --weights` refusals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mesh.cache.node_cache import NodeCache
from mesh.config import CacheConfig
from mesh.model import Decoder, LoadedModel, load_model
from mesh.weights.formats import weights_file
from mesh.weights.modules import Int8Embedding, Int8Linear
from tests.conftest import CACHE_ROOT, ENV, REPO, mesh_argv, require_model
from tests.weights.kit import mapped_ranges

PROMPT = "The capital of France is"
HEADER = ("The following are multiple choice questions (with answers) about high school geography.\n\n"
          "Which one of the following items is an example of nonmaterial culture?\n"
          "A. Dove soap\nB. Dove candy bar\nC. Dove symbol\nD. A dove (bird).\nAnswer: C\n\n")
Q1 = HEADER + "What is the capital city of France?\nA. Lyon\nB. Paris\nC. Nice\nD. Lille\nAnswer:"
Q2 = HEADER + "Which river flows through Paris?\nA. Seine\nB. Rhine\nC. Thames\nD. Danube\nAnswer:"


def _int8(key: str) -> LoadedModel:
    path = require_model(key)
    if not weights_file(path, "int8").exists():
        pytest.fail(f"{key} has no int8 weights under {path}: run `mesh setup --weights int8`")
    return load_model(CACHE_ROOT, key, weights="int8")


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return _int8("smollm2-135m")


def test_int8_weights_are_views_of_the_mapped_file_with_no_float_matrix(smol: LoadedModel) -> None:
    model = smol.model
    assert not [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert not [n for n, b in model.named_buffers() if b.dim() >= 2 and b.dtype == torch.float32]
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 30 * 7 + 1  # every projection of every layer, and the LM head
    embed = model.get_input_embeddings()
    assert isinstance(embed, Int8Embedding) and model.lm_head.qweight.data_ptr() == embed.qweight.data_ptr()
    ranges = mapped_ranges(weights_file(require_model("smollm2-135m"), "int8"))
    assert ranges, "the weight file is not memory-mapped"
    for m in [*linears, embed]:
        lo = m.qweight.data_ptr()
        assert any(a <= lo and lo + m.qweight.numel() <= b for a, b in ranges)


def test_int8_answers_a_clear_prompt_like_fp32_with_its_own_model_key(smol: LoadedModel) -> None:
    fp32 = load_model(CACHE_ROOT, "smollm2-135m")
    ids = Decoder(smol).encode(PROMPT)
    a, b = Decoder(smol).generate(ids, 6), Decoder(fp32).generate(ids, 6)
    assert a.token_ids == b.token_ids and a.text.startswith(" Paris")
    assert smol.model_key.endswith("/int8") and fp32.model_key.endswith("/fp32")
    assert smol.digest == f"{fp32.digest}+int8"
    ka, kb = (NodeCache(x, CacheConfig(), Decoder(x)).digest for x in (smol, fp32))
    assert ka != kb  # the prompt cache's model key: an int8 node never takes an fp32 node's KV


def test_int8_cache_hits_answer_like_a_recompute(smol: LoadedModel) -> None:
    dec = Decoder(smol)
    a = NodeCache(smol, CacheConfig(kv_wire="fp32"), dec)
    first = a.prepare_local(dec.encode(Q1))
    again = a.prepare_local(dec.encode(Q1))
    assert again.info["full_hit"] is True and torch.equal(again.logits, first.logits)
    part = a.prepare_local(dec.encode(Q2))
    assert part.info["decision"] == "local" and part.info["local_tokens"] >= 64
    fresh = NodeCache(smol, CacheConfig(kv_wire="fp32"), dec).prepare_local(dec.encode(Q2))
    assert fresh.info["decision"] == "no-match"
    assert torch.allclose(part.logits, fresh.logits, atol=1e-3)
    cached = dec.generate(dec.encode(Q2), 12, prepare=lambda: (part.logits, part.cache))
    plain = dec.generate(dec.encode(Q2), 12)
    assert cached.token_ids == plain.token_ids


def test_gemma_int8_answers_a_clear_prompt_like_fp32() -> None:
    loaded = _int8("gemma3-270m")
    assert isinstance(loaded.model.get_input_embeddings(), Int8Embedding)
    dec = Decoder(loaded)
    got = dec.generate(dec.encode(PROMPT), 8)
    # fp32's greedy answer (results/2026-12-06/weights_quality.json compares whole sets)
    assert got.text.startswith(" the capital of the country of France")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A MESH_HOME holding SmolLM2's config and tokenizer and a truncated int8 weight file."""
    src = require_model("smollm2-135m")
    dst = tmp_path / "models" / "smollm2-135m"
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix in (".json", ".jinja"):
            shutil.copy(p, dst / p.name)
    with weights_file(src, "int8").open("rb") as f:
        (dst / "weights-int8.safetensors").write_bytes(f.read(4 << 20))
    return tmp_path


def _node(home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = mesh_argv("node", "--name", "w1", "--model", "smollm2-135m", "--home", str(home),
                     "--broker", "127.0.0.1:9", *extra)
    return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_node_refuses_bad_weights_with_the_fix_and_no_traceback(home: Path) -> None:
    r = _node(home, "--weights", "int8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "truncated or damaged" in r.stderr and "mesh setup --weights int8" in r.stderr
    r = _node(home, "--weights", "int4")
    assert r.returncode == 2 and "unknown weight format 'int4'" in r.stderr and "Traceback" not in r.stderr
    r = _node(home, "--weights", "int8", "--roles", "worker")
    assert r.returncode == 2 and "--weights fp32" in r.stderr and "Traceback" not in r.stderr
    (home / "models" / "smollm2-135m" / "weights-int8.safetensors").unlink()
    r = _node(home, "--weights", "int8")
    assert r.returncode == 2 and "no int8 weights" in r.stderr and "mesh setup --weights int8" in r.stderr
