"""`mesh setup --gguf`: a user's GGUF of a third architecture (a tiny random-weight Qwen2 with
attention biases, an untied LM head and a byte-level BPE vocabulary, written here with the
``gguf`` package) becomes a registered model that ``mesh.model.load_model`` runs in every weight
format with the logits of transformers' Qwen2 on the same (dequantised) weights; broken files,
other architectures and bad names are refused with a clear message and leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mesh.errors import ConfigError
from mesh.model import load_model, model_spec
from mesh.user_models import read_registry
from mesh.weights.formats import (KEEP_8BIT, dequantize_groups, dequantize_groups8, dequantize_rows, quantize_groups,
                                  quantize_groups8, quantize_rows)
from nodes.setup_gguf import setup_gguf
from tests.conftest import ENV, REPO

H, HEADS, KV, FF, LAYERS, HEAD_DIM = 64, 4, 2, 128, 2, 16
# The byte-level vocabulary: the 256 byte characters, then merges, then one control token.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "s"), ("Ġs", "at")]
EOS_TEXT = "<|endoftext|>"


def _vocabulary() -> tuple[list[str], list[int], list[str]]:
    from mesh.text.bpe import BYTE_CHAR

    tokens = [BYTE_CHAR[b] for b in range(256)] + [a + b for a, b in MERGES] + [EOS_TEXT]
    types = [1] * (len(tokens) - 1) + [3]  # NORMAL..., CONTROL
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


VOCAB = len(_vocabulary()[0])


def write_qwen2(path: Path, seed: int = 0, pre: str = "default") -> dict[str, tuple[np.ndarray, str]]:
    """A 2-layer Qwen2 GGUF with random weights in several GGUF types; returns each tensor's
    dequantised float32 value and type name, by GGUF name (the reference's weights)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    tokens, types, merges = _vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    values: dict[str, tuple[np.ndarray, str]] = {}

    def add(name: str, shape: tuple[int, ...], qtype: T, scale: float = 0.2) -> None:
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, data)
            values[name] = (data, "F32")
        elif qtype == T.F16:
            w.add_tensor(name, data.astype(np.float16))
            values[name] = (data.astype(np.float16).astype(np.float32), "F16")
        else:
            raw = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            values[name] = (gguf.quants.dequantize(raw, qtype).reshape(shape), qtype.name)

    add("token_embd.weight", (VOCAB, H), T.Q8_0, 1.0)
    add("output_norm.weight", (H,), T.F32, 1.0)
    add("output.weight", (VOCAB, H), T.F16)
    kinds = [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_1, T.F32]
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (H,), T.F32, 1.0)
        add(f"blk.{i}.ffn_norm.weight", (H,), T.F32, 1.0)
        for j, (name, shape) in enumerate([("attn_q", (HEADS * HEAD_DIM, H)), ("attn_k", (KV * HEAD_DIM, H)),
                                           ("attn_v", (KV * HEAD_DIM, H)), ("attn_output", (H, HEADS * HEAD_DIM)),
                                           ("ffn_gate", (FF, H)), ("ffn_up", (FF, H)), ("ffn_down", (H, FF))]):
            add(f"blk.{i}.{name}.weight", shape, kinds[(i + j) % len(kinds)])
        for name, rows in (("attn_q", HEADS * HEAD_DIM), ("attn_k", KV * HEAD_DIM), ("attn_v", KV * HEAD_DIM)):
            add(f"blk.{i}.{name}.bias", (rows,), T.F32, 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def _hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> transformers' Qwen2 name (written out here, independent of the converter)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, i, part, kind = gguf_name.split(".")
    module = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[part]
    return f"model.layers.{i}.{module}.{kind}"


def _as_stored(w: np.ndarray, qtype: str, fmt: str) -> torch.Tensor:
    """What format ``fmt`` makes of a weight: the plain torch reference of mesh.weights.formats."""
    t = torch.from_numpy(w.copy())
    if t.dim() != 2 or fmt == "fp32":
        return t
    if fmt == "int8":
        return dequantize_rows(*quantize_rows(t))
    return dequantize_groups8(*quantize_groups8(t)) if qtype in KEEP_8BIT else dequantize_groups(*quantize_groups(t))


def _reference_logits(values: dict[str, tuple[np.ndarray, str]], fmt: str, ids: list[int]) -> torch.Tensor:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-6,
                         rope_theta=1e6, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    state = {_hf_name(n): _as_stored(v, q, fmt) for n, (v, q) in values.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _leftovers(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_a_tiny_qwen2_gguf_runs_in_every_format_like_transformers(tmp_path: Path) -> None:
    from mesh.cache.keys import ModelKey
    from mesh.cache.node_cache import _tokenizer_id

    src = tmp_path / "tiny-qwen2.gguf"
    values = write_qwen2(src)
    home = tmp_path / "home"
    done = setup_gguf(home, src, "tiny-qwen", weights=("fp32", "int8", "q4"))
    out = home / "models" / "tiny-qwen"
    assert done["tiny-qwen"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "mesh-meta.json", "model.safetensors", "tokenizer.mesh",
        "weights-int8.safetensors", "weights-q4.safetensors"]
    assert [p.name for p in (home / "models").iterdir()] == ["tiny-qwen"]  # no temporary left
    spec = model_spec("tiny-qwen", home)
    assert (spec.family, spec.packaged, spec.gguf_path) == ("llama", False, str(src.resolve()))
    assert read_registry(home)["tiny-qwen"].architecture == "qwen2"

    keys = {}
    for fmt, atol in (("fp32", 1e-4), ("int8", 2e-3), ("q4", 2e-3)):
        loaded = load_model(home, "tiny-qwen", weights=fmt, kv_dtype="float32")  # float16 KV: not the reference's arithmetic
        tok = loaded.tokenizer
        ids = tok(" the cat sat")["input_ids"]
        assert ids == [256 + 2, 256 + 5, 256 + 7]  # the GGUF's merges, applied
        assert tok.decode(ids) == " the cat sat"
        assert VOCAB - 1 in loaded.eos_ids  # <|endoftext|> from the GGUF metadata
        ids = ids + [5, 77, 200, 256]
        got = loaded.model.forward(ids, loaded.model.new_cache(), logits_to_keep=len(ids))
        ref = _reference_logits(values, fmt, ids)
        assert got.shape == ref.shape == (len(ids), VOCAB)
        assert torch.allclose(got, ref, atol=atol, rtol=1e-4), (fmt, (got - ref).abs().max())
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), fmt
        keys[fmt] = ModelKey(model_digest=loaded.digest, tokenizer=_tokenizer_id(loaded)).digest()
        assert loaded.model_key.endswith(f"/{fmt}") and loaded.model_key.startswith("tiny-qwen@")
    assert len(set(keys.values())) == 3  # nodes running different formats never share KV

    # The key names the weights, not the name: the same file under another name shares KV with
    # it; another file (other random weights) does not.
    setup_gguf(home, src, "same-file", weights=("int8",))
    other = tmp_path / "other.gguf"
    write_qwen2(other, seed=1)
    setup_gguf(home, other, "other-file", weights=("int8",))
    for name, same in (("same-file", True), ("other-file", False)):
        loaded = load_model(home, name, weights="int8")
        key = ModelKey(model_digest=loaded.digest, tokenizer=_tokenizer_id(loaded)).digest()
        assert (key == keys["int8"]) is same, name
    assert sorted(read_registry(home)) == ["other-file", "same-file", "tiny-qwen"]


def test_a_rerun_keeps_built_formats_and_adds_new_ones(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_qwen2(src)
    home = tmp_path / "home"
    setup_gguf(home, src, "tiny", weights=("int8",))
    int8 = home / "models" / "tiny" / "weights-int8.safetensors"
    inode = int8.stat().st_ino
    setup_gguf(home, src, "tiny", weights=("q4",))
    assert int8.stat().st_ino == inode  # kept (linked into the new directory), not rebuilt
    assert (home / "models" / "tiny" / "weights-q4.safetensors").exists()
    assert not (home / "models" / "tiny" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match=r"no fp32 weights .*run `mesh setup`"):
        load_model(home, "tiny", weights="fp32")
    # `mesh setup --models tiny` goes back to the registered file, and refuses it once it changed
    write_qwen2(src, seed=5)
    with pytest.raises(ConfigError, match=r"tiny.gguf has changed since tiny was registered .* --name tiny"):
        setup_gguf(home, src, "tiny", weights=("q4",), expect_sha256=model_spec("tiny", home).gguf_sha256)
    assert int8.stat().st_ino == inode and not [p for p in (home / "models").iterdir() if p.name.startswith(".")]


def _gguf_of(tmp_path: Path, arch: str) -> Path:
    import gguf

    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _truncated(tmp_path: Path) -> Path:
    src = tmp_path / "whole.gguf"
    write_qwen2(src)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:-4096])
    return cut


def _bad_magic(tmp_path: Path) -> Path:
    src = tmp_path / "whole.gguf"
    write_qwen2(src)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + src.read_bytes()[4:])
    return bad


def _short_header(tmp_path: Path) -> Path:
    src = tmp_path / "whole.gguf"
    write_qwen2(src)
    short = tmp_path / "short.gguf"
    short.write_bytes(src.read_bytes()[:100])
    return short


def _qwen2_tokenizer(tmp_path: Path) -> Path:
    src = tmp_path / "qwen2-split.gguf"
    write_qwen2(src, pre="qwen2")  # real Qwen2 files: a split the mesh's tokenizer does not reproduce
    return src


@pytest.mark.parametrize("make, name, message", [
    (lambda p: _gguf_of(p, "mamba"), "m", r"architecture 'mamba' is not supported; supported: gemma3, llama, qwen2"),
    (lambda p: _gguf_of(p, "bert"), "b", r"architecture 'bert' is not supported; supported: gemma3, llama, qwen2"),
    (_truncated, "t", r"cut.gguf is truncated or damaged \(.*\); download it again"),
    (_bad_magic, "x", r"bad.gguf is not a GGUF file \(it starts with b'GGML'"),
    (_short_header, "s", r"short.gguf is truncated or damaged \(.*\); download it again"),
    (_qwen2_tokenizer, "q", r"tokenizer pre-split 'qwen2' is not supported"),
    (lambda p: _gguf_of(p, "llama"), "smollm2-135m", r"'smollm2-135m' is a packaged model's; pick another with --name"),
    (lambda p: _gguf_of(p, "llama"), "../escape", r"model name '\.\./escape' is not allowed"),
    (lambda p: _gguf_of(p, "llama"), ".hidden", r"model name '\.hidden' is not allowed"),
    (lambda p: _gguf_of(p, "llama"), "My Model", r"model name 'My Model' is not allowed"),
])
def test_refusals_are_clear_and_leave_nothing(tmp_path: Path, make, name: str, message: str) -> None:  # noqa: ANN001
    src = make(tmp_path)
    home = tmp_path / "home"
    with pytest.raises(ConfigError, match=message):
        setup_gguf(home, src, name, weights=("int8",))
    assert _leftovers(home) == [] if home.exists() else True
    assert read_registry(home) == {}


def test_the_cli_refuses_a_truncated_file_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    cut = _truncated(tmp_path)
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "nodes.cli", "setup", "--home", str(home), "--gguf", str(cut),
                           "--name", "mine"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mesh setup: ") and "cut.gguf is truncated" in lines[0]
    assert not home.exists() or _leftovers(home) == []


def test_unknown_model_names_the_user_models_and_how_to_add_one(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_qwen2(src)
    setup_gguf(tmp_path, src, "tiny", weights=("int8",))
    with pytest.raises(ConfigError, match=r"unknown model 'nope'; known: gemma3-270m, smollm2-135m, tiny .*--gguf"):
        model_spec("nope", tmp_path)
    registry = json.loads((tmp_path / "user-models.json").read_text())
    assert registry["version"] == 1 and list(registry["models"]) == ["tiny"]
